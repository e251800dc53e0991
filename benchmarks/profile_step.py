"""Where a decode step's time goes: torch.profiler over a few decode steps of one method.

    python benchmarks/profile_step.py --method hierarchical|quantspec|bf16 [--ctx 32768] [--steps 16]

Prints the step's wall time, the GPU-busy time and the top host-side and device-side operations, so
host overhead (Python, launches, syncs) can be told apart from kernel time.
"""

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from bench_e2e import LLAMA_8B, method_kwargs  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--method", default="hierarchical")
    p.add_argument("--ctx", type=int, default=32768)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--accept-length", type=float, default=3.44)
    args = p.parse_args()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine and worker in this process, so the profiler sees them
    import torch
    from vllm import LLM, SamplingParams

    d = tempfile.mkdtemp()
    json.dump(LLAMA_8B, open(os.path.join(d, "config.json"), "w"))
    llm = LLM(model=d, load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
              max_model_len=args.ctx + 256, gpu_memory_utilization=0.88, enable_prefix_caching=False,
              max_num_seqs=1, **method_kwargs(args.method, 4, args.accept_length, d))
    prompt = [{"prompt_token_ids": torch.randint(1000, 120000, (args.ctx,)).tolist()}]

    def gen(n: int) -> float:
        torch.cuda.synchronize()
        t = time.perf_counter()
        llm.generate(prompt, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, detokenize=False),
                     use_tqdm=False)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    gen(2)
    t1, tn = gen(1), gen(args.steps + 1)
    print(f"[{args.method}] ctx {args.ctx}: {(tn - t1) / args.steps * 1e3:.2f} ms per generated token", flush=True)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        wall = gen(args.steps + 1)
    events = prof.key_averages()
    gpu_us = sum(e.self_device_time_total for e in events)
    print(f"[{args.method}] profiled {args.steps + 1} tokens (prefill included): wall {wall * 1e3:.1f} ms, "
          f"GPU busy {gpu_us / 1e3:.1f} ms", flush=True)
    print(events.table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=60), flush=True)
    print(events.table(sort_by="self_device_time_total", row_limit=12, max_name_column_width=60), flush=True)


if __name__ == "__main__":
    main()
