// CPU reference engine throughput on a real model: prefill tokens/s for given prompt lengths
// and decode tokens/s for given batch sizes, beside this machine's limits (memory copy
// bandwidth and OpenBLAS sgemm rate). Prints tables; never fails on time.
//
// Prefill is compute bound: its GFLOP/s column counts the projection GEMMs (2 x weights x
// tokens) and causal attention. Decode reads all fp32 weights once per step, whatever the batch
// (GB/s = steps/s x weight bytes), and does 2 x weights FLOPs per token: at batch 1 it is bound
// by memory bandwidth, at large batch by the GEMM rate; "of limit" is the nearer of the two.
//
//   build/tests/cpu_bench --model ~/.cache/kvtrim/SmolLM2-135M-Instruct.Q4_1.gguf
#include <cblas.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "engine/generator.h"
#include "engine/model.h"

ABSL_FLAG(std::string, model, "", "model file or directory");
ABSL_FLAG(std::string, prefill, "512,4096", "prompt lengths for prefill throughput");
ABSL_FLAG(std::string, batches, "1,8,32", "batch sizes for decode throughput");
ABSL_FLAG(int, decode_prompt, 128, "prompt tokens per sequence before decoding");
ABSL_FLAG(int, decode_tokens, 32, "tokens generated per sequence");

