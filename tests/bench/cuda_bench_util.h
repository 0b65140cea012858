// Helpers of the CUDA benchmarks (tests/bench/*.cu): checks that end the program, random device
// data, timing with CUDA events, the device line and the device-to-device copy table that every
// benchmark sets its rates against.
//
// Random data is a hash of the index: zeros run faster and hide unwritten outputs. Every CUDA call
// is checked: an error prints where it happened and ends the program. Each benchmark is one
// translation unit, which includes this header once.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <initializer_list>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/cuda/device_weights.h"

#define CHECK_CUDA(expr)                                                 \
  do {                                                                   \
    const cudaError_t error_ = (expr);                                   \
    if (error_ != cudaSuccess) {                                         \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #expr, \
                   cudaGetErrorString(error_));                          \
      std::exit(1);                                                      \
    }                                                                    \
  } while (0)

#define CHECK_OK(expr)                                                                     \
  do {                                                                                     \
    const absl::Status status_ = (expr);                                                   \
    if (!status_.ok()) {                                                                   \
      std::fprintf(stderr, "%s:%d: %s\n", __FILE__, __LINE__, status_.ToString().c_str()); \
      std::exit(1);                                                                        \
    }                                                                                      \
  } while (0)

namespace kvtrim::engine::cuda::bench {

// ---- random fill ----

__device__ inline uint32_t Hash(uint64_t x) {
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdull;
  x ^= x >> 33;
  x *= 0xc4ceb9fe1a85ec53ull;
  x ^= x >> 33;
  return static_cast<uint32_t>(x);
}

// Uniform in [-scale, scale).
__device__ inline float RandomValue(uint64_t index, uint32_t seed, float scale) {
  return (Hash(index * 0x9e3779b97f4a7c15ull + seed) * 0x1p-31f - 1.0f) * scale;
}

// static: a __global__ function cannot be inline, and each benchmark includes this header once.
static __global__ void FillBf16(__nv_bfloat16* out, size_t n, uint32_t seed, float scale) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    out[i] = __float2bfloat16(RandomValue(i, seed, scale));
  }
}

inline constexpr int kFillBlocks = 4096, kFillThreads = 256;
inline uint32_t next_seed = 1;  // each random buffer gets the next one

// At least 16 bytes, so that an empty buffer is still a real allocation.
inline DeviceBuffer Empty(size_t bytes) {
  absl::StatusOr<DeviceBuffer> buffer = DeviceBuffer::Allocate(std::max<size_t>(bytes, 16));
  CHECK_OK(buffer.status());
  return *std::move(buffer);
}

// `n` bf16 values uniform in [-scale, scale), filled on the default stream.
inline DeviceBuffer RandomBf16(size_t n, float scale = 1.0f) {
  DeviceBuffer buffer = Empty(n * sizeof(__nv_bfloat16));
  FillBf16<<<kFillBlocks, kFillThreads>>>(buffer.as<__nv_bfloat16>(), n, next_seed++, scale);
  CHECK_CUDA(cudaGetLastError());
  return buffer;
}

template <typename T>
DeviceBuffer Upload(const std::vector<T>& host) {
  DeviceBuffer buffer = Empty(host.size() * sizeof(T));
  CHECK_CUDA(
      cudaMemcpy(buffer.as<void>(), host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice));
  return buffer;
}

// ---- timing ----

struct Timing {
  double median_ms, min_ms, max_ms;
};

// `run(i)` enqueues repetition i on `stream` and checks its own launches: `warmup` untimed runs,
// then max(1, `repeats`) runs, each between two CUDA events.
inline Timing TimeRuns(cudaStream_t stream, int warmup, int repeats,
                       const std::function<void(int)>& run) {
  CHECK_CUDA(cudaDeviceSynchronize());  // the random fills ran on the default stream
  for (int i = 0; i < warmup; ++i) run(i);
  CHECK_CUDA(cudaStreamSynchronize(stream));
  repeats = std::max(1, repeats);
  std::vector<cudaEvent_t> events(repeats + 1);
  for (cudaEvent_t& e : events) CHECK_CUDA(cudaEventCreate(&e));
  CHECK_CUDA(cudaEventRecord(events[0], stream));
  for (int i = 0; i < repeats; ++i) {
    run(warmup + i);
    CHECK_CUDA(cudaEventRecord(events[i + 1], stream));
  }
  CHECK_CUDA(cudaEventSynchronize(events[repeats]));
  std::vector<double> ms(repeats);
  for (int i = 0; i < repeats; ++i) {
    float elapsed = 0.0f;
    CHECK_CUDA(cudaEventElapsedTime(&elapsed, events[i], events[i + 1]));
    ms[i] = elapsed;
  }
  for (cudaEvent_t& e : events) CHECK_CUDA(cudaEventDestroy(e));
  std::sort(ms.begin(), ms.end());
  return {ms[repeats / 2], ms.front(), ms.back()};
}

// ---- what every benchmark prints ----

// The "device:" line; returns the properties.
inline cudaDeviceProp PrintDevice() {
  int device = 0;
  CHECK_CUDA(cudaGetDevice(&device));
  cudaDeviceProp p;
  CHECK_CUDA(cudaGetDeviceProperties(&p, device));
  int runtime = 0, driver = 0;
  CHECK_CUDA(cudaRuntimeGetVersion(&runtime));
  CHECK_CUDA(cudaDriverGetVersion(&driver));
  std::printf("device: %s, sm_%d%d, %d SMs, %.1f GiB, L2 %d MB, runtime %d, driver %d\n", p.name,
              p.major, p.minor, p.multiProcessorCount, p.totalGlobalMem / double(1 << 30),
              p.l2CacheSize >> 20, runtime, driver);
  return p;
}

// The device-to-device copy table of a `bytes` buffer, a row per (method, timing); returns the
// fastest rate in GB/s of bytes read + written.
inline double PrintCopyTable(size_t bytes,
                             std::initializer_list<std::pair<const char*, Timing>> methods) {
  std::printf("\n## Device-to-device copy, %zu MiB buffer (GB/s = (read + written) / time)\n\n",
              bytes >> 20);
  std::printf("| method                         |  median ms |    min ms |    max ms |   GB/s |\n");
  std::printf("|--------------------------------|-----------:|----------:|----------:|-------:|\n");
  double best_gbs = 0.0;
  for (const auto& [name, t] : methods) {
    const double gbs = 2.0 * bytes / (t.median_ms * 1e-3) / 1e9;
    std::printf("| %-30s | %10.3f | %9.3f | %9.3f | %6.0f |\n", name, t.median_ms, t.min_ms,
                t.max_ms, gbs);
    best_gbs = std::max(best_gbs, gbs);
  }
  return best_gbs;
}

}  // namespace kvtrim::engine::cuda::bench
