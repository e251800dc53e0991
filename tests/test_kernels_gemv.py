"""Triton W4A16 GEMV vs its torch twin (x @ draft_weights.dequantize(w4).T).

CPU: TRITON_INTERPRET=1 at small shapes. GPU (`pytest -m gpu`): the compiled kernel at the 8B draft's
linear shapes.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels import triton.jit

from heavy_tails import student_t2  # noqa: E402

from vllm_quantspec.draft_weights import dequantize, quantize_w4  # noqa: E402
from vllm_quantspec.kernels.w4a16_gemv import MAX_M, w4a16_gemv  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _weights(n: int, k: int, group: int, dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    w4 = quantize_w4(student_t2((n, k), gen) * 0.02, group, scale_dtype=dtype)
    return w4, dequantize(w4), gen


def _gemv(x, w4, bias=None, **tile):
    return w4a16_gemv(x.to(DEVICE), w4.weight_packed.to(DEVICE), w4.weight_scale.to(DEVICE), w4.group_size,
                      None if bias is None else bias.to(DEVICE), **tile).cpu()


def _check_columns(n: int, k: int, group: int, dtype: torch.dtype, columns: list[int], **tile) -> None:
    """One-hot rows of x pick out weight columns: each output is q * scale, computed exactly by the
    kernel (offset trick included) and rounded once to `dtype`, so it must equal the twin bit for bit.
    A nibble read from the wrong position, word, group or row fails here."""
    w4, w, _ = _weights(n, k, group, dtype, seed=n + k + group)
    for i in range(0, len(columns), MAX_M):
        cols = columns[i:i + MAX_M]
        x = torch.zeros(len(cols), k, dtype=dtype)
        x[torch.arange(len(cols)), cols] = 1
        assert torch.equal(_gemv(x, w4, **tile), w[:, cols].T.to(dtype)), cols


def _check_random(m: int, n: int, k: int, group: int, dtype: torch.dtype, bias: bool, **tile) -> None:
    """Heavy-tailed activations. The fp32 sums carry offsets up to 264 x a product (the kernel's
    docstring): an fp32 output agrees with the twin to about 2e-5 (measured), a 16-bit one within
    its rounding (under one spacing each: Triton's interpreter truncates to bfloat16)."""
    w4, w, gen = _weights(n, k, group, dtype, seed=m + n + k)
    x = student_t2((m, k), gen).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    ref = x.float() @ w.T + (b.float() if bias else 0)
    err = (_gemv(x, w4, b, **tile).float() - ref).norm() / ref.norm()
    spacing = 0.0 if dtype == torch.float32 else torch.finfo(dtype).eps
    assert err < 5e-5 + spacing, float(err)


@pytest.mark.parametrize("group,block_g", [(128, 2), (64, 4), (32, 1)])
def test_gemv_reads_every_column(group, block_g):
    # 40 rows: five 8-row programs; K = 512: 2-16 steps; columns of every nibble, word, group and step
    k = 512
    cols = sorted({0, 1, 7, 8, 15, 63, 64, 100, group - 1, group, group + 9, k - 8, k - 2, k - 1})
    _check_columns(40, k, group, torch.float32, cols, block_g=block_g)


@pytest.mark.parametrize("m,dtype,bias", [(1, torch.float32, False), (3, torch.float32, True), (4, torch.float32, False),
                                          (2, torch.bfloat16, True), (4, torch.float16, False)])
def test_gemv_matches_torch(m, dtype, bias):
    # N = 36: the last program's rows are partly masked; K = 896 = 7 groups: the last step partly masked
    _check_random(m, 36, 896, 128, dtype, bias, block_g=4)


@pytest.mark.gpu
@pytest.mark.parametrize("k,n", [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)])
def test_gemv_matches_torch_gpu(k, n):
    """The 8B draft's linears (qkv, o, gate_up, down) with the default tiles, M = 1..4, bf16."""
    for m in range(1, MAX_M + 1):
        _check_random(m, n, k, 128, torch.bfloat16, bias=False)
    _check_columns(n, k, 128, torch.bfloat16, [0, 1, 7, 8, 127, 128, 1000, k - 1])
