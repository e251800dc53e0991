#!/bin/bash
# The GPU runs behind benchmarks/results/*-h200*, one step per device call (each at most 10 minutes; the
# machine stays warm 30 s between calls, so the steps run back to back). Every step writes its results to
# /tmp/runs, which lasts while the machine stays warm (a later step resumes from it), and copies them to
# $OUT, which comes back. A step whose --time-budget stopped it before its last engine is run again in
# the next call and resumes (--resume).
#
#   calls 1-3 (carrying .gpu/p1, p2, p3): bash .gpu/pN/stage.sh; the third then runs `kernels`
#   call 4 (carrying .gpu/m1):            bash .gpu/m1/stage.sh && bash benchmarks/gpu_runs.sh plain
#   call 5 (carrying .gpu/m2):            bash .gpu/m2/stage.sh && bash benchmarks/gpu_runs.sh real
#   call 6:                               bash benchmarks/gpu_runs.sh speculative
#   later (carrying .gpu/q01..q22 in 22 calls, then): bash benchmarks/gpu_runs.sh qwen (twice: it resumes)
#   fourth session: calls 1-3 stage vLLM, then `baselines` (twice if its time budget stops it), `phases`, `b8`;
#   then on a fresh machine (calls 1-3 again) `verify`
#   fifth session: calls 1-3 stage vLLM, then `verify`; .gpu/q01..q22; calls 1-3 again (the machine had been
#   given back), then `qwen` (cut by the call's limit during QuantSpec γ=4, resumed by hand: γ 2 and 8 not run)
#   sixth session: calls 1-3, then `async`; .gpu/m1, .gpu/m2 (SmolLM2), then `tests`, `agreement` (default and
#   batch-invariant, before the kernel fix); no device time was left for `b8`
#   seventh session: calls 1-3, .gpu/m1, .gpu/m2, then `agreement` (it did not stage SmolLM2 then: fixed;
#   its synchronous run hit its 280 s timeout, the async one passed: now one step each), `b8` (n_out 32 too
#   few: the batch was not full when timed, rows not kept; bench_e2e now refuses that), `gamma` (γ 2 and 1
#   done, cut by the call's limit before γ 4)
#   eighth session: calls 1-3 (the third also `part-b quantspec`, 451 s), `part-b bf16` (192 s), `part-b fp8`
#   (237 s), .gpu/m1 + `part-b draft_model` (228 s), .gpu/m2 + the real-gammas runs by hand with shorter budgets
#   (bf16, fp8 KV and ngram done; the QuantSpec engines not reached: device time)
#   ninth session: calls 1-3 (the third also `tune`), the kernels' GPU tests; after the split-count change, calls 1-3
#   again (the third also `batch1`), .gpu/m1, .gpu/m2 + `real-gammas 4`, `real-gammas 2,8`
#   tenth session (one refused start, 91 s): calls 1-3 (the third also `ncu`), `tune`, .gpu/m1, .gpu/m2 + `tests`,
#   `b8`, `batch1`, then the target-only batch-1 run by hand (e2e-target-only-h200; device time spent)
#   eleventh session: calls 1-3, the third with the kernels' GPU tests only (the 2-warp default; 32 passed), .gpu/q01..q22,
#   `qwen` (killed by the call's limit as its γ=2 engine started: fixed), γ 2,8 resumed by hand, `batch1` (device time spent)
#   twelfth session: calls 1-3, the third with `tune` (GPU tests of the 2-warp target-only INT8 decode, then the sweep),
#   `target-only` (438 s), .gpu/m1, .gpu/m2 + `tests` (221 s), `agreement` (synchronous, 218 s), then twice by hand
#   the hierarchical engine at 1 x 32k / 128k (e2e-target-only-repeat*; the 4-warp A/B beside it failed: a bad sed)
#   thirteenth session (two refused starts): calls 1-3, the third with `kernel-tests` and `kernel-times`; calls 1-3
#   again, the third with `kernel-times bf16` under VLLM_USE_V2_MODEL_RUNNER=0 and `kernel-times fp8`; calls 1-3, the third
#   with `kernel-times` under VLLM_USE_V2_MODEL_RUNNER=0 (hierarchical and bf16 on the same runner); after the fused
#   decode metadata, calls 1-3, the third with `target-only-b1` (device time for no more)
#   fourteenth session: calls 1-3, the third with `kernel-times hierarchical,fp8,bf16` (traces: trace_gaps.py); calls 1-3
#   again, the third with `kernel-tests` (39 passed, the metadata kernel's first on record), `batch1`, `target-only-b1`;
#   calls 1-3 again, the third the hierarchical engine by hand with each batch-1 point repeated (e2e-repeat-points-h200)
#   fifteenth session: calls 1-3 on branch v2-runner, the third with `v2-check`; calls 1-3, the third with `runner-check`
#   (profile_step's engine refused --max-model-len 131136: vLLM caps it at 131072), `engine-trace`; no device time left
#   sixteenth session (three refused calls): calls 1-3, the third with `context-check` (the second CUDA context was the
#   slowdown), `batch1`, `target-only-b1` and `kernel-tests` in one call (device time spent)
#   seventeenth session: calls 1-3, the third with `target-only`; `tests` (before .gpu/m1, m2: its backend part found no
#   model), `part-b quantspec`, `part-b bf16,fp8` (cut by the call's limit during fp8); device time spent
#   eighteenth session (one refused start): calls 1-3, the third with `part-b quantspec`; the machine was released before
#   the next call (a fresh one started, 117 s), so calls 1-3 again, the third with `part-b bf16,fp8` on QuantSpec's rows
#   carried over by hand; .gpu/m1, .gpu/m2 + `tests` (killed by its 420 s limit in the backend suite, no output back:
#   now written to $OUT as it runs); device time spent before `part-b draft_model`
#   nineteenth session: calls 1-3, the third with `part-b quantspec`; `part-b bf16,fp8`, `part-b draft_model` (the grid
#   on one machine), .gpu/m1, .gpu/m2 + `backend-tests` (233 s), `kernel-tests` (154 s)
#   twentieth session: benchmarks/tune_gemv.py twice on a bare machine (no vLLM); calls 1-3, the third with `gemv`;
#   `batch1-gemv`, `batch1-gemv marlin` (both with the draft padded to 5 tokens at batch 1, so the GEMV never ran: fixed),
#   again after the fix; .gpu/m1, .gpu/m2 + `gemv-acceptance true`
#   twenty-first session: calls 1-3 (`gemv`), `batch1-gemv`, .gpu/m1, .gpu/m2 + `gemv-acceptance true,false` (false failed
#   at start, twice), `backend-tests`, `kernel-tests`
#   twenty-second session: calls 1-3 (`gemv`: the persistent GEMV slower, removed), .gpu/m1, .gpu/m2 + `gemv-acceptance
#   false` (started this time), `kernel-times quantspec 4096 gemv`, `agreement-async`; after the bf16x2 GEMV, a fresh
#   machine: calls 1-3 (`gemv`), `batch1-gemv`; the 142 s left could not start another machine for .gpu/m1, .gpu/m2 +
#   `gemv-acceptance true`
#   twenty-third session: calls 1-3 (`gemv`), .gpu/m1, .gpu/m2 + `gemv-acceptance true`, `kernel-tests` and
#   `backend-tests` in one call; after the GEMV became the default, a fresh machine: calls 1-3, the third with the
#   GEMV's GPU tests (pytest -m gpu tests/test_kernels_gemv.py) and `batch1-gemv default`, .gpu/m1, .gpu/m2 +
#   `agreement-async`
#   twenty-fourth session: calls 1-3, the third with `attention-ab 4b614a3` (then one baseline: the first variant,
#   bff903b, against 4b614a3; its file's labels came from the device's stale git metadata, so the labels are
#   arguments now; not kept); a fresh machine: calls 1-3, the third with `NO_TESTS=1 attention-ab 68f40fd 4b614a3 U Y`,
#   then `kernel-tests` and `batch1-gemv default` in one call (on U, committed as 0ded1cb), `target-only`, .gpu/m1,
#   .gpu/m2 + `backend-tests` (device time spent)
#   twenty-fifth session: calls 1-3, the third with `NO_TESTS=1 attention-ab 0ded1cb R168 R128` (register caps, not
#   kept), .gpu/m1, .gpu/m2 + `agreement-async`; a fresh machine: calls 1-3, the third with `attention-ab S 0ded1cb T`
#   (the transposed page loop); a fresh machine: calls 1-3, the third with `kernel-tests` and `target-only` (5d793a9),
#   then `b8` under `timeout 200` (cut by the device time left before its first engine finished: nothing came back)
#   twenty-sixth session: calls 1-3, the third with `b8` (470 s), `batch1-gemv default`, .gpu/m1, .gpu/m2 +
#   `backend-tests`, `tune`; after the one-warp draft launch (33c93a3), a fresh machine: calls 1-3, the third with
#   bench_e2e.py's QuantSpec engine alone at 1 x 128k by hand (e2e-onewarp-128k-h200; device time spent).
#   `long-prompts` (test_prompts_up_to_128k) written after that
#   twenty-seventh session: calls 1-3, the third with `kernel-tests`; .gpu/m1, .gpu/m2 + `long-prompts` (failed in the test's
#   flush recorder during CUDA graph capture: fixed), `long-prompts` again (passed), `backend-tests`, `batch1-gemv default`
#   (cdaa6d3: e2e-batch1-onewarp-h200); after draft_launch_bound (c70198f), one refused start, a fresh machine: calls 1-3,
#   the third with `batch1-gemv default` (device time spent)
#   twenty-eighth session: no machine lent (the first call refused, loans paused); planned for the next: calls 1-3, the
#   third with `kernel-times quantspec,bf16 4096 default`, then `kernel-times quantspec,bf16 131072 default`, .gpu/m1,
#   .gpu/m2 + `backend-tests`, `long-prompts`
#
#   kernels      pytest -m gpu on the kernels, then bench_kernels.py (attention, prefill, W4A16 linears)
#   plain        bench_e2e.py synthetic part, the methods without a draft (bf16, fp8, hierarchical)
#   real         the SmolLM2 model, the backend's GPU test suite, bench_e2e.py's real part
#   speculative  bench_e2e.py synthetic part resumed: QuantSpec and draft_model at the acceptance the
#                real part measured; then kv-backend from those rows, and profile_step.py's phases
#   baselines    one fresh run: QuantSpec (Marlin draft linears), draft_model, bf16 and fp8 KV at batch 1 over
#                4k-128k and at batch 4 (32k) and 16 (4k), at the acceptance e2e-real-h200 measured
#   phases       profile_step.py: a QuantSpec step's draft and verify phases at 4k and 32k
#   verify       profile_step.py at 4k: QuantSpec's step split further, and a target-only step over the same cache
#   async        profile_step.py at 4k and 32k: QuantSpec with and without async scheduling, and bf16 at 4k
#   gamma        bench_e2e.py synthetic, batch 1, 4k/32k/128k: QuantSpec under async scheduling at γ 2, 1 and 4, each
#                at the acceptance of the first γ positions measured at γ=4 (e2e-real-h200), and bf16, one run
#   tests        the kernels' GPU tests and batch-invariance test; SmolLM2 staged, the backend's GPU suite
#   backend-tests  SmolLM2 staged, the backend's GPU suite alone (its log to $OUT as it runs)
#   agreement    SmolLM2: greedy QuantSpec (synchronous) vs target-only, 32 prompts x 128 tokens, batch-invariant
#                (the sixth session ran the default mode); agreement-async: QuantSpec under async scheduling
#   cache        the Triton and vLLM compile caches to $OUT/compile-cache.tgz.part-* (last call of a session); the
#                next session puts them in .gpu/cache/ and carries that folder with a call before its first engine
#   kernel-tests the kernels' GPU tests alone
#   long-prompts SmolLM2: prompts of up to 128k tokens through the hierarchical cache, vLLM's default backend and
#                QuantSpec (the backend suite's test_prompts_up_to_128k; .gpu/m1, .gpu/m2 first)
#   attention-ab THIS REF [OTHER...]  the kernels' GPU tests, then attention_ab.py: the working tree's attention kernel
#                against REF's and OTHERs' (carried as .gpu/ab/NAME.py) at the engine's launches, FA3 beside them, one run
#   kernel-times [METHODS [CTX [gemv|default]]]  profile_step.py --kernels: device time per decode token by kernel, batch 1
#   tune         the kernels' GPU tests, then tune_attention.py --quick: the attention kernel's warps, register cap,
#                page tile and split count swept at the engine's launches
#   ncu          Nsight Compute on the attention kernel's default launches at 1 x 128k (stall reasons, occupancy, and
#                sampled stalls per SASS instruction)
#   b8           the hierarchical cache and fp8 KV at batch 8 x 128k (bf16 KV cannot hold 8 x 128k tokens)
#   target-only  the hierarchical cache, bf16 and fp8 KV (target only) at batch 1 x 32k-128k and 8 x 32k / 64k, one
#                run (twice if its budget stops it: it resumes), then kv-backend-h200 reassembled
#   target-only-b1  `target-only`'s batch-1 points at 32k and 128k (after the metadata kernel's GPU test)
#   runner-check  the hierarchical cache at batch 1 x 32k: profile_step.py's engine at max_model_len 131k (device timeline);
#                bench_e2e.py's at max_model_len 33k, and in-process
#   engine-trace the hierarchical cache and bf16 (V1 runner) at 1 x 32k in bench_e2e.py's engine (its own process), then one
#                generation under vLLM's torch profiler each: trace_gaps.py's host and device side of a decode step
#   context-check  the hierarchical cache (1 x 32k / 128k, engine core in its own process) with and without a second CUDA
#                context on the GPU (bench_e2e.py --frontend-cuda-context), and fp8 KV
#   v2-check     (branch v2-runner) bench_e2e.py at batch 1 x 32k / 128k: the hierarchical cache on the V2 model runner
#                and on V1, fp8 KV (V2), bf16 on V1
#   target-only-twice  the hierarchical engine of `target-only` twice in one call (engine-to-engine spread)
#   real-gammas G  SmolLM2, bench_e2e.py's real part, 1k-8k, one run in two calls: G=4 bf16, fp8 KV, ngram and
#                QuantSpec at γ=4; G=2,8 QuantSpec at γ 2 and 8
#   part-b M     issue 5's synthetic part in one run (a call per engine group M): QuantSpec (γ=4, vLLM's default
#                scheduling), bf16, fp8 KV and draft_model at batch 1, 4 and 16 x 4k-128k
#   batch1 [lm-head]  bench_e2e.py synthetic, batch 1 x 4k-128k: QuantSpec (γ=4) and bf16, as part-b runs them
#                (lm-head: the draft with an int4 lm_head)
#   gemv         the W4A16 GEMV (kernels/w4a16_gemv.py): its GPU tests, then tune_gemv.py (tiles of both arithmetic modes
#                at M = 1, 2, 4, and 8 layers' linears in one CUDA graph, against bf16 and vLLM's Marlin in the same run)
#   batch1-gemv [marlin|lm-head|default]  `batch1`'s points at 4k / 32k / 128k: QuantSpec with the draft's batch-1 linears
#                on the GEMV (draft_gemv) and bf16 in one run; `marlin`: QuantSpec on Marlin alone (the A/B, same machine);
#                `default`: QuantSpec with no options (the GEMV on by default since the twenty-third session) and bf16
#   gemv-acceptance [true|false]  SmolLM2 (staged), bench_e2e.py's real part at γ=4, 1k-8k: QuantSpec with and (or)
#                without draft_gemv
#   qwen         Qwen2.5-Coder-1.5B (benchmarks/qwen_model.sh stage): bench_e2e.py's real part, 1k-32k, bf16,
#                fp8, ngram (γ=4) and QuantSpec (γ 2, 4, 8)
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source /tmp/stage/env.sh
# An earlier call that the device's limit killed can leave engine processes holding the GPU (vLLM's engine
# core is a process of its own); a step starts on an idle GPU.
free_gpu() {
  local left_over
  left_over=$(nvidia-smi --query-compute-apps=pid --format=csv,noheader 2>/dev/null)
  if [ -n "$left_over" ]; then
    echo "killing processes left on the GPU by an earlier engine: $(echo $left_over)"
    kill -9 $left_over 2>/dev/null; sleep 3
  fi
}
free_gpu
RUNS=/tmp/runs
OUT="${OUT:-/tmp/out}"
mkdir -p "$RUNS" "$OUT"
# Compile caches from an earlier session (the `cache` step's compile-cache.tgz.part-*, put in .gpu/cache and
# carried with a call): Triton's kernels (ours may be much of QuantSpec's engine start, 143 s against bf16's
# 56 s in e2e-part-b-h200) and vLLM's compiled graphs. Their entries are keyed by source, configuration
# and target, so a stale one is a miss.
COMPILE_CACHES=("$HOME/.triton/cache" "$HOME/.cache/vllm/torch_compile_cache")
if compgen -G ".gpu/cache/compile-cache.tgz.part-*" >/dev/null && [ ! -f /tmp/.compile-cache-restored ]; then
  cat .gpu/cache/compile-cache.tgz.part-* | tar -xzP && touch /tmp/.compile-cache-restored && echo "compile caches restored"
