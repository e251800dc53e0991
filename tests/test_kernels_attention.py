"""Triton paged attention (decode, verify, chunked prefill) vs the torch reference attention.

CPU: TRITON_INTERPRET=1 at small shapes (G=16). GPU (`pytest -m gpu`): real shapes, G=128, bf16.

Tolerances (norm-wise relative error ||out - ref|| / ||ref||, ref computed in fp32 from the same
pages and fp32 copies of the same inputs):
  - the page part runs on fp16 dot operands (q*scale, and p*scale normalized per tile by a power of
    two, each rounded once: 2**-11 relative) with fp32 accumulation: ~5e-4 measured, bound 2e-3;
  - bf16 models add bf16 p in the full-precision segment (2**-9) and the bf16 output rounding
    (half an ulp, 2**-9 relative): ~3e-3 measured, bound 8e-3 (1 bf16 ulp at the top of a binade);
  - fp16 models: fp16 p and output (2**-11 each), bound 2e-3.
Outlier-heavy keys give logits of O(100): the same 2**-11 relative error of q.k is then an absolute
logit error of ~0.05 on near-one-hot softmax rows, ~4e-3 measured: those cases get 4x the bound.
The elementwise check |out - ref| <= 4 ulps (of the model dtype) of max|V| catches a single wrong row
that the norm would average away: p's rounding errs relative to the values it weighs, not to the
output (an average that can be much smaller than its largest value).
"""

import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels import triton.jit

import ptx  # noqa: E402

from vllm_quantspec import hierarchical_kv as hk  # noqa: E402
from vllm_quantspec.kernels.paged_attention import (  # noqa: E402
    _ASM_INT4,
    _ASM_INT8,
    ONE_WARP_TILES,
    Tiles,
    _num_sms,
    _pick_num_splits,
    paged_attention,
)
from vllm_quantspec.kernels.prefill_attention import (  # noqa: E402
    dequantize_pages,
    plan_prefill,
    plan_runs,
    prefill_attention,
)
from vllm_quantspec.reference_attention import attention as reference_attention  # noqa: E402
from vllm_quantspec.reference_attention import quantized_len  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy, inside the interpreter
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
REL_TOL = {torch.bfloat16: 8e-3, torch.float16: 2e-3, torch.float32: 2e-3}
ULP = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10, torch.float32: 2.0**-10}


