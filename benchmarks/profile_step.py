"""Where a decode step's time goes, on the Llama-3.1-8B shape (dummy weights), batch 1.

    python benchmarks/profile_step.py --method quantspec|hierarchical|bf16 [--ctx 32768] [--steps 32] [--(no-)async-scheduling]
        [--profile]

Phases: the engine runs in this process, and the model runner's step (execute_model + sample_tokens)
and, for QuantSpec, the proposer's γ draft steps are timed with a device sync at each boundary. A
QuantSpec step is then: draft (γ single-token draft forwards) + the rest, itself split into
execute_model (the target's verify forward with its input and metadata preparation) and
sample_tokens minus the draft (rejection sampling and bookkeeping). The syncs cost the overlap of
host and device work, so phase times add up to a bit more than the free-running ms/token printed
first. --profile adds torch.profiler tables (host and device operations) over the same steps.
--kernels: the device time of each kernel per generated token in decode alone: two generations under
torch.profiler, 2 tokens and 2 + steps (the same prefill), differenced per kernel name; with the device's
idle time and the host's launch calls per token (--trace FILE.json.gz: the device timeline too).
"""

import argparse
import json
import os
import sys
import tempfile
import time
from collections import defaultdict

sys.path.insert(0, os.path.dirname(__file__))
from bench_e2e import LLAMA_8B, method_kwargs  # noqa: E402


def timed_phases(obj, names, totals, state, sync):
    """Wrap obj's methods so each call during a decode step (state["decode"], set by the wrapped
    execute_model from its scheduler output) adds its synchronized wall time to totals[name]."""
    for name in names:
        inner = getattr(obj, name)

        def wrapper(*a, _inner=inner, _name=name, **k):
            if _name == "execute_model":
                state["decode"] = a[0].total_num_scheduled_tokens <= state["max_decode_tokens"]
            sync()
            t = time.perf_counter()
            out = _inner(*a, **k)
            sync()
            if state["decode"]:
                totals[_name] += time.perf_counter() - t
                totals[_name + " calls"] += 1
            return out

        setattr(obj, name, wrapper)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="hierarchical")
    p.add_argument("--ctx", type=int, default=32768)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--gamma", type=int, default=4)
    p.add_argument("--accept-length", type=float, default=3.44)
    p.add_argument("--quantspec-options", default="{}")
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction,
                   help="quantspec (or draft_model) with async_scheduling True / False (default: vLLM's)")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--kernels", action="store_true", help="per-kernel device time per decode token")
    p.add_argument("--trace", help="with --kernels: write the device timeline of the decode window's generation "
                                   "here (Chrome trace, .json.gz)")
    p.add_argument("--model", help="a real HF model directory instead of the 8B shape (CPU dry runs)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--max-model-len", type=int, help="the engine's (default ctx + 256; bench_e2e's engines take "
                                                     "131072 for their 128k points)")
    args = p.parse_args()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine and worker in this process
    import torch
    import vllm
    from vllm import LLM, SamplingParams

    import bench_e2e

    bench_e2e.QUANTSPEC_OPTIONS.update(json.loads(args.quantspec_options))
    cuda = torch.cuda.is_available()
    print(f"device: {torch.cuda.get_device_name() if cuda else 'cpu'}  vllm {vllm.__version__}  "
          f"torch {torch.__version__}\ncommand: python {' '.join(sys.argv)}", flush=True)
    d = args.model
    if d is None:
        d = tempfile.mkdtemp()
        json.dump(LLAMA_8B, open(os.path.join(d, "config.json"), "w"))
    dd = tempfile.mkdtemp()
    json.dump(bench_e2e.LLAMA_1B, open(os.path.join(dd, "config.json"), "w"))
    # dummy weights: pin the acceptance (a real model accepts what it accepts)
    synthetic = None if args.model else {"rejection_sample_method": "synthetic",
                                         "synthetic_acceptance_length": args.accept_length}
    llm = LLM(model=d, load_format="auto" if args.model else "dummy", skip_tokenizer_init=True, dtype=args.dtype,
              max_model_len=args.max_model_len or args.ctx + 256, gpu_memory_utilization=0.88, enable_prefix_caching=False,
              max_num_seqs=1, enforce_eager=args.enforce_eager,
              **method_kwargs(args.method, args.gamma, synthetic, dd, args.async_scheduling))
    vocab = json.load(open(os.path.join(d, "config.json")))["vocab_size"]
    prompt = [{"prompt_token_ids": torch.randint(1000, vocab, (args.ctx,)).tolist()}]
    ms, _ = bench_e2e.decode_timing(llm, prompt, 8)  # warm-up
    ms, _ = bench_e2e.decode_timing(llm, prompt, args.steps + 1)
    print(f"[{args.method}] ctx {args.ctx}: {ms:.2f} ms per generated token (free-running)", flush=True)

    runner = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner
    totals, state = defaultdict(float), {"decode": False, "max_decode_tokens": 1 + args.gamma}
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    timed_phases(runner, ("execute_model", "sample_tokens"), totals, state, sync)
    drafter = getattr(runner, "drafter", None)
    if drafter is not None:
        timed_phases(drafter, ("propose",), totals, state, sync)
    ms_sync, _ = bench_e2e.decode_timing(llm, prompt, args.steps + 1)
    steps = totals["execute_model calls"]
    step = (totals["execute_model"] + totals["sample_tokens"]) / steps * 1e3
    draft = totals["propose"] / steps * 1e3
    print(json.dumps({"method": args.method, "ctx": args.ctx, "gamma": args.gamma if drafter else 0,
                      "async_scheduling": llm.llm_engine.vllm_config.scheduler_config.async_scheduling,
                      "ms_per_token_free": round(ms, 3), "ms_per_token_synced": round(ms_sync, 3),
                      "decode_steps": int(steps), "tokens_per_step": round(step / ms_sync, 2), "step_ms": round(step, 3), "draft_ms": round(draft, 3),
                      "draft_forward_ms": round(draft / args.gamma, 3) if drafter else None,
                      "rest_ms": round(step - draft, 3),
                      # the rest, split: the target's forward (verify for QuantSpec) with its input and
                      # metadata preparation, then sampling / rejection and bookkeeping outside the draft
                      "execute_model_ms": round(totals["execute_model"] / steps * 1e3, 3),
                      "sample_tokens_minus_draft_ms": round((totals["sample_tokens"] - totals["propose"]) / steps * 1e3, 3)}),
          flush=True)
    if args.kernels:
        print_kernel_times(llm, prompt, args.steps, args.method, args.ctx, ms, args.trace)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            bench_e2e.decode_timing(llm, prompt, args.steps + 1)
        events = prof.key_averages()
        print(events.table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=60), flush=True)
        print(events.table(sort_by="self_device_time_total", row_limit=12, max_name_column_width=60), flush=True)


