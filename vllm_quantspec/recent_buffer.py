"""The full-precision recent-token buffer: per layer a ring of each sequence's newest K/V.

Why a ring outside vLLM's block pool: the recent tokens must stay in full precision, and a page
that held them would be larger than a bf16 page. The ring is small (a few hundred tokens per
sequence), allocated on first use during vLLM's profiling forward, so vLLM counts it before it
sizes the KV pool.

Which keys a query reads from pages is a pure function of its position (``quantized_len``), so
the buffer keeps no per-sequence lengths: the only per-request state is which ring slot a request
owns, tied to vLLM's request lifecycle (P6).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch

from vllm_quantspec import reference_attention
from vllm_quantspec.options import QuantSpecOptions


@dataclass(frozen=True)
class HierarchicalKVConfig:
    """What the backend needs to know about the cache, resolved from the VllmConfig."""

    group_size: int  # G: tokens per key group = per KV page
    v_group: int  # channels per value group
    fp_min: int  # verified tokens that always stay in full precision (G for "double", 0 for "single")
    gamma: int  # speculative tokens per step (0 without speculative decoding)
    num_slots: int  # concurrent sequences (max_num_seqs)

    @property
    def fp_keep(self) -> int:
        """A query at position t reads positions < quantized_len(t) from pages and the rest in full
        precision. At least fp_min tokens before t stay in full precision, and at least γ: a verify
        step's queries C..C+γ must then find every quantized key among verified positions (< C)."""
        return max(self.fp_min, self.gamma)

    def quantized_len(self, position: int) -> int:
        """Q(t) of ``reference_attention.quantized_len``, for one position."""
        return reference_attention.quantized_len(position, self.group_size, self.fp_keep)

    @property
    def capacity(self) -> int:
        """Ring rows per sequence. A target step with context C flushes from rows
        >= quantized_len(C - γ - 1) while the ring already holds the draft's rows up to C + γ - 1 and
        then takes its own up to C + γ: that is G + fp_keep + 2γ + 1 positions."""
        return self.group_size + self.fp_keep + 2 * self.gamma + 1

    @property
    def decode_flush_groups(self) -> int:
        """Most groups a decode or verify step (at most γ + 1 query tokens) flushes per request:
        its flush_range spans q + γ <= 2γ + 1 positions, so 2γ // G + 1 group starts."""
        return 2 * self.gamma // self.group_size + 1

    def flush_range(self, context_len: int, seq_len: int) -> tuple[int, int]:
        """Positions [lo, hi) to quantize into pages in a target step over positions
        context_len..seq_len-1: its last query reads pages up to hi = quantized_len(seq_len - 1),
        all verified (hi <= context_len for a verify step, by fp_keep >= γ).

        The previous step flushed up to quantized_len of its own last position, which is at least
        context_len - γ - 1 (at most γ drafts were accepted since), so lo covers every block not yet
        flushed; a block flushed again is quantized from the same rows and gets the same bytes.
        """
        return self.quantized_len(context_len - self.gamma - 1), self.quantized_len(seq_len - 1)

    @classmethod
    def from_vllm_config(cls, vllm_config: Any) -> "HierarchicalKVConfig":
        spec = vllm_config.speculative_config
        options: QuantSpecOptions | None = getattr(spec, "quantspec", None)
        if options is None:  # the backend without speculative decoding: target-only INT8 cache
            options = QuantSpecOptions(num_speculative_tokens=0, kv_group_size=vllm_config.cache_config.block_size)
        return cls(
            group_size=options.kv_group_size,
            v_group=options.v_group_size or vllm_config.model_config.get_head_size(),
            fp_min=options.fp_buffer_min_tokens(),
            gamma=options.num_speculative_tokens,
            num_slots=vllm_config.scheduler_config.max_num_seqs,
        )


class RecentTokenBuffer:
    """Rings of full-precision K/V ([num_slots, capacity, H, D] per layer) and their slot owners."""

    def __init__(self, config: HierarchicalKVConfig):
        self.config = config
        self.rings: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.slot_of: dict[str, int] = {}
        self.free_slots = list(range(config.num_slots - 1, -1, -1))

    def ring(self, layer_name: str, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
             device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """[num_slots + 1, capacity, H, D] K and V: slot num_slots is the spare one that padding
        rows of a CUDA-graph batch and the dropped early tokens of a long prefill chunk write to."""
        if layer_name not in self.rings:
            shape = (self.config.num_slots + 1, self.config.capacity, num_kv_heads, head_dim)
            self.rings[layer_name] = (torch.zeros(shape, dtype=dtype, device=device),
                                      torch.zeros(shape, dtype=dtype, device=device))
        return self.rings[layer_name]

    # --- slot lifecycle (driven by P6 from the model runner's request bookkeeping) ----------

    def release(self, req_ids: Any) -> None:
        """Requests that finished, were aborted or were preempted give their slot back; a preempted
        request is recomputed from its first token when it resumes, so its ring is rebuilt."""
        for req_id in req_ids or ():
            slot = self.slot_of.pop(req_id, None)
            if slot is not None:
                self.free_slots.append(slot)

    def slots_for_batch(self, num_rows: int) -> list[int]:
        """Ring slot of each row of the runner's current batch, claiming slots for new requests.
        Rows past the runner's requests (CUDA-graph padding, or a capture before any request) get
        the spare slot."""
        runner = _RUNNER() if _RUNNER is not None else None
        req_ids = runner.input_batch.req_ids[:num_rows] if runner is not None else []
        slots = []
        for req_id in req_ids:
            slot = self.slot_of.get(req_id)
            if slot is None:
                if not self.free_slots:
                    raise RuntimeError(
                        f"vllm-quantspec: all {self.config.num_slots} recent-token slots are in use; "
                        "max_num_seqs bounds the running requests, so this is a bug"
                    )
                slot = self.slot_of[req_id] = self.free_slots.pop()
            slots.append(slot)
        return slots + [self.config.num_slots] * (num_rows - len(slots))


# The process's model runner (set by P6) and buffer (made by the backend's first layer or
# metadata builder). A process runs one engine at a time, but tests start several in turn.
_RUNNER: weakref.ref | None = None
_BUFFER: RecentTokenBuffer | None = None
_BUFFER_MODEL: Any = None  # the ModelConfig the buffer was made for (target and draft share it)


def on_runner_update_states(runner: Any, scheduler_output: Any) -> None:
    """P6: called before the model runner applies a scheduler step to its batch."""
    global _RUNNER
    _RUNNER = weakref.ref(runner)
    if _BUFFER is not None:
        _BUFFER.release(scheduler_output.finished_req_ids)
        _BUFFER.release(scheduler_output.preempted_req_ids)


def recent_buffer(vllm_config: Any) -> RecentTokenBuffer:
    global _BUFFER, _BUFFER_MODEL
    if _BUFFER is None or _BUFFER_MODEL is not vllm_config.model_config:
        _BUFFER = RecentTokenBuffer(HierarchicalKVConfig.from_vllm_config(vllm_config))
        _BUFFER_MODEL = vllm_config.model_config
    return _BUFFER
