"""Support for the hierarchical KV backend's end-to-end tests: real prompts, agreement metrics and
in-process vLLM engines, one alive at a time, on the CPU (fp32, the CI suite) or a CUDA GPU (bf16).

The engines run in the test process (VLLM_ENABLE_V1_MULTIPROCESSING=0, on the GPU too) so that tests
can reach the backend's recent-token buffer, and with one torch thread: on 2 shared cores, in-process
vLLM with the default thread count is ~40x slower (research/cpu-vllm.md §2).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import importlib
import inspect
import os
from dataclasses import dataclass
from typing import Any

import pytest

G = 16  # key group = KV page = vLLM block size: small, so short generations cross many flushes
MAX_NUM_SEQS = 8
MAX_MODEL_LEN = 1024

# (object whose docstring or source is the prompt, "doc" | "source", prompt tokens). All come from
# packages pinned by the CI lock (vllm, torch) or the standard library, so the prompts are fixed and
# varied: prose, reStructuredText, Python code. Lengths: 4 below G, 4 of G..2G+1 (prefills that
# flush no group or one), 4 medium, 4 long (hundreds of tokens, many groups quantized at prefill).
PROMPT_SPECS: tuple[tuple[str, str, int], ...] = (
    ("functools:lru_cache", "doc", 6),
    ("json:dumps", "source", 11),
    ("vllm:SamplingParams", "doc", 9),
    ("textwrap:dedent", "doc", 15),
    ("argparse:ArgumentParser", "doc", 16),
    ("torch.nn:Linear", "source", 24),
    ("vllm:LLM.generate", "doc", 32),
    ("functools:lru_cache", "source", 33),
    ("json:dumps", "doc", 70),
    ("textwrap:dedent", "source", 100),
    ("vllm:SamplingParams", "source", 150),
    ("argparse:ArgumentParser", "doc", 200),
    ("torch.nn:Linear", "doc", 300),
    ("vllm:LLM.generate", "source", 400),
    ("torch.nn:MultiheadAttention", "doc", 480),
    ("vllm:LLM", "doc", 500),
)


# Long prompts (test_prompts_up_to_128k, GPU only): the plugin's default page size, vLLM's default chunked
# prefill, and a model length of 128k. SmolLM2 was trained to 8k positions: its config is told 128k, so that
# vLLM builds its rotary table that far (a longer max_model_len alone would index past the table); its text
# past 8k is out of its training but deterministic, and what the test compares is the cache, not the text.
LONG_G = 128
LONG_MODEL_LEN = 131072
QUANTSPEC_GAMMA = 4  # the "quantspec" engines' γ


@dataclass(frozen=True)
class Prompt:
    label: str
    token_ids: list[int]

    def as_input(self) -> dict[str, list[int]]:
        return {"prompt_token_ids": self.token_ids}


def _text(target: str, kind: str) -> str:
    module, _, qualname = target.partition(":")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return inspect.getdoc(obj) if kind == "doc" else inspect.getsource(obj)


@functools.cache
def source_prompts(model: str) -> tuple[Prompt, ...]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    prompts = []
    for target, kind, n in PROMPT_SPECS:
        ids = tok.encode(_text(target, kind), add_special_tokens=False)
        assert len(ids) >= n, (target, kind, len(ids), n)
        prompts.append(Prompt(f"{target} {kind}", ids[:n]))
    return tuple(prompts)


@functools.cache
def long_prompts(model: str, lengths: tuple[int, ...]) -> tuple[Prompt, ...]:
    """Disjoint stretches, of these lengths, of one stream of real text: the installed vLLM package's source
    files in path order (pinned by the lock, like PROMPT_SPECS)."""
    from pathlib import Path

    import vllm
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    ids: list[int] = []
    for path in sorted(Path(vllm.__file__).parent.rglob("*.py")):
        if len(ids) >= sum(lengths):
            break
        ids += tok.encode(path.read_text(), add_special_tokens=False)
    assert len(ids) >= sum(lengths), len(ids)
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    return tuple(Prompt(f"vllm source [{a}:{a + n}]", ids[a:a + n]) for a, n in zip(starts, lengths))


def first_divergence(a: list[int], b: list[int]) -> int:
    """Index of the first differing token (the common length if one is a prefix of the other)."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def token_ids(outputs) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outputs]


