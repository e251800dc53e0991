"""Triton kernels of vllm-quantspec, importable as ``vllm_quantspec.kernels``.

Each kernel module pairs a small ``@triton.jit`` function with its launcher; its pure-torch
twin lives in ``vllm_quantspec.hierarchical_kv`` / ``vllm_quantspec.reference_attention``.
"""

import os


def interpreting() -> bool:
    """Triton's CPU interpreter (TRITON_INTERPRET=1) runs the kernels: inline PTX cannot run there, so a
    kernel swaps it for its Triton-ops twin."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
