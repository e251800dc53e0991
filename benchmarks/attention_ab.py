"""The attention kernel against earlier versions of itself, in one run on one GPU: the backend's default
launch of each at the engine's launches (draft step: INT4, 1 query token; γ=4 verify: INT8, 5; target-only
decode: INT8, 1), with vLLM's FA3 over a bf16 cache at each shape beside them. Timings alternate between
the kernels (median of two each), so clock and thermal drift hit all alike. The first baseline is the
reference the speedups are taken against.

    git show REV:kernels/paged_attention.py > /tmp/paged_attention_REV.py
    python benchmarks/attention_ab.py --baseline REV=/tmp/paged_attention_REV.py [--baseline LABEL=PATH ...] \
        [--label THIS] --out PREFIX
    python benchmarks/attention_ab.py --report PREFIX.json     # the markdown table and PNG plot again
"""

import argparse
import datetime
import importlib.util
import json
import math
import statistics
import sys

SHAPES = [(1, 4096), (1, 32768), (1, 131072), (4, 32768), (8, 65536), (16, 4096)]
LAUNCHES = (("int4", 1, "draft step"), ("int8", 5, "verify (γ=4)"), ("int8", 1, "target-only decode"))


def load_baseline(label: str, path: str):
    spec = importlib.util.spec_from_file_location(f"paged_attention_{label}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def measure(args) -> dict:
    import torch
    import triton
    import vllm
    from bench_kernels import D, attention_rows, quantized_case, timed

    from vllm_quantspec.kernels import paged_attention as current

    kernels = {args.label: current}
    for spec in args.baseline:
        label, path = spec.split("=", 1)
        kernels[label] = load_baseline(label, path)
    res = dict(device=torch.cuda.get_device_name(), vllm=vllm.__version__, torch=torch.__version__,
               triton=triton.__version__, command="python " + " ".join(sys.argv), kernels=list(kernels),
               reference=list(kernels)[1], date=datetime.datetime.now(datetime.timezone.utc).isoformat(
                   timespec="seconds"), rows=[])
    print(json.dumps({k: v for k, v in res.items() if k != "rows"}), flush=True)
    for batch, ctx in SHAPES:
        for q_len in dict.fromkeys(q for _, q, _ in LAUNCHES):
            fa3_us = next(r["us"] for r in attention_rows(batch, ctx, q_len, math.nan) if r["op"] == "fa3_bf16")
            case = quantized_case(batch, ctx, q_len)
            for mode, _, launch in (entry for entry in LAUNCHES if entry[1] == q_len):
                times = {name: [] for name in kernels}
                for _ in range(2):
                    for name, module in kernels.items():
                        times[name].append(timed(lambda: module.paged_attention(
                            **case["args"], mode=mode, sm_scale=1 / math.sqrt(D), max_query_len=q_len,
                            max_seq_len=ctx)))
                us = {name: statistics.median(t) for name, t in times.items()}
                row = dict(batch=batch, ctx=ctx, q_len=q_len, mode=mode, launch=launch, fa3_us=fa3_us, us=us,
                           GBps={name: case["bytes"][mode] / t / 1e3 for name, t in us.items()})
                res["rows"].append(row)
                print(json.dumps(row), flush=True)
            del case
            torch.cuda.empty_cache()
    json.dump(res, open(args.out + ".json", "w"), indent=1)
    return res


def report(res: dict, prefix: str) -> None:
    names, ref = res["kernels"], res["reference"]
    lines = [f"# Attention kernel versions ({', '.join(names)}), {res['device']}", "",
             f"`{res['command']}` ({res['date']}; vLLM {res['vllm']}, torch {res['torch']}, Triton {res['triton']}). "
             "The backend's default launch of each kernel at each point, timings alternated, median of two "
             "(each a CUDA-graph replay median, L2 flushed); FA3 over a bf16 paged cache at the same shape. "
             f"µs, and in brackets the speedup over {ref}.", "",
             "| launch | batch | ctx | FA3 bf16 | " + " | ".join(names) + " |",
             "|---|---|---|---|" + "---|" * len(names)]
    for r in res["rows"]:
        cells = [f"{r['us'][n]:.1f}" + ("" if n == ref else f" ({r['us'][ref] / r['us'][n]:.3f}x)") for n in names]
        lines.append(f"| {r['launch']} ({r['mode']}, {r['q_len']} token{'s' if r['q_len'] > 1 else ''}) | {r['batch']} "
                     f"| {r['ctx']} | {r['fa3_us']:.1f} | " + " | ".join(cells) + " |")
    open(prefix + ".md", "w").write("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    others = [n for n in names if n != ref]
    fig, axes = plt.subplots(1, len(LAUNCHES), figsize=(14, 4.5), sharey=True)
    width = 0.8 / len(others)
    for ax, (mode, q_len, label) in zip(axes, LAUNCHES):
        rows = {(r["batch"], r["ctx"]): r for r in res["rows"] if (r["mode"], r["q_len"]) == (mode, q_len)}
        for i, n in enumerate(others):
            ys = [rows[p]["us"][ref] / rows[p]["us"][n] if p in rows else math.nan for p in SHAPES]
            ax.bar([x + i * width for x in range(len(SHAPES))], ys, width, label=n)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks([x + width * (len(others) - 1) / 2 for x in range(len(SHAPES))],
                      [f"{b}x{c // 1024}k" for b, c in SHAPES])
        ax.set_title(f"{label} ({mode})")
        ax.set_xlabel("batch x context")
    axes[0].set_ylabel(f"speedup over {ref}")
    axes[0].legend()
    fig.suptitle(f"Attention kernel versions, {res['device']}")
    fig.tight_layout()
    fig.savefig(prefix + ".png", dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", action="append", default=[],
                    help="LABEL=PATH: a paged_attention.py from another commit (the first: the reference)")
    ap.add_argument("--label", default="this", help="the working tree's kernel's name in the table")
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
