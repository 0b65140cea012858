// The GPU's two ceilings, measured, and the engine's CUDA kernels against them.
//
//   1. Device-to-device copy bandwidth (bytes read + bytes written per second), through the copy
//      engine (cudaMemcpyAsync) and through a plain 16-byte-per-thread copy kernel.
//   2. bf16 GEMM rate through the engine's own cuBLAS wrapper (engine/cuda/gemm.h): 8192³, and
//      the decode/prefill shapes of a Llama-3-8B MLP projection.
//   3. The engine's elementwise kernels at Llama-3-8B sizes: achieved GB/s against the copy
//      kernel's.
//
// Every input is random (a hash of the index; zeros run faster and hide unwritten outputs).
// Each row is the median of --repeats timed runs (CUDA events around each) after warm-up runs.
// Prints tables; never fails on time. Every CUDA call is checked: an error ends the program.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <cstdio>
#include <functional>
#include <memory>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "engine/cuda/device_weights.h"
#include "engine/cuda/embedding.h"
#include "engine/cuda/gemm.h"
#include "engine/cuda/rmsnorm.h"
#include "engine/cuda/rope.h"
#include "engine/cuda/swiglu.h"
#include "engine/model.h"
#include "engine/rope.h"
#include "tests/bench/cuda_bench_util.h"

ABSL_FLAG(int, repeats, 20, "timed runs per row (the median is printed)");
ABSL_FLAG(int, warmup, 3, "untimed runs before each row");
ABSL_FLAG(int64_t, copy_mib, 2048, "size of the copied buffer, MiB");
ABSL_FLAG(int, gemm_size, 8192, "M = N = K of the square GEMM");

namespace kvtrim::engine::cuda {
namespace {

using bench::Empty;
using bench::RandomBf16;
using bench::Timing;

// ---- random fill and copy kernels ----

__global__ void FillFloat(float* out, size_t n, uint32_t seed, float scale, float offset) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    out[i] = offset + bench::RandomValue(i, seed, scale);
  }
}

__global__ void FillIndices(int32_t* out, size_t n, uint32_t seed, int32_t bound) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    out[i] = static_cast<int32_t>(bench::Hash(i + seed) % static_cast<uint32_t>(bound));
  }
}

__global__ void CopyKernel(const uint4* __restrict__ in, uint4* __restrict__ out, size_t n) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    out[i] = in[i];
  }
}

DeviceBuffer RandomFloats(size_t n, float scale = 1.0f, float offset = 0.0f) {
  DeviceBuffer buffer = Empty(n * sizeof(float));
  FillFloat<<<bench::kFillBlocks, bench::kFillThreads>>>(buffer.as<float>(), n, bench::next_seed++,
                                                         scale, offset);
  CHECK_CUDA(cudaGetLastError());
  return buffer;
}

DeviceBuffer RandomIndices(size_t n, int32_t bound) {
  DeviceBuffer buffer = Empty(n * sizeof(int32_t));
  FillIndices<<<bench::kFillBlocks, bench::kFillThreads>>>(buffer.as<int32_t>(), n,
                                                           bench::next_seed++, bound);
  CHECK_CUDA(cudaGetLastError());
  return buffer;
}

// ---- timing ----

// `run` enqueues one repetition on `stream`; --warmup, then --repeats timed runs.
Timing Time(cudaStream_t stream, const std::function<void()>& run) {
  return bench::TimeRuns(stream, absl::GetFlag(FLAGS_warmup), absl::GetFlag(FLAGS_repeats),
                         [&](int) { run(); });
}

// ---- 1. copy ----

double CopyBandwidth(cudaStream_t stream) {
  const size_t bytes = static_cast<size_t>(absl::GetFlag(FLAGS_copy_mib)) << 20;
  DeviceBuffer src = RandomFloats(bytes / sizeof(float));
  DeviceBuffer dst = Empty(bytes);
  const Timing engine = Time(stream, [&] {
    CHECK_CUDA(
        cudaMemcpyAsync(dst.as<void>(), src.as<void>(), bytes, cudaMemcpyDeviceToDevice, stream));
  });
  const Timing kernel = Time(stream, [&] {
    CopyKernel<<<132 * 8, 512, 0, stream>>>(src.as<uint4>(), dst.as<uint4>(), bytes / 16);
    CHECK_CUDA(cudaGetLastError());
  });
  return bench::PrintCopyTable(
      bytes, {{"cudaMemcpyAsync D2D", engine}, {"copy kernel (16 B / thread)", kernel}});
}

