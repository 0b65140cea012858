// A loaded model: architecture numbers, fp32 weights and the tokenizer description.
// Loaders (GGUF, Hugging Face directories) fill it; backends read it.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace kvtrim::engine {

// How RoPE pairs the channels of one head.
//   kHalves:   channel i pairs with i + head_dim/2 (Hugging Face "rotate_half", llama.cpp NEOX).
//   kAdjacent: channel 2i pairs with 2i + 1 (llama.cpp NORM; GGUF Llama files store Q/K rows
//              permuted so that this layout gives the same result as kHalves on the HF weights).
enum class RopeLayout { kHalves, kAdjacent };

// A 16-bit float format: bfloat16 (8 exponent bits) or IEEE half (5 exponent bits, 10 of
// mantissa).
enum class HalfFloat { kBf16, kFp16 };

// Llama-3 "rope_type: llama3" frequency scaling; factor == 0 means none.
struct RopeScaling {
  float factor = 0.0f;
  float low_freq_factor = 1.0f;
  float high_freq_factor = 4.0f;
  int original_max_position = 8192;
};

struct ModelConfig {
  std::string architecture;  // "llama", "mistral", "qwen2"
  std::string name;
  int n_layers = 0;
  int hidden = 0;      // model width
  int ffn_hidden = 0;  // SwiGLU inner width
  int n_heads = 0;     // query heads
  int n_kv_heads = 0;  // key/value heads (GQA groups = n_heads / n_kv_heads)
  int head_dim = 0;
  int vocab_size = 0;
  int max_context = 0;
  float rms_eps = 1e-5f;
  float rope_theta = 10000.0f;
  RopeLayout rope_layout = RopeLayout::kHalves;
  RopeScaling rope_scaling;
  bool qkv_bias = false;         // Qwen2
  bool tied_embeddings = false;  // output projection reuses token_embedding
  // Mistral sliding window; 0 = full attention.
  int sliding_window = 0;
  // The 16-bit format the model's files give its weights in: kFp16 where config.json's dtype
  // (torch_dtype before transformers 5) is "float16" or a GGUF's matrices are F16 (file type
  // MOSTLY_F16); kBf16 otherwise (bf16, fp32 and quantized files). The CUDA engine keeps the
  // weights in this format unless told otherwise; the CPU engine computes in fp32 either way.
  HalfFloat dtype = HalfFloat::kBf16;
};

// Row-major fp32 matrix: rows = output features, cols = input features (as torch.nn.Linear).
struct Matrix {
  int rows = 0;
  int cols = 0;
  std::vector<float> data;  // (rows, cols)
};

struct LayerWeights {
  std::vector<float> attn_norm;   // (hidden)
  Matrix wq;                      // (n_heads * head_dim, hidden)
  Matrix wk;                      // (n_kv_heads * head_dim, hidden)
  Matrix wv;                      // (n_kv_heads * head_dim, hidden)
  std::vector<float> bq, bk, bv;  // empty unless qkv_bias
  Matrix wo;                      // (hidden, n_heads * head_dim)
  std::vector<float> ffn_norm;    // (hidden)
  Matrix w_gate;                  // (ffn_hidden, hidden)
  Matrix w_up;                    // (ffn_hidden, hidden)
  Matrix w_down;                  // (hidden, ffn_hidden)
};

struct ModelWeights {
  Matrix token_embedding;  // (vocab_size, hidden)
  std::vector<LayerWeights> layers;
  std::vector<float> output_norm;  // (hidden)
  Matrix output;                   // (vocab_size, hidden); empty when tied_embeddings
  const Matrix& lm_head(bool tied) const { return tied ? token_embedding : output; }
};

// Byte-level BPE description, as GGUF's tokenizer.ggml.* keys or a tokenizer.json carry it.
struct TokenizerSpec {
  std::string model = "gpt2";        // tokenizer.ggml.model
  std::string pre;                   // pre-tokenizer name: "smollm", "llama-bpe", "qwen2", "gpt2"
  std::vector<std::string> tokens;   // id -> token text (byte-level encoded)
  std::vector<int32_t> token_types;  // id -> 1 normal, 3 control, 4 user-defined, ...
  std::vector<std::string> merges;   // "left right", highest priority first
  int32_t bos_id = -1;
  int32_t eos_id = -1;
  int32_t pad_id = -1;
  bool add_bos = false;
  std::string chat_template;  // Jinja source, used to recognise the template family
};

struct Model {
  ModelConfig config;
  ModelWeights weights;
  TokenizerSpec tokenizer;
};

// Loads a GGUF file or a Hugging Face model directory (config.json + *.safetensors).
absl::StatusOr<Model> LoadModel(const std::string& path);

}  // namespace kvtrim::engine
