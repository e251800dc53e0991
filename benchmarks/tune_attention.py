"""Sweep the attention kernel's launch parameters on the GPU: page tile, warps, pipeline stages,
register cap and split-K count, per shape and mode, with vLLM's FA3 over a bf16 cache at each shape
in the same run. Prints the best configs and the backend's default; --report draws the table and plot.

    python benchmarks/tune_attention.py [--json out.json] [--quick]
    python benchmarks/tune_attention.py --report benchmarks/results/tune-attention-h200.json

The split count is swept directly (powers of two up to one tile per split, and the backend's pick).
So are a register cap (MAXNREG: 3 or 4 programs of 4 warps per SM instead of 2, at the cost of
spills) and deeper pipelining (STAGES): per-tile times (`kernels-h200`: about 4-7 µs a tile at any
context) say the kernel waits on latency, and both put more bytes in flight.
--quick: the backend's tile at 2 or 4 warps, and one-warp programs over 64- and 32-token tiles, at the
launches an engine makes (draft steps: INT4, one query token; verify: INT8, γ+1 = 5; target-only decode:
INT8, one token), at the e2e grid's batch x context.
"""

import argparse
import itertools
import json
import math

import torch

from bench_kernels import HQ, D, G, H, attention_rows, quantized_case, timed
from vllm_quantspec.kernels.paged_attention import _num_sms, _pick_num_splits, launch, paged_attention

# registers per thread: ptxas's choice (255 for decode: 2 programs of 4 warps per SM), or capped for 3
# programs per SM at the cost of spills (kernel_sass.py counts them off the GPU)
MAXNREG = (None, 168)  # 128 was slower everywhere (tune-attention-h200)
STAGES = (2, 3)  # the full sweep's; 3 and 4 bought nothing at the engine's launches (tune-attention-h200)
SHAPES = [(1, 4096, 1), (1, 4096, 5), (1, 8192, 1), (1, 32768, 1), (1, 131072, 1), (1, 32768, 5), (1, 131072, 5),
          (8, 32768, 1), (8, 32768, 5), (8, 131072, 1)]
QUICK_SHAPES = [(1, 4096), (1, 32768), (1, 131072), (4, 32768), (16, 4096)]
# (mode, query tokens): a draft step, a γ=4 verify, a target-only decode over the hierarchical cache
QUICK_MODES = (("int4", 1), ("int8", 5), ("int8", 1))


