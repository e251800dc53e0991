"""The QuantSpec proposer: the target model itself, with int4 weights, reading the INT4 plane.

It runs on vLLM's draft-model runner path (patches P3/P4), so vLLM's scheduler, lookahead slots and
rejection sampler are reused; on a GPU each draft step replays one CUDA graph (``draft_graphs``).
What differs from vLLM's DraftModelProposer:
- the draft is built from the *target's* config and its weights are derived in memory from the
  target's loaded weights (``draft_weights``): no second checkpoint, no disk I/O;
- its attention layers share the target's KV cache (vLLM KV sharing) and read it in INT4 mode; their
  K/V for speculative tokens go only into the full-precision ring (hierarchical_kv_backend);
- no catch-up pass: the target already wrote K/V for every verified token, so drafting starts at
  the bonus token and takes γ single-token steps.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch
import torch.nn as nn
from vllm.config import CUDAGraphMode, VllmConfig, set_current_vllm_config
from vllm.config.utils import replace
from vllm.logger import init_logger
from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import CompressedTensorsConfig
from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase
from vllm.model_executor.model_loader.utils import initialize_model
from vllm.utils.torch_utils import set_default_torch_dtype
from vllm.v1.attention.backends.registry import AttentionBackendEnum
from vllm.v1.spec_decode.draft_model import DraftModelProposer

from vllm_quantspec.draft_graphs import DraftStepGraphs
from vllm_quantspec.draft_weights import (W4A16_KERNEL_DTYPES, DequantizedW4Linear, GemvW4Linear, int4_method,
                                          quantize_w4)
from vllm_quantspec.hierarchical_kv_backend import DRAFT_PREFIX
from vllm_quantspec.options import DRAFT_LINEARS, METHOD, QuantSpecOptions

logger = init_logger(__name__)

STASH = "quantspec_w4"  # attribute of a target linear holding its draft (int4) weight until the draft takes it

# The unfused projections behind each fused linear of vLLM's decoder blocks (what compressed-tensors
# matches its ignore list against).
_UNFUSED = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "o_proj": ("o_proj",),
    "gate_up_proj": ("gate_proj", "up_proj"),
    "down_proj": ("down_proj",),
}


def draft_quant_config(options: QuantSpecOptions) -> CompressedTensorsConfig:
    """vLLM's own W4A16 (compressed-tensors WNA16, uint4b8, symmetric groups) for the chosen linears;
    its kernel selection picks Machete / Marlin / TritonW4A16 on GPU and CPUWNA16 on CPU."""
    skipped = [p for fused in DRAFT_LINEARS if fused not in options.draft_quantized_linears for p in _UNFUSED[fused]]
    return CompressedTensorsConfig.from_config({
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "config_groups": {"draft_w4": {
            "targets": ["Linear"],
            "weights": {"num_bits": options.draft_weight_bits, "type": "int", "symmetric": True,
                        "strategy": "group", "group_size": options.draft_weight_group_size,
                        "dynamic": False, "actorder": None, "observer": "minmax"},
            "input_activations": None,
            "output_activations": None,
        }},
        "ignore": ["lm_head", *(f"re:.*\\.{p}$" for p in skipped)],
    })


def derive_draft_weights(draft: nn.Module, target: nn.Module, activation_dtype: torch.dtype,
                         lm_head_group: int | None = None, gemv: bool = False) -> int:
    """Give the draft its int4 linears and share everything else with the target.

    The int4 weights were derived from the target's fp weights while the target loaded (patch P8:
    on CPU, vLLM replaces a loaded fp linear weight by a prepacked oneDNN handle, so they cannot be
    read back afterwards). Every other module that owns parameters (embeddings, norms, lm_head,
    unquantized linears) is the target's own module object, which also keeps vLLM's per-platform
    GEMM setup. Draft and target are built from one config, so their module names match.
    With `lm_head_group`, the draft's lm_head is instead a copy of the target's (same vocabulary
    shard, same tied weight) that computes with int4 weights RTN-quantized from it in groups of that
    size. With `gemv`, each int4 linear runs its smallest batches on the plugin's GEMV (GemvW4Linear).
    Returns the number of int4 linear layers (the lm_head included).
    """
    target_modules = dict(target.named_modules(remove_duplicate=False))
    quantized = 0
    for name, module in list(draft.named_modules(remove_duplicate=False)):
        if hasattr(module, "weight_packed"):
            w4 = target_modules[name].__dict__.pop(STASH)
            if getattr(module, "bias", None) is not None:  # e.g. Qwen2's qkv_proj: the draft's own was never loaded
                module.bias = target_modules[name].bias
            if activation_dtype in W4A16_KERNEL_DTYPES:
                gemv_method = GemvW4Linear(w4, module.quant_method, module, activation_dtype) if gemv else None
                for key, tensor in w4.state_dict().items():
                    getattr(module, key).data = tensor  # the parameter keeps its vLLM loader attributes
                module.quant_method.process_weights_after_loading(module)  # repack for the chosen kernel
                module.quant_method = gemv_method or module.quant_method
            else:
                module.quant_method = DequantizedW4Linear(w4, activation_dtype)
                for key in w4.state_dict():
                    delattr(module, key)
            quantized += 1
        elif name and not isinstance(module, AttentionLayerBase) and next(module.parameters(False), None) is not None:
            parent, _, child = name.rpartition(".")
            setattr(draft.get_submodule(parent), child, target_modules[name])
    if lm_head_group:
        # a shallow copy shares the target's parameters; its own quant_method leaves the target's
        # lm_head (or, when tied, its embedding) untouched
        head = copy.copy(target_modules["lm_head"])
        w4 = quantize_w4(head.weight.data, lm_head_group)
        head.quant_method = int4_method(w4, activation_dtype)
        if gemv:
            head.quant_method = GemvW4Linear(w4, head.quant_method, head, activation_dtype)
        draft.lm_head = head
        quantized += 1
    return quantized


def stash_draft_weight(layer: nn.Module, options: QuantSpecOptions) -> None:
    """P8, for each target linear the draft quantizes, before vLLM repacks its fp weight."""
    if layer.prefix.startswith(DRAFT_PREFIX) or layer.prefix.rpartition(".")[2] not in options.draft_quantized_linears:
        return
    layer.__dict__[STASH] = quantize_w4(layer.weight.data, options.draft_weight_group_size)


class QuantSpecDispatch(DraftModelProposer):
    """Installed by patch P4 as the runner's ``DraftModelProposer``: builds a QuantSpecProposer for
    method quantspec and behaves exactly as vLLM's DraftModelProposer otherwise."""

    def __new__(cls, vllm_config: VllmConfig, *args: Any, **kwargs: Any):
        if cls is QuantSpecDispatch and vllm_config.speculative_config.method == METHOD:
            cls = QuantSpecProposer
        return super().__new__(cls)


