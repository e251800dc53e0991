"""The kernels' inline PTX run on Python integers: the few b32 instructions they use, so that CI (the Triton
interpreter cannot run inline asm) checks the GPU recipes against what the interpreter path computes.
Registers hold 32-bit patterns; `$0..$(n_out-1)` are outputs, the inputs follow."""

import math
import struct

MASK = 0xFFFFFFFF


def bf16_bits(v: float) -> int:
    """v rounded to bfloat16 (to nearest, ties to even: PTX's .rn), as 16 bits. Exact for every v these
    tests make (products and sums of a few bfloat16 numbers and small integers are exact in a double)."""
    if v == 0.0:
        return 0x8000 if math.copysign(1.0, v) < 0 else 0
    m, e = math.frexp(v)  # v = m * 2**e, 0.5 <= |m| < 1: 8 significant bits are m * 2**8 rounded
    return struct.unpack("<I", struct.pack("<f", math.ldexp(round(m * 256), e - 8)))[0] >> 16


def bf16_value(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", (bits & 0xFFFF) << 16))[0]


def f32_bits(v: float) -> int:
    return struct.unpack("<I", struct.pack("<f", v))[0]


def f32_value(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", bits & MASK))[0]


def _lop3(a: int, b: int, c: int, lut: int) -> int:
    """Bit-wise lookup: bit i of the result is bit (a_i * 4 + b_i * 2 + c_i) of the 8-bit table."""
    return sum(((lut >> (((a >> i) & 1) * 4 + ((b >> i) & 1) * 2 + ((c >> i) & 1))) & 1) << i for i in range(32))


def _fma_bf16x2(a: int, b: int, c: int) -> int:
    lanes = [bf16_bits(bf16_value(a >> s) * bf16_value(b >> s) + bf16_value(c >> s)) for s in (0, 16)]
    return lanes[0] | (lanes[1] << 16)


OPS = {
    "mov.b32": lambda v: v[0],
    "shl.b32": lambda v: (v[0] << v[1]) & MASK,
    "shr.u32": lambda v: v[0] >> v[1],
    "and.b32": lambda v: v[0] & v[1],
    "lop3.b32": lambda v: _lop3(*v),
    # byte i of the result: byte (selector nibble i) of the 8 bytes {b, a}
    "prmt.b32": lambda v: sum(((((v[1] << 32) | v[0]) >> (8 * ((v[2] >> (4 * i)) & 7))) & 0xFF) << (8 * i)
                              for i in range(4)),
    "fma.rn.bf16x2": lambda v: _fma_bf16x2(*v),
    # the sum in a double, then to float (.rn): exact for the sums these tests make (two bfloat16 numbers)
    "add.f32": lambda v: f32_bits(f32_value(v[0]) + f32_value(v[1])),
}


def run(asm: str, inputs: list[int], n_out: int) -> list[int]:
    regs = {f"${n_out + i}": w & MASK for i, w in enumerate(inputs)}
    for line in asm.replace("{", "").replace("}", "").split(";"):
        op, _, args = line.strip().partition(" ")
        if not op or op.startswith(".reg"):
            continue
        assert op in OPS, f"PTX op {op} is not simulated"
        dest, *srcs = [x.strip() for x in args.split(",")]
        regs[dest] = OPS[op]([regs[x] if x in regs else int(x, 0) for x in srcs])
    return [regs[f"${i}"] for i in range(n_out)]