def report(path: str) -> None:
    """Markdown table and PNG beside a sweep's JSON: per shape, FA3, the default launch as measured in the
    sweep (its split count then), the best config, and µs against the split count at the default's warps,
    2 stages and ptxas' registers."""
    import collections

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = json.load(open(path))
    rows = res["rows"]
    shapes = collections.defaultdict(list)
    for r in rows:
        shapes[(r["mode"], r["q_len"], r["batch"], r["ctx"])].append(r)
    md = ["# Attention kernel launch sweep: " + path.rsplit("/", 1)[-1], "",
          f"{res['device']}, vLLM {res['vllm']}, torch {res['torch']}, triton {res['triton']}, {res['date']}. "
          f"Command: `{res['command']}`", "",
          "µs per layer (one kernel call and its merge). `default`: the backend's launch as it was when the sweep "
          "ran (its split count in brackets); best: the fastest launch the sweep ran.", "",
          "| mode | q_len | batch | ctx | FA3 bf16 | default | best "
          "| best config (block_n, warps, stages, maxnreg, splits) |",
          "|---|---|---|---|---|---|---|---|"]
    panels = sorted({(mode, q_len) for mode, q_len, _, _ in shapes})
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    axes = dict(zip(panels, axes[0]))
    for (mode, q_len, batch, ctx), rs in sorted(shapes.items()):
        d = next(r for r in rs if r.get("default"))
        sweep = sorted((r for r in rs if not r.get("default")), key=lambda r: r["us"])
        b = sweep[0]
        md.append(f"| {mode} | {q_len} | {batch} | {ctx} | {d['fa3_us']:.1f} | {d['us']:.1f} ({d['splits']}) | "
                  f"{b['us']:.1f} | {b['block_n']}, {b['warps']}, {b['stages']}, {b['maxnreg']}, {b['splits']} |")
        # (sweeps before the one-warp INT4 rule recorded no block_n for the default: 128 then)
        curve = sorted((r["splits"], r["us"]) for r in sweep if (r["block_n"], r["warps"], r["stages"], r["maxnreg"])
                       == (d.get("block_n", 128), d["warps"], 2, None))
        ax = axes[mode, q_len]
        line, = ax.plot(*zip(*curve), marker="o", ms=3, label=f"{batch} x {ctx // 1024}k")
        ax.axhline(d["fa3_us"], color=line.get_color(), ls=":", lw=1)
    for (mode, q_len), ax in axes.items():
        title = f"{mode.upper()}, {q_len} query token{'s' if q_len > 1 else ''}"
        ax.set(xscale="log", yscale="log", xlabel="splits", ylabel="µs", title=title + "; dotted: FA3 bf16")
        ax.legend(fontsize=8)
    fig.tight_layout()
    stem = path[:-len(".json")]
    fig.savefig(stem + ".png", dpi=110)
    open(stem + ".md", "w").write("\n".join(md) + "\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--quick", action="store_true",
                    help="the engine's launches: the backend's tile at 2 or 4 warps and register cap, one warp "
                         "over 64 or 32-token tiles; split count")
    ap.add_argument("--report", help="a sweep's JSON: write its markdown table and PNG beside it")
    ap.add_argument("--profile", action="store_true",
                    help="run the default launch of a draft step and a verify at 1 x 128k a few times, untimed "
                         "(for Nsight Compute: ncu -k regex:_paged_attention python tune_attention.py --profile)")
    args = ap.parse_args()
    if args.report:
        return report(args.report)
    if args.profile:
        for mode, q_len in QUICK_MODES[:2]:  # a draft step, a verify
            case = quantized_case(1, 131072, q_len)
            for _ in range(3):
                paged_attention(**case["args"], mode=mode, sm_scale=1 / math.sqrt(D), max_query_len=q_len,
                                max_seq_len=131072)
        torch.cuda.synchronize()
        return
    import datetime
    import sys

    import triton
    import vllm

    res = dict(device=torch.cuda.get_device_name(), vllm=vllm.__version__, torch=torch.__version__,
               triton=triton.__version__, command="python " + " ".join(sys.argv),
               date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), rows=[])
    print(json.dumps({k: v for k, v in res.items() if k != "rows"}), flush=True)
    results = res["rows"]
    # one FA3 timing and one quantized case per (batch, ctx, query tokens), for every mode launched at them
    cases = ([(b, ctx, q_len, tuple(m for m, q in QUICK_MODES if q == q_len))
              for b, ctx in QUICK_SHAPES for q_len in dict.fromkeys(q for _, q in QUICK_MODES)] if args.quick
             else [(b, ctx, q_len, ("int4", "int8")) for b, ctx, q_len in SHAPES])
    for batch, ctx, q_len, modes in cases:
        # FA3 over a bf16 cache at the same shape, in the same run (what the kernel has to beat), and the
        # backend's default launch of each mode, as bench_kernels measures them
        measured = {r["op"]: r["us"] for r in attention_rows(batch, ctx, q_len, math.nan)}
        fa3_us = measured["fa3_bf16"]
        case = quantized_case(batch, ctx, q_len)
        for mode in modes:
            # the backend's launch (paged_attention's defaults)
            default_tiles, heuristic = launch(q_len, ctx, batch, H, HQ // H, G, mode, per_token_values=True)
            # (block_n, warps, stages, maxnreg). Fewer warps per program: fewer cross-warp reductions and
            # barriers per tile (kernel-sass-sm90.txt: 18 BAR a tile at 4 warps), and more programs per SM
            # to hide each one's latency (split count up to 8 programs per SM at one warp)
            launches = (list(itertools.product((128,), (2, 4), (2,), MAXNREG))
                        + [(64, 1, 2, None), (32, 1, 2, None)] if args.quick
                        else list(itertools.product((64, 128), (2, 4, 8), STAGES, MAXNREG)))
            rows = []
            for block_n, warps, stages, maxnreg in launches:
                units = ctx // block_n
                picked = _pick_num_splits(batch * H, units, warps)
                for splits in sorted({2 ** k for k in range(9) if 2 ** k <= units} | {picked}):
                    try:
                        us = timed(lambda: paged_attention(**case["args"], mode=mode, sm_scale=1 / math.sqrt(D),
                                                           max_query_len=q_len, max_seq_len=ctx, num_splits=splits,
                                                           block_n=block_n, num_warps=warps, num_stages=stages,
                                                           maxnreg=maxnreg), rep=40)
                    except Exception as e:  # noqa: BLE001 (out of resources for a config: skip it)
                        print("skip", block_n, warps, stages, maxnreg, splits, type(e).__name__)
                        continue
                    rows.append(dict(batch=batch, ctx=ctx, q_len=q_len, mode=mode, block_n=block_n, warps=warps,
                                     stages=stages, maxnreg=maxnreg, splits=splits, tiles_per_split=units / splits, us=us,
                                     GBps=case["bytes"][mode] / us / 1e3))
            default = measured[mode]
            rows.sort(key=lambda r: r["us"])
            results += rows
            b = rows[0]
            results.append(dict(batch=batch, ctx=ctx, q_len=q_len, mode=mode, default=True, splits=heuristic,
                                block_n=default_tiles.block_n, warps=default_tiles.num_warps, us=default,
                                fa3_us=fa3_us))
            print(json.dumps(dict(best=b, default_us=default, default_splits=heuristic, fa3_us=fa3_us,
                                  n_configs=len(rows))),
                  flush=True)
            for r in rows[:5]:
                print("   ", r["block_n"], r["warps"], r["stages"], r["maxnreg"], r["splits"], f"{r['us']:.1f}us",
                      f"{r['GBps']:.0f}GB/s", flush=True)
            if args.json:  # after every shape: a run its time limit cuts keeps what it measured
                json.dump(res, open(args.json, "w"))
        del case
        torch.cuda.empty_cache()
    print("SMs", _num_sms())


if __name__ == "__main__":
    main()
