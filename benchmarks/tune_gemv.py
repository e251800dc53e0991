"""Sweep the W4A16 GEMV's tiles (kernels/w4a16_gemv.py) over the 8B draft's linears on the GPU,
against bf16 cuBLAS and, where vLLM is installed, the W4A16 kernel vLLM picks for the draft (Marlin /
Machete), all in one run. Prints the best tile per (M, layer) and each default tile's time.

    python benchmarks/tune_gemv.py [--json out.json] [--md out.md]
    ncu ... python benchmarks/tune_gemv.py --profile   (one launch of each default, fp32 then bf16x2, on qkv and
                                                        gate_up: for Nsight Compute, gpu_runs.sh gemv)

Weights are random words (the kernel's speed does not depend on their values); timing as
bench_kernels.py (CUDA-graph replay, L2 flushed before every run). Every tile is timed at M=1; at
larger M, the 8 fastest tiles of M=1. Tiles of both arithmetic modes (fp32 and bf16x2): a few of
fp32's (its full sweep: w4a16-gemv-h200 before the bf16x2 mode, in git history), bf16x2's over more
step sizes and pipeline stages (stages > 1: the compiler copies the next steps' words to shared memory while
a step computes; until the twenty-second session the loop was a plain range, which is never pipelined, so earlier
sweeps' stages made no difference), since its fewer registers leave room for them. Then, at M=1, the four
linears of CHAIN_LAYERS layers, each layer with its own weights, back to back in one CUDA graph as a
draft forward runs them: the time per layer there includes the launches and the tails of one kernel
overlapping the next, as the engine pays them, which a kernel timed alone between L2 flushes does
not show.
"""

import argparse
import datetime
import itertools
import json
import sys

import torch
import triton

from bench_kernels import LINEARS, act_as_single_rank, timed
from vllm_quantspec.kernels.w4a16_gemv import w4a16_gemv

# rows, words a step, warps, stages, bf16x2
TILES = [(*tile, False) for tile in itertools.product((8, 16), (256, 512), (2, 4), (1, 2))]
TILES += [(*tile, True) for tile in itertools.product((8, 16), (128, 256, 512), (2, 4, 8), (1, 2, 3, 4))]
MS = (1, 2, 4)
CHAIN_LAYERS = 8  # 0.9 GB of int4 weights: each kernel of the chain reads its weights from HBM, not L2


def tile_of(row: dict) -> tuple:
    return row["block_n"], row["block_w"], row["warps"], row["stages"], row["bf16x2"]


