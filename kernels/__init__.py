"""Triton kernels of vllm-quantspec, importable as ``vllm_quantspec.kernels``.

Each kernel module pairs a small ``@triton.jit`` function with its launcher; its pure-torch
twin lives in ``vllm_quantspec.hierarchical_kv`` / ``vllm_quantspec.reference_attention``.
"""
