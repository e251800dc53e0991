"""W4A16 GEMV: the draft's int4 linears at decode (one program per activation row), on CUDA cores.

Why our own: at batch 1 a decode linear is a stream of int4 weights, and vLLM's tensor-core W4A16
kernels (Marlin, Machete), tiled for M >= 16, reach 15-40% of the H200's bandwidth there
(benchmarks/results/kernels-h200). An earlier GEMV (gemv-tune-h200, commit 7044ede) was slower
still: each thread had one 4-byte word in flight per loop step. Measured (w4a16-gemv-h200): 77.4 µs
over the 8B layers at M=1 against Marlin's 91.6 in the same run, bf16's 153.1; slower than Marlin
from M=2 on, so the draft calls it for one-token steps only (draft_weights.GemvW4Linear). Here every
thread loads 16 bytes of each of BLOCK_N rows per step and reuses its activations across those rows;
a program covers all of K, so there is no split-K workspace and no second launch.

Two ways to do a step's arithmetic (`bf16x2`, each with its own weight layout from ``repack``):
- fp32 (the default): every product and sum in fp32 (exact up to fp32 rounding), about 3.6
  instructions a weight (kernel-sass-sm90.txt);
- bf16x2 (bf16 activations only): two weights an instruction in bf16 (inline PTX), about 2.9
  instructions a weight. Each product q * x is rounded to bf16 and each word's four products
  (eight weights, two columns at a time) are summed in bf16 before fp32 takes over: about 2^-8
  relative error per word's sum, where the int4 weights themselves are off by a few percent. On
  the H200 the fp32 GEMV issues about as many instructions as its bytes allow (3.9 a weight at copy
  bandwidth).

Weight layouts (``repack``, from the draft's compressed-tensors words, whose torch twin is
``draft_weights.dequantize``): within each scale group of G columns (G/8 words), columns 2i and
2i + 1, i = p * G/8 + w, sit in word w at nibbles 2p and 2p + 1 (fp32) or p and p + 4 (bf16x2: the
two halves of the word, as the two lanes of a bf16x2). Either way the activations a thread needs
for pair p of its words are consecutive 32-bit pairs: loaded like the words themselves (the same
layout, no exchange between threads).

Dequantizing without an int->float conversion (a shift per two weights, then an AND-OR and an FMA
per weight): shifting a word left by 15 - 8p puts nibble 2p at bits 15..18 and nibble 2p + 1 at bits
19..22. A code c (= q + 8) OR-ed into the mantissa of 1.0 at bit s is the float f = 1 + c * 2^(s-23),
so f * (x * 2^(23-s)) = x * 2^(23-s) + c * x. A scale group's sum of those, less the offset
sum_k x_k * (2^(23-s_k) + 8), is sum_k q_k * x_k, which is then scaled once. The offset is at most
2^8 times a product, so the fp32 sums keep about 16 bits of each. bf16x2: shifting a word right by
4p puts nibbles p and p + 4 at bits 0..3 of the two halves, OR-ed into 128.0's bits (0x4300) they
are the bf16 pair 128 + c, and subtracting 136 leaves q exactly (|q| <= 8 needs 4 of bf16's 8 bits).
"""

import torch
import triton
import triton.language as tl

from vllm_quantspec.kernels import interpreting

_LO = tl.constexpr(0x00078000)  # a nibble at bits 15..18
_HI = tl.constexpr(0x00780000)  # at bits 19..22
# 1.0f's bits reach the kernel as an argument (one_bits), not a constant: with two immediates the
# compiler emits an AND and an OR per weight; with 1.0 in a register it fuses them into one LOP3
# (kernel-sass-sm90.txt: the step loop 1180 -> 925 instructions, LOP3 530 -> 274)
ONE_BITS = 0x3F800000


