"""Reference attention over the hierarchical KV cache, in torch.

It is what the Triton kernels are tested against, and the CPU execution path inside vLLM, so it
loops over sequences and long prefills' query chunks only (never over tokens) and keeps K/V shared
across GQA query heads.

Which keys a query reads quantized depends only on the query's own position t:
    keys at positions p < Q(t) = quantized_len(t)  come from pages (INT4: U plane, INT8: U+L),
    keys at positions Q(t) <= p <= t               are full precision (ring for p < C, new otherwise).
So a token's attention does not depend on how it was batched: one at a time in decode, γ+1 at a time
in a verify step, or in a prefill chunk of any size. That is what makes a QuantSpec run exactly the
target-only run with the same cache.
"""

import torch

from vllm_quantspec.hierarchical_kv import HierarchicalPageLayout, read_groups


QUERY_CHUNK = 256  # query tokens per attention call (at most γ + 1 in decode and verify steps)


def quantized_len(positions: torch.Tensor | int, group_size: int, fp_keep: int) -> torch.Tensor | int:
    """Q(t): whole groups below t - fp_keep (so at least fp_keep tokens before t stay full precision).
    `positions`: an integer tensor (elementwise) or one int."""
    q = (positions - fp_keep) // group_size * group_size  # floor division: negative below fp_keep
    return q.clamp(min=0) if isinstance(q, torch.Tensor) else max(0, q)


def gather_kv(block_table_row: torch.Tensor, q_lo: int, q_hi: int, ctx: int, pages: torch.Tensor,
              layout: HierarchicalPageLayout, k_ring: torch.Tensor, v_ring: torch.Tensor, ring_slot: int,
              k_new: torch.Tensor, v_new: torch.Tensor, mode: str) -> tuple[torch.Tensor, ...]:
    """One sequence's fp32 keys/values: quantized [0, q_hi) from pages, full precision [q_lo, seq_len)
    from the ring ([q_lo, ctx)) and the new tokens."""
    ring_size = k_ring.shape[1]
    assert q_lo % layout.block_size == 0 and q_hi % layout.block_size == 0, (q_lo, q_hi)
    assert ctx - q_lo <= ring_size, (q_lo, ctx, ring_size)
    k_q, v_q = read_groups(pages, layout, block_table_row[: q_hi // layout.block_size], mode)  # [n, G, H, D]
    ring_idx = torch.arange(q_lo, ctx, device=k_ring.device) % ring_size
    k_fp = torch.cat((k_ring[ring_slot, ring_idx].float(), k_new.float()))
    v_fp = torch.cat((v_ring[ring_slot, ring_idx].float(), v_new.float()))
    return k_q.flatten(0, 1), v_q.flatten(0, 1), k_fp, v_fp


def split_gqa_attention(q: torch.Tensor, positions: torch.Tensor, quantized: torch.Tensor, k_q: torch.Tensor,
                        v_q: torch.Tensor, k_fp: torch.Tensor, v_fp: torch.Tensor, fp_start: int,
                        sm_scale: float) -> torch.Tensor:
    """fp32 causal attention of q [q_len, Hq, D] at `positions` over two copies of the keys.

    k_q/v_q [Lq, H, D] hold positions 0..Lq-1 quantized, k_fp/v_fp [Lf, H, D] positions fp_start..
    full precision. Query i reads p < quantized[i] from the first and quantized[i] <= p <= positions[i]
    from the second: one softmax over both. Query head h reads kv head h // (Hq // H): splitting Hq
    into (H, Hq // H) maps it without copying K/V.
    """
    q_len, hq, d = q.shape
    h = k_fp.shape[1]
    qg = q.float().reshape(q_len, h, hq // h, d)
    p_q = torch.arange(k_q.shape[0], device=q.device)
    p_fp = fp_start + torch.arange(k_fp.shape[0], device=q.device)
    use_q = p_q[None, :] < quantized[:, None]  # [q_len, Lq]
    use_fp = (p_fp[None, :] >= quantized[:, None]) & (p_fp[None, :] <= positions[:, None])
    scores = torch.cat((torch.einsum("qhgd,khd->hgqk", qg, k_q).masked_fill(~use_q, float("-inf")),
                        torch.einsum("qhgd,khd->hgqk", qg, k_fp).masked_fill(~use_fp, float("-inf"))), dim=-1)
    probs = (scores * sm_scale).softmax(dim=-1)
    lq = k_q.shape[0]
    out = torch.einsum("hgqk,khd->qhgd", probs[..., :lq], v_q) + torch.einsum("hgqk,khd->qhgd", probs[..., lq:], v_fp)
    return out.reshape(q_len, hq, d)


def attention(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, query_start_loc: torch.Tensor,
              seq_lens: torch.Tensor, block_table: torch.Tensor, pages: torch.Tensor, layout: HierarchicalPageLayout,
              k_ring: torch.Tensor, v_ring: torch.Tensor, ring_slot: torch.Tensor, mode: str, sm_scale: float,
              fp_keep: int) -> torch.Tensor:
    """out [T, Hq, D] (q's dtype) for decode, verify and chunked prefill alike.

    Sequence b's query tokens are rows query_start_loc[b]..[b+1] of q/k_new/v_new, at positions
    C..seq_len-1 with C = seq_len - q_len; keys below C are in pages and in the ring (slot ring_slot[b],
    row p % R). Pages must hold [0, Q(seq_len - 1)), the ring [Q(C), C).
    """
    out = torch.empty_like(q)
    g = layout.block_size
    starts, lens, slots = query_start_loc.tolist(), seq_lens.tolist(), ring_slot.tolist()  # one host copy
    for b, seq_len in enumerate(lens):
        s, e = starts[b], starts[b + 1]
        if e == s:
            continue
        ctx = seq_len - (e - s)
        positions = torch.arange(ctx, seq_len, device=q.device)
        quantized = quantized_len(positions, g, fp_keep)
        q_lo, q_hi = int(quantized[0]), int(quantized[-1])
        k_q, v_q, k_fp, v_fp = gather_kv(block_table[b], q_lo, q_hi, ctx, pages, layout, k_ring, v_ring, slots[b],
                                         k_new[s:e], v_new[s:e], mode)
        # A long prefill in query chunks, each over the keys it can see: scores [H, Hq/H, chunk, keys] instead of
        # [.., q_len, 2 * seq_len] (a 4k prompt took minutes on 2 CPU cores, against vLLM's 300 s step timeout).
        # Decode and verify steps are one chunk over all their keys, as before.
        for i in range(0, e - s, QUERY_CHUNK):
            j = min(i + QUERY_CHUNK, e - s)
            fp_lo, fp_hi = int(quantized[i]) - q_lo, int(positions[j - 1]) + 1 - q_lo
            out[s + i:s + j] = split_gqa_attention(
                q[s + i:s + j], positions[i:j], quantized[i:j], k_q[:int(quantized[j - 1])],
                v_q[:int(quantized[j - 1])], k_fp[fp_lo:fp_hi], v_fp[fp_lo:fp_hi], q_lo + fp_lo, sm_scale).to(out.dtype)
    return out