fi
# batch 1 at every context; batches 4, 8 and 16 where their prefill fits the device time of a session
POINTS=1x4096,1x32768,1x65536,1x131072,4x4096,4x32768,8x4096,8x32768,8x65536,16x4096
E2E=(python benchmarks/bench_e2e.py --part synthetic --points "$POINTS" --n-out 64 --out "$RUNS" --resume)
MODEL=/tmp/stage-model/models/smollm2-135m-instruct

out() { cp "$@" "$OUT"/ 2>/dev/null; true; }
# out_renamed RUN_STEM NAME: a run's result files (RUN_STEM.json/.md/.png) to $OUT as NAME.json/.md/.png
out_renamed() { for f in "$1".*; do cp "$f" "$OUT/$2.${f##*.}"; done; }
# issue 4's target-only points (`target-only`, and `target-only-twice` runs the same engine)
TARGET_POINTS=1x32768,1x65536,1x131072,8x32768,8x65536
# the kernels' GPU tests (real shapes, G=128, bf16)
kernel_tests() {
  timeout 200 python -m pytest -m gpu -q -p no:cacheprovider tests/test_kernels_attention.py tests/test_kernels_write.py \
    tests/test_kernels_metadata.py \
    2>&1 | tail -15 | tee "$RUNS/pytest-kernels-h200.txt"
}
# SmolLM2 to $MODEL (benchmarks/gpu_model.sh stage; after .gpu/m1 and .gpu/m2), or stop the step: whatever
# follows needs it (the seventeenth session's `tests` ran its kernel tests first and only then found it missing)
stage_model() { bash benchmarks/gpu_model.sh stage >/dev/null || exit 1; }
# the backend's bf16 engine suite on the staged SmolLM2 (stage_model first)
# Its whole log goes to $OUT as it is written (python -u, tee), so a call that the device's limit kills still brings
# back how far it got (the eighteenth session's `tests` was killed inside this suite and brought back nothing).
# (without test_prompts_up_to_128k: three engines over 200k prompt tokens, a step of its own, `long-prompts`)
backend_tests() {
  QUANTSPEC_GPU_MODEL=$MODEL timeout 300 python -u -m pytest -m gpu -v -p no:cacheprovider -x -k "not 128k" \
    tests/test_hierarchical_kv_backend_gpu.py 2>&1 | tee "$OUT/pytest-backend-h200.log" | tail -15 \
    | tee "$RUNS/pytest-backend-h200.txt"
}

