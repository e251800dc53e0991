"""Paged decode / verify / chunked-prefill attention over the hierarchical INT4/INT8 KV cache.

Same contract and arguments as ``vllm_quantspec.reference_attention.attention``: a query at
position t reads keys p < Q(t) = ((t - fp_keep)+ // G) * G from the pages (int4: U plane + metadata;
int8: U + L), and Q(t) <= p <= t in full precision (the ring for p < C, the new tokens after).

Work split. One program = (query block, kv head, sequence, split). The query block puts
(query tokens x the GRP query heads of the kv head) on the M dimension of every tl.dot, so each page
is read once per kv head for all its query heads and tokens (GQA-native). The key axis of a
sequence is cut into units (a BLOCK_N-token tile of a page, then BLOCK_F-token tiles of the
full-precision tail); split s takes a contiguous run of units and writes a partial (normalized
output, log2-sum-exp); `_merge_kernel` combines the splits exactly. With one split the program
writes the output directly. Chunked prefill is the same kernel with several query blocks.

Transposed page loop (SWAP: queries of at most SWAP_ROWS rows, i.e. draft steps and target-only decode:
GRP rows; values quantized per token, as by default). An MMA's M is 16, so a 4-row query on M leaves 12
of 16 rows of every dot, score and accumulator tile as padding. SWAP puts the tile's tokens on M instead
(s^T = c @ w^T, out^T = c_v^T @ p^T) and the rows on N, where the MMA's width is 8: half the HMMAs, and
the softmax, P and accumulator arithmetic on [BLOCK_N, 8] and [D/2, 8] tiles instead of [16, BLOCK_N]
and [16, D/2] (sm_90 page loop: 30.8 -> 23.5 warp instructions per token for INT4 at 2 warps, 39.2 ->
30.7 for INT8; attention-ab-swap-h200: 1.13-1.19x as fast from 32k). The full-precision tail runs
untransposed.

Dequantization folded into the math (no dequantized K or V tile ever exists):
  keys per channel, x = off[d] + sc[d]*c:   score = (q*sc) . c + q . off        (one fp32 row term)
  values per token, x = off[n] + sc[n]*c:   out   = (p*sc) @ c + p . off        (one fp32 row term)
with int4: c = U, sc = s, off = min (odd channels: their high nibbles masked in place, c = 16*U, sc = s/16);
int8: c = 16*U + L (integer ops), sc = s/16, off = min - 7.5*s/16.
Dot operands are fp16: codes as the bit pattern 0x6400 | c, which is the fp16 number 1024 + c
(exact, no int->float conversion: inline asm unpacks 4-byte words; 1024 * sum(weights) is taken off
in fp32 after the dot), weights q*sc as they are and p*sc scaled per tile by a power of two (p can
be tiny), so both keep fp16's 11 bits (bf16 would keep 8: 4x the error of an INT8 cache's own step).
Accumulation fp32. Channels are handled as two streams, even and odd (the two nibbles of a byte).
"""

import dataclasses
import functools

import torch
import triton
import triton.language as tl

from vllm_quantspec.kernels import interpreting

LOG2E = 1.4426950408889634


# Unpacking: a tile of a plane is loaded as 32-bit words (keys: 4 channel-pair bytes of one token;
# values: one channel pair of 4 tokens; 16-byte loads); inline asm turns two words at a time into
# fp16 1024 + code (the bit pattern 0x6400 | c, exact, no int->float conversion): prmt puts byte k of
# both words into the two halves of a register, lop3 masks a nibble and ORs in the exponent of 1024.
# Outputs $0..$3: even channels (low nibbles) of bytes 0..3, $4..$7: odd channels (high nibbles).
# int4 (U words $8, $9): three instructions for four codes. The high nibble is masked in place, which
# makes the fp16 number 1024 + 16c (exact); the odd stream's weights carry the 1/16 (_page_tile).
_ASM_INT4 = tl.constexpr("""{
.reg .b32 t;
""" + "".join(f"""prmt.b32 t, $8, $9, 0x0{4 + k}0{k};
lop3.b32 ${k}, t, 0x000f000f, 0x64006400, 0xea;
lop3.b32 ${4 + k}, t, 0x00f000f0, 0x64006400, 0xea;
""" for k in range(4)) + "}")
# int8 (U words $8, $9; L words $10, $11): code 16*U + L. First whole words of 8-bit codes, four codes
# a word in two instructions (lop3 0xe4 takes the bits of its first operand where the mask is set,
# of its second elsewhere): even = U << 4 over L's low nibbles, odd = U's high nibbles over L >> 4.
# Then per register a byte permute and one lop3 that keeps bytes 0 and 2 and ORs in 1024's exponent.
# Six instructions for four codes.
_ASM_INT8 = tl.constexpr("""{
.reg .b32 t, ea, eb, oa, ob;
shl.b32 t, $8, 4;
lop3.b32 ea, t, $10, 0xf0f0f0f0, 0xe4;
shr.u32 t, $10, 4;
lop3.b32 oa, $8, t, 0xf0f0f0f0, 0xe4;
shl.b32 t, $9, 4;
lop3.b32 eb, t, $11, 0xf0f0f0f0, 0xe4;
shr.u32 t, $11, 4;
lop3.b32 ob, $9, t, 0xf0f0f0f0, 0xe4;
""" + "".join(f"""prmt.b32 t, ea, eb, 0x0{4 + k}0{k};
lop3.b32 ${k}, t, 0x00ff00ff, 0x64006400, 0xea;
prmt.b32 t, oa, ob, 0x0{4 + k}0{k};
lop3.b32 ${4 + k}, t, 0x00ff00ff, 0x64006400, 0xea;
""" for k in range(4)) + "}")


@triton.jit
def _fp16_code(c):
    return (c.to(tl.int16) | 0x6400).to(tl.float16, bitcast=True)


