"""Draft weights (W4A16): RTN int4 symmetric group quantization of a linear weight [N, K].

Output format = compressed-tensors "pack-quantized", weight type `uint4b8`, symmetric, strategy
"group": exactly the parameters `CompressedTensorsWNA16.create_weights` allocates, so every vLLM
W4A16 kernel (Machete / Marlin / TritonW4A16 on GPU, CPUWNA16 on CPU) runs it unchanged:
  weight_packed  int32 [N, K/8]   input column k of row n is the nibble q+8 (in [0, 15]) at bits
                                  4*(k % 8) .. 4*(k % 8)+3 of word [n, k // 8] (lowest k in the
                                  lowest bits); packing/unpacking is compressed-tensors' own code
  weight_scale   model dtype [N, K/g]
  weight_shape   int64 [2] = (N, K)
The kernel's weight is W[n, k] = q[n, k] * weight_scale[n, k // g], q in [-8, 7].

Rounding / scale rule (per group of g consecutive input columns of one row):
  s = absmax(group) / 7.5, computed in fp32 and rounded UP to the model dtype
  q = clamp(round_half_even(w / s), -8, 7)      (q = 0 where s == 0: an all-zero group)
Why 7.5: the grid {-8..7}*s has error <= s/2 on [-8.5 s, 7.5 s]; absmax/7.5 is the smallest
symmetric scale that keeps both +absmax and -absmax inside (it is also compressed-tensors'
`calculate_qparams` rule, so we agree with llm-compressor's RTN). Why round the scale up: then
|w / s| <= 7.5 after storing s in fp16/bf16, so the clamp at +7 never costs more than s/2.
Hence |w - q*s| <= s/2 for every element (up to fp32 rounding of w / s).
"""

import weakref
from dataclasses import dataclass

import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

from vllm_quantspec.hierarchical_kv import round_to_dtype
from vllm_quantspec.kernels.w4a16_gemv import repack, w4a16_gemv

NUM_BITS = 4
PACK_FACTOR = 32 // NUM_BITS  # int4 values per int32 word
Q_MIN, Q_MAX = -8, 7


@dataclass(frozen=True)
class W4Weight:
    """One quantized linear weight, in compressed-tensors WNA16 (uint4b8) parameter format."""

    weight_packed: torch.Tensor  # int32 [N, K/8]
    weight_scale: torch.Tensor  # model dtype [N, K/g]
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.weight_packed.shape[0], self.weight_packed.shape[1] * PACK_FACTOR

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The parameters `CompressedTensorsWNA16.create_weights` registers, by their names."""
        return {
            "weight_packed": self.weight_packed,
            "weight_scale": self.weight_scale,
            "weight_shape": torch.tensor(self.shape, dtype=torch.int64),
        }


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 [N, K] in [-8, 7] -> int32 [N, K/8] (uint4b8 nibbles, packed along K)."""
    return pack_to_int32(q.to(torch.int8), NUM_BITS, packed_dim=1)


def unpack_int4(packed: torch.Tensor, k: int) -> torch.Tensor:
    """int32 [N, K/8] -> int8 [N, K] in [-8, 7]; inverse of `pack_int4`."""
    return unpack_from_int32(packed, NUM_BITS, torch.Size((packed.shape[0], k)), packed_dim=1)


