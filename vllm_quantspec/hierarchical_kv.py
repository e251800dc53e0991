"""Reference math of the hierarchical INT4/INT8 KV cache (the project's single source of truth).

Every kernel is tested against these functions. Math is fp32, functions are small and pure.
"""

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch


def round_to_dtype(x: torch.Tensor, dtype: torch.dtype, up: bool) -> torch.Tensor:
    """Round fp32 `x` to `dtype` toward +inf (`up`) or -inf, never to nearest.

    Directed rounding keeps stored metadata conservative: a minimum rounded down still lies
    below every value of its group, a scale rounded up still spans the whole range.
    """
    y = x.to(dtype)  # round to nearest, then step one ulp where that went the wrong way
    wrong = y.float() < x if up else y.float() > x
    toward = torch.full_like(y, float("inf") if up else float("-inf"))
    return torch.where(wrong, torch.nextafter(y, toward), y)


FP16_MAX = 65504.0
NUM_LEVELS = 15  # top code of a 4-bit plane
MODES = ("int4", "int8")


@dataclass(frozen=True)
class QuantizedKV:
    """Quantized groups: packed U/L nibble planes and fp16 metadata (shapes depend on the axis)."""

    hi: torch.Tensor  # uint8, two 4-bit codes per byte
    lo: torch.Tensor | None  # uint8, same shape as hi; None where only the draft (INT4) view is read
    scale: torch.Tensor  # fp16
    mn: torch.Tensor  # fp16


def quantize_codes(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, ...]:
    """The exact spec of design-brief.md, groups along `dim`.

    Returns (hi, lo, scale, mn): hi/lo uint8 codes in [0, 15] shaped like x (unpacked), scale/mn
    fp16 with `dim` kept as size 1.
    """
    x = x.float().clamp(-FP16_MAX, FP16_MAX)  # metadata is fp16: keep it finite
    mn16 = round_to_dtype(x.amin(dim, keepdim=True), torch.float16, up=False)
    m = mn16.float()
    s16 = round_to_dtype((x.amax(dim, keepdim=True) - m) / NUM_LEVELS, torch.float16, up=True)
    s = s16.float()
    live = s > 0  # s == 0: a constant group, exactly mn16; codes hi=0, lo=8 (a zero residual)
    s_safe = torch.where(live, s, 1.0)
    y = torch.where(live, (x - m) / s_safe, 0.0)
    hi = torch.round(y).clamp(0, NUM_LEVELS)  # torch.round is round-half-even
    r = x - (m + s * hi)  # |r| <= s/2
    lo = torch.where(live, torch.floor(r / (s_safe / 16)).clamp(-8, 7) + 8, 8.0)
    return hi.to(torch.uint8), lo.to(torch.uint8), s16, mn16


def dequantize_codes(hi: torch.Tensor, lo: torch.Tensor | None, scale: torch.Tensor, mn: torch.Tensor,
                     mode: str) -> torch.Tensor:
    """fp32 values of codes (metadata broadcast): int4 = U plane only, int8 = U + mid-rise L."""
    m, s, h = mn.float(), scale.float(), hi.float()
    if mode == "int4":
        return m + s * h
    if mode == "int8":
        # L levels sit at (lo - 8 + 0.5) * s/16: the centres of the 16 cells of [-s/2, s/2]
        return m + s * (h + (lo.float() - 7.5) / 16)
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [..., D] in [0, 15] -> uint8 [..., D/2]: element 2i low nibble, 2i+1 high."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., D/2] -> uint8 codes [..., D]; inverse of `pack_nibbles`."""
    return torch.stack((packed & 15, packed >> 4), dim=-1).flatten(-2)


def quantize_keys(k: torch.Tensor) -> QuantizedKV:
    """Keys [..., G, D]: one group per channel over the G tokens -> hi/lo [..., G, D/2], scale/mn [..., D]."""
    hi, lo, scale, mn = quantize_codes(k, dim=-2)
    return QuantizedKV(pack_nibbles(hi), pack_nibbles(lo), scale.squeeze(-2), mn.squeeze(-2))


