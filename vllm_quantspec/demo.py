"""The QuantSpec demo: the same prompts with and without QuantSpec, on the embedded default model.

    python -m vllm_quantspec.demo [--gamma 4] [--max-tokens 128]

It prints the generated text, the acceptance rate, the mean accepted length and tokens/s of each run,
all measured in this run. On a CPU the plugin runs its pure-torch reference path, which is slower than
vLLM's C++ CPU attention: the demo shows that it works and what it accepts, and says so; the speedups
are measured on the GPU by benchmarks/bench_e2e.py.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass

from vllm_quantspec.embedded_model import embedded_model_path

QUESTIONS = [
    "Explain what a hash map is and when you would use one.",
    "Write a Python function that returns the n-th Fibonacci number, with a short docstring.",
    "Summarize the plot of a heist story in a few sentences, then list its three main characters.",
    "What are the trade-offs between threads and processes for parallel work?",
]


@dataclass
class RunResult:
    label: str
    texts: list[str]
    tokens: int
    seconds: float
    drafts: int = 0
    draft_tokens: int = 0
    accepted: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def _counter(metrics, name: str) -> int:
    return int(sum(getattr(m, "value", 0) for m in metrics if m.name == name))


def run(label: str, llm_kwargs: dict, prompts: list[str], max_tokens: int) -> RunResult:
    from vllm import LLM, SamplingParams
    from vllm.distributed import cleanup_dist_env_and_memory

    print(f"[demo] {label}: starting vLLM ...", flush=True)
    llm = LLM(**llm_kwargs)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    chats = [[{"role": "user", "content": p}] for p in prompts]
    llm.chat(chats[:1], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up outside the timing
    before = llm.get_metrics()
    print(f"[demo] {label}: generating {len(prompts)} x {max_tokens} tokens ...", flush=True)
    start = time.perf_counter()
    outputs = llm.chat(chats, params, use_tqdm=True)
    seconds = time.perf_counter() - start
    after = llm.get_metrics()
    delta = {n: _counter(after, n) - _counter(before, n) for n in (
        "vllm:spec_decode_num_drafts", "vllm:spec_decode_num_draft_tokens", "vllm:spec_decode_num_accepted_tokens")}
    result = RunResult(label, [o.outputs[0].text for o in outputs], sum(len(o.outputs[0].token_ids) for o in outputs),
                       seconds, delta["vllm:spec_decode_num_drafts"], delta["vllm:spec_decode_num_draft_tokens"],
                       delta["vllm:spec_decode_num_accepted_tokens"])
    llm.llm_engine.engine_core.shutdown()
    del llm
    cleanup_dist_env_and_memory()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gamma", type=int, default=4, help="draft tokens per step (num_speculative_tokens)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--kv-group-size", type=int, default=128)
    args = parser.parse_args()

    import torch

    on_gpu = torch.cuda.is_available()
    if not on_gpu:  # vLLM on CPU: a bounded KV pool, and the engine in this process (3x faster on few cores)
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    model = embedded_model_path()
    common = dict(model=model, dtype="bfloat16" if on_gpu else "float32", max_model_len=2048, seed=0,
                  max_num_seqs=len(QUESTIONS), enforce_eager=not on_gpu, disable_log_stats=False)
    spec = {"method": "quantspec", "num_speculative_tokens": args.gamma, "kv_group_size": args.kv_group_size}
    runs = [
        run("vLLM (default attention, no speculation)", common, QUESTIONS, args.max_tokens),
        run(f"QuantSpec (gamma={args.gamma}, G={args.kv_group_size})", dict(common, speculative_config=spec),
            QUESTIONS, args.max_tokens),
    ]
    base, qs = runs
    print("\n" + "=" * 78)
    for question, text in zip(QUESTIONS, qs.texts):
        print(f"Q: {question}\nA (QuantSpec): {text.strip()}\n" + "-" * 78)
    rate = qs.accepted / qs.draft_tokens if qs.draft_tokens else 0.0
    mean_len = 1 + qs.accepted / qs.drafts if qs.drafts else 0.0
    print(f"model: {model} ({'GPU ' + torch.cuda.get_device_name() if on_gpu else 'CPU'})")
    print(f"{'run':<48} {'tokens':>7} {'seconds':>8} {'tok/s':>8}")
    for r in runs:
        print(f"{r.label:<48} {r.tokens:>7} {r.seconds:>8.2f} {r.tokens_per_s:>8.1f}")
    print(f"acceptance rate: {rate:.1%} ({qs.accepted}/{qs.draft_tokens} draft tokens); "
          f"mean accepted length: {mean_len:.2f} tokens per step (bonus token included)")
    same = sum(a == b for a, b in zip(base.texts, qs.texts))
    print(f"greedy texts identical to plain vLLM: {same}/{len(QUESTIONS)} (QuantSpec is lossless w.r.t. its "
          "INT8-KV target, not bit-exact to an fp KV cache)")
    if not on_gpu:
        print("note: on CPU the plugin runs its pure-torch reference kernels and an fp32 dequantized draft, so "
              "QuantSpec is slower here than vLLM's C++ CPU attention; the speedups are GPU results "
              "(benchmarks/results/).")


if __name__ == "__main__":
    main()