def rtn_int4(weight: torch.Tensor, group_size: int, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The rule of the module docstring: -> (q int8 [N, K], scale `scale_dtype` [N, K/g])."""
    n, k = weight.shape
    if k % group_size or k % PACK_FACTOR:
        raise ValueError(f"input size {k} must be a multiple of group_size {group_size} and of {PACK_FACTOR}")
    w = weight.float().reshape(n, k // group_size, group_size)
    scale = round_to_dtype(w.abs().amax(dim=-1) / 7.5, scale_dtype, up=True)
    s = scale.float().unsqueeze(-1)
    y = torch.where(s > 0, w / torch.where(s > 0, s, 1.0), 0.0)
    q = torch.round(y).clamp(Q_MIN, Q_MAX)  # torch.round is round-half-even
    return q.to(torch.int8).reshape(n, k), scale


def quantize_w4(weight: torch.Tensor, group_size: int = 128, scale_dtype: torch.dtype | None = None) -> W4Weight:
    """RTN-quantize a linear weight [N, K] (out, in) with scales in `scale_dtype` (default: weight's)."""
    q, scale = rtn_int4(weight, group_size, scale_dtype or weight.dtype)
    return W4Weight(pack_int4(q), scale, group_size)


def dequantize(w4: W4Weight) -> torch.Tensor:
    """The fp32 weight [N, K] the kernels compute with: q * scale (exact in fp32).

    A kernel may round each product to the activation dtype before its fp32 accumulation.
    """
    q = unpack_int4(w4.weight_packed, w4.shape[1])
    return q.float() * w4.weight_scale.float().repeat_interleave(w4.group_size, dim=1)


def bf16x2_linear(x: torch.Tensor, w4: W4Weight) -> torch.Tensor:
    """x [M, K] (bf16) @ dequantize(w4).T in the bf16x2 GEMV's arithmetic (kernels/w4a16_gemv.py): the
    eight weights of one of its words are columns 2i + h (h = 0, 1) of a scale group, i = p * G/8 + w for
    p = 0..3; each lane h sums its four products q * x in bf16 (each step rounded once, as a fused
    multiply-add), then the word's two lanes, its group's words and, scaled, the groups in fp32.
    The kernel sums in fp32 in another order: they agree to fp32 rounding, except where that flips a
    bf16 rounding (one bf16 spacing of one word's sum)."""
    n, k = w4.shape
    g = w4.group_size
    q = unpack_int4(w4.weight_packed, k).float().view(n, k // g, 4, g // 8, 2)  # [n, group, p, w, h]
    xs = x.float().view(-1, 1, k // g, 4, g // 8, 2)
    lanes = torch.full((xs.shape[0], n, k // g, g // 8, 2), -0.0, device=x.device)
    for p in range(4):
        lanes = (q[:, :, p] * xs[:, :, :, p] + lanes).to(torch.bfloat16).float()
    return (lanes.sum((-1, -2)) * w4.weight_scale.float()).sum(-1).to(x.dtype)


class DequantizedW4Linear:
    """The torch twin of a W4A16 kernel, for activations no vLLM W4A16 kernel takes (fp32 on CPU,
    where CPUWNA16 runs bf16/fp16 only): the same int4 weights, dequantized once, then a dense GEMM.
    It stands in as the layer's ``quant_method``, so it needs only ``apply``."""

    def __init__(self, w4: W4Weight, dtype: torch.dtype):
        self.weight = dequantize(w4).to(dtype)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight, bias)


class W4A16Linear:
    """vLLM's own W4A16 kernel (the one its compressed-tensors WNA16 scheme picks: Machete / Marlin /
    TritonW4A16 on GPU, CPUWNA16 on CPU) for a weight that is not one of the model's linear layers:
    the draft's int4 lm_head. Stands in as that module's ``quant_method``."""

    def __init__(self, w4: W4Weight, dtype: torch.dtype):
        from vllm.model_executor.layers.quantization.compressed_tensors.schemes.compressed_tensors_wNa16 import (
            CompressedTensorsWNA16,
        )

        n, k = w4.shape
        self.scheme = CompressedTensorsWNA16(strategy="group", num_bits=NUM_BITS, group_size=w4.group_size,
                                             symmetric=True)
        self.layer = torch.nn.Module()
        with torch.device(w4.weight_packed.device):
            self.scheme.create_weights(self.layer, output_size=n, input_size=k, output_partition_sizes=[n],
                                       input_size_per_partition=k, params_dtype=dtype, weight_loader=None)
        for name, tensor in w4.state_dict().items():
            getattr(self.layer, name).data.copy_(tensor)
        self.layer.bias = None  # the bias, if any, is passed to apply
        self.scheme.process_weights_after_loading(self.layer)  # repack for the chosen kernel

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return self.scheme.apply_weights(self.layer, x, bias)


W4A16_KERNEL_DTYPES = (torch.float16, torch.bfloat16)  # what vLLM's W4A16 kernels take as activations

# by the index each one's custom-op calls carry (a list: compiled with dynamic shapes, the index may be
# a SymInt, which indexes a list but is no dict key); weak, so that a freed draft (another LLM in the
# same process) takes its weights with it
_GEMV_LINEARS: list[weakref.ref] = []


@torch.library.custom_op("quantspec::draft_linear", mutates_args=())
def _draft_linear(x: torch.Tensor, index: int, bias: torch.Tensor | None) -> torch.Tensor:
    return _GEMV_LINEARS[index]().forward(x, bias)


@_draft_linear.register_fake
def _(x: torch.Tensor, index: int, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(x.shape[0], _GEMV_LINEARS[index]().out_features)


class GemvW4Linear:
    """A draft linear whose small batches run the plugin's W4A16 GEMV and whose larger batches run
    vLLM's W4A16 kernel (`inner`, the layer's own quant_method), each on its own copy of the int4
    weights. Stands in as the layer's ``quant_method``. The choice by batch size is made inside one
    opaque custom op: vLLM compiles the draft once for every batch size, so a branch in the traced code
    would be fixed at the size it was traced with. A bf16 model's GEMV does its arithmetic in bf16x2
    (two weights an instruction; kernels/w4a16_gemv.py), an fp16 model's in fp32. Small: up to the rows
    where the GEMV beat Marlin over the 8B draft's four linears (w4a16-gemv-h200, µs at M = 1 / 2:
    bf16x2 65.1 / 86.6, fp32 77.1 / 105.5, Marlin 91.8 / 91.8; the GEMV reads the weights once a row)."""

    def __init__(self, w4: W4Weight, inner, layer: torch.nn.Module, activation_dtype: torch.dtype):
        self.bf16x2 = activation_dtype == torch.bfloat16
        self.max_rows = 2 if self.bf16x2 else 1
        self.weight = repack(w4.weight_packed, w4.group_size, self.bf16x2)
        self.scale = w4.weight_scale.clone()  # the inner kernel's repacking may replace or permute its own
        self.group_size = w4.group_size
        self.out_features = w4.shape[0]
        self.inner, self.layer = inner, layer
        self.index = len(_GEMV_LINEARS)
        _GEMV_LINEARS.append(weakref.ref(self))

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return torch.ops.quantspec.draft_linear(x, self.index, bias)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if x.shape[0] <= self.max_rows:
            return w4a16_gemv(x, self.weight, self.scale, self.group_size, bias, bf16x2=self.bf16x2)
        return self.inner.apply(self.layer, x, bias)


def int4_method(w4: W4Weight, dtype: torch.dtype) -> W4A16Linear | DequantizedW4Linear:
    """A ``quant_method`` computing x @ dequantize(w4).T: vLLM's kernel, or its torch twin for fp32."""
    return W4A16Linear(w4, dtype) if dtype in W4A16_KERNEL_DTYPES else DequantizedW4Linear(w4, dtype)

