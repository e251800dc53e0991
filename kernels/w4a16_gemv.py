"""W4A16 GEMV for the draft's linear layers at small M (decode: M = batch size).

The weights are the draft's own format (``vllm_quantspec.draft_weights``: compressed-tensors uint4b8,
int32 [N, K/8] with 8 consecutive input columns per word, scales [N, K/g]), read as they are: no
repacking, and the torch twin is ``draft_weights.dequantize``.

Why not a tensor-core kernel: at M <= 8 a decode linear is a stream of int4 weights, and vLLM's
Machete/Marlin tiles (built for M >= 16) reach 12-43% of the bandwidth there (kernels-h200). Here each
program owns BLOCK_N output rows over all of K (no split-K: no workspace, no second launch) and
accumulates elementwise in fp32 registers; the only cross-thread reduction is one per output, after
the loop. A code becomes a float without an int->float conversion: (nibble | 0x4B000000) is the fp32
number 2**23 + nibble, and subtracting 2**23 + 8 leaves the signed weight q = nibble - 8 exactly.
"""

import functools

import torch
import triton
import triton.language as tl

MAX_M = 8  # beyond this the FMAs per weight byte make a tensor-core kernel the better choice


@triton.jit
def _w4a16_gemv_kernel(x_ptr, sx_m, w_ptr, sw_n, s_ptr, ss_n, bias_ptr, out_ptr, so_m, M, N, words_per_split,
                       G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
                       HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr):
    """Rows [BLOCK_N) of out[m, n] = sum_k x[m, k] * q[n, k] * s[n, k // G] (+ bias[n]) over this
    split's words (8 input columns each), BLOCK_W words a step. PARTIAL: write the split's fp32 sum
    to out[split] (the reduce kernel adds the splits and the bias). The launcher guarantees that a
    split is a whole number of steps and a step lies inside one scale group (G % (8 * BLOCK_W) == 0)."""
    WPG: tl.constexpr = G // 8  # words per scale group
    split = tl.program_id(1)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    w_row = w_ptr + n.to(tl.int64)[:, None] * sw_n
    s_row = s_ptr + n.to(tl.int64) * ss_n
    wi = tl.arange(0, BLOCK_W)
    m = tl.arange(0, BLOCK_M)
    x_ok = (m < M)[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_W], tl.float32)
    w_lo = split * words_per_split
    for w0 in range(w_lo, w_lo + words_per_split, BLOCK_W):
        kw = w0 + wi
        words = tl.load(w_row + kw[None, :], mask=n_ok[:, None], other=0)  # [BN, BW]
        sc = tl.load(s_row + w0 // WPG, mask=n_ok, other=0.0).to(tl.float32)  # one group per step
        x_col = x_ptr + m[:, None] * sx_m + 8 * kw[None, :]
        # sum_j x_j * (128 + nibble_j) - 136 * sum_j x_j = sum_j x_j * (nibble_j - 8): the nibble sits
        # at bits 16..19 of 0x43000000 (128.0, whose mantissa step there is 1), one AND-OR away
        part = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_W], tl.float32)
        xsum = tl.zeros([BLOCK_M, BLOCK_W], tl.float32)
        for j in tl.static_range(8):
            if j < 4:
                bits = words << (16 - 4 * j)
            elif j == 4:
                bits = words
            else:
                bits = words >> (4 * j - 16)
            q = ((bits & 0x000F0000) | 0x43000000).to(tl.float32, bitcast=True)
            xj = tl.load(x_col + j, mask=x_ok, other=0.0).to(tl.float32)
            part += xj[:, None, :] * q[None, :, :]
            xsum += xj
        acc += (part - 136.0 * xsum[:, None, :]) * sc[None, :, None]
    res = tl.sum(acc, axis=2)
    o_ok = (m < M)[:, None] & n_ok[None, :]
    if PARTIAL:
        tl.store(out_ptr + split * M * so_m + m[:, None] * so_m + n[None, :], res, mask=o_ok)
    else:
        if HAS_BIAS:
            res += tl.load(bias_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + m[:, None] * so_m + n[None, :], res.to(out_ptr.dtype.element_ty), mask=o_ok)


@triton.jit
def _split_sum_kernel(part_ptr, bias_ptr, out_ptr, MN, N, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr,
                      BLOCK: tl.constexpr):
    """out = sum over splits of the fp32 partials [SPLIT, M, N] (+ bias), in out's dtype."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < MN
    res = tl.zeros([BLOCK], tl.float32)
    for s in tl.static_range(SPLIT):
        res += tl.load(part_ptr + s * MN + i, mask=ok, other=0.0)
    if HAS_BIAS:
        res += tl.load(bias_ptr + i % N, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + i, res.to(out_ptr.dtype.element_ty), mask=ok)


@functools.cache
def _num_sms() -> int:
    return torch.cuda.get_device_properties().multi_processor_count if torch.cuda.is_available() else 8


def _default_tile(m: int, n: int, k: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_N, BLOCK_W, num_warps, num_stages, split): a 64 x 16-word tile, and enough K splits for
    about 4 programs per SM. Measured on an H200 (benchmarks/tune_gemv.py)."""
    block_n = 64
    programs = triton.cdiv(n, block_n)
    split = 1
    while programs * split < 4 * _num_sms() and (k // 8) % (2 * split * 16) == 0 and k // 8 // (2 * split) >= 64:
        split *= 2
    return block_n, 16, 4, 3, split


def w4a16_gemv(x: torch.Tensor, weight_packed: torch.Tensor, weight_scale: torch.Tensor, group_size: int,
               bias: torch.Tensor | None = None, *, block_n: int | None = None, block_w: int | None = None,
               num_warps: int | None = None, num_stages: int | None = None, split: int | None = None) -> torch.Tensor:
    """x [M, K] (M <= MAX_M) @ W.T with W = dequantize(weight_packed, weight_scale) [N, K] -> [M, N] in x's dtype."""
    M, K = x.shape
    N = weight_packed.shape[0]
    assert 1 <= M <= MAX_M, f"w4a16_gemv takes 1..{MAX_M} rows, got {M}"
    assert weight_packed.shape == (N, K // 8) and weight_packed.dtype == torch.int32, weight_packed.shape
    assert weight_scale.shape == (N, K // group_size) and x.stride(1) == 1 == weight_packed.stride(1)
    tile = _default_tile(M, N, K)
    block_n = block_n or tile[0]
    block_w = min(block_w or tile[1], group_size // 8)  # a step stays inside one scale group
    split = split or tile[4]
    words = K // 8
    while words % (split * block_w):  # splits of whole steps
        split, block_w = (split // 2, block_w) if split > 1 else (1, block_w // 2)
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    part = torch.empty(split, M, N, dtype=torch.float32, device=x.device) if split > 1 else out
    _w4a16_gemv_kernel[(triton.cdiv(N, block_n), split)](
        x, x.stride(0), weight_packed, weight_packed.stride(0), weight_scale, weight_scale.stride(0),
        bias if bias is not None else out, part, N, M, N, words // split,
        G=group_size, BLOCK_M=triton.next_power_of_2(M), BLOCK_N=block_n, BLOCK_W=block_w,
        HAS_BIAS=bias is not None, PARTIAL=split > 1, num_warps=num_warps or tile[2],
        num_stages=num_stages or tile[3])
    if split > 1:
        _split_sum_kernel[(triton.cdiv(M * N, 1024),)](part, bias if bias is not None else out, out, M * N, N,
                                                       SPLIT=split, HAS_BIAS=bias is not None, BLOCK=1024)
    return out
