#!/usr/bin/env python3
"""Makes the tiny random models under tests/data/tiny/ and their golden logits.

Usage: python3 tools/reference/make_tiny_models.py [--out tests/data/tiny]
Needs torch, transformers, safetensors, tokenizers and gguf (CPU is enough). Deterministic: a
fixed seed per model; re-running rewrites the same weights (given the same library versions).

The models (hidden 64, SwiGLU inner 96, 4 query heads, 2 kv heads, head_dim 16, vocab 384,
max_position_embeddings 256, rms_norm_eps 1e-5; weights ~N(0, 0.15), norms ~N(1, 0.05)):
  llama_gqa    llama, 3 layers, theta 1e4, untied; safetensors F16 in 3 shards; GGUF F16
  llama3_tied  llama, 2 layers, theta 5e5, tied, rope_scaling llama3 (factor 8, low 1, high 4,
               original_max_position_embeddings 64); safetensors BF16; GGUF F32
  mistral      mistral, 2 layers, theta 1e4, untied, sliding_window 16 (shorter than the
               40-token golden sequence); safetensors F32; GGUF F16 (arch "llama")
  qwen2        qwen2, 2 layers, theta 1e6, tied, q/k/v bias; safetensors F16; GGUF F16
The tokenizer is a byte-level BPE (GPT-2 pre-tokenizer) trained on the GPL-3 text: ids 0..2 are
<|endoftext|>, <|im_start|>, <|im_end|>, then the 256 byte symbols, then 125 merges.

For each model <name> it writes:
  <name>/config.json, <name>/model.safetensors (or model-0000i-of-0000n.safetensors plus
      model.safetensors.index.json for the sharded one), <name>/tokenizer.json: the Hugging Face
      directory, written by save_pretrained(safe_serialization=True), plus
      tokenizer_config.json (bos = eos = <|endoftext|>, id 0; no BOS added). llama3_tied's
      config.json is rewritten with the pre-transformers-5 keys rope_theta / rope_scaling, the
      others keep transformers 5's "rope_parameters".
  <name>.gguf: the same weights in llama.cpp's GGUF conventions. Arch "llama" (llama, mistral)
      stores attn_q/attn_k rows permuted as convert_hf_to_gguf.py's LlamaModel.permute does;
      arch "qwen2" stores them unpermuted, with attn_{q,k,v}.bias. Llama-3 rope scaling is
      written as llama.cpp does (a rope_freqs.weight tensor of per-frequency divisors) plus the
      keys llama.rope.scaling.factor and llama.rope.scaling.original_context_length. A byte-level
      BPE vocab (the same as tokenizer.json) fills the tokenizer.ggml.* keys.
  <name>.golden.json and <name>.logits.f32: golden logits of the Hugging Face fp32 forward
      (eager attention, CPU), each sequence run alone from position 0.
      golden.json = {
        "model": name, "dir": name, "gguf": "<name>.gguf", "vocab_size": V,
        "logits_file": "<name>.logits.f32",
        "sequences": [{"ids": [int...], "logits_offset": F}, ...],
        "tokenizer_checks": [{"text": str, "ids": [int...]}, ...],   # tokenizer.json encodings
        "versions": {"torch": ..., "transformers": ..., "gguf": ..., "tokenizers": ...}}
      <name>.logits.f32 = raw float32 little-endian; sequence s occupies the floats
      [logits_offset, logits_offset + len(ids) * V), row-major (position, vocab): the logits
      after every position, not only the last.

Weights are rounded to the precision of their storage dtypes before the goldens are taken, so
every file holds exactly the weights the goldens were computed with.
"""

import argparse
import copy
import json
import math
import os
import shutil
from importlib.metadata import version

import gguf
import numpy as np
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM)

VOCAB = 384
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
SEQUENCE_LENGTHS = [1, 7, 40]
TOKENIZER_CONFIG = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>",
                    "eos_token": "<|endoftext|>", "add_bos_token": False,
                    "model_max_length": 256}
TOKENIZER_TEXTS = ["Hello world, this is free software!", "  GNU General Public License v3\n"]
COMMON = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, max_position_embeddings=256,
              rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=0)

# name -> (model class, config class, extra config, seed, safetensors dtype, gguf dtype,
#          max_shard_size or None)
MODELS = {
    "llama_gqa": (LlamaForCausalLM, LlamaConfig,
                  dict(num_hidden_layers=3, rope_theta=10000.0, tie_word_embeddings=False),
                  11, torch.float16, "f16", "100KB"),
    "llama3_tied": (LlamaForCausalLM, LlamaConfig,
                    dict(num_hidden_layers=2, rope_theta=500000.0, tie_word_embeddings=True,
                         rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                           high_freq_factor=4.0,
                                           original_max_position_embeddings=64)),
                    12, torch.bfloat16, "f32", None),
    "mistral": (MistralForCausalLM, MistralConfig,
                dict(num_hidden_layers=2, rope_theta=10000.0, tie_word_embeddings=False,
                     sliding_window=16),
                13, torch.float32, "f16", None),
    "qwen2": (Qwen2ForCausalLM, Qwen2Config,
              dict(num_hidden_layers=2, rope_theta=1000000.0, tie_word_embeddings=True),
              14, torch.float16, "f16", None),
}


