"""Sweep the W4A16 GEMV's launch parameters on the GPU (no vLLM needed) over the 8B draft's linears,
against bf16 cuBLAS at the same M. Prints the best tile per (M, layer).

    python benchmarks/tune_gemv.py [--json out.json]

Weights are random words (the kernel's speed does not depend on their values); timing as
bench_kernels.py (CUDA graph replay, L2 flushed before every run). The tiles of M = 4 and 8 are the eight
fastest of M = 1.
"""

import argparse
import itertools
import json

import torch

from bench_kernels import LINEARS, timed
from vllm_quantspec.kernels.w4a16_gemv import w4a16_gemv

MS = (1, 4, 8)
TILES = list(itertools.product((16, 32, 64, 128), (8, 16), (2, 4, 8)))  # block_n, block_w, warps
SPLITS = (1, 2, 4, 8, 16)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    args = ap.parse_args()
    rows = []
    for name, (k, n) in LINEARS.items():
        packed = torch.randint(-2**31, 2**31 - 1, (n, k // 8), dtype=torch.int32, device="cuda")
        scale = (torch.rand(n, k // 128, device="cuda") * 0.01).to(torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        w_bytes = packed.numel() * 4 + scale.numel() * 2
        top = None
        for m in MS:  # every tile at M=1, the 8 fastest of M=1 at larger M
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            bf16 = timed(lambda: torch.nn.functional.linear(x, w), rep=30)
            default = timed(lambda: w4a16_gemv(x, packed, scale, 128), rep=30)
            here = []
            for bn, bw, warps, split in top or [(*t, s) for t in TILES for s in SPLITS]:
                try:
                    us = timed(lambda: w4a16_gemv(x, packed, scale, 128, block_n=bn, block_w=bw, num_warps=warps,
                                                  split=split), rep=30)
                except Exception as e:  # noqa: BLE001 (out of resources for a config: skip it)
                    print("skip", name, m, bn, bw, warps, split, type(e).__name__, flush=True)
                    continue
                here.append(dict(layer=name, k=k, n=n, m=m, block_n=bn, block_w=bw, warps=warps, split=split,
                                 us=us, bf16_us=bf16, default_us=default, GBps=w_bytes / us / 1e3))
            here.sort(key=lambda r: r["us"])
            top = top or [(r["block_n"], r["block_w"], r["warps"], r["split"]) for r in here[:8]]
            rows += here
            print(json.dumps(here[0]), flush=True)
        del packed, scale, w
    for m in MS:
        best = {lay: min((r for r in rows if r["m"] == m and r["layer"] == lay), key=lambda r: r["us"]) for lay in LINEARS}
        print(f"M={m}: best per layer " + ", ".join(f"{lay} {r['us']:.1f}us ({r['block_n']},{r['block_w']},{r['warps']},"
                                                     f"s{r['split']})" for lay, r in best.items()) +
              f"; sum {sum(r['us'] for r in best.values()):.1f}, default {sum(r['default_us'] for r in best.values()):.1f},"
              f" bf16 {sum(r['bf16_us'] for r in best.values()):.1f}", flush=True)
    if args.json:
        json.dump(rows, open(args.json, "w"))


if __name__ == "__main__":
    main()
