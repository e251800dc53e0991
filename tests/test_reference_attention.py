"""Reference attention == dense softmax attention over a by-hand dequantized cache."""

import math
from dataclasses import dataclass

import pytest
import torch

from vllm_quantspec.hierarchical_kv import (
    HierarchicalPageLayout,
    QuantizedKV,
    dequantize_keys,
    dequantize_values,
    write_groups,
)
from vllm_quantspec import reference_attention
from vllm_quantspec.reference_attention import attention

G, H, R, KEEP = 16, 2, 32, 16  # group/block size, kv heads, ring size, fp_keep
# (q_len, context C): decode with C % G != 0, a verify step whose ring wraps, short sequences with no
# pages, a prefill chunk whose last queries read some of its own tokens quantized, a fresh prefill
SEQS = [(1, 37), (9, 70), (4, 5), (3, 32), (2, 48), (40, 20), (5, 0)]


def _q(t: int) -> int:
    return max(0, (t - KEEP) // G * G)


@dataclass
class Case:
    inputs: dict  # kwargs of attention() except mode
    full_k: list  # full-precision keys/values per sequence, cached and new: [seq_len, H, D]
    full_v: list


def _make_case(seqs, ratio: int, d: int, dtype=torch.float32, seed=0) -> Case:
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(shape, generator=gen).to(dtype)

    b_count, hq = len(seqs), H * ratio
    layout = HierarchicalPageLayout(G, H, d)
    num_blocks = sum(_q(ql + c - 1) // G for ql, c in seqs) + 4
    pages = torch.randint(0, 256, (num_blocks, layout.page_bytes), dtype=torch.uint8, generator=gen)
    free = torch.randperm(num_blocks, generator=gen).tolist()
    max_blocks = max((ql + c) // G for ql, c in seqs) + 1
    # unused table entries point at real (other sequences') pages: reading past Q shows up
    block_table = torch.randint(0, num_blocks, (b_count, max_blocks), dtype=torch.int32, generator=gen)
    slots = torch.randperm(b_count + 1, generator=gen)[:b_count]
    k_ring, v_ring = rand(b_count + 1, R, H, d), rand(b_count + 1, R, H, d)  # garbage outside [Q(C), C)
    full_k, full_v, new_k, new_v = [], [], [], []
    for b, (ql, c) in enumerate(seqs):
        fk, fv = rand(c + ql, H, d), rand(c + ql, H, d)
        full_k.append(fk), full_v.append(fv), new_k.append(fk[c:]), new_v.append(fv[c:])
        qz = _q(c + ql - 1)  # what the backend has flushed before this step's attention
        blocks = [free.pop() for _ in range(qz // G)]
        block_table[b, :len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        if blocks:
            write_groups(pages, layout, fk, fv, torch.arange(qz).view(-1, G), torch.tensor(blocks, dtype=torch.int32))
        for p in range(_q(c), c):
            k_ring[slots[b], p % R], v_ring[slots[b], p % R] = fk[p], fv[p]
    t = sum(ql for ql, _ in seqs)
    qsl = torch.tensor([0] + [ql for ql, _ in seqs], dtype=torch.int32).cumsum(0).to(torch.int32)
    inputs = dict(q=rand(t, hq, d), k_new=torch.cat(new_k), v_new=torch.cat(new_v), query_start_loc=qsl,
                  seq_lens=torch.tensor([ql + c for ql, c in seqs], dtype=torch.int32),
                  block_table=block_table, pages=pages, layout=layout, k_ring=k_ring, v_ring=v_ring,
                  ring_slot=slots.to(torch.int32), sm_scale=1 / math.sqrt(d), fp_keep=KEEP)
    return Case(inputs, full_k, full_v)


def _dequantized_pages(case: Case, b: int, mode: str):
    """Sequence b's pages, dequantized one by one: [n * G, H, D] keys and values."""
    inp = case.inputs
    views = inp["layout"].views(inp["pages"])
    ks, vs = [torch.zeros(0, H, inp["layout"].head_dim)], [torch.zeros(0, H, inp["layout"].head_dim)]
    for j in range(_q(case.full_k[b].shape[0] - 1) // G):
        blk = int(inp["block_table"][b, j])
        lo_k = views.k_lo[blk] if mode == "int8" else None
        lo_v = views.v_lo[blk] if mode == "int8" else None
        ks.append(dequantize_keys(QuantizedKV(views.k_hi[blk], lo_k, views.k_scale[blk], views.k_min[blk]), mode)
                  .transpose(0, 1))
        vs.append(dequantize_values(QuantizedKV(views.v_hi[blk], lo_v, views.v_scale[blk], views.v_min[blk]), mode)
                  .transpose(0, 1))
    return torch.cat(ks), torch.cat(vs)


def _dense(case: Case, mode: str | None) -> torch.Tensor:
    """Plain per-query softmax attention (fp32), GQA by repeating kv heads. The query at position t
    sees keys p < Q(t) dequantized (mode) and Q(t) <= p <= t in full precision; mode None: all full."""
    inp = case.inputs
    q, hq = inp["q"].float(), inp["q"].shape[1]
    out = torch.zeros(q.shape)
    qsl = inp["query_start_loc"].tolist()
    for b in range(len(qsl) - 1):
        fk, fv = case.full_k[b].float(), case.full_v[b].float()
        dk, dv = _dequantized_pages(case, b, mode) if mode else (fk[:0], fv[:0])
        c = fk.shape[0] - (qsl[b + 1] - qsl[b])
        for i, row in enumerate(range(qsl[b], qsl[b + 1])):
            t = c + i
            qz = _q(t) if mode else 0
            k = torch.cat([dk[:qz], fk[qz:t + 1]]).repeat_interleave(hq // H, dim=1)
            v = torch.cat([dv[:qz], fv[qz:t + 1]]).repeat_interleave(hq // H, dim=1)
            scores = torch.einsum("hd,khd->hk", q[row], k) * inp["sm_scale"]
            out[row] = torch.einsum("hk,khd->hd", scores.softmax(-1), v)
    return out


@pytest.mark.parametrize("mode", ["int4", "int8"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("ratio", [1, 3, 4, 8])
def test_matches_dense_on_dequantized_cache(mode, d, ratio):
    case = _make_case(SEQS, ratio, d, seed=ratio + d)
    out = attention(**case.inputs, mode=mode)
    assert out.shape == case.inputs["q"].shape and out.dtype == torch.float32
    ref = _dense(case, mode)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["int4", "int8"])
def test_query_chunks_match_dense(mode, monkeypatch):
    """Long prefills run in query chunks, each over only the keys it can see. Chunks of 4 query tokens
    (the 40-, 9- and 5-token queries above cross chunk and group boundaries) give the dense result."""
    monkeypatch.setattr(reference_attention, "QUERY_CHUNK", 4)
    case = _make_case(SEQS, 4, 64, seed=7)
    torch.testing.assert_close(attention(**case.inputs, mode=mode), _dense(case, mode), rtol=1e-5, atol=1e-5)


def test_model_dtype_inputs():
    case = _make_case(SEQS[:3], 4, 64, dtype=torch.bfloat16)  # bf16 q, ring and new K/V
    out = attention(**case.inputs, mode="int8")
    assert out.dtype == torch.bfloat16
    ref = _dense(case, "int8")
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2)  # bf16 output rounding


def test_int8_is_much_closer_to_full_precision_than_int4():
    case = _make_case(SEQS, 4, 64, seed=11)
    full = _dense(case, None)
    err4 = (attention(**case.inputs, mode="int4") - full).abs().max()
    err8 = (attention(**case.inputs, mode="int8") - full).abs().max()
    assert err8 < err4 / 8, (err4, err8)  # ~16x finer steps; int4 itself is a real perturbation
    assert err4 > 1e-2


def test_new_tokens_are_causal():
    # changing the last new token of a sequence changes only that query's output
    case = _make_case(SEQS[:2], 1, 64)
    base = attention(**case.inputs, mode="int8")
    last = int(case.inputs["query_start_loc"][2]) - 1
    case.inputs["k_new"][last] += 3.0
    case.inputs["v_new"][last] += 3.0
    moved = (attention(**case.inputs, mode="int8") - base).abs().amax(dim=(1, 2))
    assert moved[last] > 0 and moved[:last].eq(0).all()
