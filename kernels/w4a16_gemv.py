"""W4A16 GEMV: the draft's int4 linears at decode (M = batch size <= MAX_M rows), on CUDA cores.

Why our own: at M <= 4 a decode linear is a stream of int4 weights, and vLLM's tensor-core W4A16
kernels (Marlin, Machete), tiled for M >= 16, reach 15-40% of the H200's bandwidth there
(benchmarks/results/kernels-h200). An earlier GEMV (gemv-tune-h200, commit 7044ede) was slower
still: each thread had one 4-byte word in flight per loop step, too few bytes to cover HBM latency.
Here every thread loads BLOCK_N rows x 4 consecutive words (16-byte loads) per step and reuses each
activation across those rows; a program covers all of K for its rows, so there is no split-K
workspace and no second launch.

Weights are the draft's own format (``vllm_quantspec.draft_weights``: compressed-tensors uint4b8,
int32 [N, K/8], input column 8w + j at bits 4j..4j+3 of word w, scales [N, K/g]), read as they are;
the torch twin is ``draft_weights.dequantize``.

Dequantizing without an int->float conversion (a shift per two weights, then an AND-OR and an FMA
per weight): shifting a word left by 15 - 4j puts nibble j at bits 15..18 and nibble j+1 at bits
19..22. A code c (= q + 8) OR-ed into the mantissa of 1.0 at bit s is the float f = 1 + c * 2^(s-23),
so f * (x * 2^(23-s)) = x * 2^(23-s) + c * x. A scale group's sum of those, less the offset
sum_k x_k * (2^(23-s_k) + 8), is sum_k q_k * x_k, which is then scaled once. The offset is at most
2^8 times a product, so the fp32 sums keep about 16 bits of each.
"""

import torch
import triton
import triton.language as tl

MAX_M = 4  # beyond this a tensor-core kernel (vLLM's) does the M FMAs per weight better

_LO, _HI = 0x00078000, 0x00780000  # nibble masks at bits 15..18 and 19..22
_ONE = 0x3F800000  # 1.0f


@triton.jit
def _w4a16_gemv_kernel(x_ptr, sx_m, w_ptr, sw_n, s_ptr, ss_n, bias_ptr, out_ptr, so_m, M, N, n_groups,
                       G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr,
                       HAS_BIAS: tl.constexpr):
    """out[m, n] = sum_k x[m, k] * q[n, k] * s[n, k // G] (+ bias[n]) for rows [BLOCK_N) of this
    program, BLOCK_G scale groups (G / 8 words each) a step."""
    WPG: tl.constexpr = G // 8  # words per scale group
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    m = tl.arange(0, BLOCK_M)
    gi = tl.arange(0, BLOCK_G)
    wi = tl.arange(0, WPG)
    w_rows = w_ptr + n.to(tl.int64)[:, None, None] * sw_n + wi[None, None, :]  # [BN, 1, WPG]
    s_rows = s_ptr + n.to(tl.int64)[:, None] * ss_n  # [BN, 1]
    x_cols = x_ptr + m[:, None, None] * sx_m + wi[None, None, :] * 8  # [BM, 1, WPG]: column 8w of a group
    acc = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_G], tl.float32)
    for g0 in range(0, n_groups, BLOCK_G):
        g = g0 + gi
        g_ok = g < n_groups
        words = tl.load(w_rows + (g * WPG)[None, :, None], mask=n_ok[:, None, None] & g_ok[None, :, None], other=0)
        scale = tl.load(s_rows + g[None, :], mask=n_ok[:, None] & g_ok[None, :], other=0.0).to(tl.float32)
        x_grp = x_cols + (g * G)[None, :, None]  # [BM, BG, WPG]
        x_ok = (m < M)[:, None, None] & g_ok[None, :, None]
        dot = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_G, WPG], tl.float32)
        offset = tl.zeros([BLOCK_M, BLOCK_G, WPG], tl.float32)
        for p in tl.static_range(4):  # nibbles 2p (at bits 15..18 after the shift) and 2p + 1 (19..22)
            if 15 - 8 * p > 0:
                bits = words << (15 - 8 * p)
            else:
                bits = words >> (8 * p - 15)  # arithmetic: the sign fills bits the masks drop
            f_lo = ((bits & _LO) | _ONE).to(tl.float32, bitcast=True)  # 1 + c / 256
            f_hi = ((bits & _HI) | _ONE).to(tl.float32, bitcast=True)  # 1 + c / 16
            x_lo = tl.load(x_grp + 2 * p, mask=x_ok, other=0.0).to(tl.float32)
            x_hi = tl.load(x_grp + 2 * p + 1, mask=x_ok, other=0.0).to(tl.float32)
            dot += f_lo[None] * (x_lo * 256.0)[:, None] + f_hi[None] * (x_hi * 16.0)[:, None]
            offset += x_lo * 264.0 + x_hi * 24.0
        acc += scale[None] * (tl.sum(dot, axis=3) - tl.sum(offset, axis=2)[:, None, :])
    res = tl.sum(acc, axis=2)  # [BM, BN]
    if HAS_BIAS:
        res += tl.load(bias_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + m[:, None] * so_m + n[None, :], res.to(out_ptr.dtype.element_ty),
             mask=(m < M)[:, None] & n_ok[None, :])


def default_tile(m: int, n_groups: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_G, num_warps): 8 rows x up to 32 groups (16 KB of int4 at g=128) for 4 warps,
    a step that divides K where a power of two can; fewer rows per thread as M grows."""
    block_g = 32
    while block_g > 1 and n_groups % block_g:
        block_g //= 2
    return (8 if m == 1 else 4), block_g, 4


def w4a16_gemv(x: torch.Tensor, weight_packed: torch.Tensor, weight_scale: torch.Tensor, group_size: int,
               bias: torch.Tensor | None = None, *, block_n: int | None = None, block_g: int | None = None,
               num_warps: int | None = None, num_stages: int = 1) -> torch.Tensor:
    """x [M, K] (M <= MAX_M) @ W.T with W = dequantize(weight_packed, weight_scale) [N, K] -> [M, N] in x's dtype."""
    M, K = x.shape
    N = weight_packed.shape[0]
    assert 1 <= M <= MAX_M, f"w4a16_gemv takes 1..{MAX_M} rows, got {M}"
    assert weight_packed.shape == (N, K // 8) and weight_packed.dtype == torch.int32, weight_packed.shape
    assert weight_scale.shape == (N, K // group_size), weight_scale.shape
    assert group_size % 8 == 0 and (group_size & (group_size - 1)) == 0, group_size
    x = x if x.stride(1) == 1 else x.contiguous()
    n_groups = K // group_size
    tile = default_tile(M, n_groups)
    block_n = block_n or tile[0]
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    _w4a16_gemv_kernel[(triton.cdiv(N, block_n),)](
        x, x.stride(0), weight_packed, weight_packed.stride(0), weight_scale, weight_scale.stride(0),
        bias if bias is not None else out, out, out.stride(0), M, N, n_groups,
        G=group_size, BLOCK_M=triton.next_power_of_2(M), BLOCK_N=block_n, BLOCK_G=block_g or tile[1],
        HAS_BIAS=bias is not None, num_warps=num_warps or tile[2], num_stages=num_stages)
    return out
