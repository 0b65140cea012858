#!/usr/bin/env python3
"""Golden token ids, logits and greedy generations of SmolLM2-135M-Instruct (Q4_1 GGUF).

Usage: python3 tools/reference/make_smollm2_goldens.py [--model PATH] [--out tests/data/smollm2]
Needs torch, transformers, accelerate and gguf. Runs Hugging Face transformers in fp32 on the CPU
on the GGUF itself (transformers dequantizes Q4_1 to fp32 and builds the tokenizer from the
GGUF's tokenizer.ggml.* keys), so the reference sees exactly the weights kvtrim loads.

Writes:
  <out>/<prompt>.logits.f32: the logits after the last prompt token, vocab_size float32 values,
      little-endian, nothing else in the file.
  <out>/goldens.json = {
    "model": "SmolLM2-135M-Instruct.Q4_1.gguf", "model_sha256": hex, "vocab_size": 49152,
    "versions": {"torch", "transformers", "gguf", "tokenizers", "accelerate"},
    "eos_id": int, "bos_id": int or null,
    "prompts": [{
      "name": str,
      "kind": "chat" | "text",
      "messages": [{"role", "content"}] (chat only: the input of apply_chat_template with
                  add_generation_prompt=True),
      "text": str (the exact string that was tokenized; for chat, the template's output),
      "source": str (how a GPL-3 prompt was cut, else absent),
      "ids": [int] (tokenizer(text) with the tokenizer's own add_special_tokens default; for
                  chat, add_special_tokens=False since the template already has them),
      "logits_file": "<prompt>.logits.f32",
      "greedy_ids": [64 ints]: argmax decoding of 64 new tokens with the KV cache, no sampling,
                  no repetition penalty, and eos NOT treated specially (decoding goes on past
                  it, so every id is the argmax of the full vocabulary),
      "greedy_margins": [64 floats]: top-1 minus top-2 logit at each step (near-ties are where
                  an fp32 engine may legitimately pick the other token),
      "first_eos": index into greedy_ids of the first eos, or -1,
      "greedy_text": the decoded greedy_ids up to (not including) the first eos}]}
"""

import argparse
import hashlib
import json
import os
from importlib.metadata import version

import numpy as np
import torch
import transformers

DEFAULT_MODEL = os.path.expanduser("~/.cache/kvtrim/SmolLM2-135M-Instruct.Q4_1.gguf")
LICENSE = "/usr/share/common-licenses/GPL-3"
NEW_TOKENS = 64

CHATS = {
    "chat_capital": [{"role": "user", "content": "What is the capital of France?"}],
    "chat_haiku": [{"role": "user", "content": "Write a haiku about the sea."}],
}
TEXTS = {"text_fox": "The quick brown fox jumps over the lazy dog. Once upon a time,"}
# name -> minimum token count; the prompt is the shortest prefix of whole GPL-3 lines that has
# at least that many tokens.
LICENSE_PROMPTS = {"gpl_1k": 1000, "gpl_4k": 4096}


def license_prompt(tokenizer, min_tokens: int) -> tuple[str, str]:
    with open(LICENSE, encoding="utf-8") as f:
        lines = f.read().splitlines(keepends=True)
    # Token counts grow with the line count; bisect on the number of lines.
    low, high = 1, len(lines)
    if len(tokenizer("".join(lines))["input_ids"]) < min_tokens:
        raise SystemExit(f"{LICENSE} has fewer than {min_tokens} tokens")
    while low < high:
        mid = (low + high) // 2
        if len(tokenizer("".join(lines[:mid]))["input_ids"]) >= min_tokens:
            high = mid
        else:
            low = mid + 1
    return "".join(lines[:low]), f"{LICENSE} lines 1..{low}"


def make_prompts(tokenizer) -> list[dict]:
    prompts = []
    for name, messages in CHATS.items():
        text = tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        prompts.append({"name": name, "kind": "chat", "messages": messages, "text": text,
                        "ids": ids})
    for name, text in TEXTS.items():
        prompts.append({"name": name, "kind": "text", "text": text,
                        "ids": tokenizer(text)["input_ids"]})
    for name, min_tokens in LICENSE_PROMPTS.items():
        text, source = license_prompt(tokenizer, min_tokens)
        prompts.append({"name": name, "kind": "text", "text": text, "source": source,
                        "ids": tokenizer(text)["input_ids"]})
    return prompts


@torch.no_grad()
def prefill_and_greedy(model, ids: list[int]) -> tuple[np.ndarray, list[int], list[float]]:
    out = model(input_ids=torch.tensor([ids]), use_cache=True)
    last_logits = out.logits[0, -1].float().numpy().copy()
    cache, logits = out.past_key_values, out.logits[0, -1]
    greedy, margins = [], []
    for _ in range(NEW_TOKENS):
        top2 = torch.topk(logits, 2)
        token = int(top2.indices[0])
        greedy.append(token)
        margins.append(float(top2.values[0] - top2.values[1]))
        out = model(input_ids=torch.tensor([[token]]), past_key_values=cache, use_cache=True)
        cache, logits = out.past_key_values, out.logits[0, -1]
    return last_logits, greedy, margins


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--out", default="tests/data/smollm2")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    directory, filename = os.path.split(os.path.abspath(args.model))
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=filename)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        directory, gguf_file=filename, dtype=torch.float32).eval()
    eos_id = tokenizer.eos_token_id
    prompts = make_prompts(tokenizer)
    for prompt in prompts:
        logits, greedy, margins = prefill_and_greedy(model, prompt["ids"])
        prompt["logits_file"] = f"{prompt['name']}.logits.f32"
        logits.astype("<f4").tofile(os.path.join(args.out, prompt["logits_file"]))
        first_eos = greedy.index(eos_id) if eos_id in greedy else -1
        prompt["greedy_ids"] = greedy
        prompt["greedy_margins"] = [round(m, 5) for m in margins]
        prompt["first_eos"] = first_eos
        prompt["greedy_text"] = tokenizer.decode(greedy[:first_eos] if first_eos >= 0
                                                 else greedy)
        print(f"{prompt['name']}: {len(prompt['ids'])} prompt tokens, first eos {first_eos}")
    goldens = {
        "model": filename, "model_sha256": sha256(args.model),
        "vocab_size": int(model.config.vocab_size),
        "versions": {p: version(p) for p in
                     ("torch", "transformers", "gguf", "tokenizers", "accelerate")},
        "eos_id": eos_id, "bos_id": tokenizer.bos_token_id, "prompts": prompts,
    }
    with open(os.path.join(args.out, "goldens.json"), "w", encoding="utf-8") as f:
        json.dump(goldens, f, indent=1, ensure_ascii=False)
        f.write("\n")


if __name__ == "__main__":
    main()
