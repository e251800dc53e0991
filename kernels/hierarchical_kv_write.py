"""Write / flush kernel: quantize complete groups of G tokens into hierarchical INT4/INT8 pages.

Same semantics as ``vllm_quantspec.hierarchical_kv.write_groups`` (the write contract of the design
brief): group j is the G source rows ``src_rows[j]`` (token order) of ``src_k``/``src_v`` and goes to
page ``dest_blocks[j]``; a negative block skips the group (fixed-length, CUDA-graph-safe flush
lists). Keys are quantized per channel over the G tokens, values per token over ``v_group``
consecutive channels. Every float operation mirrors the reference in fp32 with IEEE
rounding (``div_rn``; ``s16*hi`` is exact because s16 has 11 significant bits and hi 4), so the codes
match the reference bit for bit; the tests still allow a code to differ where the reference's
quotient sits within 1 ulp of a rounding boundary (a .5 tie for U, an integer for L), in case a
compiler contracts or reorders one step.

Two program kinds in one launch (grid (n, H, D // BLOCK_DK + G // BLOCK_T)), both tiny; on a decode
step nearly every program exits at once (its group is a skipped entry of the fixed-length list: a
request flushes once every G tokens):
  keys:   D // BLOCK_DK programs per group and head: all G tokens of BLOCK_DK channels (min/max over tokens);
  values: G // BLOCK_T programs per group and head: BLOCK_T tokens of all D channels (min/max over v_group).
Nibble packing: element 2i in the low nibble, 2i+1 in the high one, so each program handles the
even and the odd channels as two streams and packs them without a shuffle.
"""

import torch
import triton
import triton.language as tl

FP16_MAX = tl.constexpr(65504.0)
_ROUND_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2**23: (y + M) - M rounds |y| < 2**22 half-to-even in fp32


@triton.jit
def _fp16_directed(x, UP: tl.constexpr):
    """fp32 -> fp16 rounded toward +inf (UP) or -inf: round to nearest, then step one ulp back
    where that went the wrong way (as the reference's round_to_dtype)."""
    y = x.to(tl.float16)
    yf = y.to(tl.float32)
    bits = y.to(tl.int16, bitcast=True).to(tl.int32)  # sign-extended fp16 bit pattern
    is_zero = (bits & 0x7FFF) == 0
    neg = bits < 0
    if UP:
        wrong = yf < x
        stepped = tl.where(is_zero, 1, tl.where(neg, bits - 1, bits + 1))
    else:
        wrong = yf > x
        stepped = tl.where(is_zero, -32767, tl.where(neg, bits + 1, bits - 1))  # -32767 = 0x8001
    stepped16 = stepped.to(tl.int16).to(tl.float16, bitcast=True)
    return tl.where(wrong, stepped16, y)


@triton.jit
def _codes(x, mn16, s16):
    """Upper and lower 4-bit codes of fp32 `x` given its group's fp16 min and scale (broadcast)."""
    mn = mn16.to(tl.float32)
    s = s16.to(tl.float32)
    zero = s == 0.0
    safe_s = tl.where(zero, 1.0, s)
    y = tl.where(zero, 0.0, tl.math.div_rn(x - mn, safe_s))
    hi = tl.minimum(tl.maximum((y + _ROUND_MAGIC) - _ROUND_MAGIC, 0.0), 15.0)
    r = x - (mn + s * hi)
    lo = tl.math.floor(tl.math.div_rn(r, safe_s * 0.0625))  # s/16 is exact
    lo = tl.where(zero, 0.0, tl.minimum(tl.maximum(lo, -8.0), 7.0)) + 8.0
    return hi.to(tl.uint8), lo.to(tl.uint8)


@triton.jit
def _scale(mn16, mx):
    return _fp16_directed(tl.math.div_rn(mx - mn16.to(tl.float32), 15.0), True)


