"""QuantSpec options: what a user may put in ``speculative_config`` with ``"method": "quantspec"``.

Every bad input is refused here, at engine-config time, with one line that names the key and
what is allowed. Checks that need the target model (head size, quantization, MoE) run in
``check_target`` once vLLM has built the target ``ModelConfig``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

METHOD = "quantspec"

# Linear layers of a decoder block, by the fused names vLLM's models use.
DRAFT_LINEARS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
DRAFT_LINEAR_PRESETS = {"all": DRAFT_LINEARS, "mlp": ("gate_up_proj", "down_proj")}

# Keys of vLLM's own SpeculativeConfig that keep their meaning with quantspec. Anything else
# of vLLM's (model, quantization, prompt_lookup_*, ...) has no meaning for a self-draft.
VLLM_KEYS = (
    "num_speculative_tokens",
    "rejection_sample_method",
    "synthetic_acceptance_rates",
    "synthetic_acceptance_length",
    "draft_sample_method",
    "enforce_eager",
)

# γ ≤ 8: the verify kernels are tiled for q_len ≤ 9 (one bonus + γ drafts); the paper's best γ is 4-6.
MAX_GAMMA = 8
KV_GROUP_SIZES = (16, 32, 64, 128, 256)  # powers of two: one group is one KV page and one kernel tile
WEIGHT_GROUP_SIZES = (32, 64, 128)  # what every vLLM W4A16 kernel we reuse accepts (Machete/Marlin/Triton/CPU)
FP_BUFFERS = ("double", "single")
# vLLM's --linear-backend values that name a W4A16 (mixed-precision) kernel family, and "auto"
DRAFT_LINEAR_BACKENDS = ("auto", "machete", "marlin", "triton", "exllama", "conch")


class QuantSpecConfigError(ValueError):
    """A QuantSpec configuration vLLM cannot run; the message is one line."""


@dataclass(frozen=True)
class QuantSpecOptions:
    """Validated QuantSpec options. Field names are the JSON keys users write."""

    num_speculative_tokens: int = 4
    """γ: draft tokens per verification step (1..8)."""
    kv_group_size: int = 128
    """G: keys are quantized per channel over G tokens; also the KV page (block) size."""
    v_group_size: int | None = None
    """Values are quantized per token over this many channels (None: head_dim)."""
    fp_buffer: str = "double"
    """Full-precision recent-token buffer. "double": between G and 2G verified tokens stay in full
    precision (the paper's buffer). "single": between 0 and G (less memory, lower acceptance)."""
    draft_weight_bits: int = 4
    draft_weight_group_size: int | None = None
    """Input channels per int4 weight group. None: the largest of 128, 64, 32 that divides every
    linear layer's (tensor-parallel) input size."""
    draft_quantized_linears: tuple[str, ...] = DRAFT_LINEARS
    """Linear layers whose draft copy is int4. "all" (default), "mlp" (the paper's public code) or a list."""
    quantize_lm_head: bool = False
    """Give the draft an int4 lm_head too (by default it shares the target's)."""
    draft_linear_backend: str = "auto"
    """vLLM's linear backend for the draft's W4A16 layers only ("auto": vLLM's own choice, Machete on
    Hopper; "marlin" etc.: that kernel family). The target's layers keep the engine's setting."""
    draft_gemv: bool | None = None
    """Draft steps of one token (two for a bf16 model) run the draft's int4 linears on the plugin's W4A16
    GEMV (kernels/w4a16_gemv.py) instead of vLLM's kernel, which keeps larger batches; a bf16 model's in
    bf16x2 arithmetic (products and each word's sum rounded to bf16), an fp16 model's in fp32. Costs a
    second copy of the draft's int4 weights. CUDA, bf16/fp16 models. None (default): on where it can run
    (check_target), since there it is the faster draft at batch 1 with the same acceptance
    (benchmarks/results/e2e-batch1-default-h200, e2e-real-gemv-true-h200)."""

    def fp_buffer_min_tokens(self) -> int:
        """Fewest verified tokens a sequence keeps in full precision once it has that many."""
        return self.kv_group_size if self.fp_buffer == "double" else 0


OPTION_KEYS = tuple(f.name for f in dataclasses.fields(QuantSpecOptions))


def _fail(key: str, allowed: str, got: Any) -> QuantSpecConfigError:
    return QuantSpecConfigError(
        f"speculative_config[{key!r}]={got!r} is not valid for method 'quantspec': {allowed}"
    )


def _int_in(key: str, value: Any, allowed: tuple[int, ...] | range) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value not in allowed:
        shown = f"{allowed.start}..{allowed.stop - 1}" if isinstance(allowed, range) else allowed
        raise _fail(key, f"expected an integer in {shown}", value)
    return value


def _draft_linears(value: Any) -> tuple[str, ...]:
    if isinstance(value, str) and value in DRAFT_LINEAR_PRESETS:
        return DRAFT_LINEAR_PRESETS[value]
    if (
        isinstance(value, (list, tuple))
        and value
        and all(isinstance(v, str) and v in DRAFT_LINEARS for v in value)
        and len(set(value)) == len(value)
    ):
        return tuple(v for v in DRAFT_LINEARS if v in value)
    raise _fail(
        "draft_quantized_linears",
        f"expected 'all', 'mlp' or a non-empty list of distinct names from {list(DRAFT_LINEARS)}",
        value,
    )


def parse_speculative_config(raw: dict[str, Any]) -> tuple[QuantSpecOptions, dict[str, Any]]:
    """Split a user's quantspec ``speculative_config`` into our options and vLLM's own keys.

    Returns (options, vllm_kwargs) where vllm_kwargs are the SpeculativeConfig keys to pass on
    (``method`` removed). Raises QuantSpecConfigError on the first bad key or value.
    """
    raw = {k.replace("-", "_"): v for k, v in raw.items()}
    assert raw.get("method") == METHOD, raw.get("method")
    for key in raw:
        if key == "method" or key in OPTION_KEYS or key in VLLM_KEYS:
            continue
        if key == "model":
            raise _fail(key, "QuantSpec drafts with the target model itself; leave 'model' out", raw[key])
        raise QuantSpecConfigError(
            f"unknown key {key!r} in speculative_config for method 'quantspec'; allowed keys: "
            + ", ".join(sorted(set(OPTION_KEYS) | set(VLLM_KEYS)))
        )
    defaults = QuantSpecOptions()
    opts: dict[str, Any] = {}
    opts["num_speculative_tokens"] = _int_in(
        "num_speculative_tokens",
        raw.get("num_speculative_tokens", defaults.num_speculative_tokens),
        range(1, MAX_GAMMA + 1),
    )
    opts["kv_group_size"] = _int_in("kv_group_size", raw.get("kv_group_size", 128), KV_GROUP_SIZES)
    v_group = raw.get("v_group_size")
    if v_group is not None:
        v_group = _int_in("v_group_size", v_group, range(16, 1025))
        if v_group % 16:
            raise _fail("v_group_size", "expected a multiple of 16 that divides head_dim", v_group)
    opts["v_group_size"] = v_group
    fp_buffer = raw.get("fp_buffer", defaults.fp_buffer)
    if fp_buffer not in FP_BUFFERS:
        raise _fail("fp_buffer", f"expected one of {list(FP_BUFFERS)}", fp_buffer)
    opts["fp_buffer"] = fp_buffer
    bits = raw.get("draft_weight_bits", 4)
    if bits != 4 or isinstance(bits, bool):
        raise _fail("draft_weight_bits", "only 4-bit draft weights are supported", bits)
    opts["draft_weight_bits"] = 4
    group = raw.get("draft_weight_group_size")
    opts["draft_weight_group_size"] = None if group is None else _int_in("draft_weight_group_size", group,
                                                                          WEIGHT_GROUP_SIZES)
    opts["draft_quantized_linears"] = _draft_linears(raw.get("draft_quantized_linears", "all"))
    lm_head = raw.get("quantize_lm_head", False)
    if not isinstance(lm_head, bool):
        raise _fail("quantize_lm_head", "expected true or false", lm_head)
    opts["quantize_lm_head"] = lm_head
    backend = raw.get("draft_linear_backend", defaults.draft_linear_backend)
    if backend not in DRAFT_LINEAR_BACKENDS:
        raise _fail("draft_linear_backend", f"expected one of {list(DRAFT_LINEAR_BACKENDS)}", backend)
    opts["draft_linear_backend"] = backend
    gemv = raw.get("draft_gemv", defaults.draft_gemv)
    if gemv is not None and not isinstance(gemv, bool):
        raise _fail("draft_gemv", "expected true or false", gemv)
    opts["draft_gemv"] = gemv
    vllm_kwargs = {k: raw[k] for k in VLLM_KEYS if k in raw}
    vllm_kwargs["num_speculative_tokens"] = opts["num_speculative_tokens"]
    return QuantSpecOptions(**opts), vllm_kwargs


def check_engine_args(args: Any, options: QuantSpecOptions) -> None:
    """Refuse engine settings QuantSpec does not support yet; fill in the ones it needs.

    ``args`` is vLLM's EngineArgs, before it builds the cache config.
    """
    if args.pipeline_parallel_size > 1:
        raise QuantSpecConfigError(
            f"pipeline_parallel_size={args.pipeline_parallel_size} is not supported with method "
            "'quantspec' yet: use 1 (tensor parallelism is fine)"
        )
    if args.kv_transfer_config is not None:
        raise QuantSpecConfigError(
            "kv_transfer_config is not supported with method 'quantspec': the hierarchical KV "
            "cache has no KV-transfer connector yet"
        )
    if args.enable_prefix_caching:
        raise QuantSpecConfigError(
            "enable_prefix_caching=True is not supported with method 'quantspec' yet: "
            "leave it unset or pass --no-enable-prefix-caching"
        )
    if args.kv_cache_dtype not in ("auto", None):
        raise QuantSpecConfigError(
            f"kv_cache_dtype={args.kv_cache_dtype!r} is not valid with method 'quantspec': the "
            "hierarchical INT4/INT8 cache is the KV format; leave kv_cache_dtype as 'auto'"
        )
    if args.block_size is not None and args.block_size != options.kv_group_size:
        raise QuantSpecConfigError(
            f"block_size={args.block_size} must equal speculative_config['kv_group_size']="
            f"{options.kv_group_size} with method 'quantspec' (one KV page holds one key group)"
        )
    backend = args.attention_backend or args.attention_config.backend
    backend = None if backend is None else getattr(backend, "name", str(backend)).upper()
    if backend not in (None, "CUSTOM"):
        raise QuantSpecConfigError(
            f"attention_backend={backend} cannot serve method 'quantspec': its draft and target read "
            "the hierarchical KV cache, which only the plugin's backend (CUSTOM) implements; leave it unset"
        )
    # async_scheduling left unset: vLLM turns it on where it can (P10 lists quantspec among the methods
    # it admits). Measured on an H200: 12-16% faster, and greedy output under it identical to the
    # target-only run (benchmarks/results: phases-async-h200.txt, agreement-h200-batch-invariant-async).
    args.enable_prefix_caching = False
    args.block_size = options.kv_group_size
    if backend is None and args.attention_config.backend is None:
        args.attention_backend = "CUSTOM"


def _is_moe(hf_text_config: Any) -> bool:
    return any(
        (getattr(hf_text_config, name, None) or 0) > 0
        for name in ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
    )


def fitting_weight_groups(text_config: Any, head_dim: int, tensor_parallel_size: int = 1) -> tuple[set[int], list[int]]:
    """The draft's linear input sizes (qkv/gate_up: hidden; o_proj: heads x head_dim, split by TP; down:
    intermediate, split by TP) and the int4 weight group sizes that divide them all."""
    inputs = {text_config.hidden_size, text_config.num_attention_heads * head_dim // tensor_parallel_size,
              text_config.intermediate_size // tensor_parallel_size}
    return inputs, [g for g in WEIGHT_GROUP_SIZES if all(k % g == 0 for k in inputs)]


def check_target(model_config: Any, options: QuantSpecOptions, tensor_parallel_size: int = 1) -> QuantSpecOptions:
    """Refuse target models QuantSpec cannot draft for; resolve v_group_size against head_dim and
    draft_weight_group_size against the linear layers' input sizes."""
    if model_config.quantization is not None:
        raise QuantSpecConfigError(
            f"the target model is quantized ({model_config.quantization}); method 'quantspec' needs "
            "an fp16/bf16 target (its int4 draft weights are derived from the target's weights)"
        )
    if _is_moe(model_config.hf_text_config):
        raise QuantSpecConfigError(
            "mixture-of-experts targets are not supported by method 'quantspec' yet"
        )
    from vllm.platforms import current_platform

    on_cuda = current_platform.is_cuda()
    if options.draft_linear_backend != "auto" and not on_cuda:
        raise _fail("draft_linear_backend", f"only 'auto' on {current_platform.device_name} (the other "
                    "W4A16 kernel families need a CUDA GPU)", options.draft_linear_backend)
    gemv, gemv_dtype = options.draft_gemv, model_config.dtype in (torch.bfloat16, torch.float16)
    if gemv and not on_cuda:
        raise _fail("draft_gemv", f"only false on {current_platform.device_name} (the GEMV needs a CUDA GPU)", True)
    if gemv and not gemv_dtype:
        raise _fail("draft_gemv", f"only false for a {model_config.dtype} model (the GEMV takes bf16/fp16)", True)
    if gemv is None:
        gemv = on_cuda and gemv_dtype
    head_dim = model_config.get_head_size()
    if head_dim % 16:
        raise QuantSpecConfigError(
            f"head_dim={head_dim} is not supported by method 'quantspec': it must be a multiple of 16"
        )
    v_group = options.v_group_size or head_dim
    if head_dim % v_group:
        raise _fail("v_group_size", f"expected a multiple of 16 that divides head_dim={head_dim}", v_group)
    inputs, fits = fitting_weight_groups(model_config.hf_text_config, head_dim, tensor_parallel_size)
    group = options.draft_weight_group_size
    if group is None:
        if not fits:
            raise QuantSpecConfigError(
                f"no int4 weight group size in {list(WEIGHT_GROUP_SIZES)} divides the draft's linear input "
                f"sizes {sorted(inputs)}; method 'quantspec' cannot quantize this model"
            )
        group = max(fits)
    elif group not in fits:
        raise _fail("draft_weight_group_size", f"expected one of {fits} (it must divide the linear input "
                    f"sizes {sorted(inputs)})", group)
    return dataclasses.replace(options, v_group_size=v_group, draft_weight_group_size=group, draft_gemv=gemv)
