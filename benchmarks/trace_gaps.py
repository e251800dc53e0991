"""Where a decode step's device time goes on the timeline: inside the replayed CUDA graph or between graphs.

Reads the Chrome traces that `profile_step.py --kernels --trace F.json.gz` writes. A graph's kernels carry the
correlation id of the cudaGraphLaunch that replayed them, so each replay is found exactly. Per decode step
(one replay to the next; the first and last replays of the trace are left out): the step's period, the
graph's span, busy time and idle time inside it, and the device work and idle time between graphs, with
the events that end the longest gaps there.

The trace is recorded under the profiler, which slows the host: the idle time between graphs is larger
than when the engine runs free. The graph's own numbers are device-side and hold free-running too.

Traces with host events (`bench_e2e.py --trace-dir`: vLLM's torch profiler in the engine core) also get the
host's side: per decode step (one cudaGraphLaunch call to the next), the host's period and its time in each
runtime call, annotated region and op by name (inclusive, so nested events count in each), the largest first.
A call that waits for the device (cudaStreamSynchronize, cudaEventSynchronize, a pageable copy) stands out.

    python benchmarks/trace_gaps.py kernel-trace-hierarchical-32768-h200.json.gz [more traces]
"""

import argparse
import gzip
import json
import statistics
import sys
from collections import defaultdict

DEVICE_EVENTS = ("kernel", "gpu_memcpy", "gpu_memset")


def graph_launches(events: list[dict]) -> set:
    """Correlation ids of the cudaGraphLaunch calls: a replayed graph's kernels carry their launch's."""
    return {e["args"]["correlation"] for e in events
            if e.get("cat") == "cuda_runtime" and e.get("name") == "cudaGraphLaunch"}


def steps(trace: dict) -> tuple[list[dict], dict[str, float]]:
    """Per decode step: period, graph span / busy / idle, between-graph busy / idle (µs); and the
    between-graph idle by the event that ends the gap, µs per step."""
    events = trace["traceEvents"]
    launches = graph_launches(events)
    device = sorted((e for e in events if e.get("ph") == "X" and e.get("cat") in DEVICE_EVENTS),
                    key=lambda e: e["ts"])
    replays = defaultdict(list)
    for i, e in enumerate(device):
        if e["args"].get("correlation") in launches:
            replays[e["args"]["correlation"]].append(i)
    order = sorted(replays.values(), key=lambda idx: device[idx[0]]["ts"])
    rows, gaps_by_next = [], defaultdict(float)
    for this, nxt in zip(order[1:-1], order[2:]):
        graph = [device[i] for i in this]
        span = graph[-1]["ts"] + graph[-1]["dur"] - graph[0]["ts"]
        busy = sum(e["dur"] for e in graph)
        between = device[this[-1]: nxt[0] + 1]  # last graph kernel, the work between, next graph's first
        idle_between = 0.0
        for a, b in zip(between, between[1:]):
            gap = max(0.0, b["ts"] - (a["ts"] + a["dur"]))
            idle_between += gap
            gaps_by_next[b["name"][:70]] += gap
        rows.append({"period": device[nxt[0]]["ts"] - graph[0]["ts"], "graph_kernels": len(graph),
                     "graph_span": span, "graph_busy": busy, "graph_idle": span - busy,
                     "between_busy": sum(e["dur"] for e in between[1:-1]), "between_idle": idle_between})
    n = max(1, len(rows))
    return rows, {k: v / n for k, v in gaps_by_next.items()}


def graph_kernels(trace: dict) -> list[tuple[float, str, str]]:
    """The replayed graphs' kernels by µs per replay, each with its launch (grid, block, registers per thread,
    shared memory; the same kernel compiled or launched otherwise shows here) and the spread of its single
    launches (µs: minimum, quartiles, maximum)."""
    events = trace["traceEvents"]
    launches = graph_launches(events)
    mine = [e for e in events if e.get("cat") == "kernel" and e["args"].get("correlation") in launches]
    n = max(1, len({e["args"]["correlation"] for e in mine}))
    us, launch, single = defaultdict(float), {}, defaultdict(list)
    for e in mine:
        name, a = e["name"][:70], e["args"]
        us[name] += e["dur"] / n
        single[name].append(e["dur"])
        launch[name] = (f"grid {a.get('grid')} block {a.get('block')} regs {a.get('registers per thread')} "
                        f"smem {a.get('shared memory')}")
    for k, durs in single.items():
        q = statistics.quantiles(durs, n=4) if len(durs) > 1 else durs * 3
        launch[k] += "; each " + " / ".join(f"{v:.1f}" for v in (min(durs), *q, max(durs)))
    return sorted(((v, k, launch[k]) for k, v in us.items()), reverse=True)


HOST_EVENTS = ("cuda_runtime", "cuda_driver", "user_annotation", "cpu_op")


def host_steps(trace: dict) -> tuple[int, float, dict[str, float]]:
    """Decode steps seen by the host (cudaGraphLaunch to the next, the first and last left out), their mean
    period (µs) and the µs per step of each host event name (inclusive)."""
    events = trace["traceEvents"]
    host = sorted((e for e in events if e.get("ph") == "X" and e.get("cat") in HOST_EVENTS), key=lambda e: e["ts"])
    launches = [e["ts"] for e in host if e["name"] == "cudaGraphLaunch"]
    if len(launches) < 4:
        return 0, 0.0, {}
    lo, hi = launches[1], launches[-1]
    by_name = defaultdict(float)
    for e in host:
        if lo <= e["ts"] < hi:
            by_name[f"{e['cat']}: {e['name'][:60]}"] += e["dur"]
    n = len(launches) - 2
    return n, (hi - lo) / n, {k: v / n for k, v in by_name.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("traces", nargs="+")
    args = ap.parse_args()
    print(f"command: python {' '.join(sys.argv)}")
    for path in args.traces:
        trace = json.load(gzip.open(path))
        device = trace.get("deviceProperties", [{}])[0].get("name", "unknown device")
        print(f"{path}: {device}, CUDA runtime {trace.get('cuda_runtime_version')}, CUPTI {trace.get('cupti_version')}")
        rows, gaps = steps(trace)
        if not rows:
            print("  fewer than three CUDA-graph replays")
            continue
        mean = {k: statistics.fmean(r[k] for r in rows) for k in rows[0]}
        print(f"  {len(rows)} decode steps, µs per step (mean)")
        print("  " + "  ".join(f"{k} {v:.0f}" for k, v in mean.items()))
        print("  the graph's kernels, µs per step (the longest):")
        for us, name, launch in graph_kernels(trace)[:6]:
            print(f"    {us:8.1f}  {name}  ({launch})")
        print("  between graphs, idle by the event that ends the gap:")
        for name, us in sorted(gaps.items(), key=lambda kv: -kv[1])[:6]:
            print(f"    {us:8.1f}  {name}")
        n, period, by_name = host_steps(trace)
        if n:
            print(f"  host: {n} decode steps, {period:.0f} µs per step (launch to launch); µs per step by event:")
            for name, us in sorted(by_name.items(), key=lambda kv: -kv[1])[:18]:
                print(f"    {us:8.1f}  {name}")


if __name__ == "__main__":
    main()
