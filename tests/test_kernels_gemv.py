"""Triton W4A16 GEMV vs its torch twin (x @ draft_weights.dequantize(w4).T).

CPU: TRITON_INTERPRET=1 at small shapes. GPU (`pytest -m gpu`): the compiled kernel at the 8B draft's
linear shapes.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels import triton.jit

import ptx  # noqa: E402
from heavy_tails import student_t2  # noqa: E402

from vllm_quantspec.draft_weights import W4Weight, bf16x2_linear, dequantize, pack_int4, quantize_w4  # noqa: E402
from vllm_quantspec.kernels.w4a16_gemv import _ASM_WORD_BF16X2, repack, step_tile, w4a16_gemv  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _gemv(x, w4, bias=None, bf16x2=False, **tile):
    return w4a16_gemv(x.to(DEVICE), repack(w4.weight_packed, w4.group_size, bf16x2).to(DEVICE),
                      w4.weight_scale.to(DEVICE), w4.group_size, None if bias is None else bias.to(DEVICE),
                      bf16x2=bf16x2, **tile).cpu()


def _check_columns(n: int, k: int, group: int, dtype: torch.dtype, columns: list[int], **tile) -> None:
    """One-hot rows of x pick out weight columns. With power-of-two scales every q * scale is a
    16-bit number, which the kernel computes exactly (the fp32 offset trick and the bf16x2 products
    alike), so each output must equal the twin bit for bit: a nibble read from the wrong position,
    word, group or row fails."""
    gen = torch.Generator().manual_seed(n + k + group)
    q = torch.randint(-8, 8, (n, k), generator=gen, dtype=torch.int8)
    scale = torch.exp2(torch.randint(-9, -2, (n, k // group), generator=gen).float()).to(dtype)
    w4 = W4Weight(pack_int4(q), scale, group)
    x = torch.zeros(len(columns), k, dtype=dtype)
    x[torch.arange(len(columns)), columns] = 1
    assert torch.equal(_gemv(x, w4, **tile), dequantize(w4)[:, columns].T.to(dtype))


def _check_random(m: int, n: int, k: int, group: int, dtype: torch.dtype, bias: bool, bf16x2: bool = False,
                  **tile) -> None:
    """Heavy-tailed weights and activations. The fp32 sums carry offsets up to 264 x a product (the
    kernel's docstring); the output agrees with the twin to within its own rounding (under one
    spacing each: Triton's interpreter truncates to bfloat16). bf16x2 rounds every product and each
    word's running sum to bf16 (8 bits): a relative error of about 2^-8 per word's sum, which adds up
    over a row's words like noise, so the whole row stays within 2^-7 (the interpreter truncates,
    which errs the same way every time: its bound is 2^-6). Against its own torch twin
    (draft_weights.bf16x2_linear: the same roundings, rounding to nearest) the GPU kernel differs only
    where another fp32 summation order flips a rounding: within 2^-10."""
    gen = torch.Generator().manual_seed(m + n + k)
    w4 = quantize_w4(student_t2((n, k), gen) * 0.02, group, scale_dtype=dtype)
    x = student_t2((m, k), gen).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    ref = x.float() @ dequantize(w4).T + (b.float() if bias else 0)
    out = _gemv(x, w4, b, bf16x2, **tile).float()
    err = (out - ref).norm() / ref.norm()
    bound = (2**-6 if DEVICE == "cpu" else 2**-7) if bf16x2 else 1e-4 + torch.finfo(dtype).eps
    assert err < bound, float(err)
    if bf16x2 and DEVICE == "cuda":
        twin = bf16x2_linear(x.to(DEVICE), W4Weight(*(t.to(DEVICE) for t in (w4.weight_packed, w4.weight_scale)),
                                                    w4.group_size)).cpu().float() + (b.float() if bias else 0)
        assert (out - twin).norm() / ref.norm() < 2**-10


@pytest.mark.parametrize("bf16x2", [False, True])
@pytest.mark.parametrize("group,block_w", [(128, 32), (64, 16), (32, 64)])
def test_gemv_reads_every_column(group, block_w, bf16x2):
    # 40 rows: five 8-row blocks; K = 512 (64 words): 1-4 steps (pipelined over 2 stages where there are
    # several); columns of every nibble, word, group and step
    k = 512
    cols = sorted({0, 1, 2, 3, 7, 8, 15, 16, 63, 64, 100, group - 1, group, group + 9, 255, 256, k - 8, k - 2, k - 1})
    _check_columns(40, k, group, torch.bfloat16, cols, bf16x2=bf16x2, block_w=block_w, num_stages=2)


@pytest.mark.parametrize("m,dtype,bias,bf16x2", [(1, torch.bfloat16, False, False), (3, torch.bfloat16, True, False),
                                                 (2, torch.float16, True, False), (4, torch.float16, False, False),
                                                 (1, torch.bfloat16, False, True), (3, torch.bfloat16, True, True)])
def test_gemv_matches_torch(m, dtype, bias, bf16x2):
    # N = 36: the last block's rows are partly masked; K = 896 = 7 groups: the last step partly masked
    _check_random(m, 36, 896, 128, dtype, bias, bf16x2, block_w=64)


@pytest.mark.parametrize("second,expected", [(38, 0.0), (40, 2**-9)])
def test_bf16x2_rounds_each_words_sum(second, expected):
    """bf16x2's one rounding that depends on which columns share a word: 1 + 2^-9 rounds to 1 in bf16.
    Column 6 (word 3, pair 0) holds x = 1 and column 10 (word 5) x = -1; the second column holds 2^-9:
    column 38 is word 3's pair 1 (the same running sum: lost), column 40 word 4's (another sum: kept,
    exactly in fp32). The kernel (the PTX on a GPU, its twin on the CPU) and draft_weights.bf16x2_linear
    must both give `expected`, where the exact product is 2^-9 either way."""
    q = torch.zeros(1, 128, dtype=torch.int8)
    q[0, [6, 10, second]] = 1
    w4 = W4Weight(pack_int4(q), torch.ones(1, 1, dtype=torch.bfloat16), 128)
    x = torch.zeros(1, 128, dtype=torch.bfloat16)
    x[0, [6, 10, second]] = torch.tensor([1.0, -1.0, 2**-9], dtype=torch.bfloat16)
    assert (x.float() @ dequantize(w4).T).item() == 2**-9
    assert bf16x2_linear(x, w4).item() == expected
    assert _gemv(x, w4, bf16x2=True).item() == expected


def test_bf16x2_word_asm():
    """The GPU's inline PTX for one word (run by tests/ptx.py: the Triton interpreter cannot run inline asm,
    and its twin truncates where the GPU rounds): for p = 0..3, nibbles p (low lane) and p + 4 (high lane)
    minus 8 times activation pair p added to the lane's sum, each rounded to bfloat16 (to nearest, as
    draft_weights.bf16x2_linear), then the two lanes' sum in fp32. Heavy-tailed activations: sums that round."""
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        word = int(torch.randint(0, 2**32, (), generator=gen))
        x = student_t2((4, 2), gen).to(torch.bfloat16).view(torch.int16).int().tolist()
        pairs = [(lo & 0xFFFF) | ((hi & 0xFFFF) << 16) for lo, hi in x]
        lanes = []
        for shift in (0, 16):
            acc = -0.0
            for p in range(4):
                q = ((word >> (shift + 4 * p)) & 15) - 8
                acc = ptx.bf16_value(ptx.bf16_bits(q * ptx.bf16_value(pairs[p] >> shift) + acc))
            lanes.append(acc)
        assert ptx.run(_ASM_WORD_BF16X2.value, [word] + pairs, 1)[0] == ptx.f32_bits(lanes[0] + lanes[1]), (word, x)