namespace {

using Clock = std::chrono::steady_clock;

std::vector<int> ParseList(const std::string& text) {
  std::vector<int> values;
  for (absl::string_view part : absl::StrSplit(text, ',')) {
    int v;
    if (absl::SimpleAtoi(part, &v)) values.push_back(v);
  }
  return values;
}

std::vector<int32_t> RandomPrompt(int length, int vocab, std::mt19937& rng) {
  std::vector<int32_t> prompt(length);
  for (int32_t& id : prompt) id = static_cast<int32_t>(rng() % vocab);
  return prompt;
}

double Seconds(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// Best of a few copies of a 1 GiB buffer: bytes read + written per second.
double CopyGigabytesPerSecond() {
  const size_t bytes = size_t{1} << 30;
  std::vector<char> from(bytes, 1), to(bytes, 0);
  double best = 0.0;
  for (int i = 0; i < 3; ++i) {
    auto start = Clock::now();
    std::memcpy(to.data(), from.data(), bytes);
    best = std::max(best, 2.0 * bytes / Seconds(start) / 1e9);
  }
  return best;
}

// Best of a few (m, k) x (k, n) sgemms: GFLOP/s.
double SgemmGflops(int m, int n, int k) {
  std::vector<float> a(static_cast<size_t>(m) * k, 0.5f), b(static_cast<size_t>(k) * n, 0.25f),
      c(static_cast<size_t>(m) * n);
  double best = 0.0;
  for (int i = 0; i < 5; ++i) {
    auto start = Clock::now();
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, n, k, 1.0f, a.data(), k, b.data(), k,
                0.0f, c.data(), n);
    best = std::max(best, 2.0 * m * n * k / Seconds(start) / 1e9);
  }
  return best;
}

// Elements of the matrices every token is multiplied by, without the output projection.
double LayerWeightElements(const kvtrim::engine::Model& model) {
  double elements = 0;
  for (const kvtrim::engine::LayerWeights& l : model.weights.layers) {
    for (const kvtrim::engine::Matrix* w :
         {&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down}) {
      elements += static_cast<double>(w->rows) * w->cols;
    }
  }
  return elements;
}

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  absl::StatusOr<kvtrim::engine::Model> model =
      kvtrim::engine::LoadModel(absl::GetFlag(FLAGS_model));
  if (!model.ok()) {
    std::fprintf(stderr, "%s\n", std::string(model.status().message()).c_str());
    return 1;
  }
  // Prefill goes through PromptLogits (a pool of its own, chunks of step_tokens = 512).
  auto generator = kvtrim::engine::Generator::Create(&*model, {});
  if (!generator.ok()) {
    std::fprintf(stderr, "%s\n", std::string(generator.status().message()).c_str());
    return 1;
  }
  const int vocab = model->config.vocab_size;
  std::mt19937 rng(1);
  const kvtrim::engine::ModelConfig& c = model->config;
  const double layer_elements = LayerWeightElements(*model);
  const double head_elements = static_cast<double>(c.vocab_size) * c.hidden;
  const double step_bytes = 4.0 * (layer_elements + head_elements);  // fp32 weights per step
  const double copy_gbs = CopyGigabytesPerSecond();
  const double sgemm_gflops = SgemmGflops(512, c.ffn_hidden, c.hidden);
  std::printf("model: %s (%d layers, %.0f M fp32 weight elements per step)\n", c.name.c_str(),
              c.n_layers, (layer_elements + head_elements) / 1e6);
  std::printf(
      "machine: %u hardware threads, memcpy %.1f GB/s (read + write), sgemm %.1f GFLOP/s "
      "(512 x %d x %d)\n\n",
      std::thread::hardware_concurrency(), copy_gbs, sgemm_gflops, c.ffn_hidden, c.hidden);
  std::printf(
      "| phase   | prompt | batch | new tokens | seconds | tokens/s | GFLOP/s | GB/s  | of limit "
      "|\n");
  std::printf(
      "|---------|-------:|------:|-----------:|--------:|---------:|--------:|------:|---------:|"
      "\n");
  for (int length : ParseList(absl::GetFlag(FLAGS_prefill))) {
    std::vector<int32_t> prompt = RandomPrompt(length, vocab, rng);
    auto start = Clock::now();
    auto logits = (*generator)->PromptLogits(prompt);
    double seconds = Seconds(start);
    if (!logits.ok()) return 1;
    // Causal attention: QKᵀ and PV over n²/2 (query, key) pairs per head and layer.
    const double attention_flops =
        4.0 * c.n_layers * c.n_heads * c.head_dim * (static_cast<double>(length) * length / 2);
    const double gflops = (2.0 * layer_elements * length + attention_flops) / seconds / 1e9;
    std::printf("| prefill | %6d | %5d | %10d | %7.2f | %8.1f | %7.1f |       | %7.0f%% |\n",
                length, 1, 0, seconds, length / seconds, gflops, 100.0 * gflops / sgemm_gflops);
  }
  const int prompt_length = absl::GetFlag(FLAGS_decode_prompt);
  const int new_tokens = absl::GetFlag(FLAGS_decode_tokens);
  for (int batch : ParseList(absl::GetFlag(FLAGS_batches))) {
    std::vector<kvtrim::engine::GenerationRequest> requests(batch);
    for (auto& r : requests) {
      r.prompt = RandomPrompt(prompt_length, vocab, rng);
      r.max_tokens = new_tokens;
      r.ignore_eos = true;
    }
    // One step may hold every prompt, so all sequences prefill together and then decode as one
    // batch, as the table means.
    auto decoder = kvtrim::engine::Generator::Create(
        &*model, {.pool_bytes = size_t{8} << 30,
                  .step_tokens = std::max(512, batch * prompt_length),
                  .max_running = batch});
    if (!decoder.ok()) return 1;
    // Decode time = time from the first sampled token of the batch to the end.
    Clock::time_point first_token;
    bool seen = false;
    auto on_token = [&](int, const kvtrim::engine::TokenOutput&) {
      if (!seen) first_token = Clock::now();
      seen = true;
    };
    auto results = (*decoder)->Run(requests, on_token);
    if (!results.ok()) return 1;
    // The first token of each sequence comes from prefill; the remaining ones from decode steps.
    const double seconds = Seconds(first_token);
    const int decoded = batch * (new_tokens - 1);
    // The binding limit of the two: weight bytes per step at batch 1, GEMM rate at large batch.
    const double gbs = (new_tokens - 1) / seconds * step_bytes / 1e9;
    const double gflops = 2.0 * (layer_elements + head_elements) * decoded / seconds / 1e9;
    std::printf("| decode  | %6d | %5d | %10d | %7.2f | %8.1f | %7.1f | %5.1f | %7.0f%% |\n",
                prompt_length, batch, decoded, seconds, decoded / seconds, gflops, gbs,
                100.0 * std::max(gbs / copy_gbs, gflops / sgemm_gflops));
  }
  return 0;
}
