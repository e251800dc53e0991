"""W4A16 GEMV: the draft's int4 linears at decode (one program per activation row), on CUDA cores.

Why our own: at batch 1 a decode linear is a stream of int4 weights, and vLLM's tensor-core W4A16
kernels (Marlin, Machete), tiled for M >= 16, reach 15-40% of the H200's bandwidth there
(benchmarks/results/kernels-h200). An earlier GEMV (gemv-tune-h200, commit 7044ede) was slower
still: each thread had one 4-byte word in flight per loop step. Measured (w4a16-gemv-h200): 77.4 µs
over the 8B layers at M=1 against Marlin's 91.6 in the same run, bf16's 153.1; slower than Marlin
from M=2 on, so the draft calls it for one-token steps only (draft_weights.GemvW4Linear). Here every
thread loads 16 bytes of each of BLOCK_N rows per step and reuses its activations across those rows;
a program covers all of K, so there is no split-K workspace and no second launch. Two kernels share
the step code: one program per row block (the default), and a persistent one (`programs`) whose
programs stride over row blocks and load their next step before computing this one (its speed is
not measured yet).

Weight layout (``repack``, from the draft's compressed-tensors words, whose torch twin is
``draft_weights.dequantize``): within each scale group of G columns (G/8 words), nibbles 2p and
2p + 1 of word w hold columns 2i and 2i + 1, i = p * G/8 + w. So the activations a thread needs for
nibble pair p of its words are consecutive 32-bit pairs: loaded like the words themselves (the same
layout, no exchange between threads).

Dequantizing without an int->float conversion (a shift per two weights, then an AND-OR and an FMA
per weight): shifting a word left by 15 - 8p puts nibble 2p at bits 15..18 and nibble 2p + 1 at bits
19..22. A code c (= q + 8) OR-ed into the mantissa of 1.0 at bit s is the float f = 1 + c * 2^(s-23),
so f * (x * 2^(23-s)) = x * 2^(23-s) + c * x. A scale group's sum of those, less the offset
sum_k x_k * (2^(23-s_k) + 8), is sum_k q_k * x_k, which is then scaled once. The offset is at most
2^8 times a product, so the fp32 sums keep about 16 bits of each.
"""

import torch
import triton
import triton.language as tl

_LO = tl.constexpr(0x00078000)  # a nibble at bits 15..18
_HI = tl.constexpr(0x00780000)  # at bits 19..22
# 1.0f's bits reach the kernel as an argument (one_bits), not a constant: with two immediates the
# compiler emits an AND and an OR per weight; with 1.0 in a register it fuses them into one LOP3
# (kernel-sass-sm90.txt: the step loop 1180 -> 925 instructions, LOP3 530 -> 274)
ONE_BITS = 0x3F800000


