// Model loading from a Hugging Face model directory: config.json, model.safetensors (or the
// shards of model.safetensors.index.json) and, when present, tokenizer.json.
//
// model_type: "llama", "mistral" and "qwen2" (always q/k/v bias), SwiGLU ("silu") only.
// RoPE: theta from "rope_theta" or, as transformers >= 5 writes it, "rope_parameters"; scaling
// from "rope_scaling" or "rope_parameters": none ("default"/absent) or Llama-3 ("llama3":
// factor, low_freq_factor, high_freq_factor, original_max_position_embeddings). Other scaling
// types, Llama attention/MLP biases and Qwen2's per-layer sliding window are Unimplemented
// errors rather than a silently different model. Mistral's "sliding_window" (null = none) goes
// to ModelConfig::sliding_window.
//
// Weights keep the Hugging Face layout: Q/K rows are not permuted and rope_layout is kHalves.
// lm_head.weight absent, or tie_word_embeddings true, gives tied_embeddings.
#pragma once

#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "engine/model.h"

namespace kvtrim::engine {

// config.json text to ModelConfig; `file` names it in errors. Every error names the key.
absl::StatusOr<ModelConfig> ParseHfConfig(std::string_view config_json, std::string_view file);

// Config, weights (converted to fp32) and tokenizer of the model directory `dir`. Tensor shapes
// are checked against the config; an error names the tensor and both shapes.
absl::StatusOr<Model> LoadHfModel(const std::string& dir);

}  // namespace kvtrim::engine
