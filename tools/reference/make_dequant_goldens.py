#!/usr/bin/env python3
"""Makes the dequantization goldens under tests/data/dequant/.

Usage: python3 tools/reference/make_dequant_goldens.py [--out tests/data/dequant]
Needs numpy and the `gguf` package (llama.cpp's gguf-py). Deterministic (fixed seed).

For each ggml type T in F32, F16, BF16, Q4_0, Q4_1, Q8_0, Q4_K, Q6_K it writes:
  T.bin: raw blocks as a GGUF file stores them (little-endian);
  T.f32: the values gguf.quants.dequantize gives for them, raw little-endian float32.
Q4_0, Q4_1 and Q8_0 blocks come from gguf.quants.quantize of random normal data plus one block
of random bytes (with a finite fp16 scale). gguf-py cannot quantize Q4_K and Q6_K, so their
blocks are random bytes with random finite fp16 super-block scales; every 6-bit scale and
quant pattern is then as likely as any other. F16 and BF16 are random bit patterns (no NaN),
with zeros, infinities and subnormals added.
"""

import argparse
import os

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGML_QUANT_SIZES, quants

RNG = np.random.default_rng(20241123)


def random_half(n: int) -> np.ndarray:
    """Finite fp16 scales of either sign, magnitudes between 2^-12 and 2^2."""
    magnitude = np.exp2(RNG.uniform(-12, 2, n))
    return (magnitude * RNG.choice([-1.0, 1.0], n)).astype(np.float16)


def random_blocks(qtype: T, n_blocks: int, half_offsets: list) -> np.ndarray:
    """Random block bytes with finite fp16 values at the given byte offsets of each block."""
    _, block_bytes = GGML_QUANT_SIZES[qtype]
    blocks = RNG.integers(0, 256, (n_blocks, block_bytes), dtype=np.uint8)
    for offset in half_offsets:
        blocks[:, offset:offset + 2] = random_half(n_blocks).view(np.uint8).reshape(n_blocks, 2)
    return blocks


def quantized_blocks(qtype: T, n_blocks: int, half_offsets: list) -> np.ndarray:
    block_elements, block_bytes = GGML_QUANT_SIZES[qtype]
    data = RNG.normal(0.0, 1.0, (n_blocks, block_elements)).astype(np.float32)
    data[0] *= 0.01  # a block of small values
    data[1, :] = 0.0  # and a zero block
    quantized = quants.quantize(data, qtype).reshape(n_blocks, block_bytes)
    return np.concatenate([quantized, random_blocks(qtype, 1, half_offsets)])


def half_bits(dtype) -> np.ndarray:
    """Random 16-bit patterns of an fp16 or bf16 dtype, no NaN, plus the edge cases."""
    exponent_mask, mantissa_mask = (0x7C00, 0x03FF) if dtype == "f16" else (0x7F80, 0x007F)
    bits = RNG.integers(0, 1 << 16, 200, dtype=np.uint32).astype(np.uint16)
    bits = bits[~(((bits & exponent_mask) == exponent_mask) & ((bits & mantissa_mask) != 0))]
    edges = [0x0000, 0x8000, exponent_mask, 0x8000 | exponent_mask, 0x0001, 0x8001,
             mantissa_mask, exponent_mask - 1]
    return np.concatenate([np.array(edges, dtype=np.uint16), bits[:120]])


def make_all() -> dict:
    out = {}
    f32 = np.concatenate([RNG.normal(0, 10, 60).astype(np.float32),
                          np.array([0.0, -0.0, np.inf, -np.inf], dtype=np.float32)])
    out["F32"] = (f32.view(np.uint8), T.F32)
    out["F16"] = (half_bits("f16").view(np.uint8), T.F16)
    out["BF16"] = (half_bits("bf16").view(np.uint8), T.BF16)
    out["Q4_0"] = (quantized_blocks(T.Q4_0, 4, [0]), T.Q4_0)
    out["Q4_1"] = (quantized_blocks(T.Q4_1, 4, [0, 2]), T.Q4_1)
    out["Q8_0"] = (quantized_blocks(T.Q8_0, 4, [0]), T.Q8_0)
    out["Q4_K"] = (random_blocks(T.Q4_K, 4, [0, 2]), T.Q4_K)
    out["Q6_K"] = (random_blocks(T.Q6_K, 4, [208]), T.Q6_K)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="tests/data/dequant")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    for name, (raw, qtype) in make_all().items():
        raw = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1)
        expected = quants.dequantize(raw, qtype).astype("<f4").reshape(-1)
        assert np.isfinite(expected).sum() >= len(expected) - 4, name
        raw.tofile(os.path.join(args.out, f"{name}.bin"))
        expected.tofile(os.path.join(args.out, f"{name}.f32"))
        print(f"{name}: {raw.size} bytes -> {expected.size} values")


if __name__ == "__main__":
    main()