class QuantSpecProposer(QuantSpecDispatch):
    def __init__(self, vllm_config: VllmConfig, device: torch.device, runner: Any = None):
        super().__init__(vllm_config, device, runner)
        self.options: QuantSpecOptions = self.speculative_config.quantspec
        self._target: nn.Module | None = None

    def _create_draft_vllm_config(self) -> VllmConfig:
        base = super()._create_draft_vllm_config()
        kernel_config = base.kernel_config
        if self.options.draft_linear_backend != "auto":  # read by vLLM's W4A16 kernel choice
            kernel_config = replace(kernel_config, linear_backend=self.options.draft_linear_backend)
        return replace(
            base,
            quant_config=draft_quant_config(self.options),
            kernel_config=kernel_config,
            attention_config=replace(base.attention_config, backend=AttentionBackendEnum.CUSTOM),
            # vLLM keys its AOT torch.compile cache on the config hash and the forward's source, not on
            # the model tag: without this the draft (same config, same code) would load the target's
            # compiled graph, which expects fp `weight` parameters.
            additional_config={**base.additional_config, "quantspec_draft": dataclasses.asdict(self.options)},
        )

    def _get_model(self) -> nn.Module:
        from vllm.compilation.backends import set_model_tag

        assert self._target is not None
        draft_config = self._create_draft_vllm_config()
        # As vLLM's loader does: parameters in the model dtype, on the worker's device.
        with (set_current_vllm_config(draft_config), set_model_tag("draft_model"),
              set_default_torch_dtype(draft_config.model_config.dtype), torch.device(self.device)):
            draft = initialize_model(vllm_config=draft_config, prefix="draft_model")
        group = self.options.draft_weight_group_size
        with set_current_vllm_config(draft_config):  # an int4 lm_head picks its kernel as the draft's linears
            n = derive_draft_weights(draft, self._target, draft_config.model_config.dtype,
                                     group if self.options.quantize_lm_head else None, self.options.draft_gemv)
        logger.info("QuantSpec draft: %d linear layers int4 (group %d%s, linear backend %s%s) derived from the "
                    "target's weights", n, group, ", lm_head included" if self.options.quantize_lm_head else "",
                    self.options.draft_linear_backend, ", the smallest batches on the plugin's GEMV (draft_gemv: a "
                    "second int4 copy of the weights, false saves it)" if self.options.draft_gemv else "")
        return draft

    def load_model(self, target_model: nn.Module) -> None:
        self._target = target_model
        super().load_model(target_model)
        self._target = None
        # The draft's attention layers read the target's cache (no KV memory of their own); the
        # backend reads it in INT4 mode for layers named draft_model.*.
        for name in self._draft_attn_layer_names:
            layer = self.vllm_config.compilation_config.static_forward_context[name]
            layer.kv_sharing_target_layer_name = name[len(DRAFT_PREFIX):]
        if self.device.type == "cuda" and not self.vllm_config.model_config.enforce_eager:
            self.model = DraftStepGraphs(self.model)

    def _determine_batch_execution_and_padding(self, num_tokens: int, use_cudagraphs: bool = True):
        # Draft steps replay our own whole-step graphs (DraftStepGraphs), captured per exact batch size;
        # vLLM's padding to its piecewise capture sizes (multiples of γ + 1 under spec decode: 5 tokens
        # at batch 1 and γ=4) would only add rows. Unpadded, a batch-1 step is one token, which the
        # draft's linears need for the GEMV (draft_gemv). Data parallelism keeps vLLM's padding: its
        # ranks agree on one token count.
        if isinstance(self.model, DraftStepGraphs) and self.vllm_config.parallel_config.data_parallel_size == 1:
            return CUDAGraphMode.NONE, num_tokens, None
        return super()._determine_batch_execution_and_padding(num_tokens, use_cudagraphs)

    def model_returns_tuple(self) -> bool:
        return False  # the draft is a plain causal LM: its forward returns hidden states only

    def set_inputs_first_pass(self, target_token_ids, next_token_ids, target_positions, target_hidden_states,
                              token_indices_to_sample, cad, num_rejected_tokens_gpu):
        """One token per request, the bonus token, right after the last verified one (no catch-up)."""
        batch_size = cad.batch_size()
        if token_indices_to_sample is None:
            token_indices_to_sample = cad.query_start_loc[1:] - 1
        positions = target_positions[token_indices_to_sample] + 1
        self.input_ids[:batch_size] = next_token_ids
        self._set_positions(batch_size, positions)
        seq_lens = (positions + 1).to(cad.seq_lens.dtype)
        new_cad = cad.replace(
            query_start_loc=self.arange[: batch_size + 1],
            query_start_loc_cpu=torch.arange(batch_size + 1, dtype=torch.int32),
            seq_lens=seq_lens,
            seq_lens_cpu_upper_bound=None,  # the backend builds draft steps on the device: no sync
            num_actual_tokens=batch_size,
            max_query_len=1,
            max_seq_len=cad.max_seq_len + 1,
            is_prefilling=None,
            _seq_lens_cpu=None,
            _num_computed_tokens_cpu=None,
        )
        return batch_size, self.arange[:batch_size], new_cad

    def propose(self, *args: Any, num_rejected_tokens_gpu: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        # The first pass already starts right after the last verified token, so the base class must
        # not shorten the sequences by the rejected tokens again.
        del num_rejected_tokens_gpu
        return super().propose(*args, num_rejected_tokens_gpu=None, **kwargs)