def print_kernel_times(llm, prompt, steps: int, method: str, ctx: int, ms_free: float, trace: str | None = None) -> None:
    """Device time per generated token by kernel name, decode only: a generation of 2 + steps tokens
    minus one of 2 (same prompt, same prefill), under torch.profiler (kernels replayed from CUDA
    graphs included: CUPTI records them one by one). Also per token: the device's idle time (gaps
    in the union of all its activity) by the kernel that ends each gap, and the host's launch calls.
    Kernels and gaps come from device-only profiling (host events would slow the host and widen the
    gaps); the launch calls from a second pair of generations that records host events too. `trace`:
    the device-only timeline of the longer generation as a Chrome trace (.json.gz)."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    from vllm import SamplingParams

    launches = ("cudaGraphLaunch", "cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaMemcpyAsync")

    def measure(n: int, host: bool, trace: str | None = None) -> dict[str, dict[str, float]]:
        """us of each kernel, its count and the idle us before it; with host, the host's launch calls."""
        sp = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, detokenize=False)
        device = ProfilerActivity.CUDA if torch.cuda.is_available() else ProfilerActivity.CPU  # CPU: dry runs
        with profile(activities=list({device, *([ProfilerActivity.CPU] if host else [])})) as prof:
            llm.generate(prompt, sp, use_tqdm=False)
        if trace:
            prof.export_chrome_trace(trace)
        m = {key: defaultdict(float) for key in ("busy", "count", "idle", "calls")}
        end = None
        for e in sorted((e for e in prof.events() if e.device_type == DeviceType.CUDA), key=lambda e: e.time_range.start):
            m["busy"][e.name] += e.time_range.elapsed_us()
            m["count"][e.name] += 1
            if end is not None and e.time_range.start > end:
                m["idle"][e.name] += e.time_range.start - end
            end = e.time_range.end if end is None else max(end, e.time_range.end)
        for e in prof.events():
            if e.device_type == DeviceType.CPU and e.name in launches:
                m["calls"][e.name] += 1
        return m

    base, full = measure(2, False), measure(2 + steps, False, trace)
    host_base, host_full = measure(2, True), measure(2 + steps, True)
    base["calls"], full["calls"] = host_base["calls"], host_full["calls"]

    def per_token(key: str) -> list[tuple[float, str]]:
        return sorted((((v - base[key].get(k, 0.0)) / steps, k) for k, v in full[key].items()), reverse=True)

    runner = "V2" if llm.llm_engine.vllm_config.use_v2_model_runner else "V1"
    kernels, gaps, host = per_token("busy"), per_token("idle"), per_token("calls")
    counts = dict((k, n) for n, k in per_token("count"))
    total, total_idle = sum(us for us, _ in kernels), sum(us for us, _ in gaps)
    print(f"[{method}] ctx {ctx}, model runner {runner}: decode device time per token {total / 1e3:.3f} ms, "
          f"idle {total_idle / 1e3:.3f} ms (free-running {ms_free:.2f} ms per token); by kernel, per token:", flush=True)
    print(f"{'us':>9} {'calls':>7}  kernel")
    for us, name in kernels:
        if us >= 1.0:
            print(f"{us:9.1f} {counts[name]:7.1f}  {name[:110]}")
    print(f" idle us per token, by the kernel that ends the gap:")
    for us, name in gaps[:12]:
        print(f"{us:9.1f}  {name[:110]}")
    print(" host launch calls per token: " + ", ".join(f"{name} {n:.1f}" for n, name in host))
    print(json.dumps({"method": method, "ctx": ctx, "model_runner": runner, "device_ms_per_token": round(total / 1e3, 3),
                      "idle_ms_per_token": round(total_idle / 1e3, 3), "ms_per_token_free": round(ms_free, 3),
                      "kernels_us_per_token": {name[:110]: round(us, 2) for us, name in kernels if us >= 1.0},
                      "idle_us_per_token_by_next_kernel": {name[:110]: round(us, 2) for us, name in gaps[:12]},
                      "host_launch_calls_per_token": {name: round(n, 2) for n, name in host}}),
          flush=True)


if __name__ == "__main__":
    main()