def make_tokenizer() -> Tokenizer:
    """A byte-level BPE of VOCAB tokens trained on the GPL-3 text (deterministic)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    with open("/usr/share/common-licenses/GPL-3", encoding="utf-8") as f:
        tok.train_from_iterator([f.read()], trainer)
    assert tok.get_vocab_size() == VOCAB
    return tok


def tokenizer_json(tok: Tokenizer) -> dict:
    """tokenizer.json with merges as "left right" strings (the common form on the Hub)."""
    spec = json.loads(tok.to_str())
    spec["model"]["merges"] = [" ".join(m) if isinstance(m, list) else m
                               for m in spec["model"]["merges"]]
    return spec


def llama_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.permute (called with n_head_kv folded into n_head)."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def llama3_rope_factors(cfg: dict) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.generate_extra_tensors: rope_freqs.weight."""
    scaling = cfg["rope_scaling"]
    dim = cfg["head_dim"]
    freqs = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_context / low, old_context / high
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def build_model(name: str):
    model_cls, config_cls, extra, seed, st_dtype, gguf_dtype, _ = MODELS[name]
    torch.manual_seed(seed)
    config = config_cls(**COMMON, **copy.deepcopy(extra))
    model = model_cls(config).eval()
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            # Wider than the default init (std 0.02) so that the logits are not all near zero;
            # norm weights around 1. Then rounded to both storage precisions.
            if param.dim() > 1:
                param.normal_(0.0, 0.15)
            else:
                param.normal_(1.0 if "norm" in param_name else 0.0, 0.05)
            for dtype in (st_dtype, torch.float16 if gguf_dtype == "f16" else torch.float32):
                param.copy_(param.to(dtype).float())
    return model


def write_gguf(path: str, name: str, model, spec: dict, vocab: dict) -> None:
    cfg = model.config.to_dict()
    _, _, extra, _, _, gguf_dtype, _ = MODELS[name]
    arch = "qwen2" if name == "qwen2" else "llama"
    writer = gguf.GGUFWriter(path, arch)
    writer.add_name(name)
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(cfg["num_attention_heads"])
    writer.add_head_count_kv(cfg["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_rope_freq_base(extra["rope_theta"])
    writer.add_rope_dimension_count(cfg["head_dim"])
    writer.add_key_length(cfg["head_dim"])
    writer.add_value_length(cfg["head_dim"])
    writer.add_vocab_size(cfg["vocab_size"])
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if gguf_dtype == "f16"
                         else gguf.LlamaFileType.ALL_F32)
    if "sliding_window" in extra:
        writer.add_sliding_window(extra["sliding_window"])
    if "rope_scaling" in extra:
        writer.add_rope_scaling_factor(extra["rope_scaling"]["factor"])
        writer.add_rope_scaling_orig_ctx_len(
            extra["rope_scaling"]["original_max_position_embeddings"])
    write_gguf_vocab(writer, spec, vocab)
    for tensor_name, data in gguf_tensors(name, model, cfg, extra):
        # 1-D tensors (norms, biases, rope_freqs) stay F32, as llama.cpp writes them.
        if gguf_dtype == "f16" and data.ndim == 2:
            data = data.astype(np.float16)
        writer.add_tensor(tensor_name, np.ascontiguousarray(data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_gguf_vocab(writer, spec: dict, vocab: dict) -> None:
    tokens = [None] * len(vocab)
    for text, token_id in vocab.items():
        tokens[token_id] = text
    special = {t["id"] for t in spec["added_tokens"]}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL
                            for i in range(len(tokens))])
    writer.add_token_merges(spec["model"]["merges"])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(0)
    writer.add_add_bos_token(False)


def gguf_tensors(name: str, model, cfg: dict, extra: dict):
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    n_head, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    permute = name != "qwen2"
    yield "token_embd.weight", state["model.embed_tokens.weight"]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        q, k = state[p + "self_attn.q_proj.weight"], state[p + "self_attn.k_proj.weight"]
        yield f"blk.{i}.attn_norm.weight", state[p + "input_layernorm.weight"]
        yield f"blk.{i}.attn_q.weight", llama_permute(q, n_head) if permute else q
        yield f"blk.{i}.attn_k.weight", llama_permute(k, n_kv) if permute else k
        yield f"blk.{i}.attn_v.weight", state[p + "self_attn.v_proj.weight"]
        if name == "qwen2":
            for proj in "qkv":
                yield f"blk.{i}.attn_{proj}.bias", state[p + f"self_attn.{proj}_proj.bias"]
        yield f"blk.{i}.attn_output.weight", state[p + "self_attn.o_proj.weight"]
        yield f"blk.{i}.ffn_norm.weight", state[p + "post_attention_layernorm.weight"]
        yield f"blk.{i}.ffn_gate.weight", state[p + "mlp.gate_proj.weight"]
        yield f"blk.{i}.ffn_up.weight", state[p + "mlp.up_proj.weight"]
        yield f"blk.{i}.ffn_down.weight", state[p + "mlp.down_proj.weight"]
    yield "output_norm.weight", state["model.norm.weight"]
    if not cfg["tie_word_embeddings"]:
        yield "output.weight", state["lm_head.weight"]
    if "rope_scaling" in extra:
        yield "rope_freqs.weight", llama3_rope_factors({**cfg, **extra})


def legacy_rope_config(directory: str, extra: dict) -> None:
    """Rewrites config.json with top-level rope_theta / rope_scaling, as the Hub's Llama-3 files
    have them (transformers 5 writes "rope_parameters"); the loader must read both forms."""
    path = os.path.join(directory, "config.json")
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    cfg.pop("rope_parameters", None)
    cfg["rope_theta"] = extra["rope_theta"]
    cfg["rope_scaling"] = extra["rope_scaling"]
    with open(path, "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")


def golden_sequences(seed: int) -> list:
    gen = torch.Generator().manual_seed(1000 + seed)
    return [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in SEQUENCE_LENGTHS]


@torch.no_grad()
def all_position_logits(model, ids: list) -> np.ndarray:
    out = model(input_ids=torch.tensor([ids]), use_cache=False)
    return out.logits[0].float().numpy()


def check_gguf_round_trip(out: str, name: str, model) -> None:
    """Loads the GGUF back with transformers (which un-permutes Q/K) and compares weights.

    Skipped for mistral: transformers maps a llama-arch file named "mistral" to an arch gguf-py
    does not list; its permutation is the same code that llama_gqa checks."""
    if name == "mistral":
        return
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        out, gguf_file=f"{name}.gguf", dtype=torch.float32)
    want = model.state_dict()
    for key, value in loaded.state_dict().items():
        if key in want and not torch.equal(value.float(), want[key].float()):
            raise SystemExit(f"{name}.gguf: {key} differs after the round trip")


