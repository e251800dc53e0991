"""vLLM attention backend over the paged hierarchical KV cache (registered as vLLM's CUSTOM backend).

Each KV page holds one group of G tokens as 4-bit upper and lower planes plus fp16 scales (layout in
``hierarchical_kv.HierarchicalPageLayout``); the newest tokens of each sequence stay in a
full-precision ring (``recent_buffer``). Target layers read pages as INT8 (both planes); draft layers
(``draft_model.*``, the QuantSpec proposer) read the same pages as INT4 (upper plane only).

Per layer and step, in this order: complete, verified groups are flushed from the ring (or, in
prefill, from the new K/V) into their pages; attention reads, for a query at position t, pages below
Q(t) and full-precision keys from Q(t) on (the ring below the step's context C, the layer's input
from C); last, the new K/V go to the ring. Writing last matters: a long prefill chunk wraps the
ring, and the flush and the attention still need the context rows it overwrites. (A query of at most
γ + 1 tokens cannot wrap onto the rows it reads, so on a GPU the paged kernel writes its K/V while it
attends, saving two launches per layer.) Only the target flushes, and only verified tokens.

Kernels: on a GPU, decode and verify steps run our Triton paged kernel and replay as full CUDA
graphs (the metadata builder keeps their indices in persistent buffers); prefill steps run
FlashAttention-3 over a dequantized workspace (``kernels/prefill_attention.py``). On a CPU every
step runs the torch reference. Under vLLM's batch-invariant mode (VLLM_BATCH_INVARIANT=1) the target's
kernels compute each token's row the same way in any step (see ``paged_attention``), so greedy
QuantSpec, whose verify rows are then the target-only run's decode rows, repeats it token for token.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import numpy as np
import torch
from vllm import envs
from vllm.config import VllmConfig, get_current_vllm_config
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionLayer,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
)
from vllm.v1.kv_cache_interface import AttentionSpec, FullAttentionSpec

from vllm_quantspec import hierarchical_kv, reference_attention
from vllm_quantspec.hierarchical_kv import HierarchicalPageLayout
from vllm_quantspec.kernels.decode_metadata import decode_metadata
from vllm_quantspec.kernels.paged_attention import launch
from vllm_quantspec.kernels.prefill_attention import PrefillPlan, plan_prefill, prefill_attention
from vllm_quantspec.options import KV_GROUP_SIZES
from vllm_quantspec.recent_buffer import HierarchicalKVConfig, recent_buffer

DRAFT_PREFIX = "draft_model."  # vLLM names the proposer's layers draft_model.<target layer name>


@dataclass(frozen=True, kw_only=True)
class HierarchicalKVSpec(FullAttentionSpec):
    """A full-attention KV spec whose page is the packed hierarchical layout, so vLLM's KV budget
    counts the real bytes (about 0.52x of bf16 at G = head_dim = 128)."""

    v_group: int = 0

    def layout(self) -> HierarchicalPageLayout:
        return HierarchicalPageLayout(self.block_size, self.num_kv_heads, self.head_size, self.v_group)

    @property
    def real_page_size_bytes(self) -> int:
        return self.layout().page_bytes

    @classmethod
    def merge(cls, specs):
        merged = super().merge(specs)
        assert all(s.v_group == specs[0].v_group for s in specs), "one v_group per KV cache group"
        return replace(merged, v_group=specs[0].v_group)


class HierarchicalKVBackend(AttentionBackend):
    forward_includes_kv_cache_update: bool = True  # writes happen in forward (ring + flush)
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto"]

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"  # vLLM maps the backend's name back to its enum slot

    @staticmethod
    def get_supported_kernel_block_sizes() -> list[int]:
        return list(KV_GROUP_SIZES)  # one page is one key group

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return [64, 128]

    @staticmethod
    def get_impl_cls() -> type["HierarchicalKVImpl"]:
        return HierarchicalKVImpl

    @staticmethod
    def get_builder_cls() -> type["HierarchicalKVMetadataBuilder"]:
        return HierarchicalKVMetadataBuilder

    @staticmethod
    def get_kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_size: int,
                           cache_dtype_str: str = "auto") -> tuple[int, ...]:
        v_group = HierarchicalKVConfig.from_vllm_config(get_current_vllm_config()).v_group
        return num_blocks, HierarchicalPageLayout(block_size, num_kv_heads, head_size, v_group).page_bytes

    @classmethod
    def get_kv_cache_spec_for_layer(cls, layer: AttentionLayer, vllm_config: VllmConfig) -> AttentionSpec:
        """Called through patch P5 from vLLM's Attention.get_kv_cache_spec."""
        config = HierarchicalKVConfig.from_vllm_config(vllm_config)
        return HierarchicalKVSpec(
            block_size=vllm_config.cache_config.block_size,
            num_kv_heads=layer.num_kv_heads,
            head_size=layer.head_size,
            head_size_v=layer.head_size_v,
            dtype=torch.uint8,
            v_group=config.v_group,
        )

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @classmethod
    def supports_kv_connector(cls) -> bool:
        return False

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return False

    @classmethod
    def supports_batch_invariance(cls) -> bool:
        return True  # the target's kernels take batch_invariant (HierarchicalKVImpl.forward)

    @staticmethod
    def use_cascade_attention(*args, **kwargs) -> bool:
        return False


