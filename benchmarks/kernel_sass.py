"""The attention kernel and the W4A16 GEMV compiled for an H100/H200 (sm_90) without a GPU: registers,
spills and the instruction count of their main loops, per launch shape. Triton's bundled ptxas and cuobjdump do the work,
so this runs on the CPU machine (no device time).

    python benchmarks/kernel_sass.py [--out benchmarks/results/kernel-sass-sm90.txt]

Why it matters: the kernel is issue-bound. A loop iteration reads one BLOCK_N-token tile of a page for
one KV head; an H200 streams K+V of a token and KV head (D = 128: 128 bytes in INT4, 256 in INT8) at its
copy bandwidth only if the SMs issue at most `budget` warp instructions per such token:
    budget = 4 schedulers x SMs x clock / (copy bandwidth / bytes per token)
which assumes every scheduler issues every cycle; real kernels issue well below that. The GEMV's budget
is the same count per 32 int4 weights (16 bytes).
"""

import argparse
import inspect
import itertools
import os
import re
import subprocess
import sys
from collections import Counter

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from vllm_quantspec.kernels.paged_attention import Tiles, _paged_attention_kernel  # noqa: E402
from vllm_quantspec.kernels.w4a16_gemv import BLOCK_N, NUM_WARPS, _w4a16_gemv_kernel, step_tile  # noqa: E402

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
# Llama-3.1-8B's attention (32 query heads, 8 KV heads, D = 128) and G = 128
HQ, H, D, G = 32, 8, 128, 128
# H200 (KINDS.md / kernels-h200: copy bandwidth 4270 GB/s measured; 132 SMs; 1.98 GHz boost)
SMS, CLOCK_HZ, COPY_BPS = 132, 1.98e9, 4270e9
POINTERS = {"q_ptr": "*bf16", "kn_ptr": "*bf16", "vn_ptr": "*bf16", "kr_ptr": "*bf16", "vr_ptr": "*bf16",
            "qsl_ptr": "*i32", "seq_lens_ptr": "*i32", "bt_ptr": "*i32", "slot_ptr": "*i32",
            "khi_ptr": "*u8", "vhi_ptr": "*u8", "klo_ptr": "*u8", "vlo_ptr": "*u8",
            "ksc_ptr": "*fp16", "kmn_ptr": "*fp16", "vsc_ptr": "*fp16", "vmn_ptr": "*fp16",
            "out_ptr": "*bf16", "po_ptr": "*fp32", "plse_ptr": "*fp32", "rd_ptr": "*i64"}
# What Triton's JIT specializes at the backend's launch (8B shape): every pointer and these strides are
# multiples of 16 (tt.divisibility, which lets it vectorize the code loads to 16 bytes), and vm_t (one
# value group per token) is 1, compiled in as a constant.
STRIDES_16 = ("sq_t", "sq_h", "skn_t", "skn_h", "svn_t", "svn_h", "sr_s", "sr_r", "sr_h", "pl_blk", "pl_h", "pl_t",
              "km_blk", "km_h", "vmn_words", "vm_blk", "vm_h", "so_t", "so_h")
ONES = {"vm_t": 1}
# (label, query tokens per sequence, mode) as the backend launches them: decode / draft step, γ=4 verify
SHAPES = [("decode", 1, "int4"), ("decode", 1, "int8"), ("verify", 5, "int4"), ("verify", 5, "int8")]
# other launch parameters of the INT4 decode loop (warps, BLOCK_N): does any issue less per token?
SWEEP = [(1, 128), (2, 128), (8, 128), (1, 64), (4, 64), (1, 32)]
# the other launches at 2 warps (the backend takes 2 only for single-token steps over enough page tiles): do they spill?
TWO_WARPS = [(1, "int8"), (5, "int4"), (5, "int8")]
# register caps of the decode loop (paged_attention's maxnreg): 3 or 4 programs of 4 warps per SM, for spills
MAXNREG = (168, 128)


