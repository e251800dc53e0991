"""A decode step's ring rows and flush list in one launch.

Same results as ``vllm_quantspec.hierarchical_kv_backend.ring_destinations`` (the ring row of each
new token) and ``decode_flush`` (the step's fixed-length flush list), its pure-torch twins, for steps
whose queries are at most γ + 1 tokens long (decode, verify and draft steps). The metadata builder runs
every step on the host, outside the CUDA graph it feeds, where the torch twins take about 50 small
kernel launches (benchmarks/results/kernel-times-h200-run3.txt: 62 launches per target-only token
against bf16's 13). Under async scheduling a target-only engine hid them already: one launch instead
changed its ms per token by nothing measurable (e2e-target-only-b1-h200). QuantSpec's draft steps,
whose host work is not hidden, build their metadata here too; their gain is not measured yet.

One program per request: its query tokens' ring rows and, with FLUSH, its K flush entries (the
groups [Q(C - γ - 1), Q(seq_len - 1)), each with its G ring rows and page; -1: no group). One more
program gives the padding tokens past query_start_loc[n] the spare row.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _quantized_len(t, G: tl.constexpr, fp_keep):
    # Q(t) = max(0, floor((t - fp_keep) / G) * G); truncating division differs from floor only below
    # zero, where both clamp to 0
    return tl.maximum((t - fp_keep) // G * G, 0)


@triton.jit
def _decode_metadata_kernel(qsl_ptr, seq_lens_ptr, slot_ptr, bt_ptr, s_bt, max_col, ring_dst_ptr, rows_ptr,
                            blocks_ptr, n, num_tokens, cap, spare, gamma, fp_keep,
                            G: tl.constexpr, K: tl.constexpr, K_P2: tl.constexpr, BLOCK_Q: tl.constexpr,
                            FLUSH: tl.constexpr):
    b = tl.program_id(0)
    if b < n:
        q0 = tl.load(qsl_ptr + b)
        q1 = tl.load(qsl_ptr + b + 1)
        seq = tl.load(seq_lens_ptr + b)
        slot = tl.load(slot_ptr + b).to(tl.int64)
        tok = q0 + tl.arange(0, BLOCK_Q)
        pos = seq - (q1 - tok)
        row = tl.where(pos >= seq - cap, slot * cap + pos % cap, spare)
        tl.store(ring_dst_ptr + tok, row, mask=tok < q1)
        if FLUSH:
            lo = _quantized_len(seq - (q1 - q0) - gamma - 1, G, fp_keep)
            hi = _quantized_len(seq - 1, G, fp_keep)
            k = tl.arange(0, K_P2)
            start = lo + k * G
            page = tl.load(bt_ptr + b * s_bt + tl.minimum(start // G, max_col), mask=k < K, other=-1)
            tl.store(blocks_ptr + b * K + k, tl.where(start < hi, page, -1), mask=k < K)
            g = tl.arange(0, G)
            rows = slot * cap + (start[:, None] + g[None, :]) % cap
            tl.store(rows_ptr + (b * K + k)[:, None] * G + g[None, :], rows, mask=(k < K)[:, None])
    else:
        for p in range(tl.load(qsl_ptr + n), num_tokens, BLOCK_Q):
            tok = p + tl.arange(0, BLOCK_Q)
            tl.store(ring_dst_ptr + tok, tl.full([BLOCK_Q], spare, tl.int64), mask=tok < num_tokens)


def decode_metadata(qsl: torch.Tensor, seq_lens: torch.Tensor, block_table: torch.Tensor, slot: torch.Tensor,
                    config, num_tokens: int, ring_dst: torch.Tensor, flush_rows: torch.Tensor | None = None,
                    flush_blocks: torch.Tensor | None = None) -> None:
    """Fill ring_dst[:num_tokens] (int64) and, given flush_rows / flush_blocks, the first
    n * config.decode_flush_groups entries of those ([m, G] int64, [m] int32) for the n = len(seq_lens)
    requests, whose queries hold at most γ + 1 tokens. `config`: a HierarchicalKVConfig."""
    n, G, k = seq_lens.shape[0], config.group_size, config.decode_flush_groups
    flush = flush_rows is not None
    assert ring_dst.dtype == torch.int64 and ring_dst.numel() >= num_tokens
    assert not flush or (flush_rows.dtype == torch.int64 and flush_rows.shape[1] == G and flush_rows.is_contiguous()
                         and flush_blocks.dtype == torch.int32 and flush_rows.shape[0] >= n * k)
    assert block_table.stride(1) == 1
    _decode_metadata_kernel[(n + 1,)](
        qsl, seq_lens, slot, block_table, block_table.stride(0), max(block_table.shape[1] - 1, 0), ring_dst,
        flush_rows if flush else ring_dst, flush_blocks if flush else ring_dst, n, num_tokens, config.capacity,
        config.num_slots * config.capacity, config.gamma, config.fp_keep,
        G=G, K=k, K_P2=triton.next_power_of_2(k), BLOCK_Q=triton.next_power_of_2(config.gamma + 1), FLUSH=flush)
