"""Sweep the attention kernel's launch parameters on the GPU (no vLLM needed): page tile, warps,
pipeline stages and split-K count, per shape and mode. Prints the best configs and the heuristic's.

    python benchmarks/tune_attention.py [--json out.json]
"""

import argparse
import itertools
import json
import math

import torch

from bench_kernels import D, H, quantized_case, timed
from vllm_quantspec.kernels.paged_attention import _num_sms, _pick_num_splits, paged_attention

SHAPES = [(1, 8192, 1), (1, 32768, 1), (1, 131072, 1), (1, 32768, 5), (1, 131072, 5), (8, 32768, 1), (8, 32768, 5),
          (8, 131072, 1)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    args = ap.parse_args()
    results = []
    for batch, ctx, q_len in SHAPES:
        case = quantized_case(batch, ctx, q_len)
        for mode in ("int4", "int8"):
            rows = []
            for block_n, warps, stages, pps in itertools.product((64, 128), (4, 8), (2, 3), (1, 2, 4, 8)):
                splits = _pick_num_splits(batch * H, ctx // block_n, programs_per_sm=pps)
                try:
                    us = timed(lambda: paged_attention(**case["args"], mode=mode, sm_scale=1 / math.sqrt(D),
                                                       max_query_len=q_len, max_seq_len=ctx, num_splits=splits,
                                                       block_n=block_n, num_warps=warps, num_stages=stages), rep=40)
                except Exception as e:  # noqa: BLE001 (out of resources for a config: skip it)
                    print("skip", block_n, warps, stages, pps, type(e).__name__)
                    continue
                rows.append(dict(batch=batch, ctx=ctx, q_len=q_len, mode=mode, block_n=block_n, warps=warps,
                                 stages=stages, pps=pps, splits=splits, us=us,
                                 GBps=case["bytes"][mode] / us / 1e3))
            default = timed(lambda: paged_attention(**case["args"], mode=mode, sm_scale=1 / math.sqrt(D),
                                                    max_query_len=q_len, max_seq_len=ctx))
            rows.sort(key=lambda r: r["us"])
            results += rows
            b = rows[0]
            print(json.dumps(dict(best=b, default_us=default, n_configs=len(rows))), flush=True)
            for r in rows[:5]:
                print("   ", r["block_n"], r["warps"], r["stages"], r["pps"], r["splits"], f"{r['us']:.1f}us",
                      f"{r['GBps']:.0f}GB/s", flush=True)
        del case
        torch.cuda.empty_cache()
    print("SMs", _num_sms())
    if args.json:
        json.dump(results, open(args.json, "w"))


if __name__ == "__main__":
    main()
