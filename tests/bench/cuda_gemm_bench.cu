// A decode step's projections through engine/cuda/gemm.h, against the copy rate:
// at a few tokens a projection is a read of its weights, so the device-to-device copy rate
// measured here bounds it.
//
//   1. Each projection of a shape alone, at 1 to 64 tokens, its weights read from memory: every
//      run takes the next of enough copies of the matrix to fill --cycle_mib, so the L2 holds
//      none of them. Shapes the small-matrix kernel takes (gemm_small.h) get a second row, and
//      gate|up a third: its product with SwiGLU in one launch, as the engine runs it.
//   2. The projections of a whole model's layers as a decode step runs them, attention left out:
//      add + RMSNorm, q|k|v, o (+= residual), add + RMSNorm, gate|up, SwiGLU, down (+= residual),
//      each layer its own weights, then the logits. The small kernels are the engine's, launched
//      as in a step (programmatic dependent launch where the GPU has it). Twice: every GEMM on
//      cuBLAS, then as the engine runs them (small matrices on gemm_small.h's kernel, gate|up with
//      SwiGLU in one launch where it takes it).
//
// Rates are weight bytes over time, set against the device-to-device copy rate measured here.
// Random data. Prints tables; never fails on time. Every CUDA call is checked.
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "engine/cuda/device_weights.h"
#include "engine/cuda/gemm.h"
#include "engine/cuda/gemm_small.h"
#include "engine/cuda/rmsnorm.h"
#include "engine/cuda/swiglu.h"
#include "engine/dummy_model.h"
#include "tests/bench/cuda_bench_util.h"

ABSL_FLAG(int, repeats, 20, "timed runs per row (the median is printed)");
ABSL_FLAG(int, warmup, 3, "untimed runs before each row");
ABSL_FLAG(int64_t, cycle_mib, 1024, "weights cycled through per projection row, MiB at least");
ABSL_FLAG(std::vector<std::string>, archs, std::vector<std::string>({"llama3-8b", "smollm2-135m"}),
          "comma-separated --load_format dummy architectures whose shapes are timed");
ABSL_FLAG(int, chain_tokens, 32, "tokens of the whole-step table");

