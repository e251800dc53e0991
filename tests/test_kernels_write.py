"""Triton write/flush kernel vs the torch reference write_groups (bit-exact pages).

CPU: TRITON_INTERPRET=1 at small shapes. GPU (`pytest -m gpu`): the compiled kernel at G=128.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels import triton.jit

from vllm_quantspec import hierarchical_kv as hk  # noqa: E402
from vllm_quantspec.kernels.hierarchical_kv_write import write_groups  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _data(kind: str, n: int, h: int, d: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(n, h, d, generator=gen)
    if kind == "outliers":  # a few huge channels and tokens (post-RoPE keys have them), past fp16 range
        x[:, :, torch.randperm(d, generator=gen)[:3]] *= 300
        x[torch.randperm(n, generator=gen)[:2]] *= 1e3
        x[0, 0, 0] = 1e6 if dtype == torch.bfloat16 else 6e4  # clamped to fp16 range before quantizing
    elif kind == "constant":  # s16 == 0 groups (every token equal, and one token with all channels equal)
        x[:] = 0.375
        x[1, :, :] = -2.0
    return x.to(dtype)


def _near_boundary(x: torch.Tensor, scale: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
    """Codes whose reference quotient is within 1 ulp of a rounding boundary (a .5 tie of U, an integer
    step of L): the only places where a correct fp32 kernel may pick the neighbouring code (if its
    compiler contracts or reorders an operation). x, scale, mn broadcast to the code shape."""
    x = x.float().clamp(-hk.FP16_MAX, hk.FP16_MAX)
    s, m = scale.float(), mn.float()
    s_safe = torch.where(s > 0, s, 1.0)
    y = (x - m) / s_safe
    hi = torch.round(y)
    q = (x - (m + s * hi)) / (s_safe / 16)
    ulp = lambda v: torch.finfo(torch.float32).eps * v.abs().clamp_min(1.0)  # noqa: E731
    return ((y - y.floor() - 0.5).abs() <= ulp(y)) | ((q - q.round()).abs() <= ulp(q))


def _check_pages(got: torch.Tensor, want: torch.Tensor, layout, src_k, src_v, rows, blocks):
    """Metadata bit-exact; codes bit-exact except +-1 at a boundary (_near_boundary)."""
    pv_got, pv_want = layout.views(got), layout.views(want)
    for name in ("k_scale", "k_min", "v_scale", "v_min"):
        # compared as bits: the untouched pages hold random bytes, some of them fp16 NaNs
        assert torch.equal(getattr(pv_got, name).view(torch.int16), getattr(pv_want, name).view(torch.int16)), name
    keep = blocks >= 0  # negative blocks are skipped groups
    rows, idx = rows[keep], blocks[keep].long()
    k = src_k[rows.long()].transpose(1, 2)  # [n, H, G, D]
    v = src_v[rows.long()].transpose(1, 2)
    vg = layout.v_group
    k_tie = _near_boundary(k, pv_want.k_scale[idx][:, :, None, :], pv_want.k_min[idx][:, :, None, :])
    v_tie = _near_boundary(v, pv_want.v_scale[idx].repeat_interleave(vg, -1), pv_want.v_min[idx].repeat_interleave(vg, -1))
    for name, tie in (("k_hi", k_tie), ("k_lo", k_tie), ("v_hi", v_tie), ("v_lo", v_tie)):
        a = hk.unpack_nibbles(getattr(pv_got, name)[idx]).int()
        b = hk.unpack_nibbles(getattr(pv_want, name)[idx]).int()
        diff = (a - b).abs()
        assert diff.max() <= 1 and not (diff.bool() & ~tie).any(), (name, int(diff.bool().sum()))
    # nothing outside the destination pages changed (padding bytes included)
    other = torch.ones(got.shape[0], dtype=torch.bool, device=got.device)
    other[idx] = False
    assert torch.equal(got[other], want[other])


def _run(G, H, D, VG, dtype, kind, n_groups, n_src, num_blocks, seed=0):
    gen = torch.Generator().manual_seed(seed)
    layout = hk.HierarchicalPageLayout(G, H, D, VG)
    src_k = _data(kind, n_src, H, D, dtype, gen).to(DEVICE)
    src_v = _data(kind, n_src, H, D, dtype, gen).to(DEVICE)
    # ragged gather: each group reads G arbitrary source rows (a ring with wrap-around, a prefill chunk)
    rows = torch.stack([torch.randperm(n_src, generator=gen)[:G] for _ in range(n_groups)]).int().to(DEVICE)
    blocks = torch.randperm(num_blocks, generator=gen)[:n_groups].int().to(DEVICE)
    init = torch.randint(0, 256, (num_blocks, layout.page_bytes), generator=gen, dtype=torch.uint8).to(DEVICE)
    got = init.clone()
    write_groups(got, layout, src_k, src_v, rows, blocks)
    # The reference runs on the CPU: on CUDA, torch divides by a Python scalar (its "/ 15") as a
    # multiplication by the rounded reciprocal, which is not the spec's correctly rounded division
    # and moves some scales by one fp16 ulp. The kernel uses IEEE division (div_rn) like the spec.
    cpu = [t.cpu() for t in (init, src_k, src_v, rows, blocks)]
    want = cpu[0].clone()
    hk.write_groups(want, layout, *cpu[1:])
    _check_pages(got.cpu(), want, layout, *cpu[1:])


@pytest.mark.parametrize("kind", ["normal", "outliers", "constant"])
@pytest.mark.parametrize("G,H,D,VG,dtype", [
    (16, 2, 64, None, torch.bfloat16),
    (16, 3, 128, 32, torch.float16),
    (8, 1, 64, 16, torch.bfloat16),
])
def test_write_groups_matches_reference(G, H, D, VG, dtype, kind):
    _run(G, H, D, VG, dtype, kind, n_groups=3, n_src=5 * G, num_blocks=6)


def test_write_groups_ring_flush():
    """Decode flush: rows slot*R + p % R of a ring viewed as [S*R, H, D], wrapping around the ring;
    a negative block (a padded entry of a decode step's fixed-length flush list) writes nothing."""
    G, H, D, R, S = 16, 2, 64, 40, 3
    layout = hk.HierarchicalPageLayout(G, H, D)
    gen = torch.Generator().manual_seed(1)
    k_ring = torch.randn(S, R, H, D, generator=gen).bfloat16().to(DEVICE)
    v_ring = torch.randn(S, R, H, D, generator=gen).bfloat16().to(DEVICE)
    starts = torch.tensor([32, 0, 70, 16])  # positions of the group's first token; 32..47 and 70..85 wrap
    slots = torch.tensor([2, 0, 1, 1])
    rows = (slots[:, None] * R + (starts[:, None] + torch.arange(G)) % R).int().to(DEVICE)
    blocks = torch.tensor([5, 1, 3, -1], dtype=torch.int32, device=DEVICE)
    want = torch.zeros(7, layout.page_bytes, dtype=torch.uint8, device=DEVICE)
    got = want.clone()
    src_k, src_v = k_ring.view(S * R, H, D), v_ring.view(S * R, H, D)
    write_groups(got, layout, src_k, src_v, rows, blocks)
    cpu = [t.cpu() for t in (src_k, src_v, rows, blocks)]  # reference on the CPU: see _run
    want = want.cpu()
    hk.write_groups(want, layout, *cpu)
    _check_pages(got.cpu(), want, layout, *cpu)
    untouched = torch.ones(7, dtype=torch.bool)
    untouched[[5, 1, 3]] = False
    assert not want[untouched].any() and not got.cpu()[untouched].any()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["normal", "outliers", "constant"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_write_groups_gpu(kind, dtype):
    _run(128, 8, 128, None, dtype, kind, n_groups=64, n_src=4096, num_blocks=100)