def _ops(device: torch.device):
    """(attention, write_groups): the Triton kernels on a GPU, their pure-torch reference elsewhere."""
    if device.type == "cuda":
        from vllm_quantspec.kernels.hierarchical_kv_write import write_groups
        from vllm_quantspec.kernels.paged_attention import paged_attention

        return paged_attention, write_groups
    return reference_attention.attention, hierarchical_kv.write_groups


@dataclass
class HierarchicalKVMetadata:
    num_reqs: int
    num_actual_tokens: int
    max_query_len: int
    max_seq_len: int
    query_start_loc: torch.Tensor  # [B+1] i32
    seq_lens: torch.Tensor  # [B] i32
    block_table: torch.Tensor  # [B, max_blocks] i32
    ring_slot: torch.Tensor  # [B] i32 (padding rows: the spare slot)
    ring_dst: torch.Tensor  # [T] i64 flat ring row of each new token (spare slot if not kept)
    # Flush, target steps only: group j = source rows flush_rows[j] -> page flush_blocks[j] (< 0: none).
    # The rows index the ring (decode/verify steps) or, with flush_staging, a staging buffer filled
    # from the ring and the new tokens (prefill steps).
    flush_rows: torch.Tensor | None = None  # [n, G] i64
    flush_blocks: torch.Tensor | None = None  # [n] i32
    flush_staging: tuple[torch.Tensor, ...] | None = None  # (staged rows, ring rows, staged rows, new rows)
    prefill_plan: PrefillPlan | None = None  # GPU prefill steps: FlashAttention-3 over a workspace
    fp_keep: int = 0  # query t reads positions < quantized_len(t; fp_keep) from pages


def ring_destinations(qsl: torch.Tensor, seq_lens: torch.Tensor, slot: torch.Tensor, tokens: torch.Tensor,
                      config: HierarchicalKVConfig) -> torch.Tensor:
    """Flat ring row of each new token (tokens = arange(T)): slot * capacity + position % capacity
    for the last `capacity` positions of its sequence; the spare slot's row 0 for the others (a long
    prefill chunk's early tokens) and for padding tokens past query_start_loc[-1]."""
    cap, n = config.capacity, seq_lens.shape[0]
    spare = config.num_slots * cap
    if n == 0:
        return torch.full_like(tokens, spare)
    ends = qsl[1:].long()
    req = torch.searchsorted(ends, tokens, right=True)  # padding tokens: n
    live = req < n
    req = req.clamp_(max=n - 1)
    s = seq_lens.long()[req]
    pos = s - (ends[req] - tokens)
    row = slot.long()[req] * cap + pos % cap
    return row.masked_fill_(~(live & (pos >= s - cap)), spare)


