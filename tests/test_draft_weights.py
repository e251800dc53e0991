"""RTN int4 draft weights: error bound, scale rule, packing, and vLLM's own CPU W4A16 kernel."""

import pytest
import torch
from heavy_tails import student_t2

from vllm_quantspec.draft_weights import (
    DequantizedW4Linear,
    W4A16Linear,
    W4Weight,
    dequantize,
    int4_method,
    pack_int4,
    quantize_w4,
    rtn_int4,
    unpack_int4,
)


def _weights(kind: str, n: int, k: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if kind == "normal":
        return torch.randn(n, k, generator=g) * 0.05
    # heavy tails plus a few outlier input channels, as in real LLM weights
    w = student_t2((n, k), g) * 0.02
    w[:, torch.randperm(k, generator=g)[:3]] *= 50
    return w


def _group_scale(w4: W4Weight) -> torch.Tensor:
    return w4.weight_scale.float().repeat_interleave(w4.group_size, dim=1)


@pytest.mark.parametrize("kind", ["normal", "heavy"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("group_size", [32, 128])
def test_error_bound_and_scale_rule(kind, dtype, group_size):
    w = _weights(kind, 48, 256).to(dtype)
    w4 = quantize_w4(w, group_size)
    assert w4.weight_packed.dtype == torch.int32 and w4.weight_packed.shape == (48, 32)
    assert w4.weight_scale.dtype == dtype and w4.weight_scale.shape == (48, 256 // group_size)
    err = (w.float() - dequantize(w4)).abs()
    # fp32 slack: w / s carries a relative error <= 2^-24, so y = w/s (|y| <= 7.5) may land on
    # the wrong side of a .5 tie by ~5e-7; q*s is exact and the subtraction adds <= 2^-24 rel.
    assert (err <= _group_scale(w4) * (0.5 + 1e-6)).all()
    # the scale is the smallest `dtype` value >= absmax/7.5: not merely *some* bounding scale
    target = w.float().reshape(48, -1, group_size).abs().amax(-1) / 7.5
    s = w4.weight_scale
    assert (s.float() >= target).all()
    below = torch.nextafter(s, torch.zeros_like(s)).float()
    assert (below < target).all()


def test_zero_group_is_exact():
    w = torch.randn(32, 64, dtype=torch.bfloat16)
    w[:5] = 0
    w[7, 32:] = 0
    w4 = quantize_w4(w, 32)
    assert (w4.weight_scale[:5] == 0).all() and w4.weight_scale[7, 1] == 0
    deq = dequantize(w4)
    assert torch.isfinite(deq).all()
    assert (deq[:5] == 0).all() and (deq[7, 32:] == 0).all()


def test_constant_rows_hit_the_ties():
    # |w| = absmax everywhere, s = 0.9375/7.5 = 0.125 exactly: w/s = +-7.5 ties round half-even
    # to +-8, and +8 clamps to 7 (error exactly s/2) while -8 is exact
    w = torch.full((32, 64), 0.9375, dtype=torch.float16)
    w[16:] = -0.9375
    q, s = rtn_int4(w, 32, torch.float16)
    assert (s == 0.125).all()
    assert (q[:16] == 7).all() and (q[16:] == -8).all()


def test_pack_unpack_round_trip():
    q = torch.randint(-8, 8, (16, 96), dtype=torch.int8, generator=torch.Generator().manual_seed(1))
    packed = pack_int4(q)
    assert packed.dtype == torch.int32 and packed.shape == (16, 12)
    assert torch.equal(unpack_int4(packed, 96), q)


def test_pack_layout_is_uint4b8_low_nibble_first():
    # column k of a row -> nibble k % 8 of word k // 8, counted from the low bits, stored as q + 8
    q = torch.tensor([[-8, -7, 0, 1, 2, 3, 6, 7]], dtype=torch.int8)
    expected = sum((int(v) + 8) << (4 * i) for i, v in enumerate(q[0]))
    expected -= 1 << 32  # top nibble is 15: the uint32 reads back as a negative int32
    assert pack_int4(q).item() == expected


def test_state_dict_names_and_shapes():
    w4 = quantize_w4(torch.randn(64, 256, dtype=torch.float16), 128)
    sd = w4.state_dict()
    assert set(sd) == {"weight_packed", "weight_scale", "weight_shape"}
    assert sd["weight_shape"].tolist() == [64, 256]


def test_bad_group_size_is_refused():
    with pytest.raises(ValueError):
        quantize_w4(torch.randn(8, 96), 64)


@pytest.mark.parametrize("act_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k,group_size", [(64, 256, 128), (96, 192, 64)])
def test_vllm_cpu_w4a16_kernel_matches_dequantized(act_dtype, n, k, group_size, monkeypatch):
    """Our parameters through vLLM's own W4A16 scheme (its kernel choice: CPUWNA16 here), as the
    draft's int4 lm_head runs (W4A16Linear; the draft's linears go through the same scheme)."""
    import vllm.model_executor.parameter as vllm_param

    # vLLM parameters read the tensor-parallel rank at construction: act as a single rank
    monkeypatch.setattr(vllm_param, "get_tensor_model_parallel_rank", lambda: 0)
    monkeypatch.setattr(vllm_param, "get_tensor_model_parallel_world_size", lambda: 1)
    w4 = quantize_w4(_weights("heavy", n, k).to(act_dtype), group_size)
    head = int4_method(w4, act_dtype)
    assert isinstance(head, W4A16Linear) and type(head.scheme.kernel).__name__ == "CPUWNA16LinearKernel"
    x = torch.randn(5, k, generator=torch.Generator().manual_seed(2)).to(act_dtype)
    y = head.apply(None, x)
    w = dequantize(w4)
    ref = x.float() @ w.T
    # vLLM's cpu_gemm_wna16 rounds more than an fp32 accumulation of the act_dtype weights would: in
    # 240 random draws of these shapes it erred by up to 6.6 eps of the magnitude sum |x| @ |W|^T per
    # element (6.7 eps from that fp32 accumulation) and 1.2 eps in relative Frobenius norm. A wrong
    # nibble order or scale layout errs by O(100%) of |y| (reversed nibbles: at least 128 eps in
    # Frobenius norm), far outside either bound.
    mag = x.float().abs() @ w.abs().T
    eps = torch.finfo(act_dtype).eps
    assert ((y.float() - ref).abs() <= 16 * eps * mag + 1e-6).all()
    assert (y.float() - ref).norm() <= 4 * eps * ref.norm()


def test_fp32_int4_method_is_the_dequantized_twin():
    w4 = quantize_w4(_weights("heavy", 32, 128), 64)
    head = int4_method(w4, torch.float32)
    assert isinstance(head, DequantizedW4Linear)
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(head.apply(None, x), x @ dequantize(w4).T)


def test_derived_draft_linear_takes_the_target_bias():
    """A quantized draft linear keeps its int4 weight and the target's bias (Qwen2's qkv_proj has one).
    The draft module's own bias was allocated but never loaded: left in place, it is garbage and
    the draft's proposals are never accepted."""
    from vllm_quantspec.proposer import STASH, derive_draft_weights

    w, b = _weights("normal", 16, 64), torch.randn(16)
    target, draft = torch.nn.Module(), torch.nn.Module()
    target.qkv_proj = torch.nn.Linear(64, 16)
    target.qkv_proj.bias.data.copy_(b)
    target.qkv_proj.__dict__[STASH] = w4 = quantize_w4(w, 32)
    draft.qkv_proj = torch.nn.Module()
    for key, tensor in w4.state_dict().items():
        setattr(draft.qkv_proj, key, torch.nn.Parameter(torch.empty_like(tensor), requires_grad=False))
    draft.qkv_proj.bias = torch.nn.Parameter(torch.full((16,), float("nan")), requires_grad=False)
    assert derive_draft_weights(draft, target, torch.float32) == 1
    layer = draft.qkv_proj
    x = torch.randn(3, 64)
    torch.testing.assert_close(layer.quant_method.apply(layer, x, layer.bias), x @ dequantize(w4).T + b)


def test_gemv_linear_runs_small_batches_on_the_gemv_and_larger_ones_on_the_inner_kernel():
    """GemvW4Linear (draft_gemv): up to two tokens on the plugin's GEMV (a bf16 model's, in bf16x2
    arithmetic), more on the layer's own kernel, decided per call inside its custom op, so one graph
    compiled for every batch size still takes both paths."""
    from vllm_quantspec.draft_weights import GemvW4Linear
    from vllm_quantspec.kernels.w4a16_gemv import repack, w4a16_gemv

    gen = torch.Generator().manual_seed(5)
    w4 = quantize_w4(student_t2((24, 256), gen) * 0.02, 64, scale_dtype=torch.bfloat16)
    inner = DequantizedW4Linear(w4, torch.bfloat16)
    method = GemvW4Linear(w4, inner, None, torch.bfloat16)
    bias = torch.randn(24, generator=gen).bfloat16()
    compiled = torch.compile(lambda x: method.apply(None, x, bias), dynamic=True, fullgraph=True)
    for run in (lambda x: method.apply(None, x, bias), compiled):
        for m in (1, 2):
            x = torch.randn(m, 256, generator=gen).bfloat16()
            assert torch.equal(run(x), w4a16_gemv(x, repack(w4.weight_packed, 64, bf16x2=True), w4.weight_scale, 64,
                                                  bias, bf16x2=True))
        x3 = torch.randn(3, 256, generator=gen).bfloat16()
        assert torch.equal(run(x3), inner.apply(None, x3, bias))
    # an fp16 model's GEMV (fp32 arithmetic) was slower than Marlin from two rows on: one row only
    inner16 = DequantizedW4Linear(w4, torch.float16)
    method16 = GemvW4Linear(w4, inner16, None, torch.float16)
    x1, x2 = (torch.randn(m, 256, generator=gen).half() for m in (1, 2))
    assert torch.equal(method16.apply(None, x1, None), w4a16_gemv(x1, repack(w4.weight_packed, 64), w4.weight_scale, 64))
    assert torch.equal(method16.apply(None, x2, None), inner16.apply(None, x2, None))


def test_gemv_linear_is_freed_with_its_draft():
    """The custom op finds a GemvW4Linear by index through weak references: a draft that is freed
    (another LLM built in the same process) does not keep its weight copies alive."""
    import gc

    from vllm_quantspec import draft_weights

    w4 = quantize_w4(_weights("normal", 16, 64), 32, scale_dtype=torch.bfloat16)
    method = draft_weights.GemvW4Linear(w4, DequantizedW4Linear(w4, torch.bfloat16), None, torch.bfloat16)
    index = method.index
    assert draft_weights._GEMV_LINEARS[index]() is method
    del method
    gc.collect()
    assert draft_weights._GEMV_LINEARS[index]() is None