namespace kvtrim::engine::cuda {
namespace {

using bench::Empty;
using bench::RandomBf16;
using bench::Timing;

struct ModelShape {
  std::string name;
  int hidden, q_width, kv_width, ffn, vocab, layers;
};

ModelShape ShapeOf(const std::string& architecture) {
  absl::StatusOr<ModelConfig> c = DummyConfig(architecture);
  CHECK_OK(c.status());
  return {architecture,
          c->hidden,
          c->n_heads * c->head_dim,
          c->n_kv_heads * c->head_dim,
          c->ffn_hidden,
          c->vocab_size,
          c->n_layers};
}

struct Projection {
  const char* name;
  int rows, cols;
  GemmOutput output;
  bool accumulate;     // y += (the residual's form)
  bool gated = false;  // gate|up: the engine fuses SwiGLU into it where it can
};

std::vector<Projection> ProjectionsOf(const ModelShape& m) {
  return {{"q|k|v", m.q_width + 2 * m.kv_width, m.hidden, GemmOutput::kHalf, false},
          {"o, += residual", m.hidden, m.q_width, GemmOutput::kFloat, true},
          {"gate|up", 2 * m.ffn, m.hidden, GemmOutput::kHalf, false, true},
          {"down, += residual", m.hidden, m.ffn, GemmOutput::kFloat, true},
          {"logits", m.vocab, m.hidden, GemmOutput::kFloat, false}};
}

Timing Time(cudaStream_t stream, const std::function<void(int)>& run) {
  return bench::TimeRuns(stream, absl::GetFlag(FLAGS_warmup), absl::GetFlag(FLAGS_repeats), run);
}

double CopyRate(cudaStream_t stream) {
  const size_t bytes = size_t{2} << 30;
  DeviceBuffer src = RandomBf16(bytes / 2);
  DeviceBuffer dst = Empty(bytes);
  const Timing t = Time(stream, [&](int) {
    CHECK_CUDA(
        cudaMemcpyAsync(dst.as<void>(), src.as<void>(), bytes, cudaMemcpyDeviceToDevice, stream));
  });
  return bench::PrintCopyTable(bytes, {{"cudaMemcpyAsync D2D", t}});
}

constexpr int kMaxTokens = 64;

// `gemm` sends every shape to cuBLAS; `engine` is the engine's Gemm, whose small matrices go to
// gemm_small.h's kernel.
void ProjectionTable(const ModelShape& m, Gemm& gemm, Gemm& engine, cudaStream_t stream,
                     double copy_gbs) {
  std::printf(
      "\n## %s projections, weights from memory (GB/s = weight bytes / time; %% of the copy "
      "rate %.0f GB/s)\n\n",
      m.name.c_str(), copy_gbs);
  std::printf("| projection | tokens | ms | at the copy rate, ms | GB/s | %% of copy |\n");
  std::printf("|---|--:|--:|--:|--:|--:|\n");
  for (const Projection& p : ProjectionsOf(m)) {
    const size_t matrix_bytes = static_cast<size_t>(p.rows) * p.cols * 2;
    const size_t cycle = static_cast<size_t>(absl::GetFlag(FLAGS_cycle_mib)) << 20;
    const int copies =
        static_cast<int>(std::max<size_t>(2, (cycle + matrix_bytes - 1) / matrix_bytes));
    DeviceBuffer weights = RandomBf16(matrix_bytes / 2 * copies, 0.02f);
    DeviceBuffer x = RandomBf16(static_cast<size_t>(kMaxTokens) * p.cols);
    DeviceBuffer y = Empty(static_cast<size_t>(kMaxTokens) * p.rows * sizeof(float));
    CHECK_CUDA(cudaMemset(y.as<void>(), 0, y.bytes()));
    for (const int tokens : {1, 8, 32, 64}) {
      const Timing t = Time(stream, [&](int i) {
        const DeviceMatrix w{weights.as<char>() + (i % copies) * matrix_bytes, p.rows, p.cols};
        CHECK_OK(
            gemm.Linear(x.as<__nv_bfloat16>(), tokens, w, y.as<void>(), p.output, p.accumulate));
      });
      const double gbs = matrix_bytes / (t.median_ms * 1e-3) / 1e9;
      std::printf("| %s (%d x %d) | %d | %.4f | %.4f | %.0f | %.0f |\n", p.name, p.rows, p.cols,
                  tokens, t.median_ms, matrix_bytes / (copy_gbs * 1e9) * 1e3, gbs,
                  100 * gbs / copy_gbs);
      const DeviceMatrix shape{weights.as<void>(), p.rows, p.cols};
      if (!SmallGemmFits(x.as<void>(), tokens, shape, y.as<void>())) continue;
      const auto row = [&](const char* what, const Timing& e) {
        const double e_gbs = matrix_bytes / (e.median_ms * 1e-3) / 1e9;
        std::printf("| %s, small kernel%s | %d | %.4f | %.4f | %.0f | %.0f |\n", p.name, what,
                    tokens, e.median_ms, matrix_bytes / (copy_gbs * 1e9) * 1e3, e_gbs,
                    100 * e_gbs / copy_gbs);
      };
      row("", Time(stream, [&](int i) {
            const DeviceMatrix w{weights.as<char>() + (i % copies) * matrix_bytes, p.rows, p.cols};
            CHECK_OK(engine.Linear(x.as<__nv_bfloat16>(), tokens, w, y.as<void>(), p.output,
                                   p.accumulate));
          }));
      if (p.gated && engine.FusesSwiglu(x.as<void>(), tokens, shape, y.as<void>())) {
        row(" + SwiGLU", Time(stream, [&](int i) {
              const DeviceMatrix w{weights.as<char>() + (i % copies) * matrix_bytes, p.rows,
                                   p.cols};
              CHECK_OK(engine.SwigluLinear(x.as<void>(), tokens, w, y.as<void>()));
            }));
      }
    }
  }
}

// A model's layers of weights, one allocation per matrix kind.
struct LayerWeights {
  DeviceBuffer qkv, o, gate_up, down, norms;
};

void StepTable(const ModelShape& m, Gemm& cublas_only, Gemm& engine, cudaStream_t stream,
               double copy_gbs) {
  const int tokens = absl::GetFlag(FLAGS_chain_tokens);
  const size_t qkv = static_cast<size_t>(m.q_width + 2 * m.kv_width) * m.hidden;
  const size_t o = static_cast<size_t>(m.hidden) * m.q_width;
  const size_t gate_up = static_cast<size_t>(2 * m.ffn) * m.hidden;
  const size_t down = static_cast<size_t>(m.hidden) * m.ffn;
  std::vector<LayerWeights> layers(m.layers);
  for (LayerWeights& l : layers) {
    l.qkv = RandomBf16(qkv, 0.02f);
    l.o = RandomBf16(o, 0.02f);
    l.gate_up = RandomBf16(gate_up, 0.02f);
    l.down = RandomBf16(down, 0.02f);
    l.norms = Empty(2 * m.hidden * sizeof(float));
    std::vector<float> ones(2 * m.hidden, 1.0f);
    CHECK_CUDA(cudaMemcpy(l.norms.as<void>(), ones.data(), ones.size() * sizeof(float),
                          cudaMemcpyHostToDevice));
  }
  DeviceBuffer lm_head = RandomBf16(static_cast<size_t>(m.vocab) * m.hidden, 0.02f);
  DeviceBuffer residual = Empty(static_cast<size_t>(tokens) * m.hidden * sizeof(float));
  DeviceBuffer normed = RandomBf16(static_cast<size_t>(tokens) * std::max(m.hidden, m.q_width));
  DeviceBuffer qkv_out = Empty(static_cast<size_t>(tokens) * (m.q_width + 2 * m.kv_width) * 2);
  DeviceBuffer attention = RandomBf16(static_cast<size_t>(tokens) * m.q_width);
  DeviceBuffer gate = Empty(static_cast<size_t>(tokens) * 2 * m.ffn * 2);
  DeviceBuffer activation = Empty(static_cast<size_t>(tokens) * m.ffn * 2);
  DeviceBuffer logits = Empty(static_cast<size_t>(tokens) * m.vocab * sizeof(float));
  CHECK_CUDA(cudaMemset(residual.as<void>(), 0, residual.bytes()));
  CHECK_CUDA(cudaMemset(gate.as<void>(), 0, gate.bytes()));

  Gemm* current = &cublas_only;
  auto* x = residual.as<float>();
  auto* n = normed.as<__nv_bfloat16>();
  const __nv_bfloat16* no_delta = nullptr;
  auto step = [&] {
    for (int i = 0; i < m.layers; ++i) {
      const LayerWeights& l = layers[i];
      const float* norm = l.norms.as<float>();
      CHECK_CUDA(LaunchAddRmsNorm(x, no_delta, norm, 1e-5f, tokens, m.hidden, n, stream));
      CHECK_OK(current->Linear(n, tokens, {l.qkv.as<void>(), m.q_width + 2 * m.kv_width, m.hidden},
                               qkv_out.as<void>(), GemmOutput::kHalf));
      CHECK_OK(current->Linear(attention.as<__nv_bfloat16>(), tokens,
                               {l.o.as<void>(), m.hidden, m.q_width}, x, GemmOutput::kFloat, true));
      CHECK_CUDA(
          LaunchAddRmsNorm(x, no_delta, norm + m.hidden, 1e-5f, tokens, m.hidden, n, stream));
      const DeviceMatrix gate_up{l.gate_up.as<void>(), 2 * m.ffn, m.hidden};
      if (current->FusesSwiglu(n, tokens, gate_up, activation.as<void>())) {
        CHECK_OK(current->SwigluLinear(n, tokens, gate_up, activation.as<void>()));
      } else {
        CHECK_OK(current->Linear(n, tokens, gate_up, gate.as<void>(), GemmOutput::kHalf));
        auto* g = gate.as<__nv_bfloat16>();
        CHECK_CUDA(LaunchSwiglu(g, g + m.ffn, 2 * m.ffn, tokens, m.ffn,
                                activation.as<__nv_bfloat16>(), m.ffn, stream));
      }
      CHECK_OK(current->Linear(activation.as<__nv_bfloat16>(), tokens,
                               {l.down.as<void>(), m.hidden, m.ffn}, x, GemmOutput::kFloat, true));
    }
    CHECK_CUDA(LaunchAddRmsNorm(x, no_delta, layers[0].norms.as<float>(), 1e-5f, tokens, m.hidden,
                                n, stream));
    CHECK_OK(current->Linear(n, tokens, {lm_head.as<void>(), m.vocab, m.hidden}, logits.as<void>(),
                             GemmOutput::kFloat));
  };
  const double bytes = 2.0 * (static_cast<double>(qkv + o + gate_up + down) * m.layers +
                              static_cast<double>(m.vocab) * m.hidden);
  std::printf(
      "\n## %s: a decode step's projections and small kernels, %d layers, %d tokens, attention "
      "left out (%.2f GB of weights; at the copy rate %.3f ms)\n\n",
      m.name.c_str(), m.layers, tokens, bytes / 1e9, bytes / (copy_gbs * 1e9) * 1e3);
  std::printf("| GEMMs | median ms | min ms | max ms | weight GB/s | %% of copy |\n");
  std::printf("|---|--:|--:|--:|--:|--:|\n");
  for (Gemm* gemm : {&cublas_only, &engine}) {
    current = gemm;
    const Timing t = Time(stream, [&](int) { step(); });
    const double gbs = bytes / (t.median_ms * 1e-3) / 1e9;
    std::printf("| %s | %.3f | %.3f | %.3f | %.0f | %.0f |\n",
                gemm == &engine ? "the engine's (small matrices on gemm_small.h)" : "cuBLAS",
                t.median_ms, t.min_ms, t.max_ms, gbs, 100 * gbs / copy_gbs);
  }
}

}  // namespace
}  // namespace kvtrim::engine::cuda

int main(int argc, char** argv) {
  using namespace kvtrim::engine::cuda;
  absl::ParseCommandLine(argc, argv);
  bench::PrintDevice();
  cudaStream_t stream;
  CHECK_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  absl::StatusOr<std::unique_ptr<Gemm>> cublas_only = Gemm::Create(stream, false);
  CHECK_OK(cublas_only.status());
  absl::StatusOr<std::unique_ptr<Gemm>> engine = Gemm::Create(stream);
  CHECK_OK(engine.status());
  const double copy_gbs = CopyRate(stream);
  for (const std::string& architecture : absl::GetFlag(FLAGS_archs)) {
    const ModelShape m = ShapeOf(architecture);
    ProjectionTable(m, **cublas_only, **engine, stream, copy_gbs);
    StepTable(m, **cublas_only, **engine, stream, copy_gbs);
  }
  CHECK_CUDA(cudaStreamDestroy(stream));
  return 0;
}
