// Helpers of the CUDA forward and attention tests: random data, bf16 rounding, the relative
// error every GPU op is judged by, device buffers, and where the test data lives on a GPU machine.
#pragma once

#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "engine/cuda/bf16.h"
#include "engine/cuda/device_weights.h"
#include "tests/test_util.h"

namespace kvtrim::engine::cuda::testing {

inline constexpr double kBf16Bound = 1e-2;

#define ASSERT_CUDA(expr)                                                     \
  do {                                                                        \
    const cudaError_t error_ = (expr);                                        \
    ASSERT_EQ(error_, cudaSuccess) << cudaGetErrorName(error_) << ": " #expr; \
  } while (0)

// A file of the source tree. $KVTRIM_SOURCE_DIR wins over the build's path: on the GPU machine
// the repository copy lives elsewhere than where the binaries were built.
inline std::string DataPath(const std::string& relative) {
  if (const char* dir = std::getenv("KVTRIM_SOURCE_DIR")) return std::string(dir) + "/" + relative;
  return kvtrim::testing::SourcePath(relative);
}

// Why the device tests cannot run here, or "" when a CUDA device is visible.
inline std::string NoDeviceReason() {
  int devices = 0;
  const cudaError_t error = cudaGetDeviceCount(&devices);
  if (error == cudaSuccess && devices > 0) return "";
  return std::string("no CUDA device here (") + cudaGetErrorName(error) +
         "): the CUDA tests run on a GPU machine (tools/gpu/run_tests.sh)";
}

inline std::vector<float> Random(std::mt19937& rng, size_t n, float stddev = 1.0f) {
  std::normal_distribution<float> normal(0.0f, stddev);
  std::vector<float> values(n);
  for (float& v : values) v = normal(rng);
  return values;
}

inline std::vector<uint16_t> ToBf16(const std::vector<float>& values) {
  std::vector<uint16_t> bits(values.size());
  for (size_t i = 0; i < values.size(); ++i) bits[i] = FloatToBf16Bits(values[i]);
  return bits;
}

inline std::vector<float> FromBf16(const std::vector<uint16_t>& bits) {
  std::vector<float> values(bits.size());
  for (size_t i = 0; i < bits.size(); ++i) values[i] = Bf16BitsToFloat(bits[i]);
  return values;
}

// ‖out − ref‖₂ / ‖ref‖₂ in double; infinity when out holds a NaN or an infinity.
inline double RelativeError(const std::vector<float>& out, const std::vector<float>& ref) {
  EXPECT_EQ(out.size(), ref.size());
  double diff = 0.0, norm = 0.0;
  for (size_t i = 0; i < out.size() && i < ref.size(); ++i) {
    if (!std::isfinite(out[i])) return std::numeric_limits<double>::infinity();
    const double d = static_cast<double>(out[i]) - ref[i];
    diff += d * d;
    norm += static_cast<double>(ref[i]) * ref[i];
  }
  return norm > 0.0 ? std::sqrt(diff / norm) : std::sqrt(diff);
}

// Prints a "[parity]" line (for docs/PERFORMANCE.md) and checks the bound.
inline void ExpectClose(const std::string& what, const std::string& shape,
                        const std::vector<float>& out, const std::vector<float>& ref,
                        double bound) {
  const double error = RelativeError(out, ref);
  std::printf("[parity] %-26s %-58s rel_err %.3e (bound %.0e)\n", what.c_str(), shape.c_str(),
              error, bound);
  EXPECT_LE(error, bound) << what << " " << shape;
}

template <typename T>
DeviceBuffer Upload(const std::vector<T>& host) {
  absl::StatusOr<DeviceBuffer> buffer = DeviceBuffer::Allocate(host.size() * sizeof(T));
  EXPECT_TRUE(buffer.ok()) << buffer.status();
  EXPECT_EQ(
      cudaMemcpy(buffer->as<void>(), host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice),
      cudaSuccess);
  return *std::move(buffer);
}

// `count` elements of T, every byte 0xFF: NaN as fp32 and as bf16.
template <typename T>
DeviceBuffer Poisoned(size_t count) {
  absl::StatusOr<DeviceBuffer> buffer = DeviceBuffer::Allocate(count * sizeof(T));
  EXPECT_TRUE(buffer.ok()) << buffer.status();
  EXPECT_EQ(cudaMemset(buffer->as<void>(), 0xFF, count * sizeof(T)), cudaSuccess);
  return *std::move(buffer);
}

template <typename T>
std::vector<T> Download(const DeviceBuffer& buffer, size_t count) {
  std::vector<T> host(count);
  EXPECT_EQ(cudaMemcpy(host.data(), buffer.as<void>(), count * sizeof(T), cudaMemcpyDeviceToHost),
            cudaSuccess);
  return host;
}

}  // namespace kvtrim::engine::cuda::testing
