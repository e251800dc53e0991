"""Kernel benchmark on one GPU (H100): hierarchical INT4 / INT8 paged attention vs vLLM's FA3 bf16,
and the W4A16 draft linears through vLLM's kernel selection vs bf16, in one run.

    python benchmarks/bench_kernels.py [--out-dir benchmarks/results] [--quick]

Shapes: Llama-3.1-8B attention (32 q heads, 8 kv heads, D=128), G = block = 128 tokens per page,
one layer; contexts 8k/32k/64k/128k, batch 1 and 8, q_len 1 (decode) and 5 (verify, gamma=4).
Chunked prefill (q_len 512/2048 over a 32k context). Draft linears of the 8B (qkv, o, gate_up,
down) at M = 1..8.

Timing: every op is captured in a CUDA graph (what vLLM replays for decode) and timed with
triton.testing.do_bench (median), which zeroes a 256 MB buffer before every replay, so each run
reads its KV/weights from HBM, not L2 (50 MB). FA3 is also timed the anchor's way (no graph,
/work/shared/gpu/tools/bench_fa_anchor.py) as `fa3_bf16_nograph`, to compare with its numbers.

Bytes: the fewest bytes each op must read (its KV or weights; q/out are negligible). Ours: the
pages' U planes (+ L planes for int8) and fp16 metadata, plus the bf16 ring of recent tokens
(fp_keep = G: C - Q(C) in [G, 2G), QuantSpec's double buffer). "% of byte bound" = (bytes / measured
device copy bandwidth) / time.

Results: <out-dir>/kernels-<gpu>.json, .md and .png (<gpu>: h100, h200, ...).
"""

import argparse
import datetime
import json
import math
import os
import sys
import traceback

import torch
import triton

from vllm_quantspec.hierarchical_kv import HierarchicalPageLayout
from vllm_quantspec.kernels.paged_attention import paged_attention
from vllm_quantspec.kernels.prefill_attention import plan_prefill, prefill_attention

HQ, H, D, G = 32, 8, 128, 128
FA_BLOCK = 16  # vLLM's default KV block size for FlashAttention (as the anchor)
RING = 384
FP_KEEP = G  # QuantSpec's double full-precision buffer: the ring holds [G, 2G) tokens at decode
LINEARS = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096)}  # (K, N)
TARGETS = {"int4": 3.2, "int8": 1.8}


def timed(fn, graph: bool = True, rep: int = 100) -> float:
    """Median µs of fn (CUDA-graph replay unless graph=False), L2 flushed before every run."""
    fn()
    torch.cuda.synchronize()
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        fn = g.replay
    return triton.testing.do_bench(fn, rep=rep, return_mode="median") * 1e3