def random_w4(k: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A random int4 weight in the GEMV's layouts (its speed does not depend on the values) and its scales."""
    packed = torch.randint(-2**31, 2**31 - 1, (n, k // 8), dtype=torch.int32, device="cuda")
    return packed, (torch.rand(n, k // 128, device="cuda") * 0.01).to(torch.bfloat16)


def gemv_call(x, packed, scale, tile: tuple):
    bn, bw, warps, stages, bf16x2 = tile
    return w4a16_gemv(x, packed, scale, 128, bf16x2=bf16x2, block_n=bn, block_w=bw, num_warps=warps,
                      num_stages=stages)


def chain_us(best: dict[str, tuple]) -> dict[str, float]:
    """µs per layer of the four linears at M=1, CHAIN_LAYERS layers in one CUDA graph, for the GEMV (default
    tile in fp32 and in bf16x2, and each layer's best M=1 tile in `best`), bf16 and vLLM's W4A16 kernel (where
    vLLM is installed)."""
    x = {k: torch.randn(1, k, device="cuda", dtype=torch.bfloat16) for k, _ in LINEARS.values()}
    calls: dict[str, list] = {"gemv": [], "gemv_bf16x2": [], "gemv_best": [], "bf16": [], "vllm": []}
    for _ in range(CHAIN_LAYERS):
        for name, (k, n) in LINEARS.items():
            packed, scale = random_w4(k, n)
            w = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
            calls["gemv"].append(lambda x=x[k], p=packed, s=scale: w4a16_gemv(x, p, s, 128))
            calls["gemv_bf16x2"].append(lambda x=x[k], p=packed, s=scale: w4a16_gemv(x, p, s, 128, bf16x2=True))
            calls["gemv_best"].append(lambda x=x[k], p=packed, s=scale, t=best[name]: gemv_call(x, p, s, t))
            calls["bf16"].append(lambda x=x[k], w=w: torch.nn.functional.linear(x, w))
            vllm_kernel = vllm_w4a16(w)
            if vllm_kernel:
                calls["vllm"].append(lambda x=x[k], linear=vllm_kernel[1]: linear.apply(None, x))
    return {name: timed(lambda fns=fns: [f() for f in fns], rep=30) / CHAIN_LAYERS
            for name, fns in calls.items() if fns}


def vllm_w4a16(w: torch.Tensor):
    """vLLM's W4A16 kernel for this weight as the draft builds it, or None without vLLM."""
    try:
        act_as_single_rank()
        from vllm_quantspec.draft_weights import W4A16Linear, quantize_w4
    except ImportError:
        return None
    linear = W4A16Linear(quantize_w4(w, 128), torch.bfloat16)
    return type(linear.scheme.kernel).__name__, linear


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--md")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    if args.profile:
        for name in ("qkv", "gate_up"):
            k, n = LINEARS[name]
            packed, scale = random_w4(k, n)
            x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
            for bf16x2 in (False, True):
                w4a16_gemv(x, packed, scale, 128, bf16x2=bf16x2)
        torch.cuda.synchronize()
        return
    props = torch.cuda.get_device_properties()
    head = dict(device=props.name, torch=torch.__version__, triton=triton.__version__, command=" ".join(sys.argv),
                date=datetime.date.today().isoformat())
    print(json.dumps(head), flush=True)
    rows, summary, best_m1 = [], [], {}
    for name, (k, n) in LINEARS.items():
        packed, scale = random_w4(k, n)
        w = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
        vllm_kernel = vllm_w4a16(w)
        w4_bytes = packed.numel() * 4 + scale.numel() * 2
        top = None
        for m in MS:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            base = dict(layer=name, k=k, n=n, m=m, bf16_us=timed(lambda: torch.nn.functional.linear(x, w), rep=30),
                        default_us=timed(lambda: w4a16_gemv(x, packed, scale, 128), rep=30),
                        bf16x2_us=timed(lambda: w4a16_gemv(x, packed, scale, 128, bf16x2=True), rep=30))
            if vllm_kernel:
                base.update(vllm_kernel=vllm_kernel[0], vllm_us=timed(lambda: vllm_kernel[1].apply(None, x), rep=30))
            here = []
            for tile in top or TILES:
                try:
                    us = timed(lambda: gemv_call(x, packed, scale, tile), rep=30)
                except Exception as e:  # noqa: BLE001 (a tile out of resources: skipped, and said)
                    print("skip", name, m, tile, type(e).__name__, flush=True)
                    continue
                here.append(dict(base, block_n=tile[0], block_w=tile[1], warps=tile[2], stages=tile[3],
                                 bf16x2=tile[4], us=us, GBps=w4_bytes / us / 1e3))
            here.sort(key=lambda r: r["us"])
            top = top or [tile_of(r) for r in here[:8]]
            if m == 1:
                best_m1[name] = tile_of(here[0])
            rows += here
            best = here[0]
            summary.append(best)
            print(f"{name} M={m}: best {best['us']:.1f} us {best['GBps']:.0f} GB/s (rows {best['block_n']}, words "
                  f"{best['block_w']}, warps {best['warps']}, stages {best['stages']}, bf16x2 {best['bf16x2']}); "
                  f"default fp32 {base['default_us']:.1f}, bf16x2 {base['bf16x2_us']:.1f};"
                  f" bf16 {base['bf16_us']:.1f}" + (f"; {base['vllm_kernel']} {base['vllm_us']:.1f}" if vllm_kernel else ""),
                  flush=True)
        del packed, scale, w, vllm_kernel
    lines = ["| layer (K→N) | M | bf16 µs | vLLM W4A16 µs | GEMV fp32 µs | GEMV bf16x2 µs | GEMV best µs (rows, words, "
             "warps, stages, arithmetic) | best GB/s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in summary:
        vllm_cell = f"{r['vllm_kernel']} {r['vllm_us']:.1f}" if "vllm_us" in r else "–"
        lines.append(f"| {r['layer']} ({r['k']}→{r['n']}) | {r['m']} | {r['bf16_us']:.1f} | {vllm_cell} | "
                     f"{r['default_us']:.1f} | {r['bf16x2_us']:.1f} | {r['us']:.1f} ({r['block_n']}, {r['block_w']}, "
                     f"{r['warps']}, {r['stages']}, {'bf16x2' if r['bf16x2'] else 'fp32'}) | {r['GBps']:.0f} |")
    for m in MS:
        sel = [r for r in summary if r["m"] == m]
        tot = {key: sum(r.get(key, 0) for r in sel) for key in ("bf16_us", "vllm_us", "default_us", "bf16x2_us", "us")}
        vllm_cell = f"{tot['vllm_us']:.1f}" if tot["vllm_us"] else "–"
        lines.append(f"| **sum of four** | {m} | {tot['bf16_us']:.1f} | {vllm_cell} | "
                     f"{tot['default_us']:.1f} | {tot['bf16x2_us']:.1f} | {tot['us']:.1f} | |")
    chain = chain_us(best_m1)
    w4_layer = sum(n * k // 2 + n * k // 128 * 2 for k, n in LINEARS.values())
    lines += ["", f"The four linears of {CHAIN_LAYERS} layers back to back in one CUDA graph, M=1, µs per layer: "
              + ", ".join(f"{name} {us:.1f}" for name, us in chain.items())
              + f" (gemv, gemv_bf16x2: the default tile in fp32 and bf16x2 arithmetic, {w4_layer / chain['gemv'] / 1e3:.0f} "
              f"and {w4_layer / chain['gemv_bf16x2'] / 1e3:.0f} GB/s of int4 weights; gemv_best: each layer's best M=1 "
              f"tile, {w4_layer / chain['gemv_best'] / 1e3:.0f} GB/s)"]
    print("\n".join(lines), flush=True)
    if args.json:
        json.dump(dict(head, rows=rows, chain_us_per_layer=chain), open(args.json, "w"))
    if args.md:
        open(args.md, "w").write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