def decode_flush(qsl: torch.Tensor, seq_lens: torch.Tensor, block_table: torch.Tensor, slot: torch.Tensor,
                 config: HierarchicalKVConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """A decode or verify step's flush, as k = config.decode_flush_groups fixed entries per request:
    source ring rows [n * k, G] and pages [n * k] (-1: no group). Request b flushes the groups
    [Q(C - γ - 1), Q(seq_len - 1)) (HierarchicalKVConfig.flush_range): for a query of at most γ + 1
    tokens that range is verified (below C, by fp_keep >= γ), still in the ring, and at most k
    groups long."""
    g, cap, per_request = config.group_size, config.capacity, config.decode_flush_groups
    seq = seq_lens.long()
    ctx = seq - (qsl[1:] - qsl[:-1]).long()
    lo = reference_attention.quantized_len(ctx - config.gamma - 1, g, config.fp_keep)
    hi = reference_attention.quantized_len(seq - 1, g, config.fp_keep)
    start = lo[:, None] + torch.arange(per_request, device=seq.device) * g  # [n, per_request]
    col = (start // g).clamp_(max=block_table.shape[1] - 1)
    blocks = torch.where(start < hi[:, None], block_table.gather(1, col).long(), -1)
    rows = slot.long()[:, None, None] * cap + (start[:, :, None] + torch.arange(g, device=seq.device)) % cap
    return rows.view(-1, g), blocks.view(-1).int()


def draft_launch_bound(max_seq_len: int, max_model_len: int) -> int:
    """The sequence-length bound a draft step's attention launch is sized by (its splits and warps):
    `max_seq_len` rounded up to a multiple of 4096, or past 32k of a quarter of its power of two (at
    most 25% more page tiles than the batch has), capped at max_model_len. Each bound is one CUDA graph
    per batch size (draft_graphs), captured when the batch's longest sequence first enters it (bounds
    that launch alike share one: `shared_draft_bounds`). The bound only sizes the launch (a split takes
    its share of its sequence's actual length on the device), so any bound is correct. Sized by max_model_len instead (before), a 128k engine drafted
    at 4k with the 128k launch: 132 one-warp splits per KV head, each with at most one 64-token page
    tile, merged from 132 partials (e2e-batch1-onewarp-h200: 17.10 ms a verify step at 4k against
    15.52 before the one-warp launch)."""
    step = 1 << max(max_seq_len.bit_length() - 3, 12)
    return min(max_model_len, -(-max_seq_len // step) * step)


def shared_draft_bounds(max_model_len: int, num_seqs: int, num_kv_heads: int, grp: int, G: int,
                        per_token_values: bool) -> dict[int, int]:
    """Each `draft_launch_bound` up to max_model_len -> the largest of them that gives num_seqs sequences the
    same INT4 single-token attention launch (tiles and splits: kernels/paged_attention.launch). Since draft_graphs
    keys a step by its bound, bounds that launch alike then share one CUDA graph. With 8 KV heads of 4 query
    heads on 132 SMs, the 16 bounds up to 128k make 4 launches at batch 1, 2 at batch 4, one from batch 16 on."""
    bounds, b = [], 0
    while b < max_model_len:
        b = draft_launch_bound(b + 1, max_model_len)
        bounds.append(b)
    launches = {b: launch(1, b, num_seqs, num_kv_heads, grp, G, "int4", per_token_values) for b in bounds}
    return {b: max(c for c in bounds if launches[c] == launches[b]) for b in bounds}


class HierarchicalKVMetadataBuilder(AttentionMetadataBuilder[HierarchicalKVMetadata]):
    """Builds the step's ring and flush indices on the device, without a host sync (but one in steps
    with a prefill chunk under async scheduling with drafts: ``_prefill_flush``).

    Decode and verify steps (every query length <= γ + 1) flush only from the ring, at most
    ``decode_flush_groups`` groups per request: their indices have a fixed shape and are written into
    persistent buffers, so vLLM can capture and replay those steps as full CUDA graphs (uniform
    batches). Steps with longer queries (prefill chunks) run eagerly and may flush any number of
    groups, partly from the new tokens.
    """

    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.UNIFORM_BATCH

    def __init__(self, kv_cache_spec: AttentionSpec, layer_names: list[str], vllm_config: VllmConfig,
                 device: torch.device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.buffer = recent_buffer(vllm_config)
        self.config = cfg = self.buffer.config
        self.device = device
        # verify steps (1 + γ query tokens) are decodes, not prefills
        self._init_reorder_batch_threshold(1 + cfg.gamma, supports_spec_as_decode=True)
        sched = vllm_config.scheduler_config
        # rows and tokens of any step, CUDA-graph padding included (capture sizes count tokens)
        max_reqs = max(sched.max_num_seqs, sched.max_num_batched_tokens)
        max_tokens = max(sched.max_num_batched_tokens, sched.max_num_seqs * (1 + cfg.gamma))
        i64 = dict(dtype=torch.int64, device=device)
        self._slot = torch.zeros(max_reqs, dtype=torch.int32, device=device)
        self._seq_lens = torch.zeros(max_reqs, dtype=torch.int32, device=device)
        self._max_model_len = vllm_config.model_config.max_model_len
        # what a draft step's attention launch depends on besides its bound (_draft_bound)
        self._kv_heads, self._head_size = kv_cache_spec.num_kv_heads, kv_cache_spec.head_size
        self._grp = vllm_config.model_config.get_num_attention_heads(vllm_config.parallel_config) // self._kv_heads
        self._draft_bounds: dict[int, dict[int, int]] = {}
        # vLLM's host seq_lens (seq_lens_cpu_upper_bound) are exact, except under async scheduling with
        # speculative decoding: the runner then plans step n+1 before step n's acceptance is known, and
        # its host values assume every draft was accepted (it corrects only the device seq_lens).
        self._host_seq_lens_exact = not (sched.async_scheduling and vllm_config.speculative_config is not None)
        # FA3 would compute a decode row of a mixed step otherwise than the paged kernel does in a decode
        # step: under VLLM_BATCH_INVARIANT every target row goes through the paged kernel (HierarchicalKVImpl)
        self._plan_fa3_prefill = device.type == "cuda" and not envs.VLLM_BATCH_INVARIANT
        # about 50 small torch ops a step launched from the host become one launch (kernels/decode_metadata.py)
        self._fused_decode_metadata = device.type == "cuda"
        self._slot_host: list[int] = []
        self._ring_dst = torch.zeros(max_tokens, **i64)
        self._tokens = torch.arange(max_tokens, **i64)
        self._flush_rows = torch.zeros(max_reqs * cfg.decode_flush_groups, cfg.group_size, **i64)
        self._flush_blocks = torch.zeros(max_reqs * cfg.decode_flush_groups, dtype=torch.int32, device=device)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> HierarchicalKVMetadata:
        return self._build(common_attn_metadata, is_draft_step=False)

    def build_for_drafting(self, common_attn_metadata: CommonAttentionMetadata,
                           draft_index: int) -> HierarchicalKVMetadata:
        return self._build(common_attn_metadata, is_draft_step=True)

    def _draft_bound(self, n: int, max_seq_len: int) -> int:
        """A draft step's launch bound for n sequences (`shared_draft_bounds`, computed once per n)."""
        if n not in self._draft_bounds:
            cfg = self.config
            self._draft_bounds[n] = shared_draft_bounds(self._max_model_len, n, self._kv_heads, self._grp,
                                                        cfg.group_size, cfg.v_group == self._head_size)
        return self._draft_bounds[n][draft_launch_bound(max_seq_len, self._max_model_len)]

    def _build(self, cm: CommonAttentionMetadata, is_draft_step: bool) -> HierarchicalKVMetadata:
        """Target steps flush; draft steps (one token each) only read pages and write the ring."""
        cfg, n, t = self.config, cm.num_reqs, cm.num_actual_tokens
        slot = self._ring_slots(n)
        # Draft steps get seq_lens in a fresh tensor each step: a persistent copy (and a split-K
        # bound that changes only between buckets) let draft_graphs replay a captured step.
        seq_lens = self._seq_lens[:n].copy_(cm.seq_lens[:n]) if is_draft_step else cm.seq_lens[:n]
        max_seq_len = self._draft_bound(n, cm.max_seq_len) if is_draft_step else cm.max_seq_len
        qsl = cm.query_start_loc[: n + 1]
        decode_step = cm.max_query_len <= cfg.gamma + 1  # decode, verify or draft step
        # on a GPU its ring rows and flush list come from one kernel (decode_metadata)
        fused = self._fused_decode_metadata and decode_step and t <= self._ring_dst.numel()
        if fused:
            flush = () if is_draft_step else (self._flush_rows, self._flush_blocks)
            decode_metadata(qsl, seq_lens, cm.block_table_tensor[:n], slot, cfg, t, self._ring_dst, *flush)
            ring_dst = self._ring_dst[:t]
        else:
            ring_dst = self._ring_destinations(qsl, seq_lens, slot, t)
        md = HierarchicalKVMetadata(
            num_reqs=n, num_actual_tokens=t, max_query_len=cm.max_query_len, max_seq_len=max_seq_len,
            query_start_loc=qsl, seq_lens=seq_lens, block_table=cm.block_table_tensor[:n],
            ring_slot=slot, ring_dst=ring_dst,
            # A draft query at t reads pages only below quantized_len(t - γ): the target has flushed
            # that far (t - γ is at most its last verified position), and no further.
            fp_keep=cfg.fp_keep + (cfg.gamma if is_draft_step else 0),
        )
        if not is_draft_step:
            if fused:
                m = n * cfg.decode_flush_groups
                md.flush_rows, md.flush_blocks = self._flush_rows[:m], self._flush_blocks[:m]
            elif decode_step:
                md.flush_rows, md.flush_blocks = self._decode_flush(md)
            else:
                self._prefill_flush(md, cm)
        return md

    def _ring_slots(self, n: int) -> torch.Tensor:
        """Ring slot per batch row, in a persistent buffer; padding rows get the spare slot. Copied
        to the device only when the batch's slots change (from pageable memory: the host list may
        change again before the copy runs)."""
        slots = self.buffer.slots_for_batch(n)
        if slots != self._slot_host[:n]:  # a shorter cached list never compares equal
            self._slot[:n].copy_(torch.tensor(slots, dtype=torch.int32), non_blocking=True)
            self._slot_host = slots
        return self._slot[:n]

    def _ring_destinations(self, qsl: torch.Tensor, seq_lens: torch.Tensor, slot: torch.Tensor,
                           t: int) -> torch.Tensor:
        rows = ring_destinations(qsl, seq_lens, slot, self._tokens[:t] if t <= self._tokens.numel()
                                 else torch.arange(t, device=self.device), self.config)
        return self._ring_dst[:t].copy_(rows) if t <= self._ring_dst.numel() else rows

    def _decode_flush(self, md: HierarchicalKVMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        m = md.num_reqs * self.config.decode_flush_groups
        rows, blocks = decode_flush(md.query_start_loc, md.seq_lens, md.block_table, md.ring_slot, self.config)
        return self._flush_rows[:m].copy_(rows), self._flush_blocks[:m].copy_(blocks)

    def _prefill_flush(self, md: HierarchicalKVMetadata, cm: CommonAttentionMetadata) -> None:
        """Any number of groups per request, from the ring (positions < C) and the new tokens;
        planned on the host from exact host copies of the batch, pages looked up on the device.

        Where vLLM's host seq_lens are only an upper bound (async scheduling with drafts), a decode row
        of a mixed step would be planned past its verified tokens, from the wrong rows, and skip the
        groups below its true context: such steps read the device's seq_lens back (one sync, in steps
        with a prefill chunk only; decode and verify steps stay on the device)."""
        cfg, n = self.config, md.num_reqs
        qsl = cm.query_start_loc_cpu[: n + 1].numpy().astype(np.int64)
        seq_lens = cm.seq_lens_cpu_upper_bound if self._host_seq_lens_exact else None
        seq_lens = (seq_lens if seq_lens is not None else cm.seq_lens.cpu())[:n].numpy().astype(np.int64)
        ctx = seq_lens - np.diff(qsl)
        slots = self._slot_host
        cap, g = cfg.capacity, cfg.group_size
        req, col, ring_rows, ring_src, new_rows, new_src = [], [], [], [], [], []
        for b in range(n):
            c, lo, hi = int(ctx[b]), *cfg.flush_range(int(ctx[b]), int(seq_lens[b]))
            for block_start in range(lo, hi, g):
                j = len(req)
                req.append(b), col.append(block_start // g)
                pos = np.arange(block_start, block_start + g)
                staged = j * g + np.arange(g)
                old = pos < c
                ring_rows.append(staged[old]), ring_src.append(slots[b] * cap + pos[old] % cap)
                new_rows.append(staged[~old]), new_src.append(qsl[b] + pos[~old] - c)

        def dev(parts):
            arr = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
            return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.int64)).to(self.device, non_blocking=True)

        md.flush_blocks = md.block_table[dev([np.array(req, dtype=np.int64)]), dev([np.array(col, dtype=np.int64)])]
        md.flush_rows = torch.arange(len(req) * g, device=self.device).view(len(req), g)
        md.flush_staging = (dev(ring_rows), dev(ring_src), dev(new_rows), dev(new_src))
        if self._plan_fa3_prefill:  # our paged kernel is compute-bound on long query chunks
            md.prefill_plan = plan_prefill(qsl, seq_lens, slots[:n], md.block_table, g, cfg.fp_keep, cap)


class HierarchicalKVImpl(AttentionImpl[HierarchicalKVMetadata]):
    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int | None = None,
                 alibi_slopes: list[float] | None = None, sliding_window: int | None = None,
                 kv_cache_dtype: str = "auto", logits_soft_cap: float | None = None,
                 attn_type: str = AttentionType.DECODER, kv_sharing_target_layer_name: str | None = None,
                 **extra) -> None:
        if alibi_slopes is not None or sliding_window is not None or logits_soft_cap:
            raise ValueError("the hierarchical KV backend supports plain causal attention only "
                             "(no ALiBi, sliding window or logit soft-capping)")
        self.num_heads, self.head_size, self.scale = num_heads, head_size, scale
        self.num_kv_heads = num_kv_heads or num_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type
        self.kv_sharing_target_layer_name = kv_sharing_target_layer_name
        vllm_config = get_current_vllm_config()
        self.buffer = recent_buffer(vllm_config)
        # Bytes of the GPU prefill path's transient buffers at their largest: the fp16 workspace (K and
        # V of a max_model_len sequence) and about four fp32 [tokens, heads, head_size] tensors of the
        # merge for a full step. Allocated and freed in vLLM's profiling forward, so the KV pool leaves room.
        tokens = vllm_config.scheduler_config.max_num_batched_tokens
        self.prefill_scratch_bytes = (2 * 2 * vllm_config.model_config.max_model_len * self.num_kv_heads * head_size
                                      + 4 * 4 * tokens * num_heads * head_size)
        self.layout: HierarchicalPageLayout | None = None
        self.ops = None
        self.batch_invariant = envs.VLLM_BATCH_INVARIANT

    def forward(self, layer: AttentionLayer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, attn_metadata: HierarchicalKVMetadata, output: torch.Tensor,
                output_scale: torch.Tensor | None = None, output_block_scale: torch.Tensor | None = None
                ) -> torch.Tensor:
        """Flush, attention, ring write (on a GPU, outside prefill steps, the attention kernel's own).
        Decode steps issue the same launches with the same shapes
        every step (no host decision depends on the step's data), so a CUDA graph can replay them."""
        is_draft = layer.layer_name.startswith(DRAFT_PREFIX)
        target_name = layer.layer_name[len(DRAFT_PREFIX):] if is_draft else layer.layer_name
        # Created during vLLM's profiling forward, so the KV pool is sized after it.
        k_ring, v_ring = self.buffer.ring(target_name, self.num_kv_heads, self.head_size, key.dtype, key.device)
        if attn_metadata is None:  # profiling run
            if key.is_cuda and not is_draft:
                torch.empty(self.prefill_scratch_bytes, dtype=torch.uint8, device=key.device)
            return output
        if self.layout is None:
            v_group = self.buffer.config.v_group
            self.layout = HierarchicalPageLayout(self.buffer.config.group_size, self.num_kv_heads, self.head_size,
                                                 v_group)
            self.ops = _ops(query.device)
        attention, write_groups = self.ops
        md, t = attn_metadata, attn_metadata.num_actual_tokens
        q, k, v = query[:t], key[:t], value[:t]
        flat_k, flat_v = k_ring.view(-1, *k_ring.shape[2:]), v_ring.view(-1, *v_ring.shape[2:])
        if not is_draft and md.flush_rows is not None:
            self._flush(md, kv_cache, flat_k, flat_v, k, v, write_groups)
        args = (q, k, v, md.query_start_loc, md.seq_lens, md.block_table, kv_cache, self.layout,
                k_ring, v_ring, md.ring_slot, "int4" if is_draft else "int8", self.scale, md.fp_keep)
        # VLLM_BATCH_INVARIANT (the builder then plans no FA3 prefill): the target's rows go through the
        # paged kernel's invariant launch. The draft's rows only propose tokens: they keep the fast launch.
        invariant = self.batch_invariant and not is_draft
        if md.prefill_plan is not None and not is_draft:
            prefill_attention(q, k, v, md.prefill_plan, kv_cache, self.layout, k_ring, v_ring, self.scale, output)
        elif attention is reference_attention.attention:
            output[:t].copy_(attention(*args))
        elif not invariant:  # the paged kernel, which also writes the ring
            attention(*args, max_query_len=md.max_query_len, max_seq_len=md.max_seq_len, out=output[:t],
                      ring_dst=md.ring_dst)
            return output
        else:  # one kernel build for every step (prefill chunks wrap the ring): the ring is written after
            attention(*args, max_query_len=md.max_query_len, max_seq_len=md.max_seq_len, out=output[:t],
                      batch_invariant=True)
        flat_k.index_copy_(0, md.ring_dst, k)
        flat_v.index_copy_(0, md.ring_dst, v)
        return output

    def _flush(self, md: HierarchicalKVMetadata, pages: torch.Tensor, flat_k: torch.Tensor, flat_v: torch.Tensor,
               k: torch.Tensor, v: torch.Tensor, write_groups) -> None:
        """Quantize the step's complete verified groups into their pages (write/flush contract).
        Decode steps read them straight from the ring; a prefill step first copies them into
        contiguous rows from the ring and the new tokens."""
        src_k, src_v = flat_k, flat_v
        if md.flush_staging is not None:
            n = md.flush_rows.numel()
            src_k, src_v = k.new_empty(n, *k.shape[1:]), v.new_empty(n, *v.shape[1:])
            ring_rows, ring_src, new_rows, new_src = md.flush_staging
            for rows, src, (sk, sv) in ((ring_rows, ring_src, (flat_k, flat_v)), (new_rows, new_src, (k, v))):
                src_k.index_copy_(0, rows, sk.index_select(0, src))
                src_v.index_copy_(0, rows, sv.index_select(0, src))
        write_groups(pages, self.layout, src_k, src_v, md.flush_rows, md.flush_blocks)