@triton.jit
def _interleave4(a0, a1, a2, a3):
    """[N, W] x 4 -> [N, 4W] with element 4w + j from a_j."""
    x = tl.join(tl.join(a0, a2), tl.join(a1, a3))  # [N, W, 2, 2]: [.., k, t] = a_{2k + t}
    return tl.reshape(x, [x.shape[0], x.shape[1] * 4])


@triton.jit
def _fp16_halves(w):
    """int32 words -> their low and high fp16 halves, as fp32."""
    lo = (w & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)
    hi = (w >> 16).to(tl.int16).to(tl.float16, bitcast=True)
    return lo.to(tl.float32), hi.to(tl.float32)


@triton.jit
def _interleave2(a, b):
    """[W] x 2 -> [2W] with element 2w + j from (a, b)[j]."""
    return tl.reshape(tl.join(a, b), [a.shape[0] * 2])


@triton.jit
def _codes(hi_ptr, lo_ptr, offs, INT8: tl.constexpr, EMULATE: tl.constexpr):
    """Low- and high-nibble codes [R, 4W] of a plane tile as fp16 dot operands 1024 + c, element 4w + j
    from byte j of word w: keys (token-major) R = tokens, 4W = channel pairs; values (token-minor)
    R = channel pairs, 4W = tokens. The low nibbles hold the even channels, the high ones the odd.

    int4: c = U nibble, times 16 in the high-nibble (odd) stream; int8: c = 16*U + L. The dot's
    1024 * sum(weights) is taken off in fp32 after it. offs: int32 [R, W] word offsets. EMULATE (the
    Triton interpreter has no inline asm): the same values by integer ops."""
    u = tl.load(hi_ptr.to(tl.pointer_type(tl.int32)) + offs)
    if INT8:
        lo = tl.load(lo_ptr.to(tl.pointer_type(tl.int32)) + offs)
    if EMULATE:
        if INT8:
            e0 = _fp16_code(16 * (u & 0xF) + (lo & 0xF))
            e1 = _fp16_code(16 * ((u >> 8) & 0xF) + ((lo >> 8) & 0xF))
            e2 = _fp16_code(16 * ((u >> 16) & 0xF) + ((lo >> 16) & 0xF))
            e3 = _fp16_code(16 * ((u >> 24) & 0xF) + ((lo >> 24) & 0xF))
            o0 = _fp16_code(16 * ((u >> 4) & 0xF) + ((lo >> 4) & 0xF))
            o1 = _fp16_code(16 * ((u >> 12) & 0xF) + ((lo >> 12) & 0xF))
            o2 = _fp16_code(16 * ((u >> 20) & 0xF) + ((lo >> 20) & 0xF))
            o3 = _fp16_code(16 * ((u >> 28) & 0xF) + ((lo >> 28) & 0xF))
        else:
            e0 = _fp16_code(u & 0xF)
            e1 = _fp16_code((u >> 8) & 0xF)
            e2 = _fp16_code((u >> 16) & 0xF)
            e3 = _fp16_code((u >> 24) & 0xF)
            o0 = _fp16_code(u & 0xF0)
            o1 = _fp16_code((u >> 8) & 0xF0)
            o2 = _fp16_code((u >> 16) & 0xF0)
            o3 = _fp16_code((u >> 24) & 0xF0)
    elif INT8:
        e0, e1, e2, e3, o0, o1, o2, o3 = tl.inline_asm_elementwise(
            _ASM_INT8, "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r", [u, lo], dtype=(tl.float16,) * 8, is_pure=True, pack=2)
    else:
        e0, e1, e2, e3, o0, o1, o2, o3 = tl.inline_asm_elementwise(
            _ASM_INT4, "=r,=r,=r,=r,=r,=r,=r,=r,r,r", [u], dtype=(tl.float16,) * 8, is_pure=True, pack=2)
    return _interleave4(e0, e1, e2, e3), _interleave4(o0, o1, o2, o3)


