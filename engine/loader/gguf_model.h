// Model loading from GGUF: architecture numbers from {arch}.* metadata, weights dequantized to
// fp32, and the tokenizer from tokenizer.ggml.*.
//
// Architectures: "llama" (Llama 1-3, SmolLM, Mistral files converted as llama) and "qwen2".
// RoPE layout follows llama.cpp: "llama" files hold Q/K rows permuted for adjacent-pair rotation
// (RopeLayout::kAdjacent); "qwen2" rotates halves (kHalves). Weights are kept as stored.
//
// RoPE scaling supported:
//   - none ({arch}.rope.scaling.type absent or "none", or "linear" with factor 1);
//   - Llama-3 as explicit keys: {arch}.rope.scaling.type = "llama3", .factor,
//     .low_freq_factor (default 1), .high_freq_factor (default 4), .original_context_length
//     (default 8192);
//   - Llama-3 as llama.cpp's converter writes it: a rope_freqs.weight tensor of head_dim / 2
//     per-frequency divisors, accepted when it equals the Llama-3 formula with factor = its
//     largest entry and the keys above (or their defaults).
// Anything else ("linear" with another factor, "yarn", "longrope", other rope_freqs) is an
// Unimplemented error rather than a silently different model.
#pragma once

#include <string>

#include "absl/status/statusor.h"
#include "engine/loader/gguf.h"
#include "engine/model.h"

namespace kvtrim::engine {

// Config, weights and tokenizer of a GGUF file. Tensor shapes are checked against the config;
// an error names the tensor and both shapes.
absl::StatusOr<Model> LoadGgufModel(const std::string& path);
absl::StatusOr<Model> LoadGgufModel(const GgufFile& file);

// The tokenizer alone; reads no tensor data.
absl::StatusOr<TokenizerSpec> LoadGgufTokenizer(const std::string& path);
absl::StatusOr<TokenizerSpec> ReadGgufTokenizer(const GgufFile& file);

// The architecture numbers alone.
absl::StatusOr<ModelConfig> ReadGgufConfig(const GgufFile& file);

}  // namespace kvtrim::engine
