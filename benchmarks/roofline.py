"""QuantSpec's speed ceiling on the 8B shape: what decode would take if every kernel streamed its bytes at
the device's copy bandwidth, against the measured rows. No device time: it reads committed results.

    python benchmarks/roofline.py [--e2e benchmarks/results/e2e-part-b-h200.json] [--out benchmarks/results]

A decode step of the target reads its weights once (embeddings excepted: one row) and every request's KV.
A QuantSpec step reads, per draft forward, the int4 draft weights (Marlin's group-128 fp16 scales included)
and the bf16 lm_head it shares with the target, plus the INT4 view of the cache (upper planes and their
metadata); then the target's weights and the INT8 view (both planes) once to verify. Page bytes come from
`HierarchicalPageLayout`, the model shape from `bench_e2e.LLAMA_8B`, the bandwidth from the kernel
benchmark's copy measurement, the accepted tokens per step from real-model acceptance per draft position
(the first γ positions' rates of the largest γ a result measured: 4 on the GPU, 8 in fp32 on the CPU).
The full-precision recent buffer (at most 2G + γ + 1 tokens a request) is left out: it is under 0.2% of
the bytes at 4k.

Ideal ms = bytes / bandwidth. "ceiling" = ideal bf16 / ideal QuantSpec: the best speedup the design allows
with equally efficient kernels. Issue 5's targets (1.8x at 4k, 2.5x at 32k, 2.8x at 64k-128k) sit above it
where the ceiling row says so.

The same arithmetic for vLLM's draft_model with the 1B-shaped draft the benchmarks run (`bench_e2e.LLAMA_1B`,
bf16 weights and KV, its tied lm_head read once a forward) at the same acceptance per position, as the
benchmarks pin it: issue 5 also asks QuantSpec to be ahead of it. A draft_model step reads γ times the 1B's
weights and bf16 KV, then the target's weights and bf16 KV once. Writes roofline-<device>.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_e2e import LLAMA_1B, LLAMA_8B  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
TARGETS = {4096: 1.8, 32768: 2.5, 65536: 2.8, 131072: 2.8}  # issue 5, against bf16, batch 1
WEIGHT_GROUP = 128  # the draft's int4 weight group (fp16 scale per group)
G = 128  # tokens per KV page (kv_group_size's default)


def model_bytes(cfg: dict) -> dict[str, float]:
    """Bytes a decode step reads: target linears + lm_head in bf16, the same linears in int4, and KV per
    token (all layers) in bf16, INT8 (both planes) and INT4 (upper planes) views."""
    from vllm_quantspec.hierarchical_kv import HierarchicalPageLayout

    h, d, layers = cfg["hidden_size"], cfg["head_dim"], cfg["num_hidden_layers"]
    q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
    linear = layers * (h * (q + 2 * kv) + q * h + 3 * h * cfg["intermediate_size"])
    lm_head = h * cfg["vocab_size"]
    page = HierarchicalPageLayout(G, cfg["num_key_value_heads"], d)
    shapes = page.region_shapes()
    upper = sum(math.prod(s) * t.itemsize for name, (s, t) in shapes.items() if not name.endswith("_lo"))
    int4 = 0.5 + 2 / WEIGHT_GROUP  # bytes per int4 weight with its group's fp16 scale
    return {"target": 2 * (linear + lm_head), "draft": linear * int4 + 2 * lm_head,
            "draft_int4_lm_head": (linear + lm_head) * int4,  # the quantize_lm_head option
            "kv_bf16": layers * 2 * kv * 2, "kv_int8": layers * page.page_bytes / G,
            "kv_int4": layers * upper / G}


def accepted_per_position(path: str) -> tuple[list[float], str]:
    """Per-position acceptance of QuantSpec at its largest γ and longest context in a real-part result."""
    rows = [r for r in json.load(open(path))["rows"]
            if r["method"] == "quantspec" and r.get("acceptance_per_pos")]
    r = max(rows, key=lambda r: (r["gamma"], r["ctx"]))
    source = f"{r['model']} {r['dtype']}, ctx {r['ctx']}, γ={r['gamma']} ({os.path.basename(path)})"
    return r["acceptance_per_pos"], source


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--e2e", default=os.path.join(RESULTS, "e2e-part-b-h200.json"))
    p.add_argument("--kernels", default=os.path.join(RESULTS, "kernels-h200.json"), help="copy_GBps from here")
    p.add_argument("--accept", default=",".join(os.path.join(RESULTS, f) for f in
                                                ("e2e-real-h200.json", "e2e-real-qwen-h200.json",
                                                 "e2e-real-smollm2-cpu.json", "e2e-real-qwen-cpu.json")),
                   help="real-part results; γ up to the largest γ each measured (8 in the CPU runs)")
    p.add_argument("--latest", help="a later bench_e2e.py run of QuantSpec and bf16 at batch 1 (its speedups drawn "
                                    "and listed beside the --e2e run's)")
    p.add_argument("--out", default=RESULTS)
    args = p.parse_args()
    e2e = json.load(open(args.e2e))
    bw = json.load(open(args.kernels))["copy_GBps"] * 1e9
    b = model_bytes(LLAMA_8B)
    small = model_bytes(LLAMA_1B)  # a draft_model forward reads the 1B's bf16 weights and bf16 KV
    dm = {"weights": small["target"], "kv_bf16": small["kv_bf16"]}
    measured = {(r["method"], r["batch"], r["ctx"]): r["ms_per_token"] for r in e2e["rows"] if "ms_per_token" in r}
    gamma_measured = {r["gamma"] for r in e2e["rows"] if r["method"] == "quantspec" and "ms_per_token" in r}
    rows = []
    for path in args.accept.split(","):
        per_pos, source = accepted_per_position(path)
        for batch, ctx in sorted({(bs, c) for (m, bs, c) in measured if m == "bf16"}):
            kv = batch * ctx
            bf16_ms = (b["target"] + kv * b["kv_bf16"]) / bw * 1e3
            for gamma in range(1, len(per_pos) + 1):
                tokens = 1 + sum(per_pos[:gamma])
                ms = {draft: (gamma * (b[draft] + kv * b["kv_int4"]) + b["target"] + kv * b["kv_int8"])
                      / bw * 1e3 / tokens for draft in ("draft", "draft_int4_lm_head")}
                qs_ms = ms["draft"]
                dm_bytes = gamma * (dm["weights"] + kv * dm["kv_bf16"]) + b["target"] + kv * b["kv_bf16"]
                dm_ms = dm_bytes / bw * 1e3 / tokens
                row = {"acceptance": source, "batch": batch, "ctx": ctx, "gamma": gamma,
                       "tokens_per_step": round(tokens, 3), "ideal_bf16_ms": round(bf16_ms, 3),
                       "ideal_quantspec_ms": round(qs_ms, 3), "ceiling": round(bf16_ms / qs_ms, 3),
                       "ceiling_int4_lm_head": round(bf16_ms / ms["draft_int4_lm_head"], 3),
                       "ideal_draft_model_ms": round(dm_ms, 3), "measured_bf16_ms": measured[("bf16", batch, ctx)]}
                for method in ("quantspec", "draft_model"):
                    if gamma in gamma_measured and (method, batch, ctx) in measured:
                        row[f"measured_{method}_ms"] = measured[(method, batch, ctx)]
                rows.append(row)
    device = e2e["device"]
    result = {"device": device, "vllm": e2e["vllm"], "torch": e2e["torch"], "command": " ".join(["python"] + sys.argv),
              "copy_GBps": round(bw / 1e9),
              "bytes": {k: round(v) for k, v in b.items()},
              "draft_model_bytes": {k: round(v) for k, v in dm.items()}, "e2e": os.path.basename(args.e2e),
              "e2e_accept_length": e2e["accept_length"], "kernels": os.path.basename(args.kernels), "rows": rows}
    if args.latest:
        later = {(r["method"], r["ctx"]): r["ms_per_token"] for r in json.load(open(args.latest))["rows"]
                 if r["batch"] == 1 and "ms_per_token" in r}
        result["latest"] = {"e2e": os.path.basename(args.latest), "speedup_batch1": {
            ctx: round(later[("bf16", ctx)] / ms, 3) for (m, ctx), ms in sorted(later.items())
            if m == "quantspec" and ("bf16", ctx) in later}}
    stem = os.path.join(args.out, f"roofline-{device.split()[-1].lower()}")
    json.dump(result, open(stem + ".json", "w"), indent=1)
    write_table_and_plot(result, stem)
    print(open(stem + ".md").read())


def latest_sentence(result: dict) -> str:
    """The --latest run's batch-1 speedups, as a sentence for the table's header ('' without one)."""
    if "latest" not in result:
        return ""
    speedups = result["latest"]["speedup_batch1"]
    return (f" A later run, `{result['latest']['e2e']}`, measured QuantSpec at "
            + " / ".join(f"{v:.2f}x" for v in speedups.values()) + " of bf16 at batch 1 x "
            + " / ".join(f"{int(c) // 1024}k" for c in speedups) + " (the plot's dashed line).")


def write_table_and_plot(result: dict, stem: str) -> None:
    b = result["bytes"]
    best = {}  # (acceptance, batch, ctx) -> the row of the γ with the highest ceiling
    for r in result["rows"]:
        k = (r["acceptance"], r["batch"], r["ctx"])
        if k not in best or r["ceiling"] > best[k]["ceiling"]:
            best[k] = r
    lines = [f"# QuantSpec's byte-bound ceiling, Llama-3.1-8B shape, {result['device']}", "",
             f"`{result['command']}`. Every kernel at the copy bandwidth ({result['copy_GBps']} GB/s, "
             f"`{result['kernels']}`). Bytes a step reads: target weights {b['target'] / 1e9:.2f} GB, draft "
             f"weights {b['draft'] / 1e9:.2f} GB (int4 linears with group-128 scales, the bf16 lm_head shared; "
             f"{b['draft_int4_lm_head'] / 1e9:.2f} GB with `quantize_lm_head`), "
             f"KV per token {b['kv_bf16'] / 1024:.0f} KiB in bf16, {b['kv_int8'] / 1024:.1f} KiB INT8, "
             f"{b['kv_int4'] / 1024:.1f} KiB INT4. Measured rows: `{result['e2e']}` (QuantSpec at γ=4, async "
             f"scheduling, synthetic acceptance {result['e2e_accept_length']:.2f}).", "",
             "Ceiling = ideal bf16 ms / ideal QuantSpec ms per token, at the γ (up to the largest measured) that "
             "maximizes it: the best speedup with kernels as efficient as bf16's. Measured bf16 / ideal QuantSpec: "
             "QuantSpec's kernels at the copy bandwidth against vLLM bf16 as it runs (an upper bound no kernel "
             "reaches). Target: issue 5's speedup over bf16 (batch 1)."
             + latest_sentence(result), "",
             "| acceptance (real, per position) | batch | ctx | best γ | tokens / step | ideal bf16 ms | ideal "
             "QuantSpec ms/token | ceiling | with int4 lm_head | measured bf16 / ideal QuantSpec | target | measured "
             "bf16 ms | measured QuantSpec γ=4 ms | measured speedup |", "|---" * 14 + "|"]
    for (source, batch, ctx), r in best.items():
        at4 = next((x for x in result["rows"] if (x["acceptance"], x["batch"], x["ctx"], x["gamma"])
                    == (source, batch, ctx, 4)), {})
        qs = at4.get("measured_quantspec_ms")
        target = f"{TARGETS[ctx]}x" if batch == 1 and ctx in TARGETS else "–"
        speedup = f"{r['measured_bf16_ms'] / qs:.2f}x" if qs else "–"
        lines.append(f"| {source} | {batch} | {ctx} | {r['gamma']} | {r['tokens_per_step']} | {r['ideal_bf16_ms']} "
                     f"| {r['ideal_quantspec_ms']} | {r['ceiling']:.2f}x | {r['ceiling_int4_lm_head']:.2f}x | "
                     f"{r['measured_bf16_ms'] / r['ideal_quantspec_ms']:.2f}x | {target} | {r['measured_bf16_ms']} | "
                     f"{qs or '–'} | {speedup} |")
    lines += ["", "## Against draft_model (1B-shaped draft, same acceptance per position)", "",
              f"A draft forward of the 1B shape reads {result['draft_model_bytes']['weights'] / 1e9:.2f} GB of bf16 "
              f"weights and {result['draft_model_bytes']['kv_bf16'] / 1024:.0f} KiB of KV per token; QuantSpec's "
              f"{b['draft'] / 1e9:.2f} GB and {b['kv_int4'] / 1024:.1f} KiB (INT4), and its verify reads INT8 KV where "
              "draft_model's reads bf16. Each at its best γ. Ideal ratio = ideal draft_model / ideal QuantSpec ms per "
              "token: above 1, QuantSpec is ahead at the byte bound. Measured: both at γ=4 in the run above.", "",
              "| acceptance | batch | ctx | ideal QuantSpec ms/token (γ) | ideal draft_model ms/token (γ) | ideal "
              "ratio | measured QuantSpec ms | measured draft_model ms | measured ratio |", "|---" * 9 + "|"]
    for (source, batch, ctx), r in best.items():
        here = [x for x in result["rows"] if (x["acceptance"], x["batch"], x["ctx"]) == (source, batch, ctx)]
        dm = min(here, key=lambda x: x["ideal_draft_model_ms"])
        at4 = next((x for x in here if x["gamma"] == 4), {})
        qs, dmm = at4.get("measured_quantspec_ms"), at4.get("measured_draft_model_ms")
        lines.append(f"| {source.split(',')[0]} | {batch} | {ctx} | {r['ideal_quantspec_ms']} ({r['gamma']}) | "
                     f"{dm['ideal_draft_model_ms']} ({dm['gamma']}) | "
                     f"{dm['ideal_draft_model_ms'] / r['ideal_quantspec_ms']:.2f} | {qs or '–'} | {dmm or '–'} | "
                     f"{f'{dmm / qs:.2f}' if qs and dmm else '–'} |")
    open(stem + ".md", "w").write("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_dm) = plt.subplots(1, 2, figsize=(14, 6.5), width_ratios=(3, 2), layout="constrained")
    sources = list(dict.fromkeys(s for s, _, _ in best))
    for k, source in enumerate(sources):
        for batch, style in ((1, "-"), (4, "--"), (16, ":")):
            pts = sorted((c, r["ceiling"]) for (s, bs, c), r in best.items() if s == source and bs == batch)
            if pts:
                ax.plot([c // 1024 for c, _ in pts], [v for _, v in pts], style, marker="o",
                        color=plt.cm.tab10(k), label=f"ceiling, batch {batch}, {source.split(',')[0]}")
    measured = sorted((r["ctx"], r["measured_bf16_ms"] / r["measured_quantspec_ms"]) for r in result["rows"]
                      if r["batch"] == 1 and "measured_quantspec_ms" in r and r["acceptance"] == sources[0])
    ax.plot([c // 1024 for c, _ in measured], [v for _, v in measured], marker="s", color="black",
            label=f"measured, batch 1, γ=4 ({result['e2e']})")
    if "latest" in result:
        pts = sorted((int(c), v) for c, v in result["latest"]["speedup_batch1"].items())
        ax.plot([c // 1024 for c, _ in pts], [v for _, v in pts], marker="s", linestyle="--", color="black",
                label=f"measured, batch 1, γ=4 ({result['latest']['e2e']})")
    ax.plot([c // 1024 for c in TARGETS], list(TARGETS.values()), marker="*", color="red", linestyle="none",
            markersize=10, label="issue 5 target, batch 1")
    ax.axhline(1.0, color="gray", linewidth=0.5)
    ax.set(xlabel="context (k tokens)", ylabel="speedup over bf16", title=f"QuantSpec byte-bound ceiling, 8B shape, "
           f"{result['device']}")
    ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=3)
    # right: draft_model against QuantSpec, ideal and measured, with the first source's acceptance
    for batch, color in ((1, "C0"), (4, "C1"), (16, "C2")):
        here = [x for x in result["rows"] if x["acceptance"] == sources[0] and x["batch"] == batch]
        ctxs = sorted({x["ctx"] for x in here})
        if not ctxs:
            continue
        ideal = [min(x["ideal_draft_model_ms"] for x in here if x["ctx"] == c) / best[(sources[0], batch, c)]
                 ["ideal_quantspec_ms"] for c in ctxs]
        ax_dm.plot([c // 1024 for c in ctxs], ideal, marker="o", color=color, label=f"ideal, batch {batch}")
        pts = sorted((x["ctx"], x["measured_draft_model_ms"] / x["measured_quantspec_ms"]) for x in here
                     if x["gamma"] == 4 and "measured_draft_model_ms" in x and "measured_quantspec_ms" in x)
        ax_dm.plot([c // 1024 for c, _ in pts], [v for _, v in pts], marker="s", linestyle="--", color=color,
                   label=f"measured (γ=4), batch {batch}")
    ax_dm.axhline(1.0, color="gray", linewidth=0.5)
    ax_dm.set(xlabel="context (k tokens)", ylabel="draft_model ms / QuantSpec ms (above 1: QuantSpec ahead)",
              title="against draft_model (1B-shaped), same acceptance")
    ax_dm.legend(fontsize=6)
    fig.savefig(stem + ".png", dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    main()