@pytest.mark.parametrize("bf16x2", [False, True])
def test_repack_keeps_every_code(bf16x2):
    """The GEMV's layouts are permutations of each group's columns: columns 2i, 2i + 1 (i = p * G/8 + w)
    at nibbles 2p, 2p + 1 (fp32) or p, p + 4 (bf16x2) of word w."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(-8, 8, (3, 256), generator=gen, dtype=torch.int8)
    words = repack(pack_int4(q), 128, bf16x2)
    nibbles = torch.stack([(words >> (4 * j)) & 15 for j in range(8)], dim=-1) - 8  # [3, 32, 8]: word, nibble
    for w in range(16):
        for p in range(4):
            for h in range(2):
                nibble = p + 4 * h if bf16x2 else 2 * p + h
                for grp in range(2):
                    assert torch.equal(nibbles[:, grp * 16 + w, nibble], q[:, grp * 128 + 2 * (p * 16 + w) + h].long())


@pytest.mark.parametrize("k_in,group,tile,fp32_tile", [(4096, 128, (512, 1), (512, 1)), (14336, 128, (256, 3), (512, 1)),
                                                        (576, 64, (128, 1), (128, 1)), (8960, 128, (128, 3), (512, 1)),
                                                        (1536, 128, (256, 1), (256, 1))])
def test_default_step_tile(k_in, group, tile, fp32_tile):
    """The launcher's default words a step and stages (step_tile) in bf16x2: the fewest words masked off over
    the steps, down to 128 words a step (8B down: 7 steps of 256; SmolLM2's 72 words: one step; Qwen2.5-1.5B's
    down, 1120 words: 9 steps of 128, not 3 of 512 with 416 masked), pipelined from 4 steps on; in fp32, 512
    words (or what K holds) and one stage; a given block_w is kept (clamped to what K holds)."""
    assert step_tile(k_in // 8, group, bf16x2=True) == tile
    assert step_tile(k_in // 8, group) == fp32_tile
    assert step_tile(k_in // 8, group, block_w=64, bf16x2=True) == (64, 1)
    assert step_tile(512, 128, block_w=2048, num_stages=2) == (512, 2)


@pytest.mark.gpu
@pytest.mark.parametrize("bf16x2", [False, True])
@pytest.mark.parametrize("k,n", [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)])
def test_gemv_matches_torch_gpu(k, n, bf16x2):
    """The 8B draft's linears (qkv, o, gate_up, down) with the default tile (down's pipelined), M = 1..4, bf16,
    in fp32 and in bf16x2 arithmetic (the inline PTX, which the CPU interpreter replaces by its twin)."""
    for m in range(1, 5):
        _check_random(m, n, k, 128, torch.bfloat16, bias=False, bf16x2=bf16x2)
    _check_columns(n, k, 128, torch.bfloat16, [0, 1, 7, 8, 127, 128, 1000, k - 1], bf16x2=bf16x2)


@pytest.mark.gpu
@pytest.mark.parametrize("bf16x2", [False, True])
@pytest.mark.parametrize("k,n", [(4096, 6144), (14336, 4096)])
def test_gemv_pipelined_gpu(k, n, bf16x2):
    """Steps of 128 words pipelined over 3 stages (the compiler's copies to shared memory), a tile tune_gemv
    sweeps: 4 and 14 steps a program."""
    _check_random(1, n, k, 128, torch.bfloat16, bias=False, bf16x2=bf16x2, block_w=128, num_stages=3)
    _check_columns(n, k, 128, torch.bfloat16, [0, 1, 7, 8, 127, 128, 1000, k - 1], bf16x2=bf16x2, block_w=128,
                   num_stages=3)