@triton.jit
def _pow2_norm(bound):
    """Powers of two (scale, 1/scale), exact in fp32, that put `bound` (>= every |weight| of a tile)
    in [2**14, 2**15): the tile's weights then use fp16's full 11 bits whatever their magnitude
    (smaller ones down to 2**-24 of the bound, far below what they contribute). A bound below
    2**-113 (all-zero weights) gets the largest scale, and 0 as inverse."""
    e = (bound.to(tl.int32, bitcast=True) >> 23) & 0xFF  # biased fp32 exponent
    fb = tl.minimum(tl.maximum(268 - e, 1), 254)  # biased exponent of 2**(14 - (e - 127))
    return (fb << 23).to(tl.float32, bitcast=True), ((254 - fb) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _pairs(x, EMULATE: tl.constexpr):
    """[N, D] model-dtype tile -> even- and odd-channel [N, D/2] dot operands."""
    e, o = tl.split(tl.reshape(x, [x.shape[0], x.shape[1] // 2, 2]))
    return _fp_operand(e, EMULATE), _fp_operand(o, EMULATE)


@triton.jit
def _fp_operand(x, EMULATE: tl.constexpr):
    """Model-dtype (bf16/fp16) tile -> dot operand. The Triton interpreter cannot multiply bf16
    tensors (it stores them as uint16), so under it (CPU tests) the exact values go in as fp32."""
    if EMULATE:
        return x.to(tl.float32)
    return x


@triton.jit
def _online_softmax(s, m_i, l_i, AXIS: tl.constexpr = 1):
    """One step of the log2-domain online softmax over s's keys (its axis AXIS); rows with no visible
    key so far stay (-inf, 0)."""
    m_new = tl.maximum(m_i, tl.max(s, axis=AXIS))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - tl.expand_dims(m_safe, AXIS))
    alpha = tl.math.exp2(m_i - m_safe)
    return p, alpha, l_i * alpha + tl.sum(p, axis=AXIS), m_new


@triton.jit
def _key_weights(sc_e, sc_o, off_e, off_o, q_e, q_o, SWAP: tl.constexpr):
    """A page's per-channel key metadata folded into the query: fp16 weights of the codes and the
    fp32 row term q . off - 1024 * sum(weights) (with the rounded weights: the 1024 cancels exactly).
    No rescaling: an fp16 weight keeps 11 bits down to 2**-14; smaller ones (subnormal) err by at
    most 2**-25 absolute, i.e. < 2**-20 on a score (codes <= 255, 64 channel pairs): nothing next to
    the 2**-11 relative rounding of the others. |q * s * sm_scale| stays far below fp16's 65504."""
    qf_e = q_e.to(tl.float32)
    qf_o = q_o.to(tl.float32)
    CH: tl.constexpr = 0 if SWAP else 1  # the channel axis (SWAP: q is [D/2, M])
    w_e = (qf_e * tl.expand_dims(sc_e, 1 - CH)).to(tl.float16)
    w_o = (qf_o * tl.expand_dims(sc_o, 1 - CH)).to(tl.float16)
    row = tl.sum(qf_e * tl.expand_dims(off_e, 1 - CH) + qf_o * tl.expand_dims(off_o, 1 - CH) -
                 1024.0 * (w_e.to(tl.float32) + w_o.to(tl.float32)), axis=CH)
    return w_e, w_o, row


@triton.jit
def _pv(pw, ct, SWAP: tl.constexpr):
    """P @ V of a tile from the value codes ct [D/2, BLOCK_N]: [M, D/2], or its transpose with SWAP."""
    if SWAP:
        res = tl.dot(ct, pw)
    else:
        res = tl.dot(pw, tl.trans(ct))
    return res


@triton.jit
def _page_tile(u, u_start, m_i, l_i, acc_e, acc_o, w_e, w_o, row_k, q_e, q_o, q_row,
               b, h, qk_scale, bt_ptr, s_bt, khi_ptr, vhi_ptr, klo_ptr, vlo_ptr, pl_blk, pl_h, pl_t,
               ksc_ptr, kmn_ptr, km_blk, km_h, vsc_ptr, vmn_ptr, vmn_words, vm_blk, vm_h, vm_t,
               D: tl.constexpr, G: tl.constexpr, VG: tl.constexpr, BLOCK_N: tl.constexpr, INT8: tl.constexpr,
               EMULATE: tl.constexpr, MASKED: tl.constexpr, SWAP: tl.constexpr):
    """One BLOCK_N-token tile of a page (unit u of the sequence) folded into the online softmax.
    The page's key weights are carried from tile to tile and recomputed when a page starts.
    MASKED: rows read only keys below their own Q(t) (tiles where Q(t) steps inside the block)."""
    sub: tl.constexpr = G // BLOCK_N
    i = tl.arange(0, D // 2)
    n = tl.arange(0, BLOCK_N)
    blk = tl.load(bt_ptr + b * s_bt + u // sub).to(tl.int64)
    rows = (u % sub) * BLOCK_N + n
    pl = blk * pl_blk + h * pl_h + (u % sub) * (BLOCK_N * pl_t)  # scalar byte offset of the tile
    # int32 word offsets (pl_t is a multiple of 4): 64-bit offsets would double the registers
    tile_off = n[:, None] * (pl_t // 4) + tl.arange(0, D // 8)[None, :]
    # Keys: the per-channel scale goes into the weights, the offset into one row term. The metadata
    # loads stay outside the branch, and load 32-bit words (word i: channels 2i and 2i+1, the even and
    # odd streams), so that the pipeliner prefetches them with the codes (it skips loads under 4 bytes).
    km = (blk * km_blk + h * km_h) // 2 + i
    sc_e, sc_o = _fp16_halves(tl.load(ksc_ptr.to(tl.pointer_type(tl.int32)) + km))
    off_e, off_o = _fp16_halves(tl.load(kmn_ptr.to(tl.pointer_type(tl.int32)) + km))
    sc_e *= qk_scale  # log2-domain scores
    sc_o *= qk_scale
    off_e *= qk_scale
    off_o *= qk_scale
    if (u % sub == 0) | (u == u_start):
        if INT8:  # code 16*U + L: step s/16, offset min - 7.5*s/16
            off_e -= sc_e * (7.5 / 16)
            off_o -= sc_o * (7.5 / 16)
            sc_e *= 0.0625
            sc_o *= 0.0625
        else:  # the odd stream's codes come as 16c
            sc_o *= 0.0625
        w_e, w_o, row_k = _key_weights(sc_e, sc_o, off_e, off_o, q_e, q_o, SWAP)
    c_e, c_o = _codes(khi_ptr + pl, klo_ptr + pl, tile_off, INT8, EMULATE)
    KEYS: tl.constexpr = 0 if SWAP else 1  # the key axis of s (SWAP: s is [BLOCK_N, M], acc [D/2, M])
    if SWAP:
        s = tl.dot(c_e, w_e) + tl.dot(c_o, w_o)
    else:
        s = tl.dot(w_e, tl.trans(c_e)) + tl.dot(w_o, tl.trans(c_o))
    s += tl.expand_dims(row_k, KEYS)
    if MASKED:
        s = tl.where(tl.expand_dims((u // sub) * G + rows, 1 - KEYS) < tl.expand_dims(q_row, KEYS), s,
                     float("-inf"))

    p, alpha, l_i, m_i = _online_softmax(s, m_i, l_i, KEYS)
    acc_e *= tl.expand_dims(alpha, KEYS)
    acc_o *= tl.expand_dims(alpha, KEYS)

    # Values: the per-token scale goes into p (one power-of-two scale for the tile), the offset
    # into one row term. Their planes are token-minor (a word: one channel pair of 4 tokens), so the
    # unpacked [D/2, BLOCK_N] codes hold consecutive tokens in a thread, as P @ V's operand wants them.
    pv_tile = blk * pl_blk + h * pl_h + (u % sub) * BLOCK_N  # scalar byte offset of the tile's first token
    v_off = i[:, None] * (G // 4) + tl.arange(0, BLOCK_N // 4)[None, :]
    ct_e, ct_o = _codes(vhi_ptr + pv_tile, vlo_ptr + pv_tile, v_off, INT8, EMULATE)
    if VG == D:
        # 32-bit words again (word j: tokens 2j and 2j+1; vm_t == 1), scale and offset in one load (the
        # offsets sit vmn_words words after the scales): the pipeliner prefetches only loads that feed a
        # dot, and the offsets alone do not. Then back in token order.
        vw = (blk * vm_blk + h * vm_h) // 2 + (u % sub) * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        sw, mw = tl.split(tl.load(vsc_ptr.to(tl.pointer_type(tl.int32)) + vw[:, None] +
                                  tl.arange(0, 2)[None, :] * vmn_words))
        vsc = _interleave2(*_fp16_halves(sw))
        voff = _interleave2(*_fp16_halves(mw))
        if INT8:
            voff -= vsc * (7.5 / 16)
            vsc *= 0.0625
        # p <= 1 but p * s can be tiny: one power-of-two scale per tile keeps fp16's 11 bits
        scale, unscale = _pow2_norm(tl.max(vsc, axis=0))
        pw = (p * tl.expand_dims(vsc * scale, 1 - KEYS)).to(tl.float16)
        if INT8:
            corr = tl.expand_dims(tl.sum(p * tl.expand_dims(voff, 1 - KEYS) - (1024.0 * unscale) * pw.to(tl.float32),
                                         axis=KEYS), KEYS)
            acc_e += _pv(pw, ct_e, SWAP) * unscale + corr
            acc_o += _pv(pw, ct_o, SWAP) * unscale + corr
        else:  # the odd stream's codes come as 16c: its 1024 * sum(pw) goes in 16x smaller
            off_sum = tl.expand_dims(tl.sum(p * tl.expand_dims(voff, 1 - KEYS), axis=KEYS), KEYS)
            pw_sum = tl.expand_dims(tl.sum(pw.to(tl.float32), axis=KEYS) * unscale, KEYS)
            acc_e += _pv(pw, ct_e, SWAP) * unscale + (off_sum - 1024.0 * pw_sum)
            acc_o += _pv(pw, ct_o, SWAP) * (unscale * 0.0625) + (off_sum - 64.0 * pw_sum)
    else:
        # Several value groups per token: dequantize the tile in fp32 (a rare layout, off the hot
        # path); the fp32 dot runs as tf32 on the GPU (fp32 range, fp16-like precision).
        vg = (blk * vm_blk + h * vm_h + rows * vm_t)[:, None] + (2 * i[None, :]) // VG
        vsc = tl.load(vsc_ptr + vg).to(tl.float32)
        voff = tl.load(vmn_ptr + vg).to(tl.float32)
        if INT8:
            voff -= vsc * (7.5 / 16)
            vsc *= 0.0625
        vsc_o = vsc if INT8 else vsc * 0.0625  # int4's odd stream: codes 16c
        acc_e += tl.dot(p, voff + vsc * (tl.trans(ct_e).to(tl.float32) - 1024.0))
        acc_o += tl.dot(p, voff + vsc_o * (tl.trans(ct_o).to(tl.float32) - 1024.0))
    return m_i, l_i, acc_e, acc_o, w_e, w_o, row_k


@triton.jit
def _write_ring(kn_ptr, skn_t, skn_h, vn_ptr, svn_t, svn_h, kr_ptr, vr_ptr, sr_r, sr_h, rd_ptr,
                q0, q_len, qb, h, D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr):
    """Copy the query block's new K/V of kv head h to their ring rows (the backend's ring write,
    fused: two launches less per layer and step). Safe next to the reads of the other programs: the
    ring's capacity keeps every row this step reads clear of the rows it writes."""
    j = tl.arange(0, BLOCK_M)
    qi = qb * BLOCK_Q + j
    ok = ((j < BLOCK_Q) & (qi < q_len))[:, None]
    tok = (q0 + qi).to(tl.int64)
    d = tl.arange(0, D)[None, :]
    dst = (tl.load(rd_ptr + tok, mask=qi < q_len, other=0) * sr_r + h * sr_h)[:, None] + d
    tl.store(kr_ptr + dst, tl.load(kn_ptr + tok[:, None] * skn_t + h * skn_h + d, mask=ok), mask=ok)
    tl.store(vr_ptr + dst, tl.load(vn_ptr + tok[:, None] * svn_t + h * svn_h + d, mask=ok), mask=ok)


@triton.jit
def _paged_attention_kernel(
    q_ptr, sq_t, sq_h,                          # q [T, Hq, D]
    kn_ptr, skn_t, skn_h, vn_ptr, svn_t, svn_h,  # k_new / v_new [T, H, D]
    kr_ptr, vr_ptr, sr_s, sr_r, sr_h,           # k_ring / v_ring [S, R, H, D] (same strides)
    qsl_ptr, seq_lens_ptr, bt_ptr, s_bt, slot_ptr, fp_keep,
    khi_ptr, vhi_ptr, klo_ptr, vlo_ptr, pl_blk, pl_h, pl_t,   # planes [nb, H, G, D/2] (keys' strides; values
    ksc_ptr, kmn_ptr, km_blk, km_h,                          #   token-minor); k_scale / k_min [nb, H, D]
    vsc_ptr, vmn_ptr, vmn_words, vm_blk, vm_h, vm_t,         # v_scale / v_min [nb, H, G, D/VG]
    out_ptr, so_t, so_h,                        # out [T, Hq, D]
    po_ptr, plse_ptr,                           # partials [T, Hq, num_splits, D] fp32, [T, Hq, num_splits]
    rd_ptr,                                     # ring_dst [T] i64: flat ring row of each new token
    qk_scale, R, num_splits,
    HQ: tl.constexpr, GRP: tl.constexpr, D: tl.constexpr, G: tl.constexpr, VG: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr,
    FP_W: tl.constexpr, DIRECT: tl.constexpr, INT8: tl.constexpr, EMULATE: tl.constexpr,
    WRITE_RING: tl.constexpr, SWAP: tl.constexpr,
):
    split = tl.program_id(0) % num_splits
    qb = tl.program_id(0) // num_splits
    h = tl.program_id(1)
    b = tl.program_id(2)
    q0 = tl.load(qsl_ptr + b)
    q_len = tl.load(qsl_ptr + b + 1) - q0
    if qb * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + b)
    ctx = seq_len - q_len

    # Rows: m = token-in-block * GRP + head-in-group.
    m = tl.arange(0, BLOCK_M)
    qi = qb * BLOCK_Q + m // GRP
    hq = h * GRP + m % GRP
    row_ok = (m < BLOCK_Q * GRP) & (qi < q_len)
    tok = (q0 + qi).to(tl.int64)
    i = tl.arange(0, D // 2)  # channel pair: channels 2i (even stream) and 2i+1 (odd stream)
    q = tl.load(q_ptr + tok[:, None] * sq_t + hq[:, None] * sq_h + tl.arange(0, D)[None, :],
                mask=row_ok[:, None], other=0.0)
    q_e, q_o = tl.split(tl.reshape(q, [BLOCK_M, D // 2, 2]))  # kept in the model dtype: fewer registers
    if WRITE_RING:
        if split == 0:
            _write_ring(kn_ptr, skn_t, skn_h, vn_ptr, svn_t, svn_h, kr_ptr, vr_ptr, sr_r, sr_h, rd_ptr,
                        q0, q_len, qb, h, D, BLOCK_Q, BLOCK_M)

    # Query t reads keys p < Q(t) = ((t - fp_keep)+ // G) * G from pages, Q(t) <= p <= t in full
    # precision. Over this query block: pages [0, q_hi), full precision [q_lo, kv_end); in the
    # overlap [q_lo, q_hi) (only where Q(t) steps inside the block) each row masks by its own Q(t).
    t_row = ctx + qi
    q_row = tl.maximum(t_row - fp_keep, 0) // G * G
    t_last = ctx + tl.minimum(q_len, (qb + 1) * BLOCK_Q) - 1
    q_lo = tl.maximum(ctx + qb * BLOCK_Q - fp_keep, 0) // G * G
    q_hi = tl.maximum(t_last - fp_keep, 0) // G * G

    # This split's run of units: page tiles first, then full-precision tiles. A full-precision tile
    # counts FP_W units (its bytes relative to a page tile's), so splits read about the same bytes.
    sub: tl.constexpr = G // BLOCK_N
    n_page_units = (q_hi // G) * sub
    n_units = n_page_units + FP_W * tl.cdiv(t_last + 1 - q_lo, BLOCK_F)
    per_split = tl.cdiv(n_units, num_splits)
    u_lo = split * per_split
    u_hi = tl.minimum(n_units, u_lo + per_split)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    # Page tiles below q_lo are read whole by every row; the rest (at most one page for decode and
    # verify) masks each row at its own Q(t). SWAP: the page loop works on transposes ([D/2, M] and
    # [BLOCK_N, M]: the tokens on the dots' M axis), which the full-precision tail turns back.
    acc_e = tl.zeros([BLOCK_M, D // 2], tl.float32)
    acc_o = tl.zeros([BLOCK_M, D // 2], tl.float32)
    w_e = tl.zeros([BLOCK_M, D // 2], tl.float16)
    w_o = tl.zeros([BLOCK_M, D // 2], tl.float16)
    if SWAP:
        acc_e, acc_o, w_e, w_o = tl.trans(acc_e), tl.trans(acc_o), tl.trans(w_e), tl.trans(w_o)
        q_e, q_o = tl.trans(q_e), tl.trans(q_o)
    row_k = tl.zeros([BLOCK_M], tl.float32)
    page_args = (b, h, qk_scale, bt_ptr, s_bt, khi_ptr, vhi_ptr, klo_ptr, vlo_ptr, pl_blk, pl_h, pl_t,
                 ksc_ptr, kmn_ptr, km_blk, km_h, vsc_ptr, vmn_ptr, vmn_words, vm_blk, vm_h, vm_t)
    n_whole = (q_lo // G) * sub
    u_mid = tl.minimum(u_hi, n_whole)
    for u in range(u_lo, u_mid):
        m_i, l_i, acc_e, acc_o, w_e, w_o, row_k = _page_tile(
            u, u_lo, m_i, l_i, acc_e, acc_o, w_e, w_o, row_k, q_e, q_o, q_row, *page_args,
            D, G, VG, BLOCK_N, INT8, EMULATE, False, SWAP)
    u_first = tl.maximum(u_lo, n_whole)
    for u in range(u_first, tl.minimum(u_hi, n_page_units)):
        m_i, l_i, acc_e, acc_o, w_e, w_o, row_k = _page_tile(
            u, u_first, m_i, l_i, acc_e, acc_o, w_e, w_o, row_k, q_e, q_o, q_row, *page_args,
            D, G, VG, BLOCK_N, INT8, EMULATE, True, SWAP)

    if SWAP:
        acc_e, acc_o = tl.trans(acc_e), tl.trans(acc_o)

    # Full-precision tail: ring positions [Q, C), then the new tokens [C, seq_len), causal.
    slot = tl.load(slot_ptr + b).to(tl.int64)
    f = tl.arange(0, BLOCK_F)
    d = tl.arange(0, D)
    # q again (an L2 hit) rather than a model-dtype copy kept live in registers across the page loop
    q_e, q_o = _pairs(tl.load(q_ptr + tok[:, None] * sq_t + hq[:, None] * sq_h + d[None, :],
                              mask=row_ok[:, None], other=0.0), EMULATE)
    f_lo = tl.cdiv(tl.maximum(u_lo - n_page_units, 0), FP_W)  # the split holding a tile's first unit
    f_hi = tl.cdiv(tl.maximum(u_hi - n_page_units, 0), FP_W)
    for ft in range(f_lo, f_hi):
        pos = q_lo + ft * BLOCK_F + f
        in_ring = (pos < ctx)[:, None]
        live = (pos < seq_len)[:, None]
        ring = (slot * sr_s + (pos % R).to(tl.int64) * sr_r + h * sr_h)[:, None] + d[None, :]
        new_tok = (q0 + pos - ctx).to(tl.int64)[:, None]
        k_e, k_o = _pairs(tl.load(tl.where(in_ring, kr_ptr + ring, kn_ptr + new_tok * skn_t + h * skn_h + d[None, :]),
                                  mask=live, other=0.0), EMULATE)
        s = tl.dot(q_e, tl.trans(k_e)) + tl.dot(q_o, tl.trans(k_o))
        visible = (pos[None, :] >= q_row[:, None]) & (pos[None, :] <= t_row[:, None])
        s = tl.where(visible, s * qk_scale, float("-inf"))
        p, alpha, l_i, m_i = _online_softmax(s, m_i, l_i)
        v = tl.load(tl.where(in_ring, vr_ptr + ring, vn_ptr + new_tok * svn_t + h * svn_h + d[None, :]),
                    mask=live, other=0.0)
        v_e, v_o = _pairs(v, EMULATE)
        pb = _fp_operand(p.to(v.dtype), EMULATE)
        acc_e = acc_e * alpha[:, None] + tl.dot(pb, v_e)
        acc_o = acc_o * alpha[:, None] + tl.dot(pb, v_o)

    has = l_i > 0.0  # false only for an empty split
    l_safe = tl.where(has, l_i, 1.0)
    acc_e = acc_e / l_safe[:, None]
    acc_o = acc_o / l_safe[:, None]
    res = tl.reshape(tl.join(acc_e, acc_o), [BLOCK_M, D])  # channels back in order: 2i, 2i+1
    d = tl.arange(0, D)
    if DIRECT:  # a single split: no partials, no merge
        o = out_ptr + tok[:, None] * so_t + hq[:, None] * so_h + d[None, :]
        tl.store(o, res.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
    else:
        part = (tok * HQ + hq) * num_splits + split
        tl.store(po_ptr + part[:, None] * D + d[None, :], res, mask=row_ok[:, None])
        lse = tl.where(has, m_i + tl.math.log2(l_safe), float("-inf"))
        tl.store(plse_ptr + part, lse, mask=row_ok)


@triton.jit
def _merge_kernel(po_ptr, plse_ptr, out_ptr, so_t, so_h, num_splits,
                  HQ: tl.constexpr, D: tl.constexpr, SPLITS_P2: tl.constexpr):
    """Exact log-sum-exp merge of the splits of one (token, query head)."""
    t = tl.program_id(0).to(tl.int64)
    hq = tl.program_id(1)
    sp = tl.arange(0, SPLITS_P2)
    live = sp < num_splits
    d = tl.arange(0, D)
    base = (t * HQ + hq) * num_splits
    lse = tl.load(plse_ptr + base + sp, mask=live, other=float("-inf"))
    w = tl.math.exp2(lse - tl.max(lse, axis=0))  # empty splits: exp2(-inf) = 0
    o = tl.load(po_ptr + (base + sp)[:, None] * D + d[None, :], mask=live[:, None], other=0.0)
    res = tl.sum(o * w[:, None], axis=0) / tl.sum(w, axis=0)
    tl.store(out_ptr + t * so_t + hq * so_h + d, res.to(out_ptr.dtype.element_ty))


def _fp_weight(mode: str, block_f: int, block_n: int) -> int:
    """Units a full-precision tile counts for: twice its bytes relative to a page tile (bf16 K+V
    against U (+L) planes), since its loop step is slower per byte; spreads the ring over splits."""
    page_tile_bytes = block_n * (1 if mode == "int4" else 2)  # per channel pair, K+V
    return max(1, 2 * (block_f * 4) // page_tile_bytes)


@functools.cache
def _num_sms() -> int:
    return torch.cuda.get_device_properties().multi_processor_count if torch.cuda.is_available() else 8


def _pick_num_splits(num_programs: int, max_units: int, num_warps: int) -> int:
    """Enough programs to fill the GPU (8 warps per SM, at least 2 programs), down to one page tile
    each. Measured on an H200 (tune_attention.py, tune-attention-h200): 2 programs of 4 warps or 4 of
    2 warps per SM is best or within a few percent for draft steps and verifies at 4k-128k, batch
    1-16; more splits only add partials to merge."""
    want = max(1, max(2, 8 // num_warps) * _num_sms() // max(1, num_programs))
    return max(1, min(want, max_units, 256))


SWAP_ROWS = 8  # queries of up to this many rows (tokens x GRP) run the page loop transposed: the MMA's N
# INT4 draft steps with at least this many 64-token page tiles per program, at 8 one-warp programs per SM
# (Tiles.of), run one warp a program
ONE_WARP_TILES = 6


@dataclasses.dataclass(frozen=True)
class Tiles:
    """A launch's tile sizes (compile-time parameters) and warps."""
    block_q: int
    block_m: int
    block_n: int
    block_f: int
    num_warps: int
    swap: bool = False

    @staticmethod
    def of(max_query_len: int, grp: int, G: int, batch_invariant: bool = False, block_m: int | None = None,
           block_n: int | None = None, num_warps: int | None = None, *, seq_heads: int = 0,
           max_seq_len: int = 0, mode: str = "int8", per_token_values: bool = True) -> "Tiles":
        """M = query tokens x GRP heads; decode/verify puts the whole query in one block, prefill tiles.
        `seq_heads` (sequences x kv heads) and `max_seq_len` let the default warps follow the launch:
        single-token launches (INT4 draft steps, INT8 target-only decode) with page tiles enough
        for 4 programs per SM get 2 warps a program, 4 programs per SM. tune-attention-h200 (twelfth
        session), 2 against 4 warps in µs a layer: INT4 91.7 / 106.0 at 1 x 128k, 94.4 / 109.4 at 4 x 32k,
        70.7 / 76.2 at 16 x 4k; INT8 121.1 / 127.7 at 1 x 128k, 126.2 / 128.8 at 4 x 32k, but 46.7 / 45.1
        at 1 x 32k and 83.1 / 81.2 at 16 x 4k. 4 warps stay at 1 x 4k, whose 256 page tiles fill 2
        programs per SM only. The INT8 verify is faster at 4 warps everywhere (1.6-1.9x).
        Queries of up to SWAP_ROWS rows run the page loop transposed, in 8-row blocks (module docstring), where
        values are quantized per token (`per_token_values`: v_group == head_dim, the transposed loop's value
        metadata); a 20-row verify transposed (32-row blocks) ran at 0.73-0.81x the speed (attention-ab-swap-h200,
        T).
        On that transposed loop, INT4 draft steps over ONE_WARP_TILES or more 64-token page tiles per program
        take one warp over 64-token tiles, 8 programs per SM (tune-attention-h200, twenty-sixth session, µs a
        layer, against 2 warps over 128-token tiles): 71.5 / 76.3 at 1 x 128k (15.5 tiles a program), 74.2 /
        78.8 at 4 x 32k (15.5), 56.9 / 59.9 at 16 x 4k (7.8), but 35.4 / 32.9 at 1 x 32k (3.9); the INT8
        decode stays at 2 warps (one warp: 101.8-103.6 / 94.4 at 1 x 128k)."""
        swap = not batch_invariant and block_m is None and per_token_values and max_query_len * grp <= SWAP_ROWS
        if block_m is None:
            block_m = 64 if max_query_len * grp > 32 else max(16, triton.next_power_of_2(max_query_len * grp))
        block_q = max(1, block_m // grp if batch_invariant else min(max_query_len, block_m // grp))
        block_m = max(8 if swap else 16, triton.next_power_of_2(block_q * grp))
        # one query token, not any 16-row block: a verify of up to 4 tokens x 4 heads fits 16 rows too, and
        # the sweep found verifies faster at 4 warps
        single_token = max_query_len == 1 and block_m <= 16 and not batch_invariant
        if (single_token and swap and mode == "int4" and block_n is None and num_warps is None
                and seq_heads * triton.cdiv(max_seq_len, min(G, 64)) >= ONE_WARP_TILES * 8 * _num_sms()):
            block_n, num_warps = 64, 1
        if block_n is None:
            block_n = 128 if block_m <= 32 else 64
        if num_warps is None:
            num_warps = 4 if block_m <= 32 else 8
            page_tiles = seq_heads * triton.cdiv(max_seq_len, min(G, block_n))
            if single_token and page_tiles >= 4 * _num_sms():
                num_warps = 2
        # block_f divides G: full-precision tiles start at fixed positions (batch_invariant)
        return Tiles(block_q, block_m, min(G, block_n), min(32, G), num_warps, swap)

    def constants(self, HQ: int, grp: int, D: int, G: int, VG: int, mode: str, direct: bool,
                  write_ring: bool) -> dict:
        """_paged_attention_kernel's compile-time arguments for these tiles."""
        assert not self.swap or VG == D, "the transposed page loop reads values quantized per token"
        return dict(HQ=HQ, GRP=grp, D=D, G=G, VG=VG, BLOCK_Q=self.block_q, BLOCK_M=self.block_m,
                    BLOCK_N=self.block_n, BLOCK_F=self.block_f, FP_W=_fp_weight(mode, self.block_f, self.block_n),
                    DIRECT=direct, INT8=mode == "int8", EMULATE=interpreting(), WRITE_RING=write_ring,
                    SWAP=self.swap)


def launch(max_query_len: int, max_seq_len: int, num_seqs: int, num_kv_heads: int, grp: int, G: int, mode: str,
           per_token_values: bool, *, batch_invariant: bool = False, block_m: int | None = None,
           block_n: int | None = None, num_warps: int | None = None, num_splits: int | None = None
           ) -> tuple[Tiles, int]:
    """A call's tiles and split count: with the tensors' shapes, all its launch depends on. `max_seq_len`
    only sizes them (the kernel takes its sequences' lengths on the device), so bounds that give the same
    launch are interchangeable (the backend's draft steps share one CUDA graph among them)."""
    if batch_invariant:
        num_splits, block_m = 1, 64
    tiles = Tiles.of(max_query_len, grp, G, batch_invariant, block_m, block_n, num_warps,
                     seq_heads=num_seqs * num_kv_heads, max_seq_len=max_seq_len, mode=mode,
                     per_token_values=per_token_values)
    if num_splits is None:
        n_qblocks = triton.cdiv(max_query_len, tiles.block_q)
        num_splits = _pick_num_splits(num_seqs * num_kv_heads * n_qblocks, triton.cdiv(max_seq_len, tiles.block_n),
                                      tiles.num_warps)
    return tiles, num_splits


def paged_attention(q, k_new, v_new, query_start_loc, seq_lens, block_table, pages, layout,
                    k_ring, v_ring, ring_slot, mode, sm_scale, fp_keep, *, max_query_len: int | None = None,
                    max_seq_len: int | None = None, num_splits: int | None = None, out=None,
                    ring_dst: torch.Tensor | None = None, block_m: int | None = None, block_n: int | None = None,
                    num_warps: int | None = None,
                    num_stages: int = 2, maxnreg: int | None = None, batch_invariant: bool = False):
    """Triton twin of the reference attention (same arguments and result). `max_query_len` /
    `max_seq_len` are host-side bounds (vLLM's attention metadata has them): passing them avoids a
    device sync; `num_splits` overrides the split-K heuristic. With `ring_dst` (int64 [T], flat rows of
    the rings viewed as [slots * R, H, D]) the kernel also writes the new K/V to the ring, as the
    backend's ring write would after the attention (only for queries short enough that the ring holds
    them next to every row they read: decode, verify and draft steps). The defaults of the launch parameters
    are the fastest measured on an H100 and H200: decode/verify (M <= 32 rows) 4 warps over 128-token tiles
    (2 for single-token steps over enough page tiles, 1 over 64-token tiles for INT4 draft steps over
    many: `Tiles.of`), prefill (M = 64) 8 warps over
    64-token tiles (fewer registers per thread: no spills). `maxnreg` caps
    the registers per thread (ptxas spills the rest): tune_attention.py measures whether more programs per
    SM pay for the spills; unset, ptxas takes what it needs (255 for decode: two programs per SM).

    `batch_invariant` (vLLM's VLLM_BATCH_INVARIANT mode): a query token's row comes out bit for bit
    the same whatever else the call holds (its own query's length, the batch), as vLLM's FlashAttention
    backend does with one split. One split and one kernel build for every call (M = 64 rows, a fixed
    query block, no fused ring write: on a GPU the compiled row math followed those, measured in
    benchmarks/results/invariance-h200.txt): a decode row and the same token's row in a verify query
    then fold the same tiles in the same order (tile boundaries sit at fixed positions: pages, and
    full-precision tiles that divide G), and the tiles a row masks out entirely add exact zeros."""
    assert mode in ("int4", "int8"), mode
    T, HQ, D = q.shape
    G, H, VG = layout.block_size, layout.num_kv_heads, layout.v_group
    B = seq_lens.shape[0]
    assert layout.head_dim == D and HQ % H == 0 and k_new.shape == (T, H, D) and D % 32 == 0
    assert q.stride(2) == k_new.stride(2) == v_new.stride(2) == k_ring.stride(3) == 1
    assert k_ring.stride() == v_ring.stride() and k_ring.dtype == k_new.dtype == v_new.dtype
    grp = HQ // H
    if max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max())
    if max_seq_len is None:
        max_seq_len = int(seq_lens.max())
    assert not (batch_invariant and ring_dst is not None), \
        "batch_invariant: one kernel build for every call, so the ring is written after"
    if out is None:
        out = torch.empty_like(q)
    if T == 0:
        return out
    tiles, num_splits = launch(max_query_len, max_seq_len, B, H, grp, G, mode, VG == D,
                               batch_invariant=batch_invariant, block_m=block_m, block_n=block_n,
                               num_warps=num_warps, num_splits=num_splits)
    n_qblocks = triton.cdiv(max_query_len, tiles.block_q)
    write_ring = ring_dst is not None
    if write_ring:
        assert ring_dst.dtype == torch.int64 and k_ring.is_contiguous() and v_ring.is_contiguous()
        # rows read: from Q(first query) >= C - fp_keep - G + 1; rows written: up to C + q_len - 1
        assert max_query_len + fp_keep + G <= k_ring.shape[1] + 1, "the ring write would overwrite rows read"
    if num_splits > 1:
        po = torch.empty(T, HQ, num_splits, D, dtype=torch.float32, device=q.device)
        plse = torch.empty(T, HQ, num_splits, dtype=torch.float32, device=q.device)
    else:
        po = plse = out  # unused
    pv = layout.views(pages)
    assert pv.v_hi.stride() == (*pv.k_hi.stride()[:2], 1, G), "value planes token-minor, as the layout stores them"
    vmn_words, rem = divmod(layout.offsets["v_min"] - layout.offsets["v_scale"], 4)  # within every page
    assert VG != D or (pv.v_scale.stride(2) == 1 and rem == 0 and pv.v_min.stride() == pv.v_scale.stride()), \
        "per-token value metadata is read as 32-bit pairs of tokens, scales and offsets in one load"
    _paged_attention_kernel[(n_qblocks * num_splits, H, B)](
        q, q.stride(0), q.stride(1),
        k_new, k_new.stride(0), k_new.stride(1), v_new, v_new.stride(0), v_new.stride(1),
        k_ring, v_ring, k_ring.stride(0), k_ring.stride(1), k_ring.stride(2),
        query_start_loc, seq_lens, block_table, block_table.stride(0), ring_slot, fp_keep,
        pv.k_hi, pv.v_hi, pv.k_lo, pv.v_lo, *pv.k_hi.stride()[:3],
        pv.k_scale, pv.k_min, *pv.k_scale.stride()[:2],
        pv.v_scale, pv.v_min, vmn_words, *pv.v_scale.stride()[:3],
        out, out.stride(0), out.stride(1), po, plse, ring_dst if write_ring else seq_lens,
        sm_scale * LOG2E, k_ring.shape[1], num_splits,
        **tiles.constants(HQ, grp, D, G, VG, mode, direct=num_splits == 1, write_ring=write_ring),
        num_warps=tiles.num_warps, num_stages=num_stages, **({"maxnreg": maxnreg} if maxnreg else {}))
    if num_splits > 1:
        _merge_kernel[(T, HQ)](po, plse, out, out.stride(0), out.stride(1), num_splits, HQ=HQ, D=D,
                               SPLITS_P2=triton.next_power_of_2(num_splits))
    return out