// ---- 2. GEMM ----

void GemmRates(cudaStream_t stream) {
  absl::StatusOr<std::unique_ptr<Gemm>> gemm = Gemm::Create(stream);
  CHECK_OK(gemm.status());
  struct Shape {
    const char* name;
    int tokens, rows, cols;
  };
  const int n = absl::GetFlag(FLAGS_gemm_size);
  const Shape shapes[] = {
      {"square", n, n, n},
      {"8B w_gate, decode 1", 1, 14336, 4096},
      {"8B w_gate, decode 32", 32, 14336, 4096},
      {"8B w_gate, decode 256", 256, 14336, 4096},
      {"8B w_gate, prefill 4096", 4096, 14336, 4096},
      {"8B w_down, prefill 4096", 4096, 4096, 14336},
      {"SmolLM2 q|k|v, prefill 8192", 8192, 960, 576},
      {"SmolLM2 gate|up, prefill 8192", 8192, 3072, 576},
      {"SmolLM2 down, prefill 8192", 8192, 576, 1536},
  };
  std::printf(
      "\n## bf16 and fp16 GEMM y = x · Wᵀ (engine/cuda/gemm.h: cublasGemmEx, fp32 accumulate; "
      "fp16 on the bf16 buffers' bits, all finite)\n\n");
  std::printf(
      "| shape                         | tokens |  rows |  cols | in   | out  |  median ms |  "
      "TFLOP/s "
      "| weight GB/s |\n");
  std::printf(
      "|-------------------------------|-------:|------:|------:|------|------|-----------:|-------"
      "--:"
      "|------------:|\n");
  for (const Shape& s : shapes) {
    DeviceBuffer x = RandomBf16(static_cast<size_t>(s.tokens) * s.cols);
    DeviceBuffer w = RandomBf16(static_cast<size_t>(s.rows) * s.cols);
    DeviceBuffer y = Empty(static_cast<size_t>(s.tokens) * s.rows * sizeof(float));
    for (const HalfFloat type : {HalfFloat::kBf16, HalfFloat::kFp16}) {
      const DeviceMatrix matrix{w.as<void>(), s.rows, s.cols, type};
      const bool fp16 = type == HalfFloat::kFp16;
      for (const GemmOutput output : {GemmOutput::kHalf, GemmOutput::kFloat}) {
        const Timing t = Time(stream, [&] {
          CHECK_OK(fp16 ? (*gemm)->Linear(x.as<__half>(), s.tokens, matrix, y.as<void>(), output)
                        : (*gemm)->Linear(x.as<__nv_bfloat16>(), s.tokens, matrix, y.as<void>(),
                                          output));
        });
        const double flops = 2.0 * s.tokens * s.rows * static_cast<double>(s.cols);
        const double weight_bytes = 2.0 * s.rows * static_cast<double>(s.cols);
        std::printf("| %-29s | %6d | %5d | %5d | %-4s | %-4s | %10.3f | %8.1f | %11.0f |\n", s.name,
                    s.tokens, s.rows, s.cols, fp16 ? "fp16" : "bf16",
                    output == GemmOutput::kFloat ? "fp32"
                    : fp16                       ? "fp16"
                                                 : "bf16",
                    t.median_ms, flops / (t.median_ms * 1e-3) / 1e12,
                    weight_bytes / (t.median_ms * 1e-3) / 1e9);
      }
    }
  }
}

// ---- 3. the engine's elementwise kernels ----