def copy_bandwidth() -> float:
    x = torch.empty(2 * 1024**3, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = triton.testing.do_bench(lambda: y.copy_(x), return_mode="median")
    return 2 * x.numel() / ms / 1e6  # GB/s, read + write


def page_bytes_read(layout: HierarchicalPageLayout, mode: str) -> int:
    """Bytes one page contributes per kv head: U (+ L) planes of K and V, and all metadata."""
    plane = layout.block_size * layout.head_dim // 2
    meta = 2 * 2 * layout.head_dim + 2 * 2 * layout.block_size * (layout.head_dim // layout.v_group)
    return (2 if mode == "int4" else 4) * plane + meta


def quantized_case(batch: int, ctx: int, q_len: int, q: torch.Tensor | None = None) -> dict:
    """Inputs of our kernel for `batch` sequences of `ctx` tokens (q_len of them new), fp_keep = G
    (QuantSpec's double buffer): pages hold [0, Q(ctx - 1)) in random places, the ring [Q(C), C),
    between G and 2G tokens; and the bytes each mode reads."""
    dev = "cuda"
    T = batch * q_len
    layout = HierarchicalPageLayout(G, H, D)
    c = ctx - q_len
    n_pages = max(0, ctx - 1 - FP_KEEP) // G
    ring_tokens = c - max(0, c - FP_KEEP) // G * G
    pages = torch.randint(0, 256, (batch * n_pages, layout.page_bytes), dtype=torch.uint8, device=dev)
    pv = layout.views(pages)
    for meta, lo, hi in ((pv.k_scale, 0.01, 0.1), (pv.v_scale, 0.01, 0.1), (pv.k_min, -1, 0), (pv.v_min, -1, 0)):
        meta.uniform_(lo, hi)  # sane numbers (random bytes would hold NaNs)
    k_ring = torch.randn(batch, RING, H, D, dtype=torch.bfloat16, device=dev)
    args = dict(
        q=torch.randn(T, HQ, D, dtype=torch.bfloat16, device=dev) if q is None else q,
        k_new=torch.randn(T, H, D, dtype=torch.bfloat16, device=dev),
        v_new=torch.randn(T, H, D, dtype=torch.bfloat16, device=dev),
        query_start_loc=torch.arange(0, T + 1, q_len, dtype=torch.int32, device=dev),
        seq_lens=torch.full((batch,), ctx, dtype=torch.int32, device=dev),
        block_table=torch.randperm(batch * n_pages, device=dev).int().view(batch, n_pages),
        pages=pages, layout=layout, k_ring=k_ring, v_ring=torch.randn_like(k_ring),
        ring_slot=torch.arange(batch, dtype=torch.int32, device=dev), fp_keep=FP_KEEP)
    ring_bytes = batch * ring_tokens * H * D * 2 * 2
    nbytes = {m: batch * n_pages * H * page_bytes_read(layout, m) + ring_bytes for m in ("int4", "int8")}
    return dict(args=args, bytes=nbytes, ring_tokens=ring_tokens)


def attention_rows(batch: int, ctx: int, q_len: int, copy_gbps: float) -> list[dict]:
    from vllm.vllm_flash_attn import flash_attn_varlen_func

    torch.manual_seed(0)
    dev = "cuda"
    T = batch * q_len
    q = torch.randn(T, HQ, D, dtype=torch.bfloat16, device=dev)
    cu_q = torch.arange(0, T + 1, q_len, dtype=torch.int32, device=dev)
    seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device=dev)
    rows = []

    # FA3 on a bf16 paged cache (the anchor's setup).
    nblk = batch * ctx // FA_BLOCK
    k = torch.randn(nblk, FA_BLOCK, H, D, dtype=torch.bfloat16, device=dev)
    v = torch.randn_like(k)
    bt = torch.arange(nblk, dtype=torch.int32, device=dev).view(batch, -1)

    def fa3():
        return flash_attn_varlen_func(q, k, v, max_seqlen_q=q_len, cu_seqlens_q=cu_q, max_seqlen_k=ctx,
                                      seqused_k=seq_lens, causal=True, block_table=bt, fa_version=3)

    fa_bytes = 2 * batch * ctx * H * D * 2
    for op, graph in (("fa3_bf16", True), ("fa3_bf16_nograph", False)):
        us = timed(fa3, graph)
        rows.append(dict(op=op, batch=batch, ctx=ctx, q_len=q_len, us=us, bytes=fa_bytes))
    fa_us = rows[0]["us"]
    del k, v

    case = quantized_case(batch, ctx, q_len, q=q)
    for mode in ("int4", "int8"):
        us = timed(lambda: paged_attention(**case["args"], mode=mode, sm_scale=1 / math.sqrt(D),
                                           max_query_len=q_len, max_seq_len=ctx))
        rows.append(dict(op=mode, batch=batch, ctx=ctx, q_len=q_len, us=us, bytes=case["bytes"][mode],
                         ring_tokens=case["ring_tokens"], speedup_vs_fa3=fa_us / us))
    for r in rows:
        r.update(kind="attention", GBps=r["bytes"] / r["us"] / 1e3,
                 pct_byte_bound=100 * r["bytes"] / (copy_gbps * 1e3) / r["us"])
    return rows


def prefill_rows(ctx: int, q_len: int) -> list[dict]:
    """Chunked prefill: our query-tiled kernel over the quantized context vs FA3 over bf16 pages
    (what "dequantize the pages to a bf16 workspace, then FA3" would cost, before the dequant pass)."""
    from vllm.vllm_flash_attn import flash_attn_varlen_func

    dev = "cuda"
    q = torch.randn(q_len, HQ, D, dtype=torch.bfloat16, device=dev)
    cu_q = torch.tensor([0, q_len], dtype=torch.int32, device=dev)
    seq_lens = torch.tensor([ctx], dtype=torch.int32, device=dev)
    nblk = ctx // FA_BLOCK
    k = torch.randn(nblk, FA_BLOCK, H, D, dtype=torch.bfloat16, device=dev)
    v = torch.randn_like(k)
    bt = torch.arange(nblk, dtype=torch.int32, device=dev).view(1, -1)
    flops = 4 * HQ * D * q_len * (ctx - q_len / 2)  # QK^T and PV over the causal shape
    fa_us = timed(lambda: flash_attn_varlen_func(q, k, v, max_seqlen_q=q_len, cu_seqlens_q=cu_q, max_seqlen_k=ctx,
                                                 seqused_k=seq_lens, causal=True, block_table=bt, fa_version=3))
    rows = [dict(op="fa3_bf16", us=fa_us)]
    del k, v
    case = quantized_case(1, ctx, q_len, q=q)
    for mode in ("int4", "int8"):
        us = timed(lambda: paged_attention(**case["args"], mode=mode, sm_scale=1 / math.sqrt(D),
                                           max_query_len=q_len, max_seq_len=ctx))
        rows.append(dict(op=mode, us=us, speedup_vs_fa3=fa_us / us))
    # What the backend runs for prefill on a GPU: dequantize to an fp16 workspace, FA3 twice, merge
    # (the step's plan is built once per step, outside the timing; no CUDA graph: prefill is eager).
    a = case["args"]
    plan = plan_prefill(a["query_start_loc"].cpu().numpy(), a["seq_lens"].cpu().numpy(), a["ring_slot"].tolist(),
                        a["block_table"], G, FP_KEEP, RING)
    out = torch.empty_like(q)
    us = timed(lambda: prefill_attention(q, a["k_new"], a["v_new"], plan, a["pages"], a["layout"], a["k_ring"],
                                         a["v_ring"], 1 / math.sqrt(D), out), graph=False)
    rows.append(dict(op="int8_fa3_workspace", us=us, speedup_vs_fa3=fa_us / us))
    for r in rows:
        r.update(kind="prefill", batch=1, ctx=ctx, q_len=q_len, TFLOPs=flops / r["us"] / 1e6)
    return rows


def act_as_single_rank() -> None:
    """vLLM parameters read the tensor-parallel rank at construction: act as a single rank."""
    import vllm.model_executor.parameter as vllm_param

    vllm_param.get_tensor_model_parallel_rank = lambda: 0
    vllm_param.get_tensor_model_parallel_world_size = lambda: 1


def linear_rows(ms: list[int], copy_gbps: float) -> list[dict]:
    """The draft's W4A16 layers as the draft runs them (draft_weights.W4A16Linear: vLLM's own
    compressed-tensors WNA16 scheme, so `choose_mp_linear_kernel` picks the kernel) against bf16."""
    from vllm_quantspec.draft_weights import W4A16Linear, dequantize, quantize_w4

    act_as_single_rank()
    rows = []
    for name, (k, n) in LINEARS.items():
        w = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
        w4 = quantize_w4(w, 128)
        # vLLM's choice ("w4a16"), and the next kernel it would take without it ("w4a16_alt":
        # Marlin where it picks Machete), to see which serves the draft's M <= 8 better
        variants = []
        for disabled in ("", "MacheteLinearKernel"):
            os.environ["VLLM_DISABLED_KERNELS"] = disabled
            linear = W4A16Linear(w4, torch.bfloat16)  # on w4's device, the GPU
            kernel = type(linear.scheme.kernel).__name__
            if kernel not in [v[2] for v in variants]:
                variants.append(("w4a16_alt" if variants else "w4a16", linear, kernel))
        os.environ.pop("VLLM_DISABLED_KERNELS")
        # correctness at M=8 against the dequantized weight (bf16 rounding of products + output)
        x = torch.randn(8, k, device="cuda", dtype=torch.bfloat16)
        ref = x.float() @ dequantize(w4).T
        errs = [float((linear.apply(None, x).float() - ref).norm() / ref.norm()) for _, linear, _ in variants]
        w4_bytes = n * k // 2 + n * (k // 128) * 2
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            bf_us = timed(lambda: torch.nn.functional.linear(x, w))
            measured = [("bf16", bf_us, n * k * 2, {})]
            for (op, linear, kernel), err in zip(variants, errs):
                us = timed(lambda: linear.apply(None, x))
                measured.append((op, us, w4_bytes, dict(kernel=kernel, speedup_vs_bf16=bf_us / us,
                                                        rel_err_vs_dequant=err)))
            for op, us, nbytes, extra in measured:
                rows.append(dict(kind="linear", op=op, layer=name, m=m, k=k, n=n, us=us, bytes=nbytes,
                                 GBps=nbytes / us / 1e3, pct_byte_bound=100 * nbytes / (copy_gbps * 1e3) / us, **extra))
        del w, w4, variants
    return rows


def target_summary(rows: list[dict]) -> list[dict]:
    """The brief's targets, each with the measured value and whether it is met."""
    out = []
    att = {(r["op"], r["batch"], r["ctx"], r["q_len"]): r for r in rows if r["kind"] == "attention"}
    for (op, b, ctx, ql), r in sorted(att.items()):
        if op in TARGETS and (op == "int8" or ctx >= 65536):
            out.append(dict(target=f"{op} >= {TARGETS[op]}x FA3", case=f"b{b} ctx{ctx} q{ql}",
                            value=round(r["speedup_vs_fa3"], 2), met=r["speedup_vs_fa3"] >= TARGETS[op]))
        if op in TARGETS and b == 1 and ctx <= 32768:
            fa = att[("fa3_bf16", b, ctx, ql)]
            out.append(dict(target=f"{op} GB/s >= FA3 GB/s", case=f"b{b} ctx{ctx} q{ql}",
                            value=f"{r['GBps']:.0f} vs {fa['GBps']:.0f}", met=r["GBps"] >= fa["GBps"]))
    for r in rows:
        if r["kind"] == "linear" and r["op"].startswith("w4a16") and r["m"] == 1:
            out.append(dict(target="W4A16 >= 3x bf16 at M=1", case=f"{r['layer']} {r['kernel']}",
                            value=round(r["speedup_vs_bf16"], 2),
                            met=r["speedup_vs_bf16"] >= 3))
    return out


def markdown(res: dict) -> str:
    rows = res["rows"]
    md = [f"# Kernel benchmark: {res['device']}", "",
          f"vLLM {res['vllm']}, torch {res['torch']}, triton {res['triton']}, {res['date']}, copy bandwidth "
          f"{res['copy_GBps']:.0f} GB/s.  Command: `{res['command']}`", "",
          "## Decode / verify attention, one layer (32 q heads, 8 kv heads, D=128, G=128)", "",
          "| batch | ctx | q_len | FA3 bf16 µs (no graph) | INT4 µs | INT4 × | INT8 µs | INT8 × | FA3 / INT4 / INT8 GB/s "
          "| % byte bound FA3 / INT4 / INT8 |", "|---|---|---|---|---|---|---|---|---|---|"]
    att = {(r["op"], r["batch"], r["ctx"], r["q_len"]): r for r in rows if r["kind"] == "attention"}
    for (op, b, ctx, ql) in sorted(k for k in att if k[0] == "fa3_bf16"):
        f, ng, i4, i8 = (att[(o, b, ctx, ql)] for o in ("fa3_bf16", "fa3_bf16_nograph", "int4", "int8"))
        md.append(f"| {b} | {ctx} | {ql} | {f['us']:.1f} ({ng['us']:.1f}) | {i4['us']:.1f} | {i4['speedup_vs_fa3']:.2f} | "
                  f"{i8['us']:.1f} | {i8['speedup_vs_fa3']:.2f} | {f['GBps']:.0f} / {i4['GBps']:.0f} / {i8['GBps']:.0f} | "
                  f"{f['pct_byte_bound']:.0f} / {i4['pct_byte_bound']:.0f} / {i8['pct_byte_bound']:.0f} |")
    pre = [r for r in rows if r["kind"] == "prefill"]
    if pre:
        md += ["", "## Chunked prefill (batch 1)", "", "| ctx | q_len | op | µs | TFLOP/s | × FA3 |", "|---|---|---|---|---|---|"]
        md += [f"| {r['ctx']} | {r['q_len']} | {r['op']} | {r['us']:.0f} | {r['TFLOPs']:.0f} | "
               f"{r.get('speedup_vs_fa3', 1):.2f} |" for r in pre]
    lin = {(r["layer"], r["m"], r["op"]): r for r in rows if r["kind"] == "linear"}
    if lin:
        kern = next(r["kernel"] for r in rows if r.get("kernel") and r["op"] == "w4a16")
        alt = next((r["kernel"] for r in rows if r.get("kernel") and r["op"] == "w4a16_alt"), None)
        md += ["", f"## Draft linears W4A16 ({kern}, chosen by vLLM{f'; alternative {alt}' if alt else ''}) "
               "vs bf16 (cuBLAS)", "",
               "| layer (K→N) | M | bf16 µs | W4A16 µs | × | W4A16 GB/s | % byte bound | alternative µs (×) |",
               "|---|---|---|---|---|---|---|---|"]
        for (layer, m, op) in sorted(lin):
            if op == "w4a16":
                b, w, a = lin[(layer, m, "bf16")], lin[(layer, m, op)], lin.get((layer, m, "w4a16_alt"))
                md.append(f"| {layer} ({w['k']}→{w['n']}) | {m} | {b['us']:.1f} | {w['us']:.1f} | "
                          f"{w['speedup_vs_bf16']:.2f} | {w['GBps']:.0f} | {w['pct_byte_bound']:.0f} | "
                          + (f"{a['us']:.1f} ({a['speedup_vs_bf16']:.2f}) |" if a else "– |"))
    for e in res.get("errors", []):
        md += ["", f"**{e['section']} failed:**", "", "```", e["error"].strip().splitlines()[-1], "```"]
    md += ["", "## Targets", "", "| target | case | measured | met |", "|---|---|---|---|"]
    md += [f"| {t['target']} | {t['case']} | {t['value']} | {'yes' if t['met'] else '**no**'} |"
           for t in res["targets"]]
    if res.get("analysis"):  # written by hand into the JSON after the run: why targets are missed
        md += ["", "## Analysis", ""] + [f"- {a}" for a in res["analysis"]]
    return "\n".join(md) + "\n"


def plot(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    att = [r for r in res["rows"] if r["kind"] == "attention" and r["op"] in TARGETS]
    for op, style in (("int4", "-o"), ("int8", "-s")):
        for b, ql in sorted({(r["batch"], r["q_len"]) for r in att}):
            pts = sorted((r["ctx"], r["speedup_vs_fa3"]) for r in att if (r["op"], r["batch"], r["q_len"]) == (op, b, ql))
            a1.plot([p[0] // 1024 for p in pts], [p[1] for p in pts], style, label=f"{op} b{b} q{ql}")
    for op, t in TARGETS.items():
        a1.axhline(t, ls=":", c="gray")
    a1.set(xscale="log", xlabel="context (k tokens)", ylabel="speedup vs FA3 bf16", title="attention, one layer")
    a1.set_xticks([8, 32, 64, 128], ["8", "32", "64", "128"])
    a1.legend(fontsize=7)
    lin = [r for r in res["rows"] if r["kind"] == "linear" and r["op"] == "w4a16"]
    for layer in LINEARS:
        pts = sorted((r["m"], r["speedup_vs_bf16"]) for r in lin if r["layer"] == layer)
        a2.plot([p[0] for p in pts], [p[1] for p in pts], "-o", label=layer)
    a2.axhline(3, ls=":", c="gray")
    a2.set(xlabel="M (tokens)", ylabel="speedup vs bf16", title="W4A16 draft linears")
    a2.legend(fontsize=7)
    fig.suptitle(f"{res['device']}, vLLM {res['vllm']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def device_tag(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100': result files are named after the GPU they were measured on."""
    return next((w.lower() for w in name.split() if w[:1] in "HABL" and w[1:].isdigit()), name.split()[-1].lower())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out-dir", default="benchmarks/results")
    ap.add_argument("--quick", action="store_true", help="a few shapes only (smoke test)")
    ap.add_argument("--plot-only", help="re-draw the PNG and the markdown from a result JSON")
    args = ap.parse_args()
    if args.plot_only:
        res = json.load(open(args.plot_only))
        stem = args.plot_only[:-len(".json")]
        open(stem + ".md", "w").write(markdown(res))
        plot(res, stem + ".png")
        return
    import vllm

    os.makedirs(args.out_dir, exist_ok=True)
    res = dict(device=torch.cuda.get_device_name(), vllm=vllm.__version__, torch=torch.__version__,
               triton=triton.__version__, command="python " + " ".join(sys.argv),
               date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    res["copy_GBps"] = copy_bandwidth()
    stem = os.path.join(args.out_dir, "kernels-" + device_tag(res["device"]))
    print(json.dumps({k: v for k, v in res.items()}), flush=True)
    res["rows"], res["errors"] = [], []
    cases = [(1, 8192), (1, 131072)] if args.quick else \
        [(1, 8192), (1, 32768), (1, 65536), (1, 131072), (8, 8192), (8, 32768), (8, 65536), (8, 131072)]
    # the linears first: they decide the draft's W4A16 kernel (a run cut short still has them)
    sections = [("linears", lambda: linear_rows([1, 4] if args.quick else list(range(1, 9)), res["copy_GBps"]))]
    sections += [(f"attention b{b} ctx{c} q{q}", lambda b=b, c=c, q=q: attention_rows(b, c, q, res["copy_GBps"]))
                 for b, c in cases for q in (1, 5)]
    sections += [(f"prefill q{q}", lambda q=q: prefill_rows(32768, q)) for q in ((512,) if args.quick else (512, 2048))]
    for name, run in sections:  # a failing section is recorded, the others still run
        try:
            for r in run():
                res["rows"].append(r)
                print(json.dumps(r), flush=True)
        except Exception:  # noqa: BLE001
            res["errors"].append(dict(section=name, error=traceback.format_exc()))
            print(name, "FAILED\n", traceback.format_exc(), flush=True)
        torch.cuda.empty_cache()
        json.dump(res, open(stem + ".json", "w"), indent=1)
    res["targets"] = target_summary(res["rows"])
    json.dump(res, open(stem + ".json", "w"), indent=1)
    md = markdown(res)
    open(stem + ".md", "w").write(md)
    try:
        plot(res, stem + ".png")
    except ImportError as e:  # no matplotlib on the GPU machine: re-draw with --plot-only
        print("no plot:", e)
    print(md)


if __name__ == "__main__":
    main()