def make_one(out: str, name: str, tok: Tokenizer) -> None:
    _, _, extra, seed, st_dtype, _, shard = MODELS[name]
    built = build_model(name)
    directory = os.path.join(out, name)
    shutil.rmtree(directory, ignore_errors=True)
    kwargs = {"max_shard_size": shard} if shard else {}
    # Lossless for the weights: build_model rounded them to st_dtype already (a copy, because
    # .to() would also round the rotary inv_freq buffer).
    copy.deepcopy(built).to(st_dtype).save_pretrained(directory, safe_serialization=True, **kwargs)
    spec = tokenizer_json(tok)
    with open(os.path.join(directory, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(spec, f, ensure_ascii=False, separators=(",", ":"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(TOKENIZER_CONFIG, f, indent=2)
        f.write("\n")
    if "rope_scaling" in extra:
        legacy_rope_config(directory, extra)
    # The goldens come from the files as written, reloaded in fp32; the reloaded model must
    # agree with the one built here (catches a config.json that transformers reads otherwise).
    model = type(built).from_pretrained(directory, dtype=torch.float32,
                                        attn_implementation="eager").eval()
    if "rope_scaling" in extra and model.config.rope_parameters["rope_type"] != "llama3":
        raise SystemExit(f"{name}: config.json lost its llama3 rope scaling")
    ids = golden_sequences(seed)[-1]
    if not np.allclose(all_position_logits(built, ids), all_position_logits(model, ids),
                       rtol=1e-4, atol=1e-4):
        raise SystemExit(f"{name}: the reloaded model computes other logits")
    write_gguf(os.path.join(out, f"{name}.gguf"), name, model, spec, spec["model"]["vocab"])
    check_gguf_round_trip(out, name, model)
    write_goldens(out, name, model, seed, tok)


def write_goldens(out: str, name: str, model, seed: int, tok: Tokenizer) -> None:
    sequences, chunks, offset = [], [], 0
    for ids in golden_sequences(seed):
        logits = all_position_logits(model, ids).astype("<f4")
        sequences.append({"ids": ids, "logits_offset": offset})
        chunks.append(logits.reshape(-1))
        offset += logits.size
    np.concatenate(chunks).tofile(os.path.join(out, f"{name}.logits.f32"))
    golden = {
        "model": name, "dir": name, "gguf": f"{name}.gguf", "vocab_size": VOCAB,
        "logits_file": f"{name}.logits.f32", "sequences": sequences,
        "tokenizer_checks": [{"text": t, "ids": tok.encode(t).ids} for t in TOKENIZER_TEXTS],
        "versions": {p: version(p) for p in ("torch", "transformers", "gguf", "tokenizers")},
    }
    with open(os.path.join(out, f"{name}.golden.json"), "w", encoding="utf-8") as f:
        json.dump(golden, f, separators=(",", ":"))
        f.write("\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="tests/data/tiny")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(1)
    tok = make_tokenizer()
    for name in MODELS:
        make_one(args.out, name, tok)
        print(f"wrote {name}")


if __name__ == "__main__":
    main()
