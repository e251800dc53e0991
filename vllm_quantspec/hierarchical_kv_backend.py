"""vLLM attention backend over the paged hierarchical KV cache (registered as vLLM's CUSTOM backend).

Each KV page holds one group of G tokens as 4-bit upper and lower planes plus fp16 scales (layout in
``hierarchical_kv.HierarchicalPageLayout``); the newest tokens of each sequence stay in a
full-precision ring (``recent_buffer``). Target layers read pages as INT8 (both planes); draft layers
(``draft_model.*``, the QuantSpec proposer) read the same pages as INT4 (upper plane only).

Per layer and step, in this order: complete, verified groups are flushed from the ring (or, in
prefill, from the new K/V) into their pages; attention reads, for a query at position t, pages below
Q(t) and full-precision keys from Q(t) on (the ring below the step's context C, the layer's input
from C); last, the new K/V go to the ring. Writing
last matters: a long prefill chunk wraps the ring, and the flush and the attention still need the
context rows it overwrites. Only the target flushes, and only verified tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import numpy as np
import torch
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
    ring_slot: torch.Tensor  # [B] i32
    # ring writes: new-token row -> flat ring row (slot * capacity + position % capacity)
    ring_write_src: torch.Tensor
    ring_write_dst: torch.Tensor
    # flush: n complete groups; staged row r of group j comes from the ring or from the new tokens
    flush_blocks: torch.Tensor  # [n] i32 destination page of each group
    flush_from_ring: tuple[torch.Tensor, torch.Tensor]  # (staged rows, flat ring rows)
    flush_from_new: tuple[torch.Tensor, torch.Tensor]  # (staged rows, new-token rows)
    fp_keep: int = 0  # query t reads positions < quantized_len(t; fp_keep) from pages
    is_draft_step: bool = False  # built by build_for_drafting: draft layers never flush


class HierarchicalKVMetadataBuilder(AttentionMetadataBuilder[HierarchicalKVMetadata]):
    # Attention runs eagerly between CUDA-graph pieces (the flush list changes every step).
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER

    def __init__(self, kv_cache_spec: AttentionSpec, layer_names: list[str], vllm_config: VllmConfig,
                 device: torch.device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.buffer = recent_buffer(vllm_config)
        self.config = self.buffer.config
        self.device = device
        spec = vllm_config.speculative_config
        gamma = spec.num_speculative_tokens if spec is not None else 0
        # verify steps (1 + γ query tokens) are decodes, not prefills
        self._init_reorder_batch_threshold(1 + gamma, supports_spec_as_decode=True)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> HierarchicalKVMetadata:
        return self._build(common_attn_metadata, is_draft_step=False)

    def build_for_drafting(self, common_attn_metadata: CommonAttentionMetadata,
                           draft_index: int) -> HierarchicalKVMetadata:
        return self._build(common_attn_metadata, is_draft_step=True)

    def _build(self, cm: CommonAttentionMetadata, is_draft_step: bool) -> HierarchicalKVMetadata:
        """Target steps flush; draft steps (one token each) only read pages and write the ring."""
        cfg, n = self.config, cm.num_reqs
        qsl = cm.query_start_loc_cpu[: n + 1].numpy().astype(np.int64)
        seq_lens = (cm.seq_lens_cpu_upper_bound if cm.seq_lens_cpu_upper_bound is not None
                    else cm.seq_lens.cpu())[:n].numpy().astype(np.int64)
        q_lens = np.diff(qsl)
        ctx = seq_lens - q_lens
        slots = self.buffer.slots_for_batch(n)
        block_table = cm.block_table_tensor[:n]
        block_table_cpu = block_table.cpu().numpy()  # one copy per step, shared by all layers
        cap, g = cfg.capacity, cfg.group_size

        write_src, write_dst = [], []
        flush_blocks, ring_rows, ring_src, new_rows, new_src = [], [], [], [], []
        for b in range(n):
            c, s, slot, start = int(ctx[b]), int(seq_lens[b]), slots[b], int(qsl[b])
            first = max(c, s - cap)  # only the last `capacity` positions can stay in the ring
            pos = np.arange(first, s)
            write_src.append(start + pos - c)
            write_dst.append(slot * cap + pos % cap)
            if is_draft_step:
                continue
            lo, hi = cfg.flush_range(c, s)
            for block_start in range(lo, hi, g):
                j = len(flush_blocks)
                flush_blocks.append(int(block_table_cpu[b, block_start // g]))
                pos = np.arange(block_start, block_start + g)
                staged = j * g + np.arange(g)
                old = pos < c
                ring_rows.append(staged[old]), ring_src.append(slot * cap + pos[old] % cap)
                new_rows.append(staged[~old]), new_src.append(start + pos[~old] - c)

        def dev(parts, dtype=torch.int64):
            arr = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
            return torch.from_numpy(np.ascontiguousarray(arr)).to(dtype).to(self.device, non_blocking=True)

        return HierarchicalKVMetadata(
            num_reqs=n,
            num_actual_tokens=cm.num_actual_tokens,
            max_query_len=int(q_lens.max()) if n else 0,
            max_seq_len=int(seq_lens.max()) if n else 0,
            query_start_loc=cm.query_start_loc[: n + 1],
            seq_lens=cm.seq_lens[:n],
            block_table=block_table,
            ring_slot=dev([np.array(slots)], torch.int32),
            ring_write_src=dev(write_src),
            ring_write_dst=dev(write_dst),
            flush_blocks=dev([np.array(flush_blocks, dtype=np.int64)], torch.int32),
            flush_from_ring=(dev(ring_rows), dev(ring_src)),
            flush_from_new=(dev(new_rows), dev(new_src)),
            # A draft query at t reads pages only below quantized_len(t - γ): the target has flushed
            # that far (t - γ is at most its last verified position), and no further.
            fp_keep=cfg.fp_keep + (cfg.gamma if is_draft_step else 0),
            is_draft_step=is_draft_step,
        )


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
        self.buffer = recent_buffer(get_current_vllm_config())
        self.layout: HierarchicalPageLayout | None = None
        self.ops = None

    def forward(self, layer: AttentionLayer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, attn_metadata: HierarchicalKVMetadata, output: torch.Tensor,
                output_scale: torch.Tensor | None = None, output_block_scale: torch.Tensor | None = None
                ) -> torch.Tensor:
        is_draft = layer.layer_name.startswith(DRAFT_PREFIX)
        target_name = layer.layer_name[len(DRAFT_PREFIX):] if is_draft else layer.layer_name
        # Created during vLLM's profiling forward, so the KV pool is sized after it.
        k_ring, v_ring = self.buffer.ring(target_name, self.num_kv_heads, self.head_size, key.dtype, key.device)
        if attn_metadata is None:  # profiling run
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
        if not is_draft and md.flush_blocks.numel():
            self._flush(md, kv_cache, flat_k, flat_v, k, v, write_groups)
        args = (q, k, v, md.query_start_loc, md.seq_lens, md.block_table, kv_cache, self.layout,
                k_ring, v_ring, md.ring_slot, "int4" if is_draft else "int8", self.scale, md.fp_keep)
        if attention is reference_attention.attention:
            output[:t].copy_(attention(*args))
        else:
            attention(*args, max_query_len=md.max_query_len, max_seq_len=md.max_seq_len, out=output[:t])
        flat_k.index_copy_(0, md.ring_write_dst, k.index_select(0, md.ring_write_src))
        flat_v.index_copy_(0, md.ring_write_dst, v.index_select(0, md.ring_write_src))
        return output

    def _flush(self, md: HierarchicalKVMetadata, pages: torch.Tensor, flat_k: torch.Tensor, flat_v: torch.Tensor,
               k: torch.Tensor, v: torch.Tensor, write_groups) -> None:
        """Quantize the step's complete verified groups into their pages (write/flush contract)."""
        g = self.layout.block_size
        n = md.flush_blocks.numel()
        staged_k = k.new_empty(n * g, *k.shape[1:])
        staged_v = v.new_empty(n * g, *v.shape[1:])
        for rows, src, (sk, sv) in ((*md.flush_from_ring, (flat_k, flat_v)), (*md.flush_from_new, (k, v))):
            staged_k.index_copy_(0, rows, sk.index_select(0, src))
            staged_v.index_copy_(0, rows, sv.index_select(0, src))
        src_rows = torch.arange(n * g, device=k.device).view(n, g)
        write_groups(pages, self.layout, staged_k, staged_v, src_rows, md.flush_blocks)
