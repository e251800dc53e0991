"""Reference attention over the hierarchical KV cache (the contract of design-brief.md, in torch).

It is what the Triton kernel is tested against, and the CPU execution path inside vLLM, so it
loops over sequences only (never over tokens) and keeps K/V shared across GQA query heads.
"""

import torch

from vllm_quantspec.hierarchical_kv import HierarchicalPageLayout, read_groups


def gather_kv(blocks: torch.Tensor, num_quantized: int, pages: torch.Tensor, layout: HierarchicalPageLayout,
              k_ring: torch.Tensor, v_ring: torch.Tensor, ring_slot: int, k_new: torch.Tensor, v_new: torch.Tensor,
              seq_len: int, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 keys and values [seq_len, H, D] of one sequence (block table row `blocks`, new tokens
    k_new/v_new [q_len, H, D]): pages [0, Q), ring [Q, C), new tokens [C, seq_len)."""
    g, ring_size = layout.block_size, k_ring.shape[1]
    ctx = seq_len - k_new.shape[0]
    assert num_quantized % g == 0 and num_quantized <= ctx and ctx - num_quantized <= ring_size, \
        (num_quantized, ctx, ring_size)
    k_pages, v_pages = read_groups(pages, layout, blocks[:num_quantized // g], mode)  # [n, G, H, D]
    ring_idx = torch.arange(num_quantized, ctx, device=k_ring.device) % ring_size
    keys = (k_pages.flatten(0, 1), k_ring[ring_slot, ring_idx].float(), k_new.float())
    values = (v_pages.flatten(0, 1), v_ring[ring_slot, ring_idx].float(), v_new.float())
    return torch.cat(keys), torch.cat(values)


def causal_gqa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float) -> torch.Tensor:
    """fp32 attention of q [q_len, Hq, D] (the last q_len positions) over k, v [L, H, D].

    Query i sits at position L - q_len + i and sees keys 0 .. L - q_len + i. Query head h reads
    kv head h // (Hq // H): splitting Hq into (H, Hq // H) maps it without copying K/V.
    """
    q_len, hq, d = q.shape
    seq_len, h = k.shape[0], k.shape[1]
    qg = q.float().reshape(q_len, h, hq // h, d)  # a view when q is contiguous
    scores = torch.einsum("qhgd,khd->hgqk", qg, k) * sm_scale
    last_key = seq_len - q_len + torch.arange(q_len, device=q.device)
    visible = torch.arange(seq_len, device=q.device)[None, :] <= last_key[:, None]  # [q_len, L]
    probs = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1)
    return torch.einsum("hgqk,khd->qhgd", probs, v).reshape(q_len, hq, d)


def attention(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, query_start_loc: torch.Tensor,
              seq_lens: torch.Tensor, num_quantized: torch.Tensor, block_table: torch.Tensor, pages: torch.Tensor,
              layout: HierarchicalPageLayout, k_ring: torch.Tensor, v_ring: torch.Tensor, ring_slot: torch.Tensor,
              mode: str, sm_scale: float) -> torch.Tensor:
    """out [T, Hq, D] (q's dtype): decode, verify and chunked prefill alike; see design-brief.md."""
    out = torch.empty_like(q)
    # one host copy of the per-sequence metadata instead of a sync per element
    starts, lens = query_start_loc.tolist(), seq_lens.tolist()
    quantized, slots = num_quantized.tolist(), ring_slot.tolist()
    for b, seq_len in enumerate(lens):
        s, e = starts[b], starts[b + 1]
        if e == s:
            continue
        k, v = gather_kv(block_table[b], quantized[b], pages, layout, k_ring, v_ring, slots[b],
                         k_new[s:e], v_new[s:e], seq_len, mode)
        out[s:e] = causal_gqa_attention(q[s:e], k, v, sm_scale).to(out.dtype)
    return out