def repack(weight_packed: torch.Tensor, group_size: int) -> torch.Tensor:
    """compressed-tensors words (column 8w + j at nibble j of word w) -> the GEMV's layout (module
    docstring): int32 [N, K/8] again, the columns of each group permuted."""
    # imported here: the kernel itself runs without compressed-tensors (benchmarks/tune_gemv.py on a bare GPU)
    from vllm_quantspec.draft_weights import pack_int4, unpack_int4

    n, k = weight_packed.shape[0], weight_packed.shape[1] * 8
    q = unpack_int4(weight_packed, k).view(n, k // group_size, 4, group_size // 8, 2)  # [.., p, w, h]
    return pack_int4(q.permute(0, 1, 3, 2, 4).reshape(n, k))  # word w's nibbles in (p, h) order


@triton.jit
def _activation_pair(pair, X_BF16: tl.constexpr):
    """A 32-bit word holding two 16-bit activations -> (low, high) in fp32."""
    if X_BF16:  # a bfloat16 is the upper half of its fp32
        lo = (pair << 16).to(tl.float32, bitcast=True)
        hi = (pair & -65536).to(tl.float32, bitcast=True)
    else:
        lo = (pair & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        hi = (pair >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return lo, hi


@triton.jit
def _load_step(w_ptr, sw_n, s_ptr, ss_n, N, k_words, n0, w0, valid, G: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_W: tl.constexpr):
    """One step's words [BLOCK_N, BLOCK_W] and fp32 scales [BLOCK_N, BLOCK_W / (G/8)]: rows n0 + [BLOCK_N),
    words w0 + [BLOCK_W); all masked off where `valid` is false."""
    WPG: tl.constexpr = G // 8
    n = n0 + tl.arange(0, BLOCK_N)
    n_ok = (n < N) & valid
    kw = w0 + tl.arange(0, BLOCK_W)
    words = tl.load(w_ptr + n.to(tl.int64)[:, None] * sw_n + kw[None, :], mask=n_ok[:, None] & (kw < k_words)[None, :],
                    other=0)
    g = w0 // WPG + tl.arange(0, BLOCK_W // WPG)
    scale = tl.load(s_ptr + n.to(tl.int64)[:, None] * ss_n + g[None, :],
                    mask=n_ok[:, None] & (g < k_words // WPG)[None, :], other=0.0)
    return words, scale.to(tl.float32)


@triton.jit
def _step_dot(words, scale, x_step, k_ok, one_bits, G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
              X_BF16: tl.constexpr):
    """One step's contribution [BLOCK_N, groups] to sum_k x_k * q[n, k] * s[n, k // G], from its words and
    scales and the activation pairs at x_step (pair p = 0 of each word)."""
    WPG: tl.constexpr = G // 8  # words per scale group
    GROUPS: tl.constexpr = BLOCK_W // WPG
    dot = tl.zeros([BLOCK_N, BLOCK_W], tl.float32)
    offset = tl.zeros([BLOCK_W], tl.float32)
    for p in tl.static_range(4):  # nibbles 2p (at bits 15..18 after the shift) and 2p + 1 (19..22)
        if 15 - 8 * p > 0:
            bits = words << (15 - 8 * p)
        else:
            bits = words >> (8 * p - 15)  # arithmetic: the sign fills bits the masks drop
        f_lo = ((bits & _LO) | one_bits).to(tl.float32, bitcast=True)  # 1 + c / 256
        f_hi = ((bits & _HI) | one_bits).to(tl.float32, bitcast=True)  # 1 + c / 16
        x_lo, x_hi = _activation_pair(tl.load(x_step + p * WPG, mask=k_ok, other=0), X_BF16)
        dot += f_lo * (x_lo * 256.0)[None, :]  # two statements: each contracts to one FMA
        dot += f_hi * (x_hi * 16.0)[None, :]
        offset += x_lo * 264.0 + x_hi * 24.0
    group_dot = tl.sum(tl.reshape(dot, [BLOCK_N, GROUPS, WPG]), axis=2)
    group_offset = tl.sum(tl.reshape(offset, [GROUPS, WPG]), axis=1)
    return scale * (group_dot - group_offset[None, :])


@triton.jit
def _store_rows(acc, bias_ptr, out_ptr, n0, N, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr):
    n = n0 + tl.arange(0, BLOCK_N)
    res = tl.sum(acc, axis=1)
    if HAS_BIAS:
        res += tl.load(bias_ptr + n, mask=n < N, other=0.0).to(tl.float32)
    tl.store(out_ptr + n, res.to(out_ptr.dtype.element_ty), mask=n < N)


@triton.jit
def _w4a16_gemv_kernel(x_ptr, sx_m, w_ptr, sw_n, s_ptr, ss_n, bias_ptr, out_ptr, so_m, N, k_words, one_bits,
                       G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, X_BF16: tl.constexpr,
                       HAS_BIAS: tl.constexpr):
    """out[m, n] = sum_k x[m, k] * q[n, k] * s[n, k // G] (+ bias[n]) for activation row m =
    program_id(0) and rows [BLOCK_N) of program_id(1), BLOCK_W words (BLOCK_W / (G/8) groups) a step.
    x_ptr addresses the activations as 32-bit pairs (sx_m in pairs)."""
    WPG: tl.constexpr = G // 8
    m = tl.program_id(0)
    n0 = tl.program_id(1) * BLOCK_N
    kw = tl.arange(0, BLOCK_W)
    x_pairs = x_ptr + m * sx_m + (kw // WPG) * (4 * WPG) + kw % WPG  # pair p = 0 of each word
    acc = tl.zeros([BLOCK_N, BLOCK_W // WPG], tl.float32)
    for w0 in range(0, k_words, BLOCK_W):
        words, scale = _load_step(w_ptr, sw_n, s_ptr, ss_n, N, k_words, n0, w0, True, G, BLOCK_N, BLOCK_W)
        acc += _step_dot(words, scale, x_pairs + 4 * w0, w0 + kw < k_words, one_bits, G, BLOCK_N, BLOCK_W, X_BF16)
    _store_rows(acc, bias_ptr, out_ptr + m * so_m, n0, N, HAS_BIAS, BLOCK_N)


@triton.jit
def _w4a16_gemv_persistent_kernel(x_ptr, sx_m, w_ptr, sw_n, s_ptr, ss_n, bias_ptr, out_ptr, so_m, N, k_words,
                                  one_bits, G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
                                  X_BF16: tl.constexpr, HAS_BIAS: tl.constexpr):
    """The same product, program_id(1) striding over the row blocks (every num_programs(1)-th). Each
    iteration (one step of one row block) loads the next iteration's words and scales before its own
    arithmetic: a program keeps loads in flight while it computes, where in `_w4a16_gemv_kernel` a
    wave of programs loads, then computes, with no loads in flight meanwhile (a one-step program at
    K = 4096; the sm_90 compiler also issues the scale loads after the dequantization)."""
    WPG: tl.constexpr = G // 8
    m = tl.program_id(0)
    pid = tl.program_id(1)
    programs = tl.num_programs(1)
    total = tl.cdiv(tl.cdiv(N, BLOCK_N) - pid, programs) * tl.cdiv(k_words, BLOCK_W)  # this program's iterations
    kw = tl.arange(0, BLOCK_W)
    x_pairs = x_ptr + m * sx_m + (kw // WPG) * (4 * WPG) + kw % WPG
    n0 = pid * BLOCK_N
    w0 = 0
    words, scale = _load_step(w_ptr, sw_n, s_ptr, ss_n, N, k_words, n0, w0, total > 0, G, BLOCK_N, BLOCK_W)
    acc = tl.zeros([BLOCK_N, BLOCK_W // WPG], tl.float32)
    for it in range(total):
        last = w0 + BLOCK_W >= k_words  # the block's last step
        n1 = tl.where(last, n0 + programs * BLOCK_N, n0)
        w1 = tl.where(last, 0, w0 + BLOCK_W)
        next_words, next_scale = _load_step(w_ptr, sw_n, s_ptr, ss_n, N, k_words, n1, w1, it + 1 < total,
                                            G, BLOCK_N, BLOCK_W)
        # ptxas would sink those loads below the arithmetic (shorter live ranges); it does not move a
        # load across a barrier
        tl.debug_barrier()
        acc += _step_dot(words, scale, x_pairs + 4 * w0, w0 + kw < k_words, one_bits, G, BLOCK_N, BLOCK_W, X_BF16)
        if last:
            _store_rows(acc, bias_ptr, out_ptr + m * so_m, n0, N, HAS_BIAS, BLOCK_N)
            acc = tl.zeros([BLOCK_N, BLOCK_W // WPG], tl.float32)
        words, scale, n0, w0 = next_words, next_scale, n1, w1


# The default tile: the H200's best or within 5% of it at M=1 on the 8B draft's linears
# (benchmarks/results/w4a16-gemv-h200).
BLOCK_N, BLOCK_W, NUM_WARPS = 8, 512, 4


def step_tile(k_words: int, group_size: int, block_w: int = BLOCK_W, num_stages: int | None = None) -> tuple[int, int]:
    """(words a step, pipeline stages) of a launch over k_words words: at least one scale group, at most
    what K holds; a second stage prefetches the next step where there is one."""
    block_w = max(group_size // 8, min(block_w, triton.next_power_of_2(k_words)))
    return block_w, num_stages or (2 if k_words > block_w else 1)


def w4a16_gemv(x: torch.Tensor, weight_gemv: torch.Tensor, weight_scale: torch.Tensor, group_size: int,
               bias: torch.Tensor | None = None, *, block_n: int = BLOCK_N, block_w: int = BLOCK_W,
               num_warps: int = NUM_WARPS, num_stages: int | None = None, programs: int | None = None) -> torch.Tensor:
    """x [M, K] (bf16 / fp16) @ W.T -> [M, N] in x's dtype, W [N, K] = the dequantized weight whose
    words `repack` gave `weight_gemv`, scales [N, K / group_size]. With `programs`, that many programs per
    activation row (at most one per row block) run the persistent kernel with prefetch (not yet measured
    on a GPU: benchmarks/tune_gemv.py sweeps it; the default is one program per row block)."""
    M, K = x.shape
    N = weight_gemv.shape[0]
    assert x.dtype in (torch.bfloat16, torch.float16), x.dtype
    assert weight_gemv.shape == (N, K // 8) and weight_gemv.dtype == torch.int32, weight_gemv.shape
    assert weight_scale.shape == (N, K // group_size), weight_scale.shape
    assert group_size >= 16 and (group_size & (group_size - 1)) == 0, group_size
    pairs = x.contiguous().view(torch.int32)
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    k_words = K // 8
    block_w, num_stages = step_tile(k_words, group_size, block_w, num_stages)
    blocks = triton.cdiv(N, block_n)
    kernel = _w4a16_gemv_kernel if programs is None else _w4a16_gemv_persistent_kernel
    kernel[(M, blocks if programs is None else min(programs, blocks))](
        pairs, pairs.stride(0), weight_gemv, weight_gemv.stride(0), weight_scale, weight_scale.stride(0),
        bias if bias is not None else out, out, out.stride(0), N, k_words, ONE_BITS,
        G=group_size, BLOCK_N=block_n, BLOCK_W=block_w, X_BF16=x.dtype == torch.bfloat16,
        HAS_BIAS=bias is not None, num_warps=num_warps, num_stages=num_stages)
    return out
