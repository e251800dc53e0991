"""The hierarchical backend's step metadata, built on the device: ring destinations of the new tokens
and the fixed-length decode flush lists, against plain Python loops over the same rules
(HierarchicalKVConfig.flush_range, ring row = slot * capacity + position % capacity); and the host
plan of a step with a prefill chunk under async scheduling, whose host lengths are optimistic."""

import random
from types import SimpleNamespace

import pytest
import torch

import vllm_quantspec
from vllm_quantspec import recent_buffer
from vllm_quantspec.embedded_model import embedded_model_path
from vllm_quantspec.hierarchical_kv_backend import (
    HierarchicalKVMetadataBuilder,
    HierarchicalKVSpec,
    decode_flush,
    draft_launch_bound,
    ring_destinations,
    shared_draft_bounds,
)
from vllm_quantspec.kernels import paged_attention
from vllm_quantspec.recent_buffer import HierarchicalKVConfig


def _config(G=16, gamma=4, fp_min=16, slots=6):
    return HierarchicalKVConfig(group_size=G, v_group=64, fp_min=fp_min, gamma=gamma, num_slots=slots)


def _batch(rng, q_lens, ctxs, pad_reqs=0, pad_tokens=0):
    """query_start_loc / seq_lens as the runner pads them for a CUDA graph: padded requests have no
    tokens and seq_len 0; padded tokens sit past query_start_loc[-1]."""
    q_lens, ctxs = list(q_lens) + [0] * pad_reqs, list(ctxs) + [0] * pad_reqs
    qsl = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0)), dtype=torch.int32)
    seq_lens = torch.tensor([c + q for c, q in zip(ctxs, q_lens)], dtype=torch.int32)
    return qsl, seq_lens, int(qsl[-1]) + pad_tokens


def test_ring_destinations_match_the_rule():
    cfg, rng = _config(), random.Random(0)
    cap, spare = cfg.capacity, cfg.num_slots * cfg.capacity
    # decodes, a verify, a prefill chunk longer than the ring (its early tokens are dropped), padding
    q_lens, ctxs = [1, 5, 300, 3, 1], [40, 77, 0, 500, 0]
    qsl, seq_lens, t = _batch(rng, q_lens, ctxs, pad_reqs=2, pad_tokens=7)
    slot = torch.tensor([3, 0, 5, 1, 2, cfg.num_slots, cfg.num_slots], dtype=torch.int32)
    got = ring_destinations(qsl, seq_lens, slot, torch.arange(t), cfg).tolist()
    want = []
    for b, (q, c) in enumerate(zip(q_lens, ctxs)):
        s = c + q
        want += [int(slot[b]) * cap + p % cap if p >= s - cap else spare for p in range(c, s)]
    want += [spare] * 7
    assert got == want


@pytest.mark.parametrize("G,gamma,fp_min", [(16, 0, 16), (16, 4, 16), (16, 8, 16), (16, 8, 0), (32, 3, 0),
                                             (128, 8, 128)])
