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
from vllm_quantspec.reference_attention import attention

G, H, R = 16, 2, 32  # group/block size, kv heads, ring size
# (q_len, cached C, quantized Q): decode with C % G != 0, verify with a ring that wraps
# (positions 48..69 -> ring rows 16..31, 0..5), no pages, empty ring, full ring, fresh prefill
SEQS = [(1, 37, 32), (9, 70, 48), (4, 5, 0), (3, 32, 32), (2, 48, 16), (5, 0, 0)]


@dataclass
class Case:
    inputs: dict  # kwargs of attention() except mode
    hist_k: list  # full-precision cached keys/values per sequence, [C, H, D]
    hist_v: list
    num_blocks: int


def _make_case(seqs, ratio: int, d: int, dtype=torch.float32, seed=0) -> Case:
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(shape, generator=gen).to(dtype)

    b_count, hq = len(seqs), H * ratio
    layout = HierarchicalPageLayout(G, H, d)
    num_blocks = sum(qz // G for _, _, qz in seqs) + 4
    pages = torch.randint(0, 256, (num_blocks, layout.page_bytes), dtype=torch.uint8, generator=gen)
    free = torch.randperm(num_blocks, generator=gen).tolist()
    max_blocks = max(c // G for _, c, _ in seqs) + 1
    # unused table entries point at real (other sequences') pages: reading past Q shows up
    block_table = torch.randint(0, num_blocks, (b_count, max_blocks), dtype=torch.int32, generator=gen)
    slots = torch.randperm(b_count + 1, generator=gen)[:b_count]
    k_ring, v_ring = rand(b_count + 1, R, H, d), rand(b_count + 1, R, H, d)  # garbage outside [Q, C)
    hist_k, hist_v = [], []
    for b, (_, c, qz) in enumerate(seqs):
        hk, hv = rand(c, H, d), rand(c, H, d)
        hist_k.append(hk), hist_v.append(hv)
        blocks = [free.pop() for _ in range(qz // G)]
        block_table[b, :len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        if blocks:
            write_groups(pages, layout, hk, hv, torch.arange(qz).view(-1, G), torch.tensor(blocks, dtype=torch.int32))
        for p in range(qz, c):
            k_ring[slots[b], p % R], v_ring[slots[b], p % R] = hk[p], hv[p]
    t = sum(ql for ql, _, _ in seqs)
    qsl = torch.tensor([0] + [ql for ql, _, _ in seqs], dtype=torch.int32).cumsum(0).to(torch.int32)
    inputs = dict(q=rand(t, hq, d), k_new=rand(t, H, d), v_new=rand(t, H, d), query_start_loc=qsl,
                  seq_lens=torch.tensor([ql + c for ql, c, _ in seqs], dtype=torch.int32),
                  num_quantized=torch.tensor([qz for _, _, qz in seqs], dtype=torch.int32),
                  block_table=block_table, pages=pages, layout=layout, k_ring=k_ring, v_ring=v_ring,
                  ring_slot=slots.to(torch.int32), sm_scale=1 / math.sqrt(d))
    return Case(inputs, hist_k, hist_v, num_blocks)


def _dequantized_history(case: Case, b: int, mode: str):
    """Sequence b's cached K/V [C, H, D] as the cache holds them: pages dequantized one by one, ring rows."""
    inp = case.inputs
    layout, qz = inp["layout"], int(inp["num_quantized"][b])
    views = layout.views(inp["pages"])
    ks, vs = [], []
    for j in range(qz // G):
        blk = int(inp["block_table"][b, j])
        lo_k = views.k_lo[blk] if mode == "int8" else None
        lo_v = views.v_lo[blk] if mode == "int8" else None
        ks.append(dequantize_keys(QuantizedKV(views.k_hi[blk], lo_k, views.k_scale[blk], views.k_min[blk]), mode)
                  .transpose(0, 1))
        vs.append(dequantize_values(QuantizedKV(views.v_hi[blk], lo_v, views.v_scale[blk], views.v_min[blk]), mode)
                  .transpose(0, 1))
    slot, c = int(inp["ring_slot"][b]), case.hist_k[b].shape[0]
    for p in range(qz, c):
        ks.append(inp["k_ring"][slot, p % R][None].float())
        vs.append(inp["v_ring"][slot, p % R][None].float())
    d = layout.head_dim
    return torch.cat([torch.zeros(0, H, d)] + ks), torch.cat([torch.zeros(0, H, d)] + vs)


def _dense(case: Case, history) -> torch.Tensor:
    """Plain per-query softmax attention (fp32) with GQA by repeating kv heads."""
    inp = case.inputs
    q, hq = inp["q"].float(), inp["q"].shape[1]
    out = torch.zeros(q.shape)
    qsl = inp["query_start_loc"].tolist()
    for b in range(len(qsl) - 1):
        hk, hv = history(b)
        k = torch.cat([hk, inp["k_new"][qsl[b]:qsl[b + 1]].float()]).repeat_interleave(hq // H, dim=1)
        v = torch.cat([hv, inp["v_new"][qsl[b]:qsl[b + 1]].float()]).repeat_interleave(hq // H, dim=1)
        for i, t in enumerate(range(qsl[b], qsl[b + 1])):
            n_keys = hk.shape[0] + i + 1  # causal: the cache and new tokens 0..i
            scores = torch.einsum("hd,khd->hk", q[t], k[:n_keys]) * inp["sm_scale"]
            out[t] = torch.einsum("hk,khd->hd", scores.softmax(-1), v[:n_keys])
    return out


@pytest.mark.parametrize("mode", ["int4", "int8"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("ratio", [1, 3, 4, 8])
def test_matches_dense_on_dequantized_cache(mode, d, ratio):
    case = _make_case(SEQS, ratio, d, seed=ratio + d)
    out = attention(**case.inputs, mode=mode)
    assert out.shape == case.inputs["q"].shape and out.dtype == torch.float32
    ref = _dense(case, lambda b: _dequantized_history(case, b, mode))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_model_dtype_inputs():
    case = _make_case(SEQS[:3], 4, 64, dtype=torch.bfloat16)
    out = attention(**case.inputs, mode="int8")
    assert out.dtype == torch.bfloat16
    ref = _dense(case, lambda b: _dequantized_history(case, b, "int8"))
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2)  # bf16 output rounding


def test_int8_is_much_closer_to_full_precision_than_int4():
    case = _make_case(SEQS, 4, 64, seed=11)
    full = _dense(case, lambda b: (case.hist_k[b], case.hist_v[b]))
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
