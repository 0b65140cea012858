#!/usr/bin/env python3
"""Makes the GGUF loader goldens and the gguf_fuzz seed corpus.

Usage: python3 tools/reference/make_gguf_goldens.py [--model PATH] [--root .]
Needs numpy and the `gguf` package (llama.cpp's gguf-py). Deterministic (fixed seed).

Writes:
  tests/data/gguf/smollm2_weights.json: a few dequantized weight values of
      SmolLM2-135M-Instruct.Q4_1.gguf (default: $KVTRIM_CACHE or ~/.cache/kvtrim), read with
      gguf.GGUFReader and gguf.quants.dequantize:
      {"model": file name, "sha256": ..., "versions": {"gguf": ...},
       "samples": [{"tensor": name, "type": "Q4_1", "row": r, "col": c, "values": [float...]}]}
      values[i] is element (row, col + i) of the tensor as a (rows, cols) matrix, where cols is
      GGUF's ne[0]; 1-D tensors have row 0.
  tests/fuzz/corpus/gguf_fuzz/*.gguf: tiny valid files (< 10 KB each) for the fuzzer to start
      from: a llama model with every dequantizable 2-D type and Llama-3 rope_freqs, a qwen2
      model with q/k/v biases and tied embeddings, and a file of one tensor per type plus
      metadata of every value type at alignment 64.
"""

import argparse
import hashlib
import json
import math
import os
from importlib.metadata import version

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T

RNG = np.random.default_rng(7)

SMOLLM2_SAMPLES = [
    ("token_embd.weight", [0, 1, 12345, 49151], [0, 288]),
    ("blk.0.attn_q.weight", [0, 575], [0, 568]),
    ("blk.0.attn_k.weight", [0, 191], [32]),
    ("blk.7.attn_v.weight", [100], [0]),
    ("blk.12.attn_output.weight", [3], [64]),
    ("blk.15.ffn_gate.weight", [1535], [0]),
    ("blk.22.ffn_up.weight", [800], [200]),
    ("blk.29.ffn_down.weight", [575], [1528]),
    ("blk.0.attn_norm.weight", [0], [0]),
    ("blk.29.ffn_norm.weight", [0], [568]),
    ("output_norm.weight", [0], [0, 100]),
]


def smollm2_goldens(model_path: str) -> dict:
    reader = gguf.GGUFReader(model_path)
    tensors = {t.name: t for t in reader.tensors}
    samples = []
    for name, rows, cols in SMOLLM2_SAMPLES:
        tensor = tensors[name]
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        values = values.reshape(-1, int(tensor.shape[0]))  # (rows, ne[0])
        for row in rows:
            for col in cols:
                samples.append({"tensor": name, "type": tensor.tensor_type.name, "row": row,
                                "col": col,
                                "values": [float(v) for v in values[row, col:col + 8]]})
    with open(model_path, "rb") as f:
        sha256 = hashlib.sha256(f.read()).hexdigest()
    return {"model": os.path.basename(model_path), "sha256": sha256,
            "versions": {"gguf": version("gguf")}, "samples": samples}


def add_tensor(writer, name: str, rows: int, cols: int, qtype: T) -> None:
    """A random (rows, cols) tensor stored as qtype; 1-D when rows == 0."""
    shape = (cols,) if rows == 0 else (rows, cols)
    data = RNG.normal(0.0, 0.5, shape).astype(np.float32)
    if qtype == T.F32:
        writer.add_tensor(name, data)
    elif qtype == T.F16:
        writer.add_tensor(name, data.astype(np.float16))
    else:
        writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)


def add_tokenizer(writer, n_tokens: int) -> None:
    tokens = ["<s>", "</s>"] + [chr(ord("a") + i) for i in range(n_tokens - 3)] + ["ab"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3] + [1] * (n_tokens - 2))
    writer.add_token_merges(["a b"])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    writer.add_pad_token_id(1)
    writer.add_add_bos_token(True)
    writer.add_chat_template("{{ messages }}")


def add_config(writer, name: str, n_layers: int, vocab: int) -> None:
    writer.add_name(name)
    writer.add_block_count(n_layers)
    writer.add_context_length(128)
    writer.add_embedding_length(32)
    writer.add_feed_forward_length(32)
    writer.add_head_count(2)
    writer.add_head_count_kv(1)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(16)
    writer.add_vocab_size(vocab)


