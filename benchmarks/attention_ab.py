"""The attention kernel against its own earlier version, in one run on one GPU: the backend's default launch
of both at the engine's launches (draft step: INT4, 1 query token; γ=4 verify: INT8, 5; target-only decode:
INT8, 1), with vLLM's FA3 over a bf16 cache at each shape beside them. Timings alternate between the two
kernels (median of two each), so clock and thermal drift hit both alike.

    git show REV:kernels/paged_attention.py > /tmp/paged_attention_REV.py
    python benchmarks/attention_ab.py --baseline /tmp/paged_attention_REV.py --baseline-label REV --out PREFIX
    python benchmarks/attention_ab.py --report PREFIX.json     # the markdown table and PNG plot again
"""

import argparse
import datetime
import importlib.util
import json
import math
import statistics
import subprocess
import sys

SHAPES = [(1, 4096), (1, 32768), (1, 131072), (4, 32768), (8, 65536), (16, 4096)]
LAUNCHES = (("int4", 1, "draft step"), ("int8", 5, "verify (γ=4)"), ("int8", 1, "target-only decode"))


def load_baseline(path: str):
    spec = importlib.util.spec_from_file_location("paged_attention_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def measure(args) -> dict:
    import torch
    import triton
    import vllm
    from bench_kernels import D, attention_rows, quantized_case, timed

    from vllm_quantspec.kernels import paged_attention as current

    baseline = load_baseline(args.baseline)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    res = dict(device=torch.cuda.get_device_name(), vllm=vllm.__version__, torch=torch.__version__,
               triton=triton.__version__, command="python " + " ".join(sys.argv), code=head or "working tree",
               baseline=args.baseline_label, date=datetime.datetime.now(datetime.timezone.utc).isoformat(
                   timespec="seconds"), rows=[])
    print(json.dumps({k: v for k, v in res.items() if k != "rows"}), flush=True)
    for batch, ctx in SHAPES:
        for q_len in dict.fromkeys(q for _, q, _ in LAUNCHES):
            fa3_us = next(r["us"] for r in attention_rows(batch, ctx, q_len, math.nan) if r["op"] == "fa3_bf16")
            case = quantized_case(batch, ctx, q_len)
            for mode, _, label in (launch for launch in LAUNCHES if launch[1] == q_len):
                times = {"new": [], "base": []}
                for _ in range(2):
                    for name, module in (("new", current), ("base", baseline)):
                        times[name].append(timed(lambda: module.paged_attention(
                            **case["args"], mode=mode, sm_scale=1 / math.sqrt(D), max_query_len=q_len,
                            max_seq_len=ctx)))
                row = dict(batch=batch, ctx=ctx, q_len=q_len, mode=mode, launch=label, fa3_us=fa3_us,
                           us=statistics.median(times["new"]), baseline_us=statistics.median(times["base"]),
                           GBps=case["bytes"][mode] / statistics.median(times["new"]) / 1e3)
                row["speedup"] = row["baseline_us"] / row["us"]
                res["rows"].append(row)
                print(json.dumps(row), flush=True)
            del case
            torch.cuda.empty_cache()
    json.dump(res, open(args.out + ".json", "w"), indent=1)
    return res


def report(res: dict, prefix: str) -> None:
    lines = [f"# Attention kernel, {res['code']} against {res['baseline']}, {res['device']}", "",
             f"`{res['command']}` ({res['date']}; vLLM {res['vllm']}, torch {res['torch']}, Triton {res['triton']}). "
             "The backend's default launch of both kernels at each point, timings alternated, median of two "
             "(each a CUDA-graph replay median, L2 flushed); FA3 over a bf16 paged cache at the same shape.", "",
             "| launch | batch | ctx | FA3 bf16 µs | baseline µs | this µs | speedup | this GB/s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['launch']} ({r['mode']}, {r['q_len']} token{'s' if r['q_len'] > 1 else ''}) | {r['batch']} "
                     f"| {r['ctx']} | {r['fa3_us']:.1f} | {r['baseline_us']:.1f} | {r['us']:.1f} | {r['speedup']:.2f}x "
                     f"| {r['GBps']:.0f} |")
    open(prefix + ".md", "w").write("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5))
    points = [f"{b}x{c // 1024}k" for b, c in SHAPES]
    width = 0.8 / len(LAUNCHES)
    for i, (mode, q_len, label) in enumerate(LAUNCHES):
        ys = [next((r["speedup"] for r in res["rows"] if (r["batch"], r["ctx"], r["mode"], r["q_len"]) ==
                    (b, c, mode, q_len)), math.nan) for b, c in SHAPES]
        ax.bar([x + i * width for x in range(len(SHAPES))], ys, width, label=f"{label} ({mode})")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([x + width for x in range(len(SHAPES))], points)
    ax.set_ylabel(f"speedup over {res['baseline']}")
    ax.set_xlabel("batch x context")
    ax.set_title(f"Attention kernel {res['code']} vs {res['baseline']}, {res['device']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(prefix + ".png", dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", help="a paged_attention.py from another commit")
    ap.add_argument("--baseline-label", default="baseline")
    ap.add_argument("--out", help="output prefix: PREFIX.json, .md, .png")
    ap.add_argument("--report", help="a run's JSON: write its markdown table and PNG beside it")
    args = ap.parse_args()
    if args.report:
        return report(json.load(open(args.report)), args.report.removesuffix(".json"))
    if not (args.baseline and args.out):
        ap.error("--baseline and --out are needed to measure (or --report JSON)")
    res = measure(args)
    report(res, args.out)


if __name__ == "__main__":
    main()
