"""Chunked-prefill attention over the hierarchical cache: dequantize pages into an fp16 workspace and
run vLLM's FlashAttention-3 twice, merged by log-sum-exp.

Same result as ``vllm_quantspec.reference_attention.attention`` (mode int8), for the query lengths of
prefill chunks, where our own paged kernel is compute-bound and far slower than FA3 (0.16x measured,
benchmarks/results/kernels-*.md). The per-query boundary Q(t) (keys p < Q(t) quantized, the rest full
precision) is not a mask FA3 has, but it is piecewise constant: the queries of one sequence with the
same Q(t) = q_r form a run of consecutive positions (G of them, fp_keep + G for q_r = 0); for a run
    quantized part:      keys [0, q_r)  from the workspace, no mask;
    full-precision part: keys [q_r, t]  from a paged copy of the ring and the new tokens, causal.
Each run is one "sequence" of an FA3 varlen call with a block table, so both calls read each key
page once per run that needs it; the workspace and the copy are paged with page size G, and every
run starts at a page boundary (q_r is a multiple of G).

fp16, not bf16: the workspace holds the INT8 values (about 8 significant bits plus the group's
offset) and bf16's 8-bit mantissa would add an error as large as the cache's own; fp16 keeps 11.
Queries and full-precision keys are cast to fp16 too (FA3 needs one dtype); the write kernel clamps
cached values to the fp16 range already.
"""

from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

from vllm_quantspec.reference_attention import quantized_len


