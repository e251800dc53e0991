"""Hierarchical INT4/INT8 KV quantization: the exact spec, error bounds, packing, page layout."""

import math

import pytest
import torch
from heavy_tails import student_t2

from vllm_quantspec.hierarchical_kv import (
    HierarchicalPageLayout,
    QuantizedKV,
    dequantize_codes,
    dequantize_keys,
    dequantize_values,
    pack_nibbles,
    quantize_codes,
    quantize_keys,
    quantize_values,
    read_groups,
    round_to_dtype,
    unpack_nibbles,
    write_groups,
)

G, H, D = 16, 3, 64


def _data(kind: str, shape, dtype, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "normal":
        x = torch.randn(shape, generator=g)
    elif kind == "heavy":  # student-t tails plus a few outlier channels (last dim) scaled x50
        x = student_t2(shape, g) * 3
        x[..., torch.randperm(shape[-1], generator=g)[:4]] *= 50
    elif kind == "tiny":  # fp16 subnormal range: directed rounding of tiny metadata
        x = torch.randn(shape, generator=g) * 1e-6
    return x.to(dtype)


def _slack(x: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
    """fp32 rounding slack, per element: 4 ulps (2^-23 relative) of |x| + |mn16|.

    x - mn16, the division by s, mn16 + s*hi and the final mn16 + s*(...) each round once in
    fp32 (s*hi and s*(hi + (lo-7.5)/16) are exact: few-bit integers times an 11-bit fp16 scale);
    every such rounding is <= 2^-24 of a magnitude <= |x| + |mn16| and can move a value across
    a rounding/floor boundary by that much."""
    return 4 * 2.0**-23 * (x.double().abs() + mn.double().abs())


def _check_bounds(x, q4, q8, s, m):
    x64, s64 = x.double().clamp(-65504, 65504), s.double()
    slack = _slack(x, m)
    err4, err8 = (x64 - q4.double()).abs(), (x64 - q8.double()).abs()
    assert (err4 <= s64 / 2 + slack).all(), (err4 - s64 / 2 - slack).max()
    assert (err8 <= s64 / 32 + slack).all(), (err8 - s64 / 32 - slack).max()
    return (err4 / s64.clamp_min(1e-30)).max().item(), (err8 / s64.clamp_min(1e-30)).max().item()


@pytest.mark.parametrize("kind", ["normal", "heavy", "tiny"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_key_error_bounds(kind, dtype):
    k = _data(kind, (2, H, G, D), dtype)
    q = quantize_keys(k)
    assert q.hi.shape == q.lo.shape == (2, H, G, D // 2) and q.scale.shape == q.mn.shape == (2, H, D)
    assert q.scale.dtype == q.mn.dtype == torch.float16
    s, m = q.scale.float().unsqueeze(-2), q.mn.float().unsqueeze(-2)
    r4, r8 = _check_bounds(k, dequantize_keys(q, "int4"), dequantize_keys(q, "int8"), s, m)
    if kind != "tiny":  # the bounds are attained, i.e. they are the right bounds, not loose ones
        assert r4 > 0.45 and r8 > 0.027


@pytest.mark.parametrize("kind", ["normal", "heavy", "tiny"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("v_group", [D, 32])
def test_value_error_bounds(kind, dtype, v_group):
    v = _data(kind, (2, H, G, D), dtype, seed=1)
    q = quantize_values(v, v_group)
    assert q.hi.shape == q.lo.shape == (2, H, G, D // 2) and q.scale.shape == (2, H, G, D // v_group)
    s = q.scale.float().repeat_interleave(v_group, -1)
    m = q.mn.float().repeat_interleave(v_group, -1)
    _check_bounds(v, dequantize_values(q, "int4"), dequantize_values(q, "int8"), s, m)


@pytest.mark.parametrize("quantize, dim", [(lambda x: quantize_keys(x), -2), (lambda x: quantize_values(x, D), -1)])
@pytest.mark.parametrize("kind, dtype", [("tiny", torch.bfloat16), ("normal", torch.float32)])
def test_metadata_is_directed_rounding(quantize, dim, kind, dtype):
    x = _data(kind, (4, G, D), dtype)  # mins / spans that are not fp16 values (fp16 subnormals)
    q = quantize(x)
    mn, mx = x.float().amin(dim), x.float().amax(dim)
    mn16, s16 = q.mn.reshape(mn.shape), q.scale.reshape(mn.shape)  # values: one group per token
    up = torch.full_like(mn16, float("inf"))
    assert (mn16.float() <= mn).all() and (torch.nextafter(mn16, up).float() > mn).all()
    span = (mx - mn16.float()) / 15
    assert (s16.float() >= span).all() and (torch.nextafter(s16, -up).float() < span).all()


def test_hand_computed_codes():
    # one key channel over G=16 tokens, min 0 and max 15 -> mn16 = 0, s16 = 1
    x = torch.tensor([0, 15, 0.5, 2.5, 1.5, 3.25, 3.75, 7.0, 1, 2, 3, 4, 5, 6, 8, 9.0])
    hi, lo, s, m = quantize_codes(x.unsqueeze(-1), dim=0)
    assert s.item() == 1 and m.item() == 0
    # half-even U; residuals 0.5 / -0.5 fall in the outer mid-rise cells (lo 15 / lo 0)
    assert hi[:7, 0].tolist() == [0, 15, 0, 2, 2, 3, 4]
    assert lo[:7, 0].tolist() == [8, 8, 15, 15, 0, 12, 4]
    x8 = dequantize_codes(hi, lo, s, m, "int8")[:7, 0]
    assert x8.tolist() == [1 / 32, 15 + 1 / 32, 0.46875, 2.46875, 1.53125, 3.25 + 1 / 32, 3.75 + 1 / 32]


@pytest.mark.parametrize("c", [0.0, -3.5, 60000.0, 2.0**-24])
def test_constant_groups_are_exact(c):
    x = torch.full((2, G, D), c, dtype=torch.float16)
    for q, deq in ((quantize_keys(x), dequantize_keys), (quantize_values(x, 32), dequantize_values)):
        assert (q.scale == 0).all() and (q.mn.float() == c).all()
        assert (unpack_nibbles(q.hi) == 0).all() and (unpack_nibbles(q.lo) == 8).all()
        for mode in ("int4", "int8"):
            out = deq(q, mode)
            assert not out.isnan().any() and (out == c).all()


def test_out_of_fp16_range_is_clamped():
    x = _data("normal", (1, G, D), torch.bfloat16)
    x[0, 3, 5], x[0, 7, 5], x[0, 2, 9] = 1e6, -1e6, float("inf")
    q = quantize_keys(x)
    assert q.scale.isfinite().all() and q.mn.isfinite().all()
    s, m = q.scale.float().unsqueeze(-2), q.mn.float().unsqueeze(-2)
    _check_bounds(x, dequantize_keys(q, "int4"), dequantize_keys(q, "int8"), s, m)


def test_round_to_dtype_is_directed():
    x = torch.tensor([1 / 3, -1 / 3, 1.0, 1e-9, 70000.0])
    up, down = round_to_dtype(x, torch.float16, up=True), round_to_dtype(x, torch.float16, up=False)
    assert (up.float() >= x).all() and (down.float() <= x).all()
    assert up[2] == down[2] == 1.0  # representable values are kept
    assert (up.float() - down.float())[:2].gt(0).all()


def test_nibble_pack_round_trip_and_order():
    codes = torch.randint(0, 16, (5, 7, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    packed = pack_nibbles(codes)
    assert packed.shape == (5, 7, 32) and torch.equal(unpack_nibbles(packed), codes)
    assert pack_nibbles(torch.tensor([1, 2, 15, 0], dtype=torch.uint8)).tolist() == [0x21, 0x0F]


def test_page_layout_offsets():
    lay = HierarchicalPageLayout(block_size=16, num_kv_heads=2, head_dim=64, v_group=32)
    plane = 2 * 16 * 32
    assert lay.offsets == {"k_hi": 0, "v_hi": plane, "k_lo": 2 * plane, "v_lo": 3 * plane,
                           "k_scale": 4 * plane, "k_min": 4 * plane + 256, "v_scale": 4 * plane + 512,
                           "v_min": 4 * plane + 512 + 128}
    assert lay.page_bytes == 4864  # 4864 = 4096 + 768 (end of v_min) padded to 256
    assert HierarchicalPageLayout(16, 2, 64).v_group == 64
    with pytest.raises(ValueError):
        HierarchicalPageLayout(16, 2, 64, v_group=48)


@pytest.mark.parametrize("v_group", [D, 16])
def test_views_alias_raw_at_offsets(v_group):
    lay = HierarchicalPageLayout(G, H, D, v_group)
    nb = 3
    raw = torch.randint(0, 256, (nb, lay.page_bytes), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    views = lay.views(raw)
    for name, view in zip(views._fields, views):
        shape, dtype = lay.region_shapes()[name]
        # value planes are stored token-minor ([H, D/2, G]) and viewed as [H, G, D/2] like the key planes
        stored = view.transpose(-1, -2) if name in ("v_hi", "v_lo") else view
        if name.endswith(("_hi", "_lo")):
            assert view.shape[-2:] == (G, D // 2)
        assert stored.shape == (nb, *shape) and stored.dtype == dtype
        at, n = lay.offsets[name], math.prod(shape) * dtype.itemsize
        assert torch.equal(stored.reshape(nb, -1).view(torch.uint8), raw[:, at:at + n])  # C-contiguous region
        assert view.untyped_storage().data_ptr() == raw.untyped_storage().data_ptr()


@pytest.mark.parametrize("v_group", [D, 16])
def test_write_groups_then_read_back(v_group):
    lay = HierarchicalPageLayout(G, H, D, v_group)
    gen = torch.Generator().manual_seed(5)
    slots, ring = 3, 2 * G
    # decode-flush style source: a ring [slots, R, H, D] seen as rows slot*R + p % R
    src_k = _data("heavy", (slots * ring, H, D), torch.bfloat16, seed=6)
    src_v = _data("normal", (slots * ring, H, D), torch.bfloat16, seed=7)
    starts = [(0, 24), (2, 0), (1, 48)]  # (slot, first position), some wrapping around the ring
    src_rows = torch.stack([s * ring + (p0 + torch.arange(G)) % ring for s, p0 in starts]).to(torch.int32)
    dest = torch.tensor([4, 1, 6], dtype=torch.int32)
    pages = torch.randint(0, 256, (8, lay.page_bytes), dtype=torch.uint8, generator=gen)
    before = pages.clone()
    write_groups(pages, lay, src_k, src_v, src_rows, dest)

    untouched = [b for b in range(8) if b not in dest.tolist()]
    assert torch.equal(pages[untouched], before[untouched])
    end = lay.offsets["v_min"] + H * G * (D // v_group) * 2
    assert torch.equal(pages[:, end:], before[:, end:])  # padding is not written
    views = lay.views(pages)
    for j, b in enumerate(dest.tolist()):
        k = src_k[src_rows[j].long()].transpose(0, 1)  # [H, G, D]
        v = src_v[src_rows[j].long()].transpose(0, 1)
        kq, vq = quantize_keys(k), quantize_values(v, v_group)
        for got, want in zip(views, (kq.hi, vq.hi, kq.lo, vq.lo, kq.scale, kq.mn, vq.scale, vq.mn)):
            assert torch.equal(got[b], want)
        for mode in ("int4", "int8"):
            rk, rv = read_groups(pages, lay, torch.tensor([b]), mode)
            assert torch.equal(rk[0], dequantize_keys(kq, mode).transpose(0, 1))
            assert torch.equal(rv[0], dequantize_values(vq, mode).transpose(0, 1))


def test_int4_read_ignores_lower_plane():
    lay = HierarchicalPageLayout(G, H, D)
    src = _data("normal", (G, H, D), torch.float16)
    pages = torch.zeros(2, lay.page_bytes, dtype=torch.uint8)
    write_groups(pages, lay, src, src, torch.arange(G)[None], torch.tensor([1]))
    k4, v4 = read_groups(pages, lay, torch.tensor([1]), "int4")
    k8, v8 = read_groups(pages, lay, torch.tensor([1]), "int8")
    views = lay.views(pages)
    views.k_lo[1] ^= 0x5A
    views.v_lo[1] ^= 0xA5
    k4b, v4b = read_groups(pages, lay, torch.tensor([1]), "int4")
    k8b, v8b = read_groups(pages, lay, torch.tensor([1]), "int8")
    assert torch.equal(k4, k4b) and torch.equal(v4, v4b)
    assert not torch.equal(k8, k8b) and not torch.equal(v8, v8b)


def test_bad_mode_is_refused():
    q = quantize_keys(torch.randn(G, D))
    with pytest.raises(ValueError):
        dequantize_keys(QuantizedKV(q.hi, q.lo, q.scale, q.mn), "fp8")