# traced NAME METHOD [VAR=VALUE...]: bench_e2e.py's engine of METHOD at 1 x 32k under that environment, then one
# generation under vLLM's torch profiler (--trace-dir); its trace and JSON to $OUT as
# engine-trace-NAME-32768-h200.json.gz and engine-trace-NAME.json
traced() {
  local name=$1 method=$2
  shift 2
  env "$@" timeout 200 python benchmarks/bench_e2e.py --part synthetic --points 1x32768 --methods "$method" \
    --accept-length 1 --n-out 64 --out "$RUNS/trace-$name" --trace-dir "$RUNS/trace-$name/torch" 2>&1 \
    | grep -E '^\| (hier|bf16)|done|Error'
  free_gpu
  cp "$(ls -S "$RUNS/trace-$name/torch"/*.json.gz | head -1)" "$OUT/engine-trace-$name-32768-h200.json.gz"
  cp "$RUNS/trace-$name/e2e-h200.json" "$OUT/engine-trace-$name.json"
}

# measured faster than Machete at M <= 8 (kernels-h200); without the GEMV, as every run with it before the
# twenty-third session (draft_gemv then defaulted to false)
MARLIN='{"draft_linear_backend": "marlin", "draft_gemv": false}'
# the synthetic acceptance of the committed baselines run: phases and verify profile at the same rate
accept_length() { python -c "import json; print(json.load(open('benchmarks/results/e2e-baselines-h200.json'))['accept_length'])"; }
# profile_step.py ARGS... at that acceptance with Marlin draft linears, its result lines only
profile() {
  timeout 170 python benchmarks/profile_step.py "$@" --accept-length "$(accept_length)" --quantspec-options "$MARLIN" \
    2>&1 | grep -E '^(device|command|\[|\{)'
}
case "${1:?step: ncu | kernels | plain | real | speculative | baselines | phases | verify | async | gamma | tests | agreement | agreement-async | cache | tune | kernel-tests | kernel-times | b8 | target-only | target-only-b1 | runner-check | engine-trace | context-check | v2-check | target-only-twice | batch1 | part-b | real-gammas | qwen | gemv | batch1-gemv | gemv-acceptance | attention-ab}" in
  kernels)
    kernel_tests
    timeout 400 python benchmarks/bench_kernels.py --out-dir "$RUNS" 2>&1 | grep -v '^{' | tail -60
    out "$RUNS"/pytest-kernels-h200.txt "$RUNS"/kernels-h200.*
    ;;
  plain)
    "${E2E[@]}" --methods bf16,fp8,hierarchical --accept-length 1 --time-budget 380 2>&1 | grep -v '^{'
    out "$RUNS"/e2e-h200.*
    ;;
  real)
    stage_model
    backend_tests
    python benchmarks/bench_e2e.py --part real --model "$MODEL" --methods bf16,ngram,quantspec --gammas 4 \
      --ctxs 1024,4096,8192 --out "$RUNS" --resume 2>&1 | grep -v '^{' | tail -30
    out "$RUNS"/pytest-backend-h200.txt "$RUNS"/e2e-real-h200.*
    ;;
  real-gammas)
    # issue 5's real grid on SmolLM2 (its context ends at 8k) in one run, two calls (a SmolLM2 engine takes about
    # 70 s): `real-gammas 4` runs bf16, fp8 KV, ngram and QuantSpec at γ=4, `real-gammas 2,8` QuantSpec at γ 2 and 8
    # (the second call lists γ=4 and the baselines again: --resume skips the engines the first one finished)
    stage_model
    gammas=4
    [ "${2:?real-gammas 4 | 2,8}" = 4 ] || gammas="4,$2"
    python benchmarks/bench_e2e.py --part real --model "$MODEL" --ctxs 1024,4096,8192 --out "$RUNS/real-gammas" \
      --resume --methods bf16,fp8,ngram,quantspec --gammas "$gammas" --time-budget 400 2>&1 | grep -v '^{' | tail -30
    out_renamed "$RUNS"/real-gammas/e2e-real-h200 "e2e-real-gammas-h200"
    ;;
  speculative)
    # the draft's W4A16 kernel family: whichever bench_kernels measured faster over the 8B layers at M = 1
    OPTIONS=$(python - "$RUNS/kernels-h200.json" <<'PY'
import json, sys
rows = [r for r in json.load(open(sys.argv[1]))["rows"] if r.get("kind") == "linear" and r["m"] == 1]
us = {op: sum(r["us"] for r in rows if r["op"] == op) for op in ("w4a16", "w4a16_alt")}
alt = next((r["kernel"] for r in rows if r["op"] == "w4a16_alt"), "")
print(json.dumps({"draft_linear_backend": "marlin"} if "Marlin" in alt and us["w4a16_alt"] < us["w4a16"] else {}))
PY
)
    OPTIONS=${OPTIONS:-'{}'}
    echo "QuantSpec options: $OPTIONS"
    "${E2E[@]}" --methods bf16,fp8,hierarchical,quantspec,draft_model --accept-from "$RUNS/e2e-real-h200.json" \
      --gamma 4 --quantspec-options "$OPTIONS" --time-budget 380 2>&1 | grep -v "^{"
    python benchmarks/bench_kv_backend.py --ppl benchmarks/results/ppl-h200.json --from-e2e "$RUNS/e2e-h200.json" \
      --batches 1,8 --out "$RUNS" | tail -3
    # where a QuantSpec step's time goes, at the same acceptance
    L=$(python -c "import json; print(json.load(open('$RUNS/e2e-h200.json'))['accept_length'])")
    python benchmarks/profile_step.py --method quantspec --ctx 32768 --accept-length "$L" \
      --quantspec-options "$OPTIONS" 2>&1 | grep -E '^(device|command|\[|\{)' | tee "$RUNS/phases-quantspec-h200.txt"
    out "$RUNS"/e2e-h200.* "$RUNS"/kv-backend-h200.* "$RUNS"/phases-quantspec-h200.txt
    ;;
  baselines)
    python benchmarks/bench_e2e.py --part synthetic --points 1x4096,1x32768,1x65536,1x131072,4x32768,16x4096 \
      --methods quantspec,draft_model,bf16,fp8 --accept-from benchmarks/results/e2e-real-h200.json --gamma 4 \
      --quantspec-options "$MARLIN" --n-out 64 --out "$RUNS/baselines" --resume --time-budget 400 2>&1 | grep -v '^{'
    out_renamed "$RUNS"/baselines/e2e-h200 "e2e-baselines-h200"
    ;;
  phases)
    for ctx in 4096 32768; do profile --method quantspec --ctx $ctx; done | tee "$RUNS/phases-quantspec-h200.txt"
    out "$RUNS/phases-quantspec-h200.txt"
    ;;
  verify)
    for method in quantspec hierarchical; do profile --method $method --ctx 4096; done | tee "$OUT/phases-verify-h200.txt"
    ;;
  async)
    # QuantSpec with and without vLLM's async scheduling (its default since the seventh session), and the bf16
    # target-only step, on one
    # machine: free-running ms per token and the phase split
    for run in "bf16 4096" "quantspec 4096 --no-async-scheduling" "quantspec 4096 --async-scheduling" \
               "quantspec 32768 --no-async-scheduling" "quantspec 32768 --async-scheduling"; do
      set -- $run
      profile --method "$1" --ctx "$2" "${@:3}"
    done | tee "$OUT/phases-async-h200.txt"
    ;;
  gamma)
    python benchmarks/bench_e2e.py --part synthetic --points 1x4096,1x32768,1x131072 --methods bf16,quantspec \
      --gamma 2,1,4 --accept-from benchmarks/results/e2e-real-h200.json --async-scheduling \
      --quantspec-options "$MARLIN" --n-out 64 --out "$RUNS/gamma" --resume --time-budget 420 2>&1 | grep -v '^{'
    out_renamed "$RUNS"/gamma/e2e-h200 "e2e-gamma-h200"
    ;;
  tests)
    stage_model
    # the invariance test compiles the real kernel: its tile layouts are what could break invariance
    # (-m: pyproject's addopts deselect gpu tests, which the sixth session's run of this step lost)
    python -m pytest -q -p no:cacheprovider -m "gpu or not gpu" tests/test_kernels_attention.py \
      tests/test_kernels_write.py -k "batch_invariant or gpu" 2>&1 | tail -3 \
      | tee "$RUNS/pytest-gpu-h200.txt"
    backend_tests
    cat "$RUNS/pytest-backend-h200.txt" >> "$RUNS/pytest-gpu-h200.txt"
    out "$RUNS/pytest-gpu-h200.txt"
    ;;
  long-prompts)
    # issue 4's "prompts up to 128k" on the GPU: SmolLM2 bf16 with prompts of 131k, 65k and 3k tokens, the
    # hierarchical cache against vLLM's default backend and QuantSpec against it (test_prompts_up_to_128k)
    stage_model
    QUANTSPEC_GPU_MODEL=$MODEL timeout 500 python -u -m pytest -m gpu -v -p no:cacheprovider -k 128k \
      tests/test_hierarchical_kv_backend_gpu.py 2>&1 | tee "$OUT/pytest-long-prompts-h200.log" | tail -15
    ;;
  backend-tests)
    # `tests`' second part alone: its suite took 124 s at 924e1de but had not finished after about 220 s in the
    # eighteenth session (after SmolLM2's conversion); the suite's own timeout is 300 s, so give this call 400 s
    stage_model
    backend_tests
    ;;
  agreement|agreement-async)
    # about 280 s each (seventh session): one mode a call
    stage_model
    mode=(--batch-invariant --no-async-scheduling)
    [ "$1" = agreement-async ] && mode=(--batch-invariant --async-scheduling)
    timeout 500 python benchmarks/agreement.py --model "$MODEL" --prompts 32 --tokens 128 --out "$RUNS" "${mode[@]}" \
      2>&1 | grep -v '^{' | tail -45
    out "$RUNS"/agreement-h200*
    ;;
  tune)
    # the kernels' GPU tests first (a sweep of a broken kernel says nothing), then the attention kernel's launch
    # sweep at the engine's launches (tune_attention.py --quick: 2 or 4 warps, register cap, split count)
    kernel_tests
    timeout 380 python benchmarks/tune_attention.py --quick --json "$RUNS/tune-attention-h200.json" 2>&1 \
      | tee "$RUNS/tune-attention-h200.txt" | grep -v '^    '
    out "$RUNS"/tune-attention-h200.* "$RUNS"/pytest-kernels-h200.txt
    ;;
  ncu)
    # Nsight Compute on the attention kernel's default launch, a draft step (INT4) and a verify (INT8, 5 tokens)
    # at 1 x 128k: where its warps stall (latency or issue), occupancy, and bytes against the peak
    # (SourceCounters: sampled stalls per SASS instruction, printed from the saved report as CSV)
    NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
    timeout 200 "$NCU" --clock-control none -k regex:_paged_attention_kernel --launch-skip 2 --launch-count 2 \
      --section SpeedOfLight --section Occupancy --section LaunchStats --section SchedulerStats \
      --section WarpStateStats --section SourceCounters \
      --metrics 'regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio' -f -o "$RUNS/ncu-attention" \
      python benchmarks/tune_attention.py --profile > "$RUNS/ncu-attention-h200.log" 2>&1
    echo "ncu exit $?"
    "$NCU" -i "$RUNS/ncu-attention.ncu-rep" > "$RUNS/ncu-attention-h200.txt" 2>&1
    timeout 120 "$NCU" -i "$RUNS/ncu-attention.ncu-rep" --page source --csv --print-source sass \
      > "$RUNS/ncu-attention-sass-h200.csv" 2>&1 || echo "no per-instruction page"
    grep -v '^==PROF==' "$RUNS/ncu-attention-h200.txt" | tail -150
    out "$RUNS/ncu-attention-h200.txt" "$RUNS/ncu-attention-sass-h200.csv"
    ;;
  cache)
    # the compile caches this machine built, for the next session: parts of 15 MiB (16 MiB a file, 8 files and
    # 64 MiB in all come back); over 60 MiB, nothing (and a carried part must fit a call's 64 MiB beside the tree)
    du -sh "${COMPILE_CACHES[@]}" 2>/dev/null
    tar -czP "${COMPILE_CACHES[@]}" 2>/dev/null | split -b 15M - "$OUT/compile-cache.tgz.part-"
    total=$(cat "$OUT"/compile-cache.tgz.part-* | wc -c)
    echo "compile-cache.tgz: $total bytes in $(ls "$OUT"/compile-cache.tgz.part-* | wc -l) parts"
    [ "$total" -le $((60 << 20)) ] || { echo "over 60 MiB: not kept"; rm "$OUT"/compile-cache.tgz.part-*; }
    ;;
  b8)
    # n_out outlasts the other requests' chunked prefills (32 did not: bench_e2e refuses such a point now)
    python benchmarks/bench_e2e.py --part synthetic --points 8x131072 --methods hierarchical,fp8 --accept-length 1 \
      --n-out 256 --out "$RUNS/b8" --resume --time-budget 420 2>&1 | grep -v '^{'
    out_renamed "$RUNS"/b8/e2e-h200 "e2e-b8-128k-h200"
    ;;
  target-only)
    # issue 4's rows on the kernel as it is, in one run: the hierarchical cache, bf16 and fp8 KV, target only, at
    # batch 1 x 32k-128k and batch 8 x 32k and 64k (--resume: a second call finishes what the budget left); then
    # kv-backend-h200 reassembled, each point taken whole from the first run holding it (8 x 128k: e2e-b8-128k-h200)
    python benchmarks/bench_e2e.py --part synthetic --points "$TARGET_POINTS" \
      --methods hierarchical,bf16,fp8 --accept-length 1 --n-out 64 --out "$RUNS/target-only" --resume \
      --time-budget 400 2>&1 | grep -v '^{'
    out_renamed "$RUNS"/target-only/e2e-h200 "e2e-target-only-h200"
    R=benchmarks/results
    # (from the renamed copy: the rows' run column names the file they are committed as, not e2e-h200.json)
    python -c "import json, sys; sys.exit({'bf16', 'fp8', 'hierarchical'} - {r['method'] for r in
               json.load(open('$OUT/e2e-target-only-h200.json'))['rows']} != set())" &&
    python benchmarks/bench_kv_backend.py --ppl $R/ppl-h200.json --out "$OUT" --tag h200 \
      --from-e2e $OUT/e2e-target-only-h200.json,$R/e2e-b8-128k-h200.json,$R/e2e-h200.json | tail -3
    ;;
  target-only-b1)
    # issue 4's batch-1 rows at 32k and 128k in one run, for a session with little device time left (the thirteenth:
    # the fused decode metadata), after the metadata kernel's GPU test
    # (both written to $OUT as they go: what a call cut by the device's limit finished still comes back; the
    # thirteenth session's run kept the test's output in $RUNS and lost it that way)
    timeout 100 python -m pytest -m gpu -q -p no:cacheprovider tests/test_kernels_metadata.py 2>&1 | tail -2 \
      | tee "$OUT/pytest-metadata-h200.txt"
    python benchmarks/bench_e2e.py --part synthetic --points 1x32768,1x131072 --methods hierarchical,fp8,bf16 \
      --accept-length 1 --n-out 64 --out "$OUT/target-only-b1" --resume --time-budget 230 2>&1 | grep -v '^{'
    ;;
  runner-check)
    # the fourteenth session's open question, with the model runner ruled out (v2-check: the hierarchical cache runs
    # as slowly on V2 as on V1, bf16 on V1 as fast as on V2): on the device a hierarchical decode step costs what fp8
    # KV's does (kernel-trace-gaps-h200, profile_step's engine: in-process, max_model_len 33k), yet bench_e2e's
    # engines (engine core in its own process, max_model_len 131k) run it 0.6 ms per token slower than fp8 KV at
    # 1 x 32k. One factor at a time: profile_step's engine at max_model_len 131k, with its device timeline;
    # bench_e2e's in its own process at 33k (one point); in-process at 131k
    timeout 200 python benchmarks/profile_step.py --method hierarchical --ctx 32768 --max-model-len 131072 --steps 32 \
      --kernels --trace "$OUT/kernel-trace-hierarchical-32768-mml131k-h200.json.gz" 2>&1 \
      | grep -E '^(device|command|\[|\{| )' | tee "$OUT/kernel-times-mml131k-h200.txt"
    free_gpu
    python benchmarks/bench_e2e.py --part synthetic --points 1x32768 \
      --methods hierarchical --accept-length 1 --n-out 64 --out "$RUNS/hierarchical-33k" 2>&1 | grep -E '^\| hier|done'
    cp "$RUNS/hierarchical-33k/e2e-h200.json" "$OUT/hierarchical-33k.json"
    free_gpu
    VLLM_ENABLE_V1_MULTIPROCESSING=0 python benchmarks/bench_e2e.py --part synthetic --points 1x32768,1x131072 \
      --methods hierarchical --accept-length 1 --n-out 64 --out "$RUNS/hierarchical-in-process" 2>&1 | grep -E '^\| hier|done'
    cp "$RUNS/hierarchical-in-process/e2e-h200.json" "$OUT/hierarchical-in-process.json"
    ;;
  engine-trace)
    # runner-check's answer: the engine-core process costs the hierarchical cache 0.35 ms per token (bench_e2e
    # in-process 5.85 against 6.20 ms at 1 x 32k) and not bf16 or fp8 KV. The host's side of a decode step in
    # that process, under vLLM's torch profiler, for the hierarchical cache and bf16, both on the V1 runner
    for run in hierarchical bf16; do traced "$run" "$run" VLLM_USE_V2_MODEL_RUNNER=0; done
    python benchmarks/trace_gaps.py "$OUT"/engine-trace-*-h200.json.gz | tee "$OUT/engine-trace-gaps-h200.txt"
    ;;
  context-check)
    # engine-trace's slow attention launches happen only when the engine core runs in its own process, and every
    # such run so far also had a second CUDA context on the GPU: bench_e2e's engine-driving process synced the
    # device (its timed()). It no longer does (unless --frontend-cuda-context) and names the GPU through
    # nvidia-smi. Each row records the processes holding a context (gpu_processes). The hierarchical cache with
    # and without that second context, then fp8 KV, at batch 1 x 32k / 128k
    for run in "hierarchical none" "hierarchical frontend" "fp8 none"; do
      set -- $run
      extra=(); [ "$2" = frontend ] && extra=(--frontend-cuda-context)
      timeout 150 python benchmarks/bench_e2e.py --part synthetic --points 1x32768,1x131072 --methods "$1" \
        --accept-length 1 --n-out 64 --out "$RUNS/context-$1-$2" "${extra[@]}" 2>&1 | grep -E '^\| (hier|fp8)|done|Error'
      cp "$RUNS/context-$1-$2/e2e-h200.json" "$OUT/context-$1-$2.json"
      free_gpu
    done
    ;;
  v2-check)
    # runner-check's question answered by the runner itself: on branch v2-runner the hierarchical cache runs on
    # vLLM's V2 model runner by default and on V1 under VLLM_USE_V2_MODEL_RUNNER=0 (main's runner), so one call
    # compares the two engines, with fp8 KV (V2) and bf16 on V1 beside them; each row records its runner
    # (an engine its timeout stops leaves its engine-core process on the GPU: free_gpu before the next)
    for run in "hierarchical v2" "fp8 v2" "hierarchical v1" "bf16 v1"; do
      set -- $run
      runner=(); [ "$2" = v1 ] && runner=(VLLM_USE_V2_MODEL_RUNNER=0)
      env "${runner[@]}" timeout 140 python benchmarks/bench_e2e.py --part synthetic --points 1x32768,1x131072 \
        --methods "$1" --accept-length 1 --n-out 64 --out "$OUT/$1-$2" 2>&1 \
        | grep -E '^\| (hier|fp8|bf16)|done|Error' | tail -6
      free_gpu
    done
    ;;
  target-only-twice)
    # the twelfth session's open question: its first hierarchical engine ran 0.19-0.35 ms per token slower at batch 1
    # than two later engines of the same code; the same 5-point engine twice in one call, back to back
    for run in 1 2; do
      python benchmarks/bench_e2e.py --part synthetic --points "$TARGET_POINTS" \
        --methods hierarchical --accept-length 1 --n-out 64 --out "$RUNS/twice-$run" 2>&1 | grep -E '^\| hier|done'
      out_renamed "$RUNS/twice-$run/e2e-h200" "e2e-target-only-twice$run-h200"
    done
    ;;
  kernel-tests)
    kernel_tests
    out "$RUNS"/pytest-kernels-h200.txt
    ;;
  attention-ab)
    # `attention-ab THIS REF [OTHER...]`, carrying .gpu/ab/REF.py etc. (git show REV:kernels/paged_attention.py or
    # a variant): the kernels' GPU tests (skipped with NO_TESTS=1), then attention_ab.py, the working tree's kernel
    # (named THIS) against REF's and the others at the engine's launches, FA3 beside them
    [ -n "${NO_TESTS:-}" ] || kernel_tests
    baselines=(); for name in "${@:3}"; do baselines+=(--baseline "$name=.gpu/ab/$name.py"); done
    timeout 500 python benchmarks/attention_ab.py --label "${2:?THIS}" "${baselines[@]}" \
      --out "$RUNS/attention-ab-h200" 2>&1 | grep -v '^{"batch'
    out "$RUNS"/attention-ab-h200.* "$RUNS"/pytest-kernels-h200.txt
    ;;
  kernel-times)
    # where a decode token's device time goes, kernel by kernel (profile_step.py --kernels), 8B shape, batch 1, one
    # engine per method: `kernel-times METHODS CTX [gemv|default]` (default hierarchical,bf16 at 32k: issue 4's
    # batch-1 gap; gemv: QuantSpec's draft with draft_gemv; default: QuantSpec with no options). CTX 131072 runs a
    # 130816-token prompt in a 131072-token engine (the 8B config's limit; the profiled tokens need the rest)
    methods=${2:-hierarchical,bf16}; ctx=${3:-32768}
    options=$MARLIN; [ "${4:-}" = gemv ] && options='{"draft_linear_backend": "marlin", "draft_gemv": true}'
    [ "${4:-}" = default ] && options='{}'
    lengths=(--ctx "$ctx"); [ "$ctx" = 131072 ] && lengths=(--ctx 130816 --max-model-len 131072)
    for method in ${methods//,/ }; do
      timeout 250 python benchmarks/profile_step.py --method "$method" "${lengths[@]}" --steps 32 --kernels \
        --trace "$OUT/kernel-trace-$method-$ctx-h200.json.gz" \
        --accept-length "$(accept_length)" --quantspec-options "$options" 2>&1 | grep -E '^(device|command|\[|\{| )'
    done | tee -a "$RUNS/kernel-times-h200.txt"
    out "$RUNS/kernel-times-h200.txt"
    ;;
  batch1)
    # QuantSpec and bf16 at batch 1, 4k-128k, as part-b runs them, in one run: the kernel as it is end to end;
    # `batch1 lm-head`: the same with the draft's int4 lm_head (quantize_lm_head), to e2e-batch1-lm-head-h200
    options=$MARLIN; name=batch1
    [ "${2:-}" = lm-head ] && options='{"draft_linear_backend": "marlin", "draft_gemv": false, "quantize_lm_head": true}' && name=batch1-lm-head
    python benchmarks/bench_e2e.py --part synthetic --methods quantspec,bf16 --points 1x4096,1x32768,1x65536,1x131072 \
      --accept-from benchmarks/results/e2e-real-h200.json --gamma 4 --quantspec-options "$options" --n-out 128 \
      --out "$RUNS/$name" --resume --time-budget 420 2>&1 | grep -v '^{'
    out_renamed "$RUNS/$name/e2e-h200" "e2e-$name-h200"
    ;;
  gemv)
    timeout 200 python -m pytest -m gpu -q -p no:cacheprovider tests/test_kernels_gemv.py 2>&1 | tail -5 \
      | tee "$RUNS/pytest-gemv-h200.txt"
    # Marlin where vLLM would pick Machete: what the draft runs (MARLIN above)
    (cd benchmarks && VLLM_DISABLED_KERNELS=MacheteLinearKernel timeout 300 python tune_gemv.py \
      --json "$RUNS/w4a16-gemv-h200.json" --md "$RUNS/w4a16-gemv-h200.md") 2>&1 | grep -v '^skip' | tail -25
    out "$RUNS"/pytest-gemv-h200.txt "$RUNS"/w4a16-gemv-h200.*
    # Nsight Compute on each default launch (qkv, gate_up; fp32, then bf16x2): is the GEMV bound by its bytes or by
    # issuing its instructions (kernel-sass-sm90: 3.6 and 2.9 warp instructions per 32 weights, 3.9 at copy bandwidth)
    NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
    (cd benchmarks && timeout 120 "$NCU" --clock-control none -k regex:_w4a16_gemv_kernel --section SpeedOfLight \
      --section Occupancy --section SchedulerStats --section WarpStateStats --section MemoryWorkloadAnalysis \
      python tune_gemv.py --profile) > "$OUT/ncu-gemv-h200.txt" 2>&1
    grep -E "_w4a16_gemv_kernel|DRAM Throughput|Memory Throughput|Duration|Issue Slots Busy|No Eligible|Achieved Occupancy|Registers Per" \
      "$OUT/ncu-gemv-h200.txt" | head -60
    ;;
  batch1-gemv)
    # `batch1-gemv marlin`: QuantSpec on Marlin alone; `batch1-gemv lm-head`: with the draft's int4 lm_head on the
    # GEMV too (quantize_lm_head: 4x fewer lm_head bytes per draft step; its acceptance cost is not in these rows);
    # `batch1-gemv default`: QuantSpec with no options (vLLM's W4A16 kernel choice, the GEMV on) and bf16
    options='{"draft_linear_backend": "marlin", "draft_gemv": true}'; methods=quantspec,bf16; name=batch1-gemv
    [ "${2:-}" = default ] && options='{}' && name=batch1-default
    [ "${2:-}" = marlin ] && options=$MARLIN && methods=quantspec && name=batch1-marlin
    [ "${2:-}" = lm-head ] && methods=quantspec && name=batch1-gemv-lm-head \
      && options='{"draft_linear_backend": "marlin", "draft_gemv": true, "quantize_lm_head": true}'
    python benchmarks/bench_e2e.py --part synthetic --methods $methods --points 1x4096,1x32768,1x131072 \
      --accept-from benchmarks/results/e2e-real-h200.json --gamma 4 --quantspec-options "$options" --n-out 128 \
      --out "$RUNS/$name" --resume --time-budget 420 2>&1 | grep -v '^{'
    out_renamed "$RUNS/$name/e2e-h200" "e2e-$name-h200"
    ;;
  gemv-acceptance)
    stage_model
    for gemv in $(echo ${2:-true,false} | tr , ' '); do
      python benchmarks/bench_e2e.py --part real --model "$MODEL" --ctxs 1024,4096,8192 --methods quantspec --gammas 4 \
        --quantspec-options "{\"draft_linear_backend\": \"marlin\", \"draft_gemv\": $gemv}" \
        --out "$RUNS/gemv-acceptance-$gemv" --resume --time-budget 200 2>&1 | tee "$OUT/gemv-acceptance-$gemv.log" \
        | grep -v '^{' | tail -8
      out_renamed "$RUNS/gemv-acceptance-$gemv/e2e-real-h200" "e2e-real-gemv-$gemv-h200"
    done
    ;;
  part-b)
    # issue 5's synthetic grid in one run: batch 1, 4 and 16 x 4k-128k (a point that does not fit a method's KV
    # pool is a "skipped" row: bf16 KV cannot hold 16 x 64k, no method 16 x 128k), at vLLM's default
    # scheduling; one engine about 200-350 s, so a call per METHODS (quantspec | bf16,fp8 | draft_model), resumed
    python benchmarks/bench_e2e.py --part synthetic --methods "${2:?part-b METHODS}" \
      --points 1x4096,1x32768,1x65536,1x131072,4x4096,4x32768,4x65536,4x131072,16x4096,16x32768,16x65536,16x131072 \
      --accept-from benchmarks/results/e2e-real-h200.json --gamma 4 --quantspec-options "$MARLIN" --n-out 128 \
      --out "$RUNS/part-b" --resume --time-budget 250 2>&1 | grep -v '^{'
    out_renamed "$RUNS"/part-b/e2e-h200 "e2e-part-b-h200"
    ;;
  qwen)
    # one call for the conversion and the first engines, a second resumes: bf16, fp8, ngram and QuantSpec at
    # γ=4 first (the same-run baselines), then QuantSpec's other γ
    start=$SECONDS
    QWEN=$(bash benchmarks/qwen_model.sh stage) || exit 1
    # (the conversion takes about 3 minutes and an engine about 90 s: the eleventh session's first call ran the
    # four γ=4 engines, then started γ=2 with 1 s of budget left and was killed by the call's limit)
    left() { echo $((420 - (SECONDS - start))); }
    Q=(python benchmarks/bench_e2e.py --part real --model "$QWEN" --ctxs 1024,4096,16384,32000 --out "$RUNS/qwen" --resume)
    "${Q[@]}" --methods bf16,fp8,ngram,quantspec --gammas 4 --time-budget "$(left)" 2>&1 | grep -v '^{' | tail -20
    if [ "$(left)" -gt 120 ]; then
      "${Q[@]}" --methods quantspec --gammas 2,8 --time-budget "$(left)" 2>&1 | grep -v '^{' | tail -20
    else echo "γ 2 and 8: run this step again (it resumes)"; fi
    out_renamed "$RUNS"/qwen/e2e-real-h200 "e2e-real-qwen-h200"
    ;;
  *) echo "unknown step $1" >&2; exit 2 ;;
esac