def llama3_divisors(theta: float, head_dim: int, factor: float, old_context: int) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.generate_extra_tensors with low 1, high 4."""
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < old_context / 4:
            out.append(1.0)
        elif wavelen > old_context:
            out.append(factor)
        else:
            smooth = (old_context / wavelen - 1) / 3
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def write(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def tiny_llama(path: str) -> None:
    writer = gguf.GGUFWriter(path, "llama")
    add_config(writer, "tiny llama", 1, 8)
    writer.add_rope_scaling_orig_ctx_len(64)
    add_tokenizer(writer, 8)
    add_tensor(writer, "token_embd.weight", 8, 32, T.Q8_0)
    add_tensor(writer, "blk.0.attn_norm.weight", 0, 32, T.F32)
    add_tensor(writer, "blk.0.attn_q.weight", 32, 32, T.Q4_0)
    add_tensor(writer, "blk.0.attn_k.weight", 16, 32, T.Q4_1)
    add_tensor(writer, "blk.0.attn_v.weight", 16, 32, T.F16)
    add_tensor(writer, "blk.0.attn_output.weight", 32, 32, T.BF16)
    add_tensor(writer, "blk.0.ffn_norm.weight", 0, 32, T.F32)
    add_tensor(writer, "blk.0.ffn_gate.weight", 32, 32, T.Q8_0)
    add_tensor(writer, "blk.0.ffn_up.weight", 32, 32, T.Q4_1)
    add_tensor(writer, "blk.0.ffn_down.weight", 32, 32, T.Q4_0)
    add_tensor(writer, "output_norm.weight", 0, 32, T.F32)
    add_tensor(writer, "output.weight", 8, 32, T.Q4_1)
    writer.add_tensor("rope_freqs.weight", llama3_divisors(10000.0, 16, 8.0, 64))
    write(writer)


def tiny_qwen2(path: str) -> None:
    writer = gguf.GGUFWriter(path, "qwen2")
    add_config(writer, "tiny qwen2", 1, 8)
    add_tokenizer(writer, 8)
    add_tensor(writer, "token_embd.weight", 8, 32, T.F16)
    for norm in ("attn_norm", "ffn_norm"):
        add_tensor(writer, f"blk.0.{norm}.weight", 0, 32, T.F32)
    for proj, rows in (("q", 32), ("k", 16), ("v", 16)):
        add_tensor(writer, f"blk.0.attn_{proj}.weight", rows, 32, T.F16)
        add_tensor(writer, f"blk.0.attn_{proj}.bias", 0, rows, T.F32)
    add_tensor(writer, "blk.0.attn_output.weight", 32, 32, T.Q8_0)
    for proj in ("ffn_gate", "ffn_up", "ffn_down"):
        add_tensor(writer, f"blk.0.{proj}.weight", 32, 32, T.Q4_0)
    add_tensor(writer, "output_norm.weight", 0, 32, T.F32)
    write(writer)


def all_types(path: str) -> None:
    writer = gguf.GGUFWriter(path, "test")
    writer.add_custom_alignment(64)
    writer.add_uint8("test.u8", 200)
    writer.add_int8("test.i8", -100)
    writer.add_uint16("test.u16", 60000)
    writer.add_int16("test.i16", -30000)
    writer.add_uint32("test.u32", 4000000000)
    writer.add_int32("test.i32", -2000000000)
    writer.add_uint64("test.u64", 1 << 40)
    writer.add_int64("test.i64", -(1 << 40))
    writer.add_float32("test.f32", 1.5)
    writer.add_float64("test.f64", -2.25)
    writer.add_bool("test.bool", True)
    writer.add_string("test.string", "héllo")
    writer.add_array("test.ints", [1, -2, 3])
    writer.add_array("test.floats", [0.5, 1.5])
    writer.add_array("test.strings", ["a", "", "ccc"])
    writer.add_array("test.bools", [True, False])
    for qtype in (T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q8_0):
        add_tensor(writer, f"t.{qtype.name}", 1, 256, qtype)
    for qtype, block_bytes in ((T.Q4_K, 144), (T.Q6_K, 210)):
        raw = RNG.integers(0, 256, (1, block_bytes), dtype=np.uint8)
        scale_offset = 0 if qtype == T.Q4_K else 208
        raw[0, scale_offset:scale_offset + 2] = np.array([0.01], np.float16).view(np.uint8)
        writer.add_tensor(f"t.{qtype.name}", raw, raw_dtype=qtype)
    write(writer)


def main() -> None:
    cache = os.environ.get("KVTRIM_CACHE", os.path.expanduser("~/.cache/kvtrim"))
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=os.path.join(cache, "SmolLM2-135M-Instruct.Q4_1.gguf"))
    parser.add_argument("--root", default=".")
    args = parser.parse_args()
    data = os.path.join(args.root, "tests/data/gguf")
    corpus = os.path.join(args.root, "tests/fuzz/corpus/gguf_fuzz")
    os.makedirs(data, exist_ok=True)
    os.makedirs(corpus, exist_ok=True)
    with open(os.path.join(data, "smollm2_weights.json"), "w", encoding="utf-8") as f:
        json.dump(smollm2_goldens(args.model), f, indent=1)
        f.write("\n")
    tiny_llama(os.path.join(corpus, "tiny_llama.gguf"))
    tiny_qwen2(os.path.join(corpus, "tiny_qwen2.gguf"))
    all_types(os.path.join(corpus, "all_types.gguf"))
    for name in sorted(os.listdir(corpus)):
        size = os.path.getsize(os.path.join(corpus, name))
        assert size < 10_000, f"{name} is {size} bytes"
        print(f"{name}: {size} bytes")


if __name__ == "__main__":
    main()