@triton.jit
def _dequant_pages_kernel(
    blocks_ptr,                                       # [n] page of each workspace page
    khi_ptr, vhi_ptr, klo_ptr, vlo_ptr, p_blk, p_h, p_t,   # planes [nb, H, G, D/2]: the keys' strides,
    pv_t, pv_i,                                       # the values' token and pair strides (token-minor)
    ksc_ptr, kmn_ptr, km_blk, km_h,                   # key metadata [nb, H, D]
    vsc_ptr, vmn_ptr, vm_blk, vm_h, vm_t,             # value metadata [nb, H, G, D/VG]
    wk_ptr, wv_ptr, w_blk, w_t, w_h,                  # workspace [n, G, H, D] fp16
    D: tl.constexpr, VG: tl.constexpr, BLOCK_T: tl.constexpr, INT8: tl.constexpr,
):
    """One (workspace page, kv head, token tile): x = min + scale * (U + (L - 7.5) / 16) (int8) or
    min + scale * U (int4), in fp32 as hierarchical_kv.dequantize_codes, then rounded to fp16."""
    j = tl.program_id(0)
    h = tl.program_id(1)
    t = tl.program_id(2) * BLOCK_T + tl.arange(0, BLOCK_T)
    i = tl.arange(0, D // 2)  # channel pair: channels 2i (low nibble) and 2i + 1 (high nibble)
    blk = tl.load(blocks_ptr + j).to(tl.int64)
    head = blk * p_blk + h * p_h
    w = j.to(tl.int64) * w_blk + h * w_h + t[:, None] * w_t + 2 * i[None, :]
    for is_v in tl.static_range(2):
        if is_v:
            plane = head + t[:, None] * pv_t + i[None, :] * pv_i
        else:
            plane = head + t[:, None] * p_t + i[None, :]
        hi = tl.load((vhi_ptr if is_v else khi_ptr) + plane)
        c_e = (hi & 15).to(tl.float32)
        c_o = (hi >> 4).to(tl.float32)
        if INT8:
            lo = tl.load((vlo_ptr if is_v else klo_ptr) + plane)
            c_e = c_e + ((lo & 15).to(tl.float32) - 7.5) / 16
            c_o = c_o + ((lo >> 4).to(tl.float32) - 7.5) / 16
        if is_v:  # per token, per VG channels
            m = blk * vm_blk + h * vm_h + t[:, None] * vm_t + (2 * i[None, :]) // VG
            s = tl.load(vsc_ptr + m).to(tl.float32)
            mn = tl.load(vmn_ptr + m).to(tl.float32)
            x_e, x_o = mn + s * c_e, mn + s * c_o  # a channel pair never straddles a value group
        else:  # per channel
            m = blk * km_blk + h * km_h + 2 * i
            s_e = tl.load(ksc_ptr + m).to(tl.float32)[None, :]
            s_o = tl.load(ksc_ptr + m + 1).to(tl.float32)[None, :]
            x_e = tl.load(kmn_ptr + m).to(tl.float32)[None, :] + s_e * c_e
            x_o = tl.load(kmn_ptr + m + 1).to(tl.float32)[None, :] + s_o * c_o
        dst = wv_ptr if is_v else wk_ptr
        tl.store(dst + w, x_e.to(tl.float16))
        tl.store(dst + w + 1, x_o.to(tl.float16))


def dequantize_pages(pages: torch.Tensor, layout, blocks: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 keys and values [n, G, H, D] of pages `blocks`: twin of hierarchical_kv.read_groups
    (whose fp32 result, rounded to fp16, it equals)."""
    G, H, D, VG = layout.block_size, layout.num_kv_heads, layout.head_dim, layout.v_group
    n = blocks.numel()
    wk = torch.empty(n, G, H, D, dtype=torch.float16, device=pages.device)
    wv = torch.empty_like(wk)
    if n == 0:
        return wk, wv
    pv = layout.views(pages)
    assert pv.v_hi.stride()[:2] == pv.k_hi.stride()[:2]  # one page and head offset for both
    block_t = min(G, max(1, 4096 // D))
    _dequant_pages_kernel[(n, H, G // block_t)](
        blocks, pv.k_hi, pv.v_hi, pv.k_lo, pv.v_lo, *pv.k_hi.stride()[:3], *pv.v_hi.stride()[2:],
        pv.k_scale, pv.k_min, *pv.k_scale.stride()[:2], pv.v_scale, pv.v_min, *pv.v_scale.stride()[:3],
        wk, wv, *wk.stride()[:3], D=D, VG=VG, BLOCK_T=block_t, INT8=mode == "int8")
    return wk, wv


@dataclass
class PrefillPlan:
    """The step's runs and index arrays, on the device; the same for every layer (built once per
    step by the metadata builder)."""

    ws_blocks: torch.Tensor  # [n_ws] i32 page of each workspace page (page 0: a dummy)
    fp_rows: torch.Tensor  # [R] i64 rows of the full-precision copy, filled from ...
    fp_from_ring: torch.Tensor  # [R1] i64 flat ring rows (the first R1 of fp_rows)
    fp_from_new: torch.Tensor  # [R - R1] i64 new-token rows (the rest)
    n_fp_pages: int
    cu_seqlens_q: torch.Tensor  # [runs + 1] i32
    len_quantized: torch.Tensor  # [runs] i32 keys of each run in the workspace (1 = the dummy)
    len_full: torch.Tensor  # [runs] i32 keys of each run in the full-precision copy
    pages_quantized: torch.Tensor  # [runs, *] i32 block table into the workspace
    pages_full: torch.Tensor  # [runs, *] i32 block table into the full-precision copy
    drop_quantized: torch.Tensor | None  # [T] bool: rows whose quantized part is empty (the dummy)
    max_q: int
    max_len_quantized: int
    max_len_full: int


def plan_runs(qsl: np.ndarray, seq_lens: np.ndarray, group_size: int, fp_keep: int) -> list[tuple[int, ...]]:
    """Runs of queries with one boundary q_r = Q(t), in row order: (sequence, first row, rows, q_r,
    first position)."""
    runs = []
    for b in range(len(seq_lens)):
        s, start = int(seq_lens[b]), int(qsl[b])
        c = s - int(qsl[b + 1] - qsl[b])
        t = c
        while t < s:
            q_r = quantized_len(t, group_size, fp_keep)
            end = min(s, q_r + fp_keep + group_size)  # the first position with a larger boundary
            runs.append((b, start + t - c, end - t, q_r, t))
            t = end
    return runs


def plan_prefill(qsl: np.ndarray, seq_lens: np.ndarray, ring_slots: list[int], block_table: torch.Tensor,
                 group_size: int, fp_keep: int, ring_capacity: int) -> PrefillPlan:
    """Host planning from vLLM's host copies of the batch; pages are looked up on the device."""
    G, dev = group_size, block_table.device
    qsl, seq_lens = np.asarray(qsl, dtype=np.int64), np.asarray(seq_lens, dtype=np.int64)
    ctx = seq_lens - np.diff(qsl)
    runs = plan_runs(qsl, seq_lens, G, fp_keep)
    # Per sequence: workspace pages [0, Q(s - 1)), full-precision copy of positions [Q(C), s).
    ws_parts, ws_base, fp_base, fp_lo = [block_table.new_zeros(1)], [], [], []
    dst, from_ring, dst_new, from_new = [], [], [], []
    n_ws = n_fp = 0
    for b, (s, c) in enumerate(zip(seq_lens.tolist(), ctx.tolist())):
        n = quantized_len(s - 1, G, fp_keep) // G
        ws_base.append(1 + n_ws)
        ws_parts.append(block_table[b, :n])
        n_ws += n
        lo = quantized_len(c, G, fp_keep)
        fp_base.append(n_fp), fp_lo.append(lo)
        pos = np.arange(lo, s)
        old = pos < c
        dst.append(n_fp * G + pos[old] - lo), from_ring.append(ring_slots[b] * ring_capacity + pos[old] % ring_capacity)
        dst_new.append(n_fp * G + pos[~old] - lo), from_new.append(qsl[b] + pos[~old] - c)
        n_fp += -(-(s - lo) // G)
    n_runs = len(runs)
    max_ws = max([1] + [r[3] // G for r in runs])
    max_fp = max([1] + [-(-(r[4] + r[2] - r[3]) // G) for r in runs])
    cu = np.zeros(n_runs + 1, dtype=np.int64)
    len_q, len_f = np.ones(n_runs, dtype=np.int64), np.zeros(n_runs, dtype=np.int64)
    bt_q, bt_f = np.zeros((n_runs, max_ws), dtype=np.int64), np.zeros((n_runs, max_fp), dtype=np.int64)
    for i, (b, row, n, q_r, t0) in enumerate(runs):
        cu[i + 1] = row + n
        if q_r:
            bt_q[i, : q_r // G] = ws_base[b] + np.arange(q_r // G)
            len_q[i] = q_r
        len_f[i] = t0 + n - q_r
        k_pages = -(-len_f[i] // G)
        bt_f[i, :k_pages] = fp_base[b] + (q_r - fp_lo[b]) // G + np.arange(k_pages)
    drop = np.repeat(np.array([r[3] == 0 for r in runs], dtype=bool), [r[2] for r in runs])
    i64 = np.concatenate([*dst, *dst_new, *from_ring, *from_new]).astype(np.int64)
    i32 = np.concatenate([cu, len_q, len_f, bt_q.ravel(), bt_f.ravel()]).astype(np.int32)
    i64_d = torch.from_numpy(i64).to(dev, non_blocking=True)
    i32_d = torch.from_numpy(i32).to(dev, non_blocking=True)
    n_old = sum(len(x) for x in from_ring)
    n_rows = n_old + sum(len(x) for x in from_new)
    at = np.cumsum([0, n_runs + 1, n_runs, n_runs, bt_q.size, bt_f.size])
    return PrefillPlan(
        ws_blocks=torch.cat(ws_parts), fp_rows=i64_d[:n_rows], fp_from_ring=i64_d[n_rows: n_rows + n_old],
        fp_from_new=i64_d[n_rows + n_old:], n_fp_pages=n_fp,
        cu_seqlens_q=i32_d[at[0]: at[1]], len_quantized=i32_d[at[1]: at[2]], len_full=i32_d[at[2]: at[3]],
        pages_quantized=i32_d[at[3]: at[4]].view(n_runs, max_ws), pages_full=i32_d[at[4]: at[5]].view(n_runs, max_fp),
        drop_quantized=torch.from_numpy(drop).to(dev, non_blocking=True) if drop.any() else None,
        max_q=max([1] + [r[2] for r in runs]), max_len_quantized=int(len_q.max(initial=1)),
        max_len_full=int(len_f.max(initial=1)),
    )


def prefill_attention(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, plan: PrefillPlan,
                      pages: torch.Tensor, layout, k_ring: torch.Tensor, v_ring: torch.Tensor, sm_scale: float,
                      out: torch.Tensor) -> torch.Tensor:
    """INT8 attention of the step's queries (reference_attention.attention's contract) into `out`."""
    from vllm.vllm_flash_attn import flash_attn_varlen_func

    G, (H, D) = layout.block_size, k_new.shape[1:]
    ws_k, ws_v = dequantize_pages(pages, layout, plan.ws_blocks, "int8")
    n_old = plan.fp_from_ring.numel()
    fp = []
    for ring, new in ((k_ring, k_new), (v_ring, v_new)):
        # zeros: FA3 reads whole pages and multiplies the masked keys' values by 0, so garbage (NaN)
        # in the unused rows of a sequence's last page would poison the output
        buf = torch.zeros(plan.n_fp_pages * G, H, D, dtype=torch.float16, device=q.device)
        buf[plan.fp_rows[:n_old]] = ring.view(-1, H, D).index_select(0, plan.fp_from_ring).half()
        buf[plan.fp_rows[n_old:]] = new.index_select(0, plan.fp_from_new).half()
        fp.append(buf.view(plan.n_fp_pages, G, H, D))
    q16 = q.half()
    common = dict(max_seqlen_q=plan.max_q, cu_seqlens_q=plan.cu_seqlens_q, softmax_scale=sm_scale,
                  return_softmax_lse=True, fa_version=3)
    o_q, lse_q = flash_attn_varlen_func(q16, ws_k, ws_v, max_seqlen_k=plan.max_len_quantized,
                                        seqused_k=plan.len_quantized, block_table=plan.pages_quantized,
                                        causal=False, **common)
    o_f, lse_f = flash_attn_varlen_func(q16, *fp, max_seqlen_k=plan.max_len_full, seqused_k=plan.len_full,
                                        block_table=plan.pages_full, causal=True, **common)
    m = torch.maximum(lse_q, lse_f)  # [Hq, T]; the full-precision part is never empty
    w_q, w_f = torch.exp(lse_q - m).T[:, :, None], torch.exp(lse_f - m).T[:, :, None]
    res = (o_q.float() * w_q + o_f.float() * w_f) / (w_q + w_f)
    if plan.drop_quantized is not None:  # rows whose quantized part was only the dummy page
        res = torch.where(plan.drop_quantized[:, None, None], o_f.float(), res)
    out[: q.shape[0]].copy_(res)
    return out
