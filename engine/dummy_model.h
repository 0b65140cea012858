// Dummy models: the exact shapes of a named published model with pseudo-random weights and no
// file, for benchmarks (as vLLM's --load-format dummy). Their output is meaningless text; their
// cost (weights, KV bytes per token, FLOPs per token) is the real model's.
//
// Architectures (DummyArchitectures()):
//   smollm2-135m  SmolLM2-135M-Instruct as kvtrim reads its GGUF: "llama", RopeLayout::kAdjacent,
//                 tied embeddings; 135M parameters, 0.54 GB in fp32.
//   llama3-8b     Meta-Llama-3-8B as its config.json reads (no rope scaling: that came with 3.1);
//                 8.03B parameters, 32.1 GB in fp32 host matrices. Its context is 8192 tokens,
//                 so an 8192-token prompt leaves no room to generate: use llama3.1-8b.
//   llama3.1-8b   Meta-Llama-3.1-8B as its config.json reads: llama3-8b's shapes, a context of
//                 131072 and Llama-3 rope scaling (factor 8, low 1, high 4, original 8192).
//   mistral-7b    Mistral-7B-v0.1 as its config.json reads, sliding window 4096;
//                 7.24B parameters, 29.0 GB in fp32 host matrices.
//
// Weights: element i of tensor t is a uniform value from a counter-based hash (SplitMix64 of
// seed, t and i), so any element can be made on any thread and a seed always gives the same
// model. Matrices and the embedding are uniform with std 0.02 (the models' initializer_range),
// norms are 1: each layer's attention and MLP outputs are then of unit scale (std 0.02 times
// sqrt(4096) or sqrt(14336) inputs of rms 1), so the residual stream grows by a few units per
// layer and stays far from overflow in fp32 or bf16 through all 32 layers.
//
// Tokenizer: byte-level BPE without merges. Ids 0..255 are the 256 bytes, so every byte of a
// prompt is one token; ids from 256 to vocab_size - 1 are placeholders "<256>" ... that decode
// to their own text (a prompt never encodes to them: no merge makes them). No BOS, no EOS
// (generation runs to max_tokens), no chat template.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/model.h"

namespace kvtrim::engine {

// The names DummyConfig and DummyModel take, in the order the usage text lists them.
const std::vector<std::string>& DummyArchitectures();

// The preset's config, without allocating weights. config.name is "dummy <architecture>".
absl::StatusOr<ModelConfig> DummyConfig(const std::string& architecture);

// The TokenizerSpec described above, of `vocab_size` >= 256 tokens.
TokenizerSpec DummyTokenizer(int vocab_size);

// Config, random weights and tokenizer. Weights are made in parallel (OpenMP), one tensor per
// task, largest first.
absl::StatusOr<Model> DummyModel(const std::string& architecture, uint64_t seed = 0);

}  // namespace kvtrim::engine