@triton.jit
def _write_groups_kernel(
    k_ptr, sk_tok, sk_head, v_ptr, sv_tok, sv_head,  # src_k / src_v [N, H, D]
    rows_ptr, s_rows,                                # src_rows [n, G]
    blocks_ptr,                                      # dest_blocks [n]
    khi_ptr, klo_ptr, p_blk, p_head, p_tok,          # k_hi / k_lo [nb, H, G, D/2]
    ksc_ptr, kmn_ptr, km_blk, km_head,               # k_scale / k_min [nb, H, D]
    vhi_ptr, vlo_ptr, pv_blk, pv_head, pv_tok, pv_pair,  # v_hi / v_lo [nb, H, G, D/2] (token-minor)
    vsc_ptr, vmn_ptr, vm_blk, vm_head, vm_tok,       # v_scale / v_min [nb, H, G, D/VG]
    G: tl.constexpr, BLOCK_DK: tl.constexpr, NUM_KEY_PROGRAMS: tl.constexpr,
    NG: tl.constexpr, VG: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """One launch for both kinds: grid axis 2 is NUM_KEY_PROGRAMS key programs, then value ones."""
    j = tl.program_id(0)
    h = tl.program_id(1)
    c = tl.program_id(2)
    blk = tl.load(blocks_ptr + j).to(tl.int64)
    if blk < 0:  # a skipped group: most entries of a decode step's fixed-length list
        return
    if c < NUM_KEY_PROGRAMS:
        _write_keys(k_ptr, sk_tok, sk_head, rows_ptr + j * s_rows, blk, h, c, khi_ptr, klo_ptr, p_blk, p_head,
                    p_tok, ksc_ptr, kmn_ptr, km_blk, km_head, G, BLOCK_DK)
    else:
        _write_values(v_ptr, sv_tok, sv_head, rows_ptr + j * s_rows, blk, h, c - NUM_KEY_PROGRAMS, vhi_ptr,
                      vlo_ptr, pv_blk, pv_head, pv_tok, pv_pair, vsc_ptr, vmn_ptr, vm_blk, vm_head, vm_tok, NG, VG,
                      BLOCK_T)


@triton.jit
def _write_keys(src_ptr, s_tok, s_head, rows_ptr, blk, h, cb, hi_ptr, lo_ptr, p_blk, p_head, p_tok,
                sc_ptr, mn_ptr, m_blk, m_head, G: tl.constexpr, BLOCK_DK: tl.constexpr):
    """All G tokens of BLOCK_DK channels of group `rows_ptr` (min/max over tokens)."""
    t = tl.arange(0, G)
    i = cb * (BLOCK_DK // 2) + tl.arange(0, BLOCK_DK // 2)  # packed byte index = channel pair
    rows = tl.load(rows_ptr + t).to(tl.int64)
    base = src_ptr + rows[:, None] * s_tok + h * s_head
    xe = tl.load(base + 2 * i[None, :]).to(tl.float32)
    xo = tl.load(base + 2 * i[None, :] + 1).to(tl.float32)
    xe = tl.minimum(tl.maximum(xe, -FP16_MAX), FP16_MAX)
    xo = tl.minimum(tl.maximum(xo, -FP16_MAX), FP16_MAX)
    mne = _fp16_directed(tl.min(xe, axis=0), False)
    mno = _fp16_directed(tl.min(xo, axis=0), False)
    se = _scale(mne, tl.max(xe, axis=0))
    so = _scale(mno, tl.max(xo, axis=0))
    hie, loe = _codes(xe, mne[None, :], se[None, :])
    hio, loo = _codes(xo, mno[None, :], so[None, :])

    p_off = blk * p_blk + h * p_head + t[:, None] * p_tok + i[None, :]
    tl.store(hi_ptr + p_off, hie | (hio << 4))
    tl.store(lo_ptr + p_off, loe | (loo << 4))
    m_off = blk * m_blk + h * m_head + 2 * i
    tl.store(sc_ptr + m_off, se)
    tl.store(sc_ptr + m_off + 1, so)
    tl.store(mn_ptr + m_off, mne)
    tl.store(mn_ptr + m_off + 1, mno)


@triton.jit
def _write_values(src_ptr, s_tok, s_head, rows_ptr, blk, h, tb, hi_ptr, lo_ptr, p_blk, p_head, p_tok, p_pair,
                  sc_ptr, mn_ptr, m_blk, m_head, m_tok, NG: tl.constexpr, VG: tl.constexpr, BLOCK_T: tl.constexpr):
    """BLOCK_T tokens of all D channels of group `rows_ptr` (min/max over each v_group)."""
    t = tb * BLOCK_T + tl.arange(0, BLOCK_T)
    g = tl.arange(0, NG)
    i = tl.arange(0, VG // 2)
    # [BLOCK_T, NG, VG/2] tiles: channel pair (g*VG/2 + i) holds channels 2(g*VG/2 + i) and +1.
    pair = g[None, :, None] * (VG // 2) + i[None, None, :]
    rows = tl.load(rows_ptr + t).to(tl.int64)
    base = src_ptr + rows[:, None, None] * s_tok + h * s_head
    xe = tl.load(base + 2 * pair).to(tl.float32)
    xo = tl.load(base + 2 * pair + 1).to(tl.float32)
    xe = tl.minimum(tl.maximum(xe, -FP16_MAX), FP16_MAX)
    xo = tl.minimum(tl.maximum(xo, -FP16_MAX), FP16_MAX)
    mn = _fp16_directed(tl.minimum(tl.min(xe, axis=2), tl.min(xo, axis=2)), False)  # [BLOCK_T, NG]
    s = _scale(mn, tl.maximum(tl.max(xe, axis=2), tl.max(xo, axis=2)))
    hie, loe = _codes(xe, mn[:, :, None], s[:, :, None])
    hio, loo = _codes(xo, mn[:, :, None], s[:, :, None])

    p_off = blk * p_blk + h * p_head + t[:, None, None] * p_tok + pair * p_pair
    tl.store(hi_ptr + p_off, hie | (hio << 4))
    tl.store(lo_ptr + p_off, loe | (loo << 4))
    m_off = blk * m_blk + h * m_head + t[:, None] * m_tok + g[None, :]
    tl.store(sc_ptr + m_off, s)
    tl.store(mn_ptr + m_off, mn)


def write_groups(pages: torch.Tensor, layout, src_k: torch.Tensor, src_v: torch.Tensor,
                 src_rows: torch.Tensor, dest_blocks: torch.Tensor) -> None:
    """Quantize n complete groups into their pages in place (see the module docstring)."""
    n = src_rows.shape[0]
    if n == 0:
        return
    G, H, D, VG = layout.block_size, layout.num_kv_heads, layout.head_dim, layout.v_group
    assert src_rows.shape == (n, G) and dest_blocks.shape == (n,)
    assert src_k.shape[1:] == (H, D) and src_v.shape[1:] == (H, D)
    assert src_k.stride(2) == 1 and src_v.stride(2) == 1 and src_rows.stride(1) == 1
    assert D % VG == 0 and VG % 2 == 0 and triton.next_power_of_2(G) == G
    pv = layout.views(pages)
    block_dk = min(D, 32)  # 32 channels x G tokens per program keeps the fp32 tile in registers
    block_t = min(G, max(1, 4096 // D))
    n_key = D // block_dk
    _write_groups_kernel[(n, H, n_key + G // block_t)](
        src_k, src_k.stride(0), src_k.stride(1), src_v, src_v.stride(0), src_v.stride(1),
        src_rows, src_rows.stride(0), dest_blocks,
        pv.k_hi, pv.k_lo, *pv.k_hi.stride()[:3], pv.k_scale, pv.k_min, *pv.k_scale.stride()[:2],
        pv.v_hi, pv.v_lo, *pv.v_hi.stride(), pv.v_scale, pv.v_min, *pv.v_scale.stride()[:3],
        G=G, BLOCK_DK=block_dk, NUM_KEY_PROGRAMS=n_key, NG=D // VG, VG=VG, BLOCK_T=block_t)