def _scenario(q_lens, ctxs, *, G=16, H=2, grp=4, D=64, VG=None, keep=20, R=None, dtype=torch.bfloat16,
              kind="normal", seed=0):
    """Random pages (written by the reference write_groups), ring, block table and queries.

    ctxs[b] = C (tokens before the queries). Sequence b's table row points at distinct pages for
    [0, Q(seq_len - 1)) and at other sequences' pages after (reading past Q would show up). The ring
    has R >= keep + G - 1 rows (default: exactly that, so positions wrap around it)."""
    gen = torch.Generator().manual_seed(seed)
    layout = hk.HierarchicalPageLayout(G, H, D, VG)
    B, hq = len(q_lens), H * grp
    R = keep + G - 1 if R is None else R
    n_pages = [quantized_len(torch.tensor(c + q - 1), G, keep).item() // G for c, q in zip(ctxs, q_lens)]
    max_blocks = max(c + q for c, q in zip(ctxs, q_lens)) // G + 1
    num_blocks = sum(n_pages) + 3
    block_table = torch.randint(0, num_blocks, (B, max_blocks), dtype=torch.int32, generator=gen)
    free = torch.randperm(num_blocks, generator=gen)
    at = 0
    for b, n in enumerate(n_pages):
        block_table[b, :n] = free[at:at + n]
        at += n

    def data(*shape, scale=1.0):
        x = torch.randn(*shape, generator=gen) * scale
        if kind == "outliers":  # heavy channels (post-RoPE keys) and a few huge tokens
            x[..., torch.randperm(shape[-1], generator=gen)[:2]] *= 40
            x.view(-1, shape[-1])[torch.randperm(x.numel() // shape[-1], generator=gen)[:3]] *= 20
        elif kind == "constant":
            x = torch.full(shape, 0.5) + 1e-3 * x
        return x.to(dtype)

    pages = torch.zeros(num_blocks, layout.page_bytes, dtype=torch.uint8, device=DEVICE)
    src_k, src_v = data(num_blocks * G, H, D, scale=2.0).to(DEVICE), data(num_blocks * G, H, D).to(DEVICE)
    hk.write_groups(pages, layout, src_k, src_v, torch.arange(num_blocks * G, device=DEVICE).view(num_blocks, G),
                    torch.arange(num_blocks, dtype=torch.int32, device=DEVICE))
    S = B + 2
    T = sum(q_lens)
    qsl = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    args = dict(
        q=data(T, hq, D), k_new=data(T, H, D, scale=2.0), v_new=data(T, H, D),
        query_start_loc=qsl, seq_lens=torch.tensor([c + q for c, q in zip(ctxs, q_lens)], dtype=torch.int32),
        block_table=block_table, pages=pages, layout=layout, k_ring=data(S, R, H, D, scale=2.0),
        v_ring=data(S, R, H, D), ring_slot=torch.randperm(S, generator=gen)[:B].int(), mode="int4",
        sm_scale=1 / math.sqrt(D), fp_keep=keep)
    return {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in args.items()}


def _check(args, mode, tol_scale=1.0, **kernel_kw):
    args = dict(args, mode=mode)
    dtype = args["q"].dtype
    fp32 = {k: args[k].float() for k in ("q", "k_new", "v_new", "k_ring", "v_ring")}
    ref = reference_attention(**dict(args, **fp32))  # fp32 math and fp32 output
    out = torch.full_like(args["q"], float("nan"))  # poisoned: every element must be written
    paged_attention(**args, out=out, **kernel_kw)
    assert not out.isnan().any()
    err = (out.float() - ref).norm() / ref.norm()
    assert err <= REL_TOL[dtype] * tol_scale, float(err)
    all_blocks = torch.arange(args["pages"].shape[0], device=DEVICE)
    v_pages = hk.read_groups(args["pages"], args["layout"], all_blocks, "int8")[1]
    v_max = max(float(v.abs().max()) for v in (v_pages, fp32["v_new"], fp32["v_ring"]))
    assert (out.float() - ref).abs().max() <= 4 * ULP[dtype] * v_max


@pytest.mark.parametrize("mode", ["int4", "int8"])
def test_unpack_asm(mode):
    """The GPU unpack's PTX (run by tests/ptx.py: the Triton interpreter cannot run inline asm) gives the
    codes the interpreter's emulation gives (the kernel's contract):
    register k (even channels) and 4 + k (odd) hold, as fp16 bit patterns 0x6400 | c in their low and
    high halves, byte k of the first and of the second word; c = 16U + L (int8), c = U's nibble (int4,
    times 16 in the odd stream)."""
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        u = torch.randint(0, 2**32, (2,), generator=gen, dtype=torch.int64).tolist()
        lo = torch.randint(0, 2**32, (2,), generator=gen, dtype=torch.int64).tolist()
        out = ptx.run(_ASM_INT8.value if mode == "int8" else _ASM_INT4.value, u + lo if mode == "int8" else u, 8)
        for k in range(4):
            for stream, reg in ((0, out[k]), (1, out[4 + k])):
                for half in range(2):
                    ub, lb = (u[half] >> (8 * k)) & 0xFF, (lo[half] >> (8 * k)) & 0xFF
                    un, ln = (ub >> (4 * stream)) & 0xF, (lb >> (4 * stream)) & 0xF
                    code = 16 * un + ln if mode == "int8" else un * (16 if stream else 1)
                    assert (reg >> (16 * half)) & 0xFFFF == 0x6400 | code, (mode, k, stream, half)


@pytest.mark.parametrize("mode", ["int4", "int8"])
@pytest.mark.parametrize("num_splits", [1, 4])
@pytest.mark.parametrize("block_m", [None, 16])
def test_decode_ragged(mode, num_splits, block_m):
    """q_len 1, ragged contexts, lengths not multiples of G, two with no quantized page at all; the page
    loop transposed (the default for 4 rows) and not (16-row blocks)."""
    assert Tiles.of(1, 4, 16).swap and not Tiles.of(1, 4, 16, block_m=16).swap
    args = _scenario([1, 1, 1, 1], [75, 16, 130, 7])
    _check(args, mode, num_splits=num_splits, block_m=block_m)


@pytest.mark.parametrize("mode", ["int4", "int8"])
def test_swapped_masked_tiles(mode):
    """Two-token queries (8 rows: the transposed page loop) whose tokens straddle a group boundary, so
    their last page is read with a mask per row: C = keep - 1 + k * G, k >= 1."""
    assert Tiles.of(2, 4, 16).swap
    args = _scenario([2, 2, 2], [51, 35, 67], keep=20, seed=3)
    _check(args, mode, num_splits=2)


@pytest.mark.parametrize("mode", ["int4", "int8"])
def test_tiles_smaller_than_a_page(mode):
    """BLOCK_N < G, as the GPU's chunked prefill runs (64-token tiles of 128-token pages): a page is
    read as several tiles, its key weights carried from tile to tile, the token-minor value planes
    entered in the middle of their rows. Decode, verify and a prefill chunk in one call."""
    args = _scenario([1, 5, 24], [100, 70, 45], G=32)
    _check(args, mode, block_n=16, num_splits=3)


@pytest.mark.parametrize("mode", ["int4", "int8"])
@pytest.mark.parametrize("grp,D", [(1, 64), (3, 128), (4, 64), (8, 128)])
def test_verify_gqa(mode, grp, D):
    """Verify: q_len = gamma + 1 for gamma 1..8, every GQA ratio, head_dim 64 and 128; the 9-token
    query at C=33 crosses a group boundary (its first queries read [16, 32) full precision, its last
    ones quantized)."""
    args = _scenario([2, 9, 5, 1, 7], [50, 33, 91, 64, 18], grp=grp, D=D, H=2 if grp < 8 else 1, seed=grp)
    _check(args, mode)


@pytest.mark.parametrize("gamma", range(1, 9))
def test_verify_each_gamma(gamma):
    args = _scenario([gamma + 1, gamma + 1], [61, 100], keep=max(16, gamma), seed=gamma)
    _check(args, "int8" if gamma % 2 else "int4", num_splits=2)


@pytest.mark.parametrize("keep", [0, 4, 16, 37])
def test_fp_keep(keep):
    """fp_keep from 0 (single buffer: the query's own group boundary) to more than G."""
    args = _scenario([1, 5, 9], [70, 44, 100], keep=keep, seed=keep)
    _check(args, "int8", num_splits=3)


@pytest.mark.parametrize("kind", ["outliers", "constant"])
@pytest.mark.parametrize("mode", ["int4", "int8"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_data_kinds(kind, mode, dtype):
    args = _scenario([1, 5, 3], [70, 40, 100], kind=kind, dtype=dtype)
    _check(args, mode, num_splits=2, tol_scale=4 if kind == "outliers" else 1)


@pytest.mark.parametrize("mode", ["int4", "int8"])
def test_value_groups_fp16(mode):
    """v_group < head_dim (several value groups per token) and an fp16 model."""
    args = _scenario([1, 4], [80, 45], VG=16, dtype=torch.float16)
    _check(args, mode, num_splits=2)


def test_ring_larger_than_needed():
    args = _scenario([3, 1], [150, 40], R=64)
    _check(args, "int8")


def _check_ring_write(q_lens, ctxs, keep, G, mode, num_splits=None, **scenario):
    """With ring_dst the kernel also writes the new K/V to their ring rows: the attention is still
    the one over the ring as it was (the smallest ring that allows the write, so the written rows wrap
    onto rows just below the oldest one read), and the ring ends up as the backend's index_copy_
    would leave it."""
    R = max(q_lens) + keep + G - 1
    args = _scenario(q_lens, ctxs, keep=keep, G=G, R=R, **scenario)
    dst = torch.cat([slot * R + torch.arange(c, c + q) % R
                     for slot, c, q in zip(args["ring_slot"].tolist(), ctxs, q_lens)]).to(DEVICE)
    flat = {k: args[k].clone().view(-1, *args[k].shape[2:]) for k in ("k_ring", "v_ring")}
    flat["k_ring"].index_copy_(0, dst, args["k_new"])
    flat["v_ring"].index_copy_(0, dst, args["v_new"])
    ring_args = dict(args, k_ring=args["k_ring"].clone(), v_ring=args["v_ring"].clone())
    _check(ring_args, mode, num_splits=num_splits, ring_dst=dst)  # reference taken before the kernel runs
    for k in ("k_ring", "v_ring"):
        assert torch.equal(ring_args[k].view_as(flat[k]), flat[k])
    with pytest.raises(AssertionError, match="overwrite"):
        paged_attention(**dict(args, mode=mode, k_ring=args["k_ring"][:, :R - 1].contiguous(),
                               v_ring=args["v_ring"][:, :R - 1].contiguous()), ring_dst=dst)


@pytest.mark.parametrize("mode,num_splits", [("int4", 1), ("int8", 3)])
def test_fused_ring_write(mode, num_splits):
    _check_ring_write([1, 5, 9, 2], [70, 44, 100, 16], keep=16, G=16, mode=mode, num_splits=num_splits, seed=7)


@pytest.mark.parametrize("num_splits", [1, 2, 8, 32])
def test_splits_including_empty(num_splits):
    """More splits than units: empty splits must merge as exact zeros."""
    args = _scenario([1, 2], [20, 37])
    _check(args, "int4", num_splits=num_splits)


@pytest.mark.parametrize("mode", ["int4", "int8"])
def test_batch_invariant_rows(mode):
    """batch_invariant: each token of a verify query (sequence 0: 6 tokens whose Q(t) steps inside the
    query, in a batch with a decode and a prefill chunk) comes out bit for bit as the same token's
    decode step alone, with the query's earlier tokens in the ring by then. A launch that follows the
    call (here its split-K count: 2 in the batch, 3 alone) gives other rows."""
    q_lens, ctxs, keep, G = [6, 1, 20], [46, 30, 20], 16, 16  # Q(t): 16 for t < 48, then 32
    # fp32: no output rounding hides a difference
    args = _scenario(q_lens, ctxs, keep=keep, G=G, R=64, dtype=torch.float32, seed=3)
    verify = paged_attention(**dict(args, mode=mode), batch_invariant=True)
    split = paged_attention(**dict(args, mode=mode), num_splits=2)
    slot, R = int(args["ring_slot"][0]), args["k_ring"].shape[1]
    differs = 0
    for j in range(q_lens[0]):
        ring = {k: args[k].clone() for k in ("k_ring", "v_ring")}
        for i in range(j):  # the query's earlier tokens, written to the ring by their own steps
            ring["k_ring"][slot, (ctxs[0] + i) % R] = args["k_new"][i]
            ring["v_ring"][slot, (ctxs[0] + i) % R] = args["v_new"][i]
        one = dict(args, **ring, mode=mode, q=args["q"][j:j + 1], k_new=args["k_new"][j:j + 1],
                   v_new=args["v_new"][j:j + 1], query_start_loc=torch.tensor([0, 1], dtype=torch.int32, device=DEVICE),
                   seq_lens=torch.tensor([ctxs[0] + j + 1], dtype=torch.int32, device=DEVICE),
                   block_table=args["block_table"][:1], ring_slot=args["ring_slot"][:1])
        assert torch.equal(paged_attention(**one, batch_invariant=True)[0], verify[j]), j
        differs += not torch.equal(paged_attention(**one, num_splits=3)[0], split[j])
    assert differs  # the test can tell
    _check(args, mode, batch_invariant=True)


def test_batch_invariant_calls_share_one_kernel_build(monkeypatch):
    """On a GPU rows matched bit for bit only once every call compiled the same kernel (the interpreter
    cannot show it: benchmarks/results/invariance-h200.txt): decode, verify and prefill calls in the
    invariant launch pass the same compile-time parameters."""
    import vllm_quantspec.kernels.paged_attention as pa

    real, builds = pa._paged_attention_kernel, set()

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **constexprs):
                builds.add(tuple(sorted(constexprs.items())))
                return real[grid](*args, **constexprs)
            return launch

    monkeypatch.setattr(pa, "_paged_attention_kernel", Spy())
    for q_lens, ctxs in (([1], [70]), ([5, 1], [44, 90]), ([40, 1], [64, 20])):
        paged_attention(**dict(_scenario(q_lens, ctxs, seed=1), mode="int8"), batch_invariant=True)
    assert len(builds) == 1, builds


@pytest.mark.parametrize("mode", ["int4", "int8"])
def test_chunked_prefill_mixed_batch(mode):
    """Chunked prefill (q_len 40: several query blocks, whose later queries read some of the chunk's
    own tokens quantized) next to decodes; also a first chunk with no context at all."""
    args = _scenario([40, 1, 23, 3], [64, 90, 0, 20])
    _check(args, mode, num_splits=2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["int4", "int8"])
@pytest.mark.parametrize("q_len", [1, 5, 9])
@pytest.mark.parametrize("kind", ["normal", "outliers"])
def test_gpu_llama8b_shape(mode, q_len, kind):
    """Llama-3.1-8B attention shape (32 q heads, 8 kv heads, D=128), G=128, fp_keep=G, bf16, 8k-20k
    contexts, the split-K heuristic and the real Triton compilation."""
    args = _scenario([q_len] * 3, [8000, 20000, 12345], G=128, H=8, grp=4, D=128, keep=128, R=384, kind=kind)
    _check(args, mode, tol_scale=4 if kind == "outliers" else 1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode,q_len", [("int4", 1), ("int8", 5), ("int8", 1)])
@pytest.mark.parametrize("block_n,num_warps", [(128, 2), (64, 1), (32, 1)])
def test_gpu_launch_variants(mode, q_len, block_n, num_warps):
    """The other launches tune_attention.py --quick times (fewer warps, page tiles smaller than a page),
    compiled for real at the 8B shape: a sweep of a wrong kernel would say nothing."""
    args = _scenario([q_len] * 2, [8000, 12345], G=128, H=8, grp=4, D=128, keep=128, R=384)
    _check(args, mode, block_n=block_n, num_warps=num_warps, num_splits=64)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode,q_len", [("int4", 1), ("int8", 5)])
def test_gpu_fused_ring_write(mode, q_len):
    """The ring write of decode (the draft, fp_keep + γ) and verify steps at the 8B shape, with the
    split-K heuristic: programs of other splits read the ring while split 0 writes it."""
    keep = 128 + 4 if q_len == 1 else 128
    _check_ring_write([q_len] * 3, [8000, 20000, 12345], keep=keep, G=128, mode=mode, H=8, grp=4, D=128)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["int4", "int8"])
def test_gpu_chunked_prefill(mode):
    args = _scenario([512, 1, 300], [4096, 9000, 0], G=128, H=8, grp=4, D=128, keep=128, R=384)
    _check(args, mode)


# --- chunked prefill through FlashAttention-3 over a dequantized workspace (kernels/prefill_attention.py)

@pytest.mark.parametrize("mode", ["int4", "int8"])
@pytest.mark.parametrize("VG", [None, 16])
def test_dequantize_pages_matches_reference(mode, VG):
    """The workspace is the reference's fp32 dequantization rounded to fp16, page for page."""
    args = _scenario([1], [200], VG=VG, D=64)
    blocks = torch.tensor([3, 0, 5], dtype=torch.int32, device=DEVICE)
    k, v = dequantize_pages(args["pages"], args["layout"], blocks, mode)
    k_ref, v_ref = hk.read_groups(args["pages"], args["layout"], blocks, mode)
    # one fp32 operation order (min + s * code) on both sides: equal after rounding, up to one
    # fp16 ulp where a compiler contracts the multiply-add
    assert torch.allclose(k.float(), k_ref.half().float(), rtol=2.0**-10, atol=0)
    assert torch.allclose(v.float(), v_ref.half().float(), rtol=2.0**-10, atol=0)


def test_launch_heuristic():
    """The backend's launch: single-token programs (INT4 draft steps, INT8 target-only decode) take 2 warps
    once the page tiles fill 4 programs per SM (tune-attention-h200), verifies keep 4, and the split count
    fills 8 warps per SM (at least 2 programs), never more splits than page tiles. INT4 draft steps over
    many page tiles take one warp over 64-token tiles. Queries of up to 8 rows run the page loop
    transposed (8-row blocks) where values are quantized per token, the others not."""
    sms = _num_sms()
    decode, verify = Tiles.of(1, 4, 128), Tiles.of(5, 4, 128)
    assert (decode.block_m, decode.num_warps, decode.swap) == (8, 4, True)
    assert (verify.block_m, verify.num_warps, verify.swap) == (32, 4, False)
    assert not Tiles.of(3, 4, 128).swap and not Tiles.of(1, 4, 128, True).swap
    assert Tiles.of(1, 4, 128, per_token_values=False) == Tiles(1, 16, 128, 32, 4)  # v_group < head_dim: untransposed
    assert Tiles.of(1, 4, 128, seq_heads=4 * sms, max_seq_len=128).num_warps == 2
    assert Tiles.of(1, 4, 128, seq_heads=4 * sms - 1, max_seq_len=128) == decode
    assert Tiles.of(5, 4, 128, seq_heads=64 * sms, max_seq_len=128) == verify
    assert Tiles.of(4, 4, 128, seq_heads=64 * sms, max_seq_len=128).num_warps == 4  # a 16-row verify
    assert Tiles.of(2, 3, 128, seq_heads=64 * sms, max_seq_len=128).num_warps == 4  # SmolLM2's γ=1 verify
    assert Tiles.of(1, 4, 128, True, seq_heads=64 * sms, max_seq_len=128).num_warps != 2
    # INT4 draft steps over ONE_WARP_TILES 64-token tiles per program (8 programs per SM): one warp, 64-token tiles
    many = ONE_WARP_TILES * 8 * sms
    draft = Tiles.of(1, 4, 128, seq_heads=many, max_seq_len=64, mode="int4")
    assert (draft.block_n, draft.num_warps, draft.swap) == (64, 1, True)
    assert Tiles.of(1, 4, 128, seq_heads=many // 2, max_seq_len=128, mode="int4") == draft
    assert Tiles.of(1, 4, 128, seq_heads=many - 1, max_seq_len=64, mode="int4").num_warps == 2
    assert Tiles.of(1, 4, 128, seq_heads=many, max_seq_len=64).num_warps == 2  # the INT8 decode
    assert Tiles.of(1, 4, 128, seq_heads=many, max_seq_len=64, mode="int4", num_warps=2).block_n == 128
    assert Tiles.of(1, 4, 128, True, seq_heads=many, max_seq_len=64, mode="int4").num_warps != 1
    assert _pick_num_splits(8, 1024, 4) == 2 * sms // 8
    assert _pick_num_splits(8, 1024, 2) == 4 * sms // 8
    assert _pick_num_splits(8, 1024, 8) == 2 * sms // 8  # prefill's 8 warps: still 2 programs per SM
    assert _pick_num_splits(8, 3, 2) == 3
    assert _pick_num_splits(100 * sms, 1024, 4) == 1


def test_plan_runs_boundaries():
    """Runs cover every query row once, in order, and share one boundary Q(t) each: at most G rows,
    or fp_keep + G for the run with no quantized key (q_r = 0)."""
    G, keep = 16, 20
    qsl, seq_lens = [0, 40, 41, 64, 67], [104, 91, 23, 23]
    runs = plan_runs(qsl, seq_lens, G, keep)
    rows = [row + i for _, row, n, _, _ in runs for i in range(n)]
    assert rows == list(range(qsl[-1]))
    for b, row, n, q_r, t0 in runs:
        positions = torch.arange(t0, t0 + n)
        assert n <= (G if q_r else keep + G) and set(quantized_len(positions, G, keep).tolist()) == {q_r}, (b, row, n, q_r, t0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("grp,D,H", [(4, 128, 8), (3, 64, 3)])
@pytest.mark.parametrize("kind", ["normal", "outliers"])
def test_gpu_prefill_fa3(grp, D, H, kind):
    """Prefill chunks (with context, without, and a decode in the same batch) through FA3 over the
    workspace: same tolerances as the paged kernel (fp16 operands, fp32 merge, bf16 output)."""
    args = _scenario([512, 1, 300, 37], [4096, 9000, 0, 130], G=128, H=H, grp=grp, D=D, keep=128, R=384,
                     kind=kind)
    plan = plan_prefill(args["query_start_loc"].cpu().numpy(), args["seq_lens"].cpu().numpy(),
                        args["ring_slot"].tolist(), args["block_table"], 128, 128, 384)
    dtype = args["q"].dtype
    fp32 = {k: args[k].float() for k in ("q", "k_new", "v_new", "k_ring", "v_ring")}
    ref = reference_attention(**dict(args, mode="int8", **fp32))
    out = torch.full_like(args["q"], float("nan"))
    prefill_attention(args["q"], args["k_new"], args["v_new"], plan, args["pages"], args["layout"],
                      args["k_ring"], args["v_ring"], args["sm_scale"], out)
    assert not out.isnan().any()
    err = (out.float() - ref).norm() / ref.norm()
    assert err <= REL_TOL[dtype] * (4 if kind == "outliers" else 1), float(err)