def dequantize_keys(q: QuantizedKV, mode: str) -> torch.Tensor:
    """-> fp32 keys [..., G, D]."""
    lo = unpack_nibbles(q.lo) if mode == "int8" else None
    return dequantize_codes(unpack_nibbles(q.hi), lo, q.scale.unsqueeze(-2), q.mn.unsqueeze(-2), mode)


def quantize_values(v: torch.Tensor, v_group: int) -> QuantizedKV:
    """Values [..., D]: one group per token over VG channels -> hi/lo [..., D/2], scale/mn [..., D/VG]."""
    grouped = v.unflatten(-1, (-1, v_group))
    hi, lo, scale, mn = quantize_codes(grouped, dim=-1)
    return QuantizedKV(pack_nibbles(hi.flatten(-2)), pack_nibbles(lo.flatten(-2)), scale.squeeze(-1), mn.squeeze(-1))


def dequantize_values(q: QuantizedKV, mode: str) -> torch.Tensor:
    """-> fp32 values [..., D] (VG is implied: D / scale.shape[-1])."""
    hi = unpack_nibbles(q.hi).unflatten(-1, (q.scale.shape[-1], -1))
    lo = unpack_nibbles(q.lo).unflatten(-1, (q.scale.shape[-1], -1)) if mode == "int8" else None
    return dequantize_codes(hi, lo, q.scale.unsqueeze(-1), q.mn.unsqueeze(-1), mode).flatten(-2)


PAGE_ALIGN = 256  # bytes; page_bytes is padded to a multiple of this
_VIEWS: dict = {}  # (data_ptr, shape, stride, device) -> (layout, PageViews)


class PageViews(NamedTuple):
    """Strided views of a page tensor, each [num_blocks, *region shape]."""

    k_hi: torch.Tensor  # uint8 [nb, H, G, D/2]
    v_hi: torch.Tensor  # uint8 [nb, H, G, D/2], stored token-minor: strides (page, G * D/2, 1, G)
    k_lo: torch.Tensor  # uint8 [nb, H, G, D/2]
    v_lo: torch.Tensor  # uint8 [nb, H, G, D/2], token-minor as v_hi
    k_scale: torch.Tensor  # fp16 [nb, H, D]
    k_min: torch.Tensor  # fp16 [nb, H, D]
    v_scale: torch.Tensor  # fp16 [nb, H, G, D/VG]
    v_min: torch.Tensor  # fp16 [nb, H, G, D/VG]