void KernelRates(cudaStream_t stream, double copy_gbs) {
  // Llama-3-8B: hidden 4096, 32 query / 8 kv heads of 128, MLP 14336, vocab 128256.
  const int hidden = 4096, heads = 32, kv_heads = 8, head_dim = 128, ffn = 14336, vocab = 128256;
  ModelConfig config;
  config.head_dim = head_dim;
  config.rope_theta = 500000.0f;
  config.rope_scaling = {8.0f, 1.0f, 4.0f, 8192};
  const std::vector<float> inv_freq = RopeInverseFrequencies(config);
  DeviceBuffer d_inv_freq = Empty(inv_freq.size() * sizeof(float));
  CHECK_CUDA(cudaMemcpy(d_inv_freq.as<void>(), inv_freq.data(), inv_freq.size() * sizeof(float),
                        cudaMemcpyHostToDevice));
  DeviceBuffer table = RandomBf16(static_cast<size_t>(vocab) * hidden);

  std::printf(
      "\n## Engine kernels at Llama-3-8B sizes (GB/s = bytes read + written / time; "
      "'of copy' against the faster copy above, %.0f GB/s)\n\n",
      copy_gbs);
  std::printf(
      "| kernel                   | tokens |  median µs |   MB moved |   GB/s | of copy |\n");
  std::printf(
      "|--------------------------|-------:|-----------:|-----------:|-------:|--------:|\n");
  auto row = [&](const char* name, int tokens, double bytes, const Timing& t) {
    const double gbs = bytes / (t.median_ms * 1e-3) / 1e9;
    std::printf("| %-24s | %6d | %10.1f | %10.1f | %6.0f | %6.0f%% |\n", name, tokens,
                t.median_ms * 1e3, bytes / 1e6, gbs, 100.0 * gbs / copy_gbs);
  };
  for (const int tokens : {32, 4096, 16384}) {
    const size_t rows = static_cast<size_t>(tokens);
    DeviceBuffer ids = RandomIndices(rows, vocab);
    DeviceBuffer positions = RandomIndices(rows, 131072);
    DeviceBuffer residual = RandomFloats(rows * hidden, 4.0f);
    DeviceBuffer delta = RandomBf16(rows * hidden);
    DeviceBuffer norm_weight = RandomFloats(hidden, 0.5f, 1.0f);
    DeviceBuffer normed = Empty(rows * hidden * sizeof(__nv_bfloat16));
    const int qkv_width = (heads + 2 * kv_heads) * head_dim;
    DeviceBuffer qkv = RandomBf16(rows * qkv_width);
    DeviceBuffer gate_up = RandomBf16(rows * 2 * ffn, 3.0f);
    DeviceBuffer activated = Empty(rows * ffn * sizeof(__nv_bfloat16));

    row("embedding (bf16 -> fp32)", tokens, rows * hidden * (2.0 + 4.0) + rows * 4.0,
        Time(stream, [&] {
          CHECK_CUDA(LaunchEmbedding(ids.as<int32_t>(), tokens, nullptr, table.as<__nv_bfloat16>(),
                                     vocab, hidden, residual.as<float>(), stream));
        }));
    // Reads x (fp32) and delta (bf16), writes x (fp32) and normed (bf16).
    row("add + rmsnorm", tokens, rows * hidden * (4.0 + 2.0 + 4.0 + 2.0), Time(stream, [&] {
          CHECK_CUDA(LaunchAddRmsNorm(residual.as<float>(), delta.as<__nv_bfloat16>(),
                                      norm_weight.as<float>(), 1e-5f, tokens, hidden,
                                      normed.as<__nv_bfloat16>(), stream));
        }));
    // Reads and writes the q and k columns of the packed QKV rows.
    __nv_bfloat16* q = qkv.as<__nv_bfloat16>();
    row("rope (q, k in qkv)", tokens, rows * (heads + kv_heads) * head_dim * 2.0 * 2.0,
        Time(stream, [&] {
          CHECK_CUDA(LaunchRope(q, qkv_width, heads, q + heads * head_dim, qkv_width, kv_heads,
                                tokens, head_dim, positions.as<int32_t>(), d_inv_freq.as<float>(),
                                RopeLayout::kHalves, stream));
        }));
    const __nv_bfloat16* gate = gate_up.as<__nv_bfloat16>();
    row("swiglu (packed gate|up)", tokens, rows * ffn * 3.0 * 2.0, Time(stream, [&] {
          CHECK_CUDA(LaunchSwiglu(gate, gate + ffn, 2 * ffn, tokens, ffn,
                                  activated.as<__nv_bfloat16>(), ffn, stream));
        }));
  }
}

}  // namespace
}  // namespace kvtrim::engine::cuda

int main(int argc, char** argv) {
  using namespace kvtrim::engine::cuda;
  absl::ParseCommandLine(argc, argv);
  bench::PrintDevice();
  cudaStream_t stream;
  CHECK_CUDA(cudaStreamCreate(&stream));
  const double copy_gbs = CopyBandwidth(stream);
  GemmRates(stream);
  KernelRates(stream, copy_gbs);
  CHECK_CUDA(cudaStreamDestroy(stream));
  return 0;
}