def test_decode_flush_lists_every_group_of_the_rule_once(G, gamma, fp_min):
    """For decode and verify queries (<= γ + 1 tokens, what the builder sends this way) the fixed list
    holds exactly the groups of flush_range, each with its ring rows, and decode_flush_groups = 2γ // G + 1
    entries always suffice (a first version admitted queries of fp_keep + 1 tokens: 2 groups, 1 slot)."""
    cfg, rng = _config(G, gamma, fp_min), random.Random(G + gamma)
    per_request = 2 * gamma // G + 1
    cap = cfg.capacity
    for _ in range(40):
        n = rng.randint(1, 5)
        q_lens = [rng.randint(1, gamma + 1) for _ in range(n)]
        ctxs = [rng.randint(0, 20 * G) for _ in range(n)]
        qsl, seq_lens, _ = _batch(rng, q_lens, ctxs, pad_reqs=2)
        slot = torch.tensor(rng.sample(range(cfg.num_slots), n) + [cfg.num_slots] * 2, dtype=torch.int32)
        block_table = torch.randperm(1000)[: (n + 2) * 30].view(n + 2, 30).int()
        assert cfg.decode_flush_groups == per_request
        rows, blocks = decode_flush(qsl, seq_lens, block_table, slot, cfg)
        assert rows.shape == ((n + 2) * per_request, G) and blocks.shape == ((n + 2) * per_request,)
        got = {(int(blk), tuple(r)) for blk, r in zip(blocks.tolist(), rows.tolist()) if blk >= 0}
        want = set()
        for b, (q, c) in enumerate(zip(q_lens, ctxs)):
            lo, hi = cfg.flush_range(c, c + q)
            starts = range(lo, hi, G)
            assert len(starts) <= per_request, (c, q, lo, hi)
            assert hi <= c, "a decode step flushes verified positions only"
            want |= {(int(block_table[b, p // G]), tuple(int(slot[b]) * cap + (p + i) % cap for i in range(G)))
                     for p in starts}
        assert got == want
        assert int((blocks >= 0).sum()) == len(want)  # no group listed twice, padding rows list none


def test_prefill_flush_is_planned_from_exact_lengths_under_async_scheduling(monkeypatch):
    """A step with a prefill chunk plans its flush on the host, for its verify rows too. Under async
    scheduling vLLM plans step n+1 before step n's drafts are judged: its host seq_lens assume every
    draft was accepted (only the device's are corrected, gpu_model_runner._prepare_inputs). The plan
    must be the one of the exact lengths, which a synchronous step gets on the host."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.attention.backend import CommonAttentionMetadata

    vllm_quantspec.register()
    G, gamma = 16, 4  # "single" buffer: fp_keep = γ = 4, the smallest distance to unverified tokens
    config = EngineArgs(model=embedded_model_path(), skip_tokenizer_init=True, dtype="float32", max_model_len=1024,
                        speculative_config={"method": "quantspec", "num_speculative_tokens": gamma,
                                            "kv_group_size": G, "fp_buffer": "single"}).create_engine_config()
    spec = HierarchicalKVSpec(block_size=G, num_kv_heads=3, head_size=64, head_size_v=64, dtype=torch.uint8, v_group=64)

    def builder(async_scheduling: bool) -> HierarchicalKVMetadataBuilder:
        config.scheduler_config.async_scheduling = async_scheduling  # read once, by the builder's __init__
        return HierarchicalKVMetadataBuilder(spec, ["layer"], config, torch.device("cpu"))

    monkeypatch.setattr(recent_buffer, "_RUNNER", lambda: SimpleNamespace(input_batch=SimpleNamespace(
        req_ids=["verify-a", "prefill", "verify-b"])))
    # (context C, query length, drafts of the previous step that were rejected)
    rows = [(30, 1 + gamma, 3), (0, 100, 0), (40, 1 + gamma, 4)]
    q_lens = [q for _, q, _ in rows]
    qsl = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    exact = torch.tensor([c + q for c, q, _ in rows], dtype=torch.int32)
    optimistic = exact + torch.tensor([r for _, _, r in rows], dtype=torch.int32)
    block_table = (torch.arange(len(rows) * 8, dtype=torch.int32) + 100).view(len(rows), 8)

    def plan(b: HierarchicalKVMetadataBuilder, host_seq_lens: torch.Tensor):
        cm = CommonAttentionMetadata(
            query_start_loc=qsl, query_start_loc_cpu=qsl, seq_lens=exact, seq_lens_cpu_upper_bound=host_seq_lens,
            num_reqs=len(rows), num_actual_tokens=int(qsl[-1]), max_query_len=max(q_lens),
            max_seq_len=int(host_seq_lens.max()), block_table_tensor=block_table,
            slot_mapping=torch.zeros(int(qsl[-1]), dtype=torch.int64))
        md = b.build(0, cm)
        return [md.flush_blocks.tolist(), *(t.tolist() for t in md.flush_staging)]

    synchronous = plan(builder(False), exact)
    assert plan(builder(True), optimistic) == synchronous
    cfg = recent_buffer.recent_buffer(config).config
    want = [int(block_table[b, p // G])
            for b, (c, q, _) in enumerate(rows) for p in range(*cfg.flush_range(c, c + q), G)]
    assert synchronous[0] == want
    assert want == [100 + 8 + i for i in range(5)] + [100 + 16 + 1]  # the chunk's 5 groups; verify-b's group 16..31
    # what the host bound alone plans: verify-a's group 16..31 (positions 30 and 31 not verified yet),
    # and not verify-b's, which no later step would flush (their flush ranges start at 32)
    assert plan(builder(False), optimistic)[0] == [100 + 1] + want[:-1]


@pytest.mark.parametrize("is_draft_step", [False, True])
def test_fused_decode_metadata_equals_the_torch_path(monkeypatch, is_draft_step):
    """On a GPU the builder computes a decode, verify or draft step's ring rows and flush list in one
    kernel (kernels/decode_metadata.py, here under the Triton interpreter); the metadata it hands the
    layers is the torch path's, persistent buffers included."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.attention.backend import CommonAttentionMetadata

    vllm_quantspec.register()
    G, gamma = 16, 4
    config = EngineArgs(model=embedded_model_path(), skip_tokenizer_init=True, dtype="float32", max_model_len=1024,
                        speculative_config={"method": "quantspec", "num_speculative_tokens": gamma,
                                            "kv_group_size": G}).create_engine_config()
    spec = HierarchicalKVSpec(block_size=G, num_kv_heads=3, head_size=64, head_size_v=64, dtype=torch.uint8, v_group=64)
    monkeypatch.setattr(recent_buffer, "_RUNNER", lambda: SimpleNamespace(input_batch=SimpleNamespace(
        req_ids=["a", "b", "c"])))
    q_lens = [1, 1, 1] if is_draft_step else [1 + gamma, 1, 3]
    ctxs = [47, 300, 33]  # in the verify batch, a's and c's steps flush a group (fp_keep = G = 16)
    qsl = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist() + [sum(q_lens)], dtype=torch.int32)  # + padding
    seq_lens = torch.tensor([c + q for c, q in zip(ctxs, q_lens)] + [0], dtype=torch.int32)
    cm = CommonAttentionMetadata(
        query_start_loc=qsl, query_start_loc_cpu=qsl, seq_lens=seq_lens, seq_lens_cpu_upper_bound=seq_lens,
        num_reqs=4, num_actual_tokens=sum(q_lens) + 2, max_query_len=max(q_lens), max_seq_len=int(seq_lens.max()),
        block_table_tensor=(torch.arange(4 * 40, dtype=torch.int32) + 100).view(4, 40),
        slot_mapping=torch.zeros(sum(q_lens) + 2, dtype=torch.int64))

    def metadata(fused: bool) -> list:
        b = HierarchicalKVMetadataBuilder(spec, ["layer"], config, torch.device("cpu"))
        b._fused_decode_metadata = fused
        md = b.build_for_drafting(cm, 0) if is_draft_step else b.build(0, cm)
        indices = [x if x is None else x.tolist() for x in (md.ring_dst, md.flush_rows, md.flush_blocks)]
        return indices + [md.max_seq_len]

    torch_path = metadata(False)
    assert metadata(True) == torch_path
    # a draft step's launch bound is its bucket, here the engine's max_model_len (below the 4096 floor)
    assert torch_path[3] == (1024 if is_draft_step else int(seq_lens.max()))
    assert (torch_path[1] is None) == is_draft_step
    assert is_draft_step or sum(blk >= 0 for blk in torch_path[2]) == 2


def test_draft_launch_bound_covers_the_batch_in_few_buckets():
    """A draft step's attention launch is sized by a bucket of the batch's longest sequence (one CUDA
    graph per bucket): never below it (a launch sized for fewer page tiles than it reads is correct
    but slow), at most 25% above it past 32k, and 16 buckets up to 128k."""
    lens = torch.arange(1, 131073).tolist()
    bounds = [draft_launch_bound(n, 131072) for n in lens]
    assert all(b >= n for n, b in zip(lens, bounds))
    assert all(b <= 1.25 * n for n, b in zip(lens, bounds) if n > 32768)
    assert sorted(set(bounds)) == list(range(4096, 32769, 4096)) + [40960 + 8192 * i for i in range(4)] + \
        [81920 + 16384 * i for i in range(4)]
    assert draft_launch_bound(5000, 4608) == 4608


def test_draft_bounds_that_launch_alike_share_one(monkeypatch):
    """Bounds whose draft-step attention launch is the same share the largest of them (draft_graphs then
    captures one graph for them): never below a step's own bound, launching exactly as it, and on the 8B's
    attention (8 KV heads of 4 query heads, G = 128) on an H200's 132 SMs, the 16 bounds up to 128k make 4
    launches at batch 1, 2 at batch 4 and one from batch 16 on."""
    monkeypatch.setattr(paged_attention, "_num_sms", lambda: 132)
    for batch, launches in ((1, 4), (2, 3), (4, 2), (16, 1), (256, 1)):
        shared = shared_draft_bounds(131072, batch, 8, 4, 128, True)
        assert len(shared) == 16 and len(set(shared.values())) == launches, (batch, shared)
        for bound, to in shared.items():
            assert to >= bound
            assert paged_attention.launch(1, to, batch, 8, 4, 128, "int4", True) == \
                paged_attention.launch(1, bound, batch, 8, 4, 128, "int4", True)
    # at batch 1: 4k alone, 8k alone (33 splits, not 32), 12k-48k at 2 warps, 56k-128k at one warp
    assert sorted(set(shared_draft_bounds(131072, 1, 8, 4, 128, True).values())) == [4096, 8192, 49152, 131072]
    assert shared_draft_bounds(4608, 1, 8, 4, 128, True) == {4096: 4096, 4608: 4608}