@dataclass(frozen=True)
class HierarchicalPageLayout:
    """Byte layout of one page (= one vLLM block of G tokens, all kv heads); see design-brief.md.

    The U planes come first and contiguous, so a draft (INT4) read touches only them + metadata.
    Value planes are stored token-minor (per head [D/2, G]: a 32-bit word holds one channel pair of
    4 consecutive tokens), so that the attention kernel's unpacked value codes already sit as its
    P @ V product wants them, consecutive tokens in a thread, with no trip through shared memory;
    key planes token-major ([G, D/2]) for the same reason on Q @ K^T. PageViews show both as
    [G, D/2] (the value planes as transposed views).
    """

    block_size: int  # G, tokens per page = tokens per key group
    num_kv_heads: int  # H
    head_dim: int  # D
    v_group: int | None = None  # VG, channels per value group; None = head_dim

    def __post_init__(self):
        if self.v_group is None:
            object.__setattr__(self, "v_group", self.head_dim)
        if self.head_dim % 2 or self.head_dim % self.v_group:
            raise ValueError(f"head_dim {self.head_dim} must be even and a multiple of v_group {self.v_group}")

    def region_shapes(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Region name -> (shape, dtype), in storage order (PageViews' field order)."""
        h, g, d = self.num_kv_heads, self.block_size, self.head_dim
        plane, v_plane = ((h, g, d // 2), torch.uint8), ((h, d // 2, g), torch.uint8)
        v_meta = ((h, g, d // self.v_group), torch.float16)
        return {"k_hi": plane, "v_hi": v_plane, "k_lo": plane, "v_lo": v_plane,
                "k_scale": ((h, d), torch.float16), "k_min": ((h, d), torch.float16),
                "v_scale": v_meta, "v_min": v_meta}

    @property
    def offsets(self) -> dict[str, int]:
        """Region name -> byte offset in the page (every region starts 2-byte aligned)."""
        out, at = {}, 0
        for name, (shape, dtype) in self.region_shapes().items():
            out[name] = at
            at += math.prod(shape) * dtype.itemsize
        return out

    @property
    def page_bytes(self) -> int:
        shape, dtype = self.region_shapes()["v_min"]
        end = self.offsets["v_min"] + math.prod(shape) * dtype.itemsize
        return -(-end // PAGE_ALIGN) * PAGE_ALIGN

    def views(self, raw: torch.Tensor) -> PageViews:
        """raw uint8 [num_blocks, page_bytes] -> PageViews sharing raw's storage (writes go through).

        Cached per tensor: every layer of every step asks for the same views of its KV cache, and
        building them is a few dozen tensor ops of host time."""
        key = (raw.data_ptr(), raw.shape, raw.stride(), raw.device)
        cached = _VIEWS.get(key)
        if cached is None or cached[0] != self:
            if len(_VIEWS) >= 256:  # KV caches are few; tests make many small page tensors
                _VIEWS.clear()
            cached = _VIEWS[key] = (self, self._make_views(raw))
        return cached[1]

    def _make_views(self, raw: torch.Tensor) -> PageViews:
        assert raw.dtype == torch.uint8 and raw.shape[-1] == self.page_bytes, (raw.dtype, raw.shape)
        regions = []
        for (name, (shape, dtype)), at in zip(self.region_shapes().items(), self.offsets.values()):
            nbytes = math.prod(shape) * dtype.itemsize
            region = raw[:, at:at + nbytes].view(dtype).unflatten(1, shape)
            regions.append(region.transpose(-1, -2) if name in ("v_hi", "v_lo") else region)
        return PageViews(*regions)


def write_groups(pages: torch.Tensor, layout: HierarchicalPageLayout, src_k: torch.Tensor, src_v: torch.Tensor,
                 src_rows: torch.Tensor, dest_blocks: torch.Tensor) -> None:
    """Quantize n complete groups into pages (in place): group j = src rows src_rows[j, :] (token
    order) of src_k/src_v [N, H, D] -> page dest_blocks[j]. Valid dest_blocks must be distinct; a
    negative one skips its group (a decode step's flush list has a fixed length, padded that way,
    so that a CUDA graph can replay it)."""
    keep = dest_blocks >= 0
    src_rows, dest_blocks = src_rows[keep], dest_blocks[keep]
    rows = src_rows.long()
    k = src_k[rows].transpose(1, 2)  # [n, H, G, D]
    v = src_v[rows].transpose(1, 2)
    kq, vq = quantize_keys(k), quantize_values(v, layout.v_group)
    views, blocks = layout.views(pages), dest_blocks.long()
    for view, part in zip(views, (kq.hi, vq.hi, kq.lo, vq.lo, kq.scale, kq.mn, vq.scale, vq.mn)):
        view[blocks] = part


def read_groups(pages: torch.Tensor, layout: HierarchicalPageLayout, blocks: torch.Tensor,
                mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantized (keys, values) fp32 [n, G, H, D] of the given pages; int4 reads no L plane."""
    pv, idx = layout.views(pages), blocks.long()
    lo = mode == "int8"
    k = dequantize_keys(QuantizedKV(pv.k_hi[idx], pv.k_lo[idx] if lo else None, pv.k_scale[idx], pv.k_min[idx]), mode)
    v = dequantize_values(QuantizedKV(pv.v_hi[idx], pv.v_lo[idx] if lo else None, pv.v_scale[idx], pv.v_min[idx]),
                          mode)
    return k.transpose(1, 2), v.transpose(1, 2)
