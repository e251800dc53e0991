"""Each QuantSpec draft step as one CUDA graph.

vLLM runs draft models with piecewise CUDA graphs only: attention runs eagerly between the graph
pieces. For our draft that host work (one custom op, Python and kernel launches per layer) is
several times the draft step's GPU time, and it is paid γ times per verify step. A draft step
feeds one token per request, and the hierarchical backend builds its metadata into persistent
buffers on the device (``HierarchicalKVMetadataBuilder``), so the whole step can be captured once
per batch size and launch bound (``draft_launch_bound``: the attention's splits follow the context;
bounds that launch alike share one, ``shared_draft_bounds``) and replayed: the builder runs before
each step and refreshes those buffers.

A step is replayed only when it is the kind that was captured: every attention layer's metadata
is a single-token hierarchical step, and the inputs and metadata tensors sit at the addresses seen
at capture. Anything else (vLLM's dummy runs, a different batch) runs eagerly as before.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from vllm.config import CUDAGraphMode
from vllm.forward_context import get_forward_context
from vllm.logger import init_logger

logger = init_logger(__name__)


def _step_signature(input_ids: torch.Tensor, positions: torch.Tensor) -> tuple | None:
    """The addresses and sizes a captured step depends on, or None if this is not a draft step."""
    from vllm_quantspec.hierarchical_kv_backend import HierarchicalKVMetadata

    metadata = get_forward_context().attn_metadata
    if not isinstance(metadata, dict) or not metadata:
        return None
    md = next(iter(metadata.values()))
    if not all(isinstance(m, HierarchicalKVMetadata) and m.max_query_len == 1 for m in metadata.values()):
        return None
    tensors = (input_ids, positions, md.query_start_loc, md.seq_lens, md.block_table, md.ring_slot, md.ring_dst)
    return tuple((t.data_ptr(), tuple(t.shape)) for t in tensors) + (md.num_actual_tokens, md.max_seq_len)


class DraftStepGraphs:
    """Wraps the draft model: ``__call__`` replays a captured step when it can; every other
    attribute is the model's own."""

    def __init__(self, model: nn.Module):
        self.model = model
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None

    def __getattr__(self, name: str) -> Any:  # only called for attributes not set in __init__
        return getattr(self.__dict__["model"], name)

    def __call__(self, input_ids: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                 **kwargs: Any) -> torch.Tensor:
        signature = None
        if input_ids is not None and not any(v is not None for v in kwargs.values()):
            signature = _step_signature(input_ids, positions)
        if signature is None:
            return self.model(input_ids=input_ids, positions=positions, **kwargs)
        context = get_forward_context()
        # the inner piecewise graphs must run as plain code inside our capture
        context.cudagraph_runtime_mode = CUDAGraphMode.NONE
        context.batch_descriptor = None
        captured = self._graphs.get(signature)
        if captured is not None:
            captured[0].replay()
            return captured[1]
        out = self.model(input_ids=input_ids, positions=positions)  # this step, eagerly (also a warm-up)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            static_out = self.model(input_ids=input_ids, positions=positions)
        self._pool = graph.pool()
        self._graphs[signature] = (graph, static_out)
        logger.info("QuantSpec: captured a draft-step CUDA graph for %d tokens up to %d positions",
                    input_ids.shape[0], signature[-1])
        return out
