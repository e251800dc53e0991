"""Triton W4A16 GEMV vs the torch twin x @ dequantize(w4).T.

CPU: TRITON_INTERPRET=1 at small shapes. GPU (`pytest -m gpu`): the 8B draft's four linears, M = 1..8.

Tolerance, per output element: one bf16/fp16 ulp of the result (the output rounding: round to nearest
on the GPU, truncation in the interpreter, which stores 16-bit floats as integers) plus the fp32
accumulation bound K * 2**-24 * sum_k |x_k w_nk| (every product x * q is exact in fp32: 8 + 4
significant bits; the scale multiplies a partial sum, then the sums round once per step).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels import triton.jit

from vllm_quantspec.draft_weights import dequantize, quantize_w4  # noqa: E402
from vllm_quantspec.kernels.w4a16_gemv import MAX_M, w4a16_gemv  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _check(m, n, k, group, dtype, bias, outliers=False, **tile):
    gen = torch.Generator().manual_seed(m * 7919 + n + k)
    w = torch.randn(n, k, generator=gen) * 0.05
    x = torch.randn(m, k, generator=gen)
    if outliers:  # a few huge activation channels and weight columns, as in real LLMs
        x[:, torch.randperm(k, generator=gen)[:3]] *= 100
        w[:, torch.randperm(k, generator=gen)[:2]] *= 30
    w4 = quantize_w4(w.to(dtype), group)
    x = x.to(dtype).to(DEVICE)
    b = (torch.randn(n, generator=gen) * 0.5).to(dtype).to(DEVICE) if bias else None
    deq = dequantize(w4).to(DEVICE)
    ref = x.float() @ deq.T + (b.float() if bias else 0.0)
    out = w4a16_gemv(x, w4.weight_packed.to(DEVICE), w4.weight_scale.to(DEVICE), group, b, **tile)
    assert out.shape == (m, n) and out.dtype == dtype
    ulp = torch.finfo(dtype).eps * torch.exp2(torch.floor(torch.log2(ref.abs().clamp_min(1e-30))))
    bound = ulp + k * 2.0**-24 * ((x.float().abs() @ deq.abs().T) + (b.float().abs() if bias else 0.0))
    err = (out.float() - ref).abs()
    assert (err <= bound).all(), f"max err {err.max():.3g}, worst margin {(err - bound).max():.3g}"


@pytest.mark.parametrize("m", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gemv_matches_dequantized(m, dtype):
    _check(m, 40, 512, 128, dtype, bias=m % 2 == 1)  # N not a multiple of the tile; bias on odd M


@pytest.mark.parametrize("n,k,group,block_w,split", [(33, 256, 32, 8, 1), (64, 384, 64, 8, 3), (16, 1024, 128, 32, 4),
                                                      (40, 512, 128, 16, 8)])
def test_gemv_tiles_groups_and_splits(n, k, group, block_w, split):
    """Steps of one scale group (a wider tile is narrowed to the group), K cut into splits whose
    partial sums a second kernel adds (a split count that does not divide the steps is lowered)."""
    _check(4, n, k, group, torch.bfloat16, bias=split % 2 == 0, block_n=16, block_w=block_w, split=split)


def test_gemv_outliers():
    _check(2, 24, 256, 64, torch.bfloat16, bias=True, outliers=True)


def test_gemv_refuses_too_many_rows():
    w4 = quantize_w4(torch.randn(16, 128), 128)
    with pytest.raises(AssertionError, match="rows"):
        w4a16_gemv(torch.randn(MAX_M + 1, 128).to(DEVICE), w4.weight_packed.to(DEVICE),
                   w4.weight_scale.to(DEVICE), 128)


LINEARS_8B = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096)}  # (K, N)


@pytest.mark.gpu
@pytest.mark.parametrize("layer", list(LINEARS_8B))
@pytest.mark.parametrize("m", [1, 4, 8])
def test_gpu_gemv_8b_shapes(layer, m):
    k, n = LINEARS_8B[layer]
    _check(m, n, k, 128, torch.bfloat16, bias=layer == "qkv")
