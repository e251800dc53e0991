"""Sweep the attention kernel's launch parameters on the GPU (no vLLM needed): page tile, warps,
pipeline stages and split-K count, per shape and mode. Prints the best configs and the heuristic's.

    python benchmarks/tune_attention.py [--json out.json] [--quick]

The split count is swept directly (powers of two up to one tile per split), not through
`_pick_num_splits`: at short contexts its floor of 4 tiles per split caps the programs a decode step
launches (batch 1 x 8 kv heads at 4k: 8 splits, 64 programs for 132 SMs), and the sweep shows what
more splits would buy. So are a register cap (MAXNREG) and deeper pipelining (STAGES): the decode
kernel holds 255 registers, two programs per SM, and per-tile times (`kernels-h200`: about 4-7 µs a
tile at any context) say it waits on latency rather than issue; both put more bytes in flight.
--quick: the backend's tile and warps, the launches an engine makes (draft steps: INT4, one query
token; verify: INT8, γ+1 = 5), at the e2e grid's batch x context.
"""

import argparse
import itertools
import json
import math

import torch

from bench_kernels import HQ, D, G, H, attention_rows, quantized_case, timed
from vllm_quantspec.kernels.paged_attention import Tiles, _num_sms, _pick_num_splits, paged_attention

# registers per thread: ptxas's choice (255 for decode: 2 programs of 4 warps per SM), or capped for 3 or 4
# programs per SM at the cost of spills (kernel_sass.py counts them off the GPU)
MAXNREG = (None, 168, 128)
STAGES = (2, 3, 4)
SHAPES = [(1, 4096, 1), (1, 4096, 5), (1, 8192, 1), (1, 32768, 1), (1, 131072, 1), (1, 32768, 5), (1, 131072, 5),
          (8, 32768, 1), (8, 32768, 5), (8, 131072, 1)]
QUICK_SHAPES = [(1, 4096), (1, 32768), (1, 131072), (4, 32768), (16, 4096)]
QUICK_MODES = (("int4", 1), ("int8", 5))  # (mode, query tokens): a draft step, a γ=4 verify


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--quick", action="store_true", help="sweep the split count at the backend's tiles only")
    args = ap.parse_args()
    results = []
    cases = ([(b, ctx, q_len, (mode,)) for b, ctx in QUICK_SHAPES for mode, q_len in QUICK_MODES] if args.quick
             else [(b, ctx, q_len, ("int4", "int8")) for b, ctx, q_len in SHAPES])
    for batch, ctx, q_len, modes in cases:
        # FA3 over a bf16 cache at the same shape, in the same run: what the kernel has to beat
        fa3_us = next(r["us"] for r in attention_rows(batch, ctx, q_len, math.nan) if r["op"] == "fa3_bf16")
        case = quantized_case(batch, ctx, q_len)
        for mode in modes:
            default_tiles = Tiles.of(q_len, HQ // H, G)
            launches = (((default_tiles.block_n,), (default_tiles.num_warps,), STAGES) if args.quick
                        else ((64, 128), (4, 8), STAGES))
            rows = []
            for block_n, warps, stages, maxnreg in itertools.product(*launches, MAXNREG):
                units = ctx // block_n
                picked = _pick_num_splits(batch * H, units)
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
            default = timed(lambda: paged_attention(**case["args"], mode=mode, sm_scale=1 / math.sqrt(D),
                                                    max_query_len=q_len, max_seq_len=ctx))
            heuristic = _pick_num_splits(batch * H, ctx // default_tiles.block_n)  # the backend's split count
            rows.sort(key=lambda r: r["us"])
            results += rows
            b = rows[0]
            results.append(dict(batch=batch, ctx=ctx, q_len=q_len, mode=mode, default=True, splits=heuristic,
                                us=default, fa3_us=fa3_us))
            print(json.dumps(dict(best=b, default_us=default, default_splits=heuristic, fa3_us=fa3_us,
                                  n_configs=len(rows))),
                  flush=True)
            for r in rows[:5]:
                print("   ", r["block_n"], r["warps"], r["stages"], r["maxnreg"], r["splits"], f"{r['us']:.1f}us",
                      f"{r['GBps']:.0f}GB/s", flush=True)
            if args.json:  # after every shape: a run its time limit cuts keeps what it measured
                json.dump(results, open(args.json, "w"))
        del case
        torch.cuda.empty_cache()
    print("SMs", _num_sms())


if __name__ == "__main__":
    main()