def repack(weight_packed: torch.Tensor, group_size: int, bf16x2: bool = False) -> torch.Tensor:
    """compressed-tensors words (column 8w + j at nibble j of word w) -> the GEMV's layout for its fp32
    or bf16x2 arithmetic (module docstring): int32 [N, K/8] again, the columns of each group permuted."""
    # imported here: the kernel itself runs without compressed-tensors (benchmarks/tune_gemv.py on a bare GPU)
    from vllm_quantspec.draft_weights import pack_int4, unpack_int4

    n, k = weight_packed.shape[0], weight_packed.shape[1] * 8
    q = unpack_int4(weight_packed, k).view(n, k // group_size, 4, group_size // 8, 2)  # [.., p, w, h]
    # word w's nibbles in (p, h) order (fp32), (h, p) order (bf16x2)
    order = (0, 1, 3, 4, 2) if bf16x2 else (0, 1, 3, 2, 4)
    return pack_int4(q.permute(order).reshape(n, k))


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
def _load_step(w_ptr, sw_n, s_ptr, ss_n, N, k_words, n0, w0, G: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_W: tl.constexpr):
    """One step's words [BLOCK_N, BLOCK_W] and fp32 scales [BLOCK_N, BLOCK_W / (G/8)]: rows n0 + [BLOCK_N),
    words w0 + [BLOCK_W)."""
    WPG: tl.constexpr = G // 8
    n = n0 + tl.arange(0, BLOCK_N)
    n_ok = n < N
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


# One word's eight weights against its four activation pairs (x, bf16x2 each): for p = 0..3, the word
# shifted right by 4p, its nibbles p and p + 4 masked and OR-ed into 128.0 (lop3), minus 136 (q, exact),
# then q * x added to the word's sum (one bf16x2 FMA: two products); the two lanes of the sum added in fp32.
# $0: that fp32 sum; $1: the word; $2..$5: its pairs p = 0..3.
_ASM_WORD_BF16X2 = tl.constexpr("""{
.reg .b32 t, q, a, one, neg;
mov.b32 one, 0x3F803F80;
mov.b32 neg, 0xC308C308;
mov.b32 a, 0x80008000;
""" + "".join(("" if p == 0 else f"""shr.u32 t, $1, {4 * p};
""") + f"""lop3.b32 q, {'$1' if p == 0 else 't'}, 0x000f000f, 0x43004300, 0xea;
fma.rn.bf16x2 q, q, one, neg;
fma.rn.bf16x2 a, q, ${2 + p}, a;
""" for p in range(4)) + """shl.b32 t, a, 16;
and.b32 a, a, 0xffff0000;
add.f32 $0, t, a;
}""")


@triton.jit
def _bf16_round(v):
    return v.to(tl.bfloat16).to(tl.float32)


@triton.jit
def _step_dot_bf16x2(words, scale, x_step, k_ok, G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
                     USE_ASM: tl.constexpr):
    """`_step_dot` in bf16x2 arithmetic, from words in the bf16x2 layout: the inline PTX on a GPU, its
    twin in Triton ops (the same products and sums, each rounded to bf16) in the CPU interpreter."""
    WPG: tl.constexpr = G // 8
    GROUPS: tl.constexpr = BLOCK_W // WPG
    if USE_ASM:
        x0 = tl.broadcast_to(tl.load(x_step, mask=k_ok, other=0)[None, :], [BLOCK_N, BLOCK_W])
        x1 = tl.broadcast_to(tl.load(x_step + WPG, mask=k_ok, other=0)[None, :], [BLOCK_N, BLOCK_W])
        x2 = tl.broadcast_to(tl.load(x_step + 2 * WPG, mask=k_ok, other=0)[None, :], [BLOCK_N, BLOCK_W])
        x3 = tl.broadcast_to(tl.load(x_step + 3 * WPG, mask=k_ok, other=0)[None, :], [BLOCK_N, BLOCK_W])
        dot = tl.inline_asm_elementwise(_ASM_WORD_BF16X2, "=f,r,r,r,r,r", [words, x0, x1, x2, x3],
                                        dtype=tl.float32, is_pure=True, pack=1)
    else:
        lo = tl.zeros([BLOCK_N, BLOCK_W], tl.float32)
        hi = tl.zeros([BLOCK_N, BLOCK_W], tl.float32)
        for p in tl.static_range(4):
            x_lo, x_hi = _activation_pair(tl.load(x_step + p * WPG, mask=k_ok, other=0), True)
            lo = _bf16_round((((words >> (4 * p)) & 15) - 8).to(tl.float32) * x_lo[None, :] + lo)
            hi = _bf16_round((((words >> (16 + 4 * p)) & 15) - 8).to(tl.float32) * x_hi[None, :] + hi)
        dot = lo + hi
    return scale * tl.sum(tl.reshape(dot, [BLOCK_N, GROUPS, WPG]), axis=2)


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
                       HAS_BIAS: tl.constexpr, BF16X2: tl.constexpr, USE_ASM: tl.constexpr, STAGES: tl.constexpr):
    """out[m, n] = sum_k x[m, k] * q[n, k] * s[n, k // G] (+ bias[n]) for activation row m =
    program_id(0) and rows [BLOCK_N) of program_id(1), BLOCK_W words (BLOCK_W / (G/8) groups) a step.
    x_ptr addresses the activations as 32-bit pairs (sx_m in pairs)."""
    WPG: tl.constexpr = G // 8
    m = tl.program_id(0)
    n0 = tl.program_id(1) * BLOCK_N
    kw = tl.arange(0, BLOCK_W)
    x_pairs = x_ptr + m * sx_m + (kw // WPG) * (4 * WPG) + kw % WPG  # pair p = 0 of each word
    acc = tl.zeros([BLOCK_N, BLOCK_W // WPG], tl.float32)
    for w0 in tl.range(0, k_words, BLOCK_W, num_stages=STAGES):  # (a plain range is never pipelined)
        words, scale = _load_step(w_ptr, sw_n, s_ptr, ss_n, N, k_words, n0, w0, G, BLOCK_N, BLOCK_W)
        if BF16X2:
            acc += _step_dot_bf16x2(words, scale, x_pairs + 4 * w0, w0 + kw < k_words, G, BLOCK_N, BLOCK_W, USE_ASM)
        else:
            acc += _step_dot(words, scale, x_pairs + 4 * w0, w0 + kw < k_words, one_bits, G, BLOCK_N, BLOCK_W, X_BF16)
    _store_rows(acc, bias_ptr, out_ptr + m * so_m, n0, N, HAS_BIAS, BLOCK_N)


# The default tile: the H200's best or within 5% of it at M=1 on the 8B draft's linears
# (benchmarks/results/w4a16-gemv-h200).
BLOCK_N, BLOCK_W, NUM_WARPS = 8, 512, 4


def step_tile(k_words: int, group_size: int, block_w: int | None = None, num_stages: int | None = None,
              bf16x2: bool = False) -> tuple[int, int]:
    """(words a step, pipeline stages) of a launch over k_words words: block_w (default BLOCK_W) within [one
    scale group, what K holds], stages as given, else 1. The bf16x2 default instead: of BLOCK_W words (or what
    K holds) and its half and quarter, down to 128 words, the one whose steps leave the fewest words masked
    off (down's 1792 words: 7 steps of 256, not 3.5 of 512), the larger on a tie, and 3 stages from 4 steps on
    (the compiler copies the next steps' words into shared memory while this one computes, cp.async).
    Measured (w4a16-gemv-h200, twenty-third session, bf16x2, M=1): down 17.1 µs at 256 words and 3 stages
    against 18.3 at 512 words and 1 stage (the other layers' one step of 512: within 1% of their best); before
    the loop took `tl.range`, stages had no effect. The fp32 arithmetic keeps its measured default: neither
    was swept there, and its 256-word step compiles to a layout exchange through shared memory (4.00 warp
    instructions per 32 weights against 3.61, over the 3.92 that copy bandwidth leaves; kernel-sass-sm90.txt)."""
    wpg = group_size // 8
    if block_w is not None or not bf16x2:
        return max(wpg, min(block_w or BLOCK_W, triton.next_power_of_2(k_words))), num_stages or 1
    top = max(wpg, min(BLOCK_W, triton.next_power_of_2(k_words)))
    fits = [w for w in (top, top // 2, top // 4) if w >= max(wpg, min(top, 128))]
    block_w = min(fits, key=lambda w: (triton.cdiv(k_words, w) * w, -w))
    return block_w, num_stages or (3 if triton.cdiv(k_words, block_w) >= 4 else 1)


def w4a16_gemv(x: torch.Tensor, weight_gemv: torch.Tensor, weight_scale: torch.Tensor, group_size: int,
               bias: torch.Tensor | None = None, *, bf16x2: bool = False, block_n: int = BLOCK_N,
               block_w: int | None = None, num_warps: int = NUM_WARPS, num_stages: int | None = None) -> torch.Tensor:
    """x [M, K] (bf16 / fp16; bf16 for `bf16x2`) @ W.T -> [M, N] in x's dtype, W [N, K] = the dequantized
    weight whose words `repack` gave `weight_gemv` (with the same `bf16x2`), scales [N, K / group_size]."""
    M, K = x.shape
    N = weight_gemv.shape[0]
    assert x.dtype in ((torch.bfloat16,) if bf16x2 else (torch.bfloat16, torch.float16)), (x.dtype, bf16x2)
    assert weight_gemv.shape == (N, K // 8) and weight_gemv.dtype == torch.int32, weight_gemv.shape
    assert weight_scale.shape == (N, K // group_size), weight_scale.shape
    assert group_size >= 16 and (group_size & (group_size - 1)) == 0, group_size
    pairs = x.contiguous().view(torch.int32)
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    k_words = K // 8
    block_w, num_stages = step_tile(k_words, group_size, block_w, num_stages, bf16x2)
    _w4a16_gemv_kernel[(M, triton.cdiv(N, block_n))](
        pairs, pairs.stride(0), weight_gemv, weight_gemv.stride(0), weight_scale, weight_scale.stride(0),
        bias if bias is not None else out, out, out.stride(0), N, k_words, ONE_BITS,
        G=group_size, BLOCK_N=block_n, BLOCK_W=block_w, X_BF16=x.dtype == torch.bfloat16,
        HAS_BIAS=bias is not None, BF16X2=bf16x2, USE_ASM=not interpreting(),
        STAGES=num_stages, num_warps=num_warps, num_stages=num_stages)
    return out