# Engine settings per platform. CPU: fp32, eager. GPU: bf16 with vLLM's default compilation, the
# realistic setting (torch.compile; CUDA graphs, full ones for decode-only batches, which the
# hierarchical backend supports, piecewise for the rest); a fifth of the GPU's memory per engine, so
# that the next engine's start-up check passes whatever the previous one left behind.
PLATFORMS: dict[str, dict[str, Any]] = {
    "cpu": dict(dtype="float32", enforce_eager=True),
    "gpu": dict(dtype="bfloat16", gpu_memory_utilization=0.2),
}


def engine_kwargs(model: str, kind: str, platform: str = "cpu") -> dict[str, Any]:
    common = dict(model=model, max_model_len=MAX_MODEL_LEN, seed=0, max_num_seqs=MAX_NUM_SEQS, block_size=G,
                  enable_prefix_caching=False, **PLATFORMS[platform])
    if kind.startswith("long_"):
        common.update(max_model_len=LONG_MODEL_LEN, block_size=LONG_G, max_num_seqs=4,
                      hf_overrides={"max_position_embeddings": LONG_MODEL_LEN})
        kind = kind.removeprefix("long_")
    if kind == "default":  # vLLM's own backend (CPU_ATTN; FlashAttention on the GPU), full-precision KV
        return common
    if kind == "quantspec":  # QuantSpec over the hierarchical cache (its backend implied); stats on, for its counters
        return {**common, "disable_log_stats": False,
                "speculative_config": {"method": "quantspec", "num_speculative_tokens": QUANTSPEC_GAMMA,
                                       "kv_group_size": common["block_size"]}}
    common["attention_backend"] = "CUSTOM"
    if kind == "hierarchical":
        return common
    if kind == "tiny_pool":
        # 40 pages of 16 tokens (one max_model_len request fits) for 8 requests that need 75 at
        # once: vLLM must preempt. Stats on, for the preemption counter. A 40-token step budget also
        # chunks every prefill (and every recompute after preemption) at boundaries that do not
        # follow the groups, with chunks longer than the ring: the other engines never chunk.
        return {**common, "max_model_len": 512, "num_gpu_blocks_override": 40, "max_num_batched_tokens": 40,
                "disable_log_stats": False}
    raise ValueError(kind)


class Engines:
    """At most one in-process LLM at a time (each holds ~2 GB and its own KV pool); asking for
    another kind shuts the current one down first."""

    def __init__(self, model: str, platform: str = "cpu"):
        self.model, self.platform = model, platform
        self.kind: str | None = None
        self.llm = None

    def get(self, kind: str):
        if kind != self.kind:
            self.close()
            from vllm import LLM

            self.llm, self.kind = LLM(**engine_kwargs(self.model, kind, self.platform)), kind
        return self.llm

    def close(self) -> None:
        if self.llm is None:
            return
        from vllm.distributed import cleanup_dist_env_and_memory

        from vllm.platforms import current_platform

        self.llm.llm_engine.engine_core.shutdown()
        self.llm, self.kind = None, None
        gc.collect()
        cleanup_dist_env_and_memory()  # in-process engines leave vLLM's distributed state behind
        # vLLM keeps one CUDA-graph memory pool per process (a class attribute of the platform); the
        # next engine must not capture into the pool of graphs that were just freed (first GPU run:
        # the second engine's capture failed with the caching allocator's "use_count > 0" assert).
        type(current_platform)._global_graph_pool = None


@contextlib.contextmanager
def in_process_environment():
    """Environment for in-process engines, restored afterwards (vLLM changes process-wide state)."""
    import torch
    from vllm import envs

    saved_threads, saved_setter = torch.get_num_threads(), torch.set_num_threads
    envs.disable_envs_cache()  # an earlier in-process engine may have frozen vLLM's view of the environment
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        mp.setenv("VLLM_CPU_KVCACHE_SPACE", os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
        torch.set_num_threads(1)
        try:
            yield
        finally:
            # vLLM's CPU worker replaces torch.set_num_threads for the whole process, and the
            # in-process engine core caches vllm.envs: undo both for the tests that run after us.
            torch.set_num_threads = saved_setter
            torch.set_num_threads(saved_threads)
            envs.disable_envs_cache()
