"""End-to-end decode speed: QuantSpec against vLLM bf16, fp8 KV, the hierarchical cache alone and
draft_model, on a Llama-3.1-8B-shaped model with dummy weights, all in one run.

    python benchmarks/bench_e2e.py --part synthetic [--ctxs 4096,32768] [--batches 1] [--out DIR]

Dummy weights give true speed but meaningless acceptance, so speculative rows pin the acceptance with
vLLM's rejection_sample_method="synthetic" (rates given by --accept-length, from a real-model
measurement) and are labelled "synthetic". Each method runs in its own process (one engine each);
ms/token = decode time / generated tokens, decode time = time(n tokens) - time(1 token).
Writes e2e-<device>.json ({"device","vllm","torch","command","date","rows"}), a markdown table and a PNG.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time

LLAMA_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
    "vocab_size": 128256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 128000, "eos_token_id": 128001,
    "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
}
LLAMA_1B = dict(LLAMA_8B, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, head_dim=64,
                tie_word_embeddings=True, rope_scaling=dict(LLAMA_8B["rope_scaling"], factor=32.0))


def method_kwargs(method: str, gamma: int, accept_length: float, draft_dir: str) -> dict:
    synthetic = {"rejection_sample_method": "synthetic", "synthetic_acceptance_length": accept_length}
    if method == "bf16":
        return {}
    if method == "fp8":
        return {"kv_cache_dtype": "fp8"}
    if method == "hierarchical":
        return {"attention_backend": "CUSTOM", "block_size": 128}
    if method == "draft_model":
        return {"speculative_config": {"model": draft_dir, "num_speculative_tokens": gamma, **synthetic}}
    if method == "quantspec":
        return {"speculative_config": {"method": "quantspec", "num_speculative_tokens": gamma, **synthetic}}
    raise ValueError(method)


def worker(args: argparse.Namespace) -> None:
    """One engine, every (batch, ctx) of the grid; prints one JSON row per point."""
    import torch
    from vllm import LLM, SamplingParams

    d = tempfile.mkdtemp()
    json.dump(LLAMA_8B, open(os.path.join(d, "config.json"), "w"))
    dd = tempfile.mkdtemp()
    json.dump(LLAMA_1B, open(os.path.join(dd, "config.json"), "w"))
    ctxs = [int(x) for x in args.ctxs.split(",")]
    batches = [int(x) for x in args.batches.split(",")]
    kw = dict(model=d, load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
              max_model_len=max(ctxs) + args.n_out + 64, gpu_memory_utilization=0.88,
              enable_prefix_caching=False, max_num_seqs=max(batches), disable_log_stats=False,
              **method_kwargs(args.worker, args.gamma, args.accept_length, dd))
    t0 = time.time()
    llm = LLM(**kw)
    startup = time.time() - t0
    cache = llm.llm_engine.vllm_config.cache_config
    kv_tokens = (cache.num_gpu_blocks or 0) * cache.block_size
    g = torch.Generator().manual_seed(0)
    for bs in batches:
        for ctx in ctxs:
            if bs * (ctx + args.n_out) > kv_tokens:
                print(json.dumps({"method": args.worker, "batch": bs, "ctx": ctx, "skipped": "KV pool too small",
                                  "kv_tokens": kv_tokens}), flush=True)
                continue
            prompts = [{"prompt_token_ids": torch.randint(1000, 120000, (ctx,), generator=g).tolist()}
                       for _ in range(bs)]

            def timed(n: int) -> float:
                sp = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, detokenize=False)
                torch.cuda.synchronize()
                t = time.perf_counter()
                llm.generate(prompts, sp, use_tqdm=False)
                torch.cuda.synchronize()
                return time.perf_counter() - t

            timed(2)  # warm-up
            t1 = timed(1)
            before = {m.name: getattr(m, "value", None) for m in llm.get_metrics()}
            tn = timed(args.n_out)
            after = {m.name: getattr(m, "value", None) for m in llm.get_metrics()}

            def delta(name: str) -> float:
                return (after.get(name) or 0) - (before.get(name) or 0)

            drafts, drafted = delta("vllm:spec_decode_num_drafts"), delta("vllm:spec_decode_num_draft_tokens")
            accepted = delta("vllm:spec_decode_num_accepted_tokens")
            spec = args.worker in ("quantspec", "draft_model")
            print(json.dumps({
                "method": args.worker, "model": "llama-3.1-8b-shape (dummy weights)",
                "acceptance": "synthetic" if spec else "none", "batch": bs, "ctx": ctx,
                "gamma": args.gamma if spec else 0,
                "ms_per_token": round((tn - t1) / (args.n_out - 1) * 1e3, 3),
                "acceptance_rate": round(accepted / drafted, 4) if drafted else None,
                "mean_accepted_length": round(1 + accepted / drafts, 3) if drafts else None,
                "kv_tokens": kv_tokens, "startup_s": round(startup, 1), "prefill_s": round(t1, 3),
            }), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["synthetic"], default="synthetic")
    p.add_argument("--methods", default="bf16,fp8,hierarchical,quantspec,draft_model")
    p.add_argument("--ctxs", default="4096,32768,65536,131072")
    p.add_argument("--batches", default="1")
    p.add_argument("--gamma", type=int, default=4)
    p.add_argument("--accept-length", type=float, required=True,
                   help="mean accepted length (bonus included) measured on a real model, for synthetic rows")
    p.add_argument("--accept-source", default="", help="where --accept-length was measured (recorded)")
    p.add_argument("--n-out", type=int, default=128)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    import torch
    import vllm

    device = torch.cuda.get_device_name()
    command = " ".join([os.path.basename(sys.executable)] + sys.argv)
    print(f"device: {device}  vllm {vllm.__version__}  torch {torch.__version__}\ncommand: {command}", flush=True)
    rows = []
    for method in args.methods.split(","):
        print(f"[bench_e2e] {method} ...", flush=True)
        proc = subprocess.run([sys.executable, *sys.argv, "--worker", method], capture_output=True, text=True)
        got = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not got:
            print(f"[bench_e2e] {method} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}", flush=True)
            rows.append({"method": method, "failed": proc.stderr[-500:]})
        for row in got:
            print(json.dumps(row), flush=True)
        rows += got
    result = {"device": device, "vllm": vllm.__version__, "torch": torch.__version__, "command": command,
              "date": datetime.date.today().isoformat(), "accept_length": args.accept_length,
              "accept_source": args.accept_source, "rows": rows}
    os.makedirs(args.out, exist_ok=True)
    tag = "h100" if "H100" in device else device.split()[-1].lower()
    path = os.path.join(args.out, f"e2e-{tag}.json")
    json.dump(result, open(path, "w"), indent=1)
    write_table_and_plot(result, path[:-5])


def write_table_and_plot(result: dict, stem: str) -> None:
    rows = [r for r in result["rows"] if "ms_per_token" in r]
    base = {(r["batch"], r["ctx"]): r["ms_per_token"] for r in rows if r["method"] == "bf16"}
    lines = [f"# End-to-end decode, {result['device']}, vLLM {result['vllm']}, torch {result['torch']}", "",
             f"`{result['command']}` ({result['date']}). Synthetic rows pin the acceptance to mean accepted "
             f"length {result['accept_length']} ({result['accept_source']}).", "",
             "| method | acceptance | batch | ctx | γ | ms/token | vs bf16 | accept rate | mean accepted len | KV tokens |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b = base.get((r["batch"], r["ctx"]))
        speed = f"{b / r['ms_per_token']:.2f}x" if b else "–"
        lines.append(f"| {r['method']} | {r['acceptance']} | {r['batch']} | {r['ctx']} | {r['gamma']} | "
                     f"{r['ms_per_token']:.2f} | {speed} | {r['acceptance_rate'] or '–'} | "
                     f"{r['mean_accepted_length'] or '–'} | {r['kv_tokens']} |")
    open(stem + ".md", "w").write("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = sorted((r["ctx"], r["ms_per_token"]) for r in rows if r["method"] == method and r["batch"] == 1)
        if pts:
            ax.plot([c // 1024 for c, _ in pts], [m for _, m in pts], marker="o", label=method)
    ax.set_xlabel("context (k tokens)")
    ax.set_ylabel("ms per generated token (batch 1)")
    ax.set_title(f"decode, Llama-3.1-8B shape, {result['device']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(stem + ".png", dpi=120)


if __name__ == "__main__":
    main()