def compile_sm90(q_len: int, mode: str, block_n: int | None = None, num_warps: int | None = None,
                 maxnreg: int | None = None, block_m: int | None = None):
    t = Tiles.of(q_len, HQ // H, G, block_n=block_n, num_warps=num_warps, block_m=block_m)
    const = t.constants(HQ, HQ // H, D, G, D, mode, direct=False, write_ring=True) | ONES  # the backend's launch
    names = _paged_attention_kernel.arg_names
    sig = {n: "constexpr" if n in const else POINTERS.get(n, "fp32" if n == "qk_scale" else "i32") for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n in POINTERS or n in STRIDES_16}
    k = triton.compile(ASTSource(_paged_attention_kernel, sig, constexprs=const, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=t.num_warps, num_stages=2, **({"maxnreg": maxnreg} if maxnreg else {})))
    return k, t


def gemv_summary(k_in: int, tmp: str, bf16x2: bool = False, block_w: int | None = None,
                 stages: int | None = None) -> list[str]:
    """The W4A16 GEMV at the launcher's default tile (or these words a step and stages; M=1, bf16, G=128,
    K = k_in), in fp32 or bf16x2 arithmetic: its step loop's warp instructions per 32 weights and opcode mix,
    and how many of its weight loads are issued before the arithmetic starts (global loads; a pipelined loop
    copies the next steps' words to shared memory instead, LDGSTS, and reads them back, LDS)."""
    block_w, num_stages = step_tile(k_in // 8, G, block_w, stages, bf16x2)
    const = dict(G=G, BLOCK_N=BLOCK_N, BLOCK_W=block_w, X_BF16=True, HAS_BIAS=False, BF16X2=bf16x2, USE_ASM=True,
                 STAGES=num_stages)
    pointers = {"x_ptr": "*i32", "w_ptr": "*i32", "s_ptr": "*bf16", "bias_ptr": "*bf16", "out_ptr": "*bf16"}
    names = _w4a16_gemv_kernel.arg_names
    sig = {n: "constexpr" if n in const else pointers.get(n, "i32") for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n not in const}  # 8B shapes: all are
    k = triton.compile(ASTSource(_w4a16_gemv_kernel, sig, constexprs=const, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=NUM_WARPS, num_stages=num_stages))
    usage, loops, total = sass_report(write_cubin(k, tmp))
    n, ops, _, body = loops[0]
    weights = BLOCK_N * block_w * 8 // NUM_WARPS  # per warp and step
    # the whole kernel: the loop once a step, the rest (addresses, the last reductions, the store) once
    whole = n * triton.cdiv(k_in // 8, block_w) + total - n
    # 128-bit loads (the rows' words, and the activations as pairs) issued before the arithmetic starts
    first_fma = next(i for i, op in enumerate(body) if "FMA" in op)
    early = [i for i, op in enumerate(body[:first_fma]) if "LDG.E.128" in op or "LDGSTS.E.BYPASS.128" in op]
    where = f"instructions {early[0]}-{early[-1]}" if early else "none"
    return [f"K={k_in}: rows={BLOCK_N} words={block_w} warps={NUM_WARPS} stages={num_stages}  {usage}",
            f"  step loop: {n} instructions per warp and step = {32 * n / weights:.2f} warp instructions per 32 weights; "
            f"{len(early)} 128-bit loads (or copies to shared memory) before its first FMA (at {first_fma}): {where}",
            f"  whole kernel: {whole} instructions per warp (the loop once a step, the rest once, NOPs left out) = "
            f"{32 * whole / (weights * triton.cdiv(k_in // 8, block_w)):.2f} warp instructions per 32 weights",
            "  " + " ".join(f"{op}:{c}" for op, c in ops.most_common(14))]


def write_cubin(kernel, tmp: str) -> str:
    path = os.path.join(tmp, "k.cubin")
    open(path, "wb").write(kernel.asm["cubin"])
    return path


def sass_report(path: str) -> tuple[str, list[tuple[int, Counter, tuple[int, int], list[str]]], int]:
    """cuobjdump's resource line, (instructions, opcode counts, address range, instructions) of each loop
    (backward branch) of the cubin at path, and the kernel's instructions in all, NOPs left out."""
    res = subprocess.run([os.path.join(BIN, "cuobjdump"), "-res-usage", path], capture_output=True, text=True).stdout
    usage = re.search(r"REG:\d+ STACK:\d+ SHARED:\d+ LOCAL:\d+", res).group(0)
    sass = subprocess.run([os.path.join(BIN, "cuobjdump"), "-sass", path], capture_output=True, text=True).stdout
    ins = [(int(a, 16), op) for a, op in re.findall(r"/\*([0-9a-f]{4,})\*/\s+(.*?);", sass)]
    loops = []
    for at, op in ins:
        m = re.search(r"BRA.*?0x([0-9a-f]+)", op)
        if m and int(m.group(1), 16) < at:
            lo = int(m.group(1), 16)
            body = [o for a, o in ins if lo <= a <= at]
            loops.append((len(body), Counter(re.sub(r"^@!?U?P\w+\s+", "", o).split()[0].split(".")[0] for o in body),
                          (lo, at), body))
    return usage, loops, sum(not op.startswith("NOP") for _, op in ins)


def source_lines(path: str, span: tuple[int, int], top: int = 10) -> list[str]:
    """The source lines (of this repository's kernel file) that the instructions in `span` of the cubin
    at path come from, by instruction count (nvdisasm's line table; Triton's own helpers, e.g. tl.sum,
    show as standard.py)."""
    out = subprocess.run([os.path.join(BIN, "nvdisasm"), "--print-line-info", "-c", path],
                         capture_output=True, text=True).stdout
    src, counts = None, Counter()
    for line in out.splitlines():
        m = re.search(r'//## File "([^"]+)", line (\d+)', line)
        if m:
            src = (m.group(1), int(m.group(2)))
        elif (m := re.match(r"\s+/\*([0-9a-f]{4,})\*/", line)) and span[0] <= int(m.group(1), 16) <= span[1]:
            counts[src] += 1
    kernel_file = inspect.getsourcefile(_paged_attention_kernel.fn)
    text = open(kernel_file).read().splitlines()
    mine = os.path.basename(kernel_file)

    def where(f: str, ln: int) -> str:
        if os.path.basename(f) == mine:
            return f"line {ln}: {text[ln - 1].strip()[:90]}"
        return f"{os.path.basename(f)}:{ln}"

    triton_lib = sum(n for (f, _), n in counts.items() if os.path.basename(f) != mine)
    return ([f"  {n:5d}  {where(f, ln)}" for (f, ln), n in counts.most_common(top)]
            + [f"  {triton_lib:5d}  in all from Triton's own library code (tl.max / tl.sum reductions and the like)"])


def page_loop_summary(q_len: int, mode: str, tmp: str, block_n: int | None = None, num_warps: int | None = None,
                      maxnreg: int | None = None, block_m: int | None = None) -> str:
    """One launch variant's page loop: warp instructions per token and KV head, spill loads/stores in it,
    and the resource line."""
    k, t = compile_sm90(q_len, mode, block_n, num_warps, maxnreg, block_m)
    usage, loops, _ = sass_report(write_cubin(k, tmp))
    n, ops, *_ = loops[0]
    return f"{n * t.num_warps / t.block_n:.1f} per token, LDL+STL {ops['LDL'] + ops['STL']}  ({usage})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out")
    args = p.parse_args()
    # K+V codes of one token and KV head: D bytes in INT4 (U planes), 2D in INT8 (U + L)
    budget = {mode: 4 * SMS * CLOCK_HZ / (COPY_BPS / (D * (1 if mode == "int4" else 2))) for mode in ("int4", "int8")}
    lines = [f"Triton {triton.__version__}, sm_90, Llama-3.1-8B attention (HQ={HQ}, H={H}, D={D}), G={G}",
             "command: python " + " ".join(sys.argv),
             f"budget at the H200's copy bandwidth: {budget['int4']:.0f} (INT4) / {budget['int8']:.0f} (INT8) warp "
             "instructions per token and KV head, every scheduler issuing every cycle", ""]
    tmp = os.environ.get("TMPDIR", "/tmp")
    for label, q_len, mode in SHAPES:
        k, t = compile_sm90(q_len, mode)
        cubin = write_cubin(k, tmp)
        usage, loops, _ = sass_report(cubin)
        n, ops, span, _ = loops[0]  # whole page tiles (the masked loop and the full-precision tail follow)
        lines += [f"{label} {mode}: BLOCK_M={t.block_m} BLOCK_N={t.block_n} warps={t.num_warps} "
                  f"{'transposed ' if t.swap else ''}{usage}",
                  f"  page loop: {n} instructions per warp and tile = {n * t.num_warps / t.block_n:.1f} warp "
                  "instructions per token and KV head",
                  "  " + " ".join(f"{op}:{c}" for op, c in ops.most_common(14))]
        if (label, mode) == ("decode", "int4"):
            lines += ["  its instructions by source line:"] + source_lines(cubin, span)
    lines += ["", "decode int4, other launch parameters (above: 4 warps, BLOCK_N=128; the backend takes 2 warps for "
              "draft steps over at least 4 page tiles per SM, 1 warp over 64-token tiles for those over at least 6 "
              "such tiles per program at 8 programs per SM): warp instructions per token and KV head of the page "
              "loop, spill loads/stores (LDL+STL) in it; static counts (with BLOCK_N < G the loop's page-start "
              "branch, run once a page, is counted for every tile)"]
    for warps, block_n in SWEEP:
        lines.append(f"  warps={warps} BLOCK_N={block_n}: " + page_loop_summary(1, "int4", tmp, block_n, warps))
    lines += ["", "the other launches at 2 warps, BLOCK_N=128 (target-only decode, then the γ=4 verify): warp "
              "instructions per token and KV head of the page loop, spill loads/stores in it"]
    for q_len, mode in TWO_WARPS:
        lines.append(f"  {mode} q_len={q_len}: " + page_loop_summary(q_len, mode, tmp, 128, 2))
    lines += ["", "single-token launches at 2 warps, BLOCK_N=128, the page loop transposed (8-row blocks: the tokens "
              "on the MMA's M, the backend's default) and not (16-row blocks): warp instructions per token and KV "
              "head, spill loads/stores"]
    for mode in ("int4", "int8"):
        for block_m, label in ((None, "transposed"), (16, "untransposed")):
            lines.append(f"  {mode} {label}: " + page_loop_summary(1, mode, tmp, 128, 2, block_m=block_m))
    lines += ["", "decode at the backend's tiles with a register cap (maxnreg; 65536 registers per SM hold 2 programs "
              "of 4 warps at 255, 3 at 168, 4 at 128): the page loop's warp instructions per token and KV head, "
              "spill loads/stores in it"]
    for mode, maxnreg in itertools.product(("int4", "int8"), MAXNREG):
        lines.append(f"  {mode} maxnreg={maxnreg}: " + page_loop_summary(1, mode, tmp, maxnreg=maxnreg))
    gemv_budget = 4 * SMS * CLOCK_HZ / (COPY_BPS / 16)
    lines += ["", f"W4A16 GEMV (kernels/w4a16_gemv.py), M=1, the launcher's default tile, 8B input sizes: budget at "
              f"the H200's copy bandwidth {gemv_budget:.2f} warp instructions per 32 weights"]
    for bf16x2 in (False, True):
        lines += [f"  {'bf16x2' if bf16x2 else 'fp32'} arithmetic:"]
        for k_in in (4096, 14336):
            lines += ["    " + line for line in gemv_summary(k_in, tmp, bf16x2)]
    lines += ["  bf16x2, K=4096 in 4 steps of 128 words over 3 stages (the default there: one step of 512; tune_gemv.py sweeps):"]
    lines += ["    " + line for line in gemv_summary(4096, tmp, True, 128, 3)]
    text = "\n".join(lines)
    print(text)
    if args.out:
        open(args.out, "w").write(text + "\n")


if __name__ == "__main__":
    main()
