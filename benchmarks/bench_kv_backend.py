"""The hierarchical KV cache alone (target-only INT8 pages + full-precision ring) against vLLM's bf16
and fp8 KV caches: decode speed on the Llama-3.1-8B shape (dummy weights) in one run, KV capacity,
and the perplexity measured by ppl.py.

    python benchmarks/bench_kv_backend.py --ppl benchmarks/results/ppl-h200.json [--ctxs ...] [--batches 1,8]
    python benchmarks/bench_kv_backend.py --ppl ... --from-e2e benchmarks/results/e2e-h200-run1.json[,OTHER.json ...]

Runs bench_e2e.py's synthetic part for the three methods (one engine each, same timing rule), or takes
their rows from earlier bench_e2e.py results: each (batch, ctx) point whole from the first listed run
that measured it (so a row's "vs" columns always compare methods of one run; every row names its run
in "source"), then writes kv-backend-<gpu>.json
({"device","vllm","torch","command","date","rows","kv_tokens","ppl"}), a markdown table and a PNG.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ctxs", default="32768,65536,131072")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--n-out", type=int, default=64)
    p.add_argument("--ppl", required=True, help="ppl.py's result JSON (its `ppl` object is copied)")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--tag", help="output name kv-backend-TAG (default: the first run's e2e-TAG)")
    p.add_argument("--from-e2e", help="assemble from existing bench_e2e.py result JSONs (comma-separated, the "
                                      "first that measured a point wins) instead of running")
    args = p.parse_args()
    command = " ".join(["python"] + sys.argv)
    if args.from_e2e is None:
        e2e_dir = os.path.join(args.out, "kv-backend-runs")
        subprocess.run([sys.executable, os.path.join(HERE, "bench_e2e.py"), "--part", "synthetic", "--methods",
                        "bf16,fp8,hierarchical", "--ctxs", args.ctxs, "--batches", args.batches, "--n-out",
                        str(args.n_out), "--accept-length", "1", "--out", e2e_dir], check=True)
        e2e_paths = [os.path.join(e2e_dir, f) for f in os.listdir(e2e_dir)
                     if f.startswith("e2e-") and f.endswith(".json")]
    else:
        e2e_paths = args.from_e2e.split(",")
    methods = ("bf16", "fp8", "hierarchical")
    runs = [(path, json.load(open(path))) for path in e2e_paths]
    rows, skipped, kv, taken = [], [], {}, set()
    for path, e2e in runs:
        run = [dict(r, source=os.path.basename(path)) for r in e2e["rows"] if r.get("method") in methods]
        points = {(r["batch"], r["ctx"]) for r in run if "ms_per_token" in r} - taken
        rows += [{k: r[k] for k in ("method", "batch", "ctx", "ms_per_token", "source")} for r in run
                 if "ms_per_token" in r and (r["batch"], r["ctx"]) in points]
        skipped += [r for r in run if "ms_per_token" not in r]
        taken |= points
        for r in run:
            if "kv_tokens" in r:
                kv.setdefault(r["method"], r["kv_tokens"])
    e2e = runs[0][1]  # device, versions, date: the first run's
    measured = {(r["method"], r["batch"], r["ctx"]) for r in rows}
    missing = [f"{m} batch {b} ctx {c}" for m in methods for b in args.batches.split(",")
               for c in args.ctxs.split(",") if (m, int(b), int(c)) not in measured]
    ppl = json.load(open(args.ppl))["ppl"]
    result = {k: e2e[k] for k in ("device", "vllm", "torch", "date")}
    result.update(command=command, sources=[os.path.basename(x) for x in e2e_paths], rows=rows, skipped=skipped,
                  missing=missing,
                  kv_tokens={"bf16": kv.get("bf16"), "fp8": kv.get("fp8"), "hierarchical": kv.get("hierarchical")},
                  ppl=ppl)
    tag = args.tag or os.path.basename(e2e_paths[0])[len("e2e-"):-len(".json")]
    stem = os.path.join(args.out, f"kv-backend-{tag}")
    json.dump(result, open(stem + ".json", "w"), indent=1)
    write_table_and_plot(result, stem)


def write_table_and_plot(result: dict, stem: str) -> None:
    ms = {(r["method"], r["batch"], r["ctx"]): r["ms_per_token"] for r in result["rows"]}
    kv, ppl = result["kv_tokens"], result["ppl"]
    base = ppl.get("bf16") or ppl.get("default")
    lines = [f"# Hierarchical KV cache vs vLLM bf16 / fp8 KV, {result['device']}, vLLM {result['vllm']}", "",
             f"`{result['command']}` ({result['date']}). Llama-3.1-8B shape, dummy weights, target only.", "",
             "| batch | ctx | bf16 ms/token | fp8 ms/token | hierarchical ms/token | vs bf16 | vs fp8 | run |",
             "|---|---|---|---|---|---|---|---|"]
    source = {(r["batch"], r["ctx"]): r.get("source", result.get("source", "")) for r in result["rows"]}
    for b, c in sorted({(b, c) for _, b, c in ms}):
        bf, f8, hi = (ms.get((m, b, c)) for m in ("bf16", "fp8", "hierarchical"))
        rel = lambda x: f"{x / hi:.2f}x" if x and hi else "–"  # noqa: E731
        fmt = lambda x: f"{x:.2f}" if x else "–"  # noqa: E731
        lines.append(f"| {b} | {c} | {fmt(bf)} | {fmt(f8)} | {fmt(hi)} | {rel(bf)} | {rel(f8)} | {source[b, c]} |")
    if result.get("missing"):
        lines += ["", "Not measured: " + "; ".join(result["missing"]) + "."]
    lines += ["", f"KV capacity (tokens, same memory budget): bf16 {kv['bf16']}, fp8 {kv['fp8']}, "
              f"hierarchical {kv['hierarchical']}"
              + (f" ({kv['hierarchical'] / kv['bf16']:.2f}x bf16)." if kv["bf16"] and kv["hierarchical"] else "."),
              "", f"Perplexity ({ppl['model']}, {ppl['text'] if isinstance(ppl['text'], str) else 'real text'}): "
              f"bf16 {base:.4f}, hierarchical INT8 {ppl['hierarchical']:.4f} "
              f"({(ppl['hierarchical'] / base - 1) * 100:+.3f}%)."]
    open(stem + ".md", "w").write("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    try:
        import matplotlib
    except ImportError:  # the GPU machine has no matplotlib: re-draw here with --plot-only
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({b for _, b, _ in ms})
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 3.6), squeeze=False)
    for ax, b in zip(axes[0], batches):
        for m in ("bf16", "fp8", "hierarchical"):
            pts = sorted((c, v) for (mm, bb, c), v in ms.items() if mm == m and bb == b)
            ax.plot([c // 1024 for c, _ in pts], [v for _, v in pts], marker="o", label=m)
        ax.set(xlabel="context (k tokens)", ylabel="ms per token", title=f"batch {b}")
        ax.legend()
    fig.suptitle(f"target-only decode, Llama-3.1-8B shape, {result['device']}")
    fig.tight_layout()
    fig.savefig(stem + ".png", dpi=110)


if __name__ == "__main__":
    if "--plot-only" in sys.argv:
        path = sys.argv[sys.argv.index("--plot-only") + 1]
        write_table_and_plot(json.load(open(path)), path[: -len(".json")])
    else:
        main()
