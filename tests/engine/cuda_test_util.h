// Helpers of the CUDA forward and attention tests: random data, bf16 rounding, the relative
// error every GPU op is judged by, device buffers, shuffled pages and paged K/V on the device, the
// fixture of the device tests, and where the test data lives on a GPU machine.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/cuda/bf16.h"
#include "engine/cuda/device_weights.h"
#include "engine/cuda/paged_kv.h"
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

// Why the device tests cannot run here, or "" when a CUDA device is visible. `tests` names them.
inline std::string NoDeviceReason(const std::string& tests = "CUDA tests") {
  int devices = 0;
  const cudaError_t error = cudaGetDeviceCount(&devices);
  if (error == cudaSuccess && devices > 0) return "";
  return std::string("no CUDA device here (") + cudaGetErrorName(error) + "): the " + tests +
         " run on a GPU machine (tools/gpu/run_tests.sh)";
}

inline std::vector<float> Random(std::mt19937& rng, size_t n, float stddev = 1.0f) {
  std::normal_distribution<float> normal(0.0f, stddev);
  std::vector<float> values(n);
  for (float& v : values) v = normal(rng);
  return values;
}

// Page ids 0 .. count - 1 in random order: the order pages are handed out to a step's lists.
inline std::vector<int32_t> ShuffledPages(int count, std::mt19937& rng) {
  std::vector<int32_t> order(count);
  std::iota(order.begin(), order.end(), 0);
  std::shuffle(order.begin(), order.end(), rng);
  return order;
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

// Elements a query row is padded with in the attention tests, as the engine's Q|K|V rows hold
// the keys and values after the query heads: NaN, so that reading them fails the comparison.
inline constexpr int kQueryPadding = 8;

// bf16 `rows` of `width` values laid out `width + kQueryPadding` apart, NaN in between.
inline std::vector<uint16_t> PaddedRows(const std::vector<uint16_t>& rows, size_t width) {
  const size_t n = rows.size() / width, stride = width + kQueryPadding;
  std::vector<uint16_t> padded(n * stride, uint16_t{0x7fc0});
  for (size_t r = 0; r < n; ++r) {
    std::copy_n(rows.begin() + r * width, width, padded.begin() + r * stride);
  }
  return padded;
}

// Random values rounded to bf16: what a bf16 device buffer of them holds, exactly.
inline std::vector<float> RandomBf16(std::mt19937& rng, size_t n, float stddev = 1.0f) {
  return FromBf16(ToBf16(Random(rng, n, stddev)));
}

inline std::vector<uint16_t> ToFp16(const std::vector<float>& values) {
  std::vector<uint16_t> bits(values.size());
  for (size_t i = 0; i < values.size(); ++i) bits[i] = FloatToFp16Bits(values[i]);
  return bits;
}

inline std::vector<float> FromFp16(const std::vector<uint16_t>& bits) {
  std::vector<float> values(bits.size());
  for (size_t i = 0; i < bits.size(); ++i) values[i] = Fp16BitsToFloat(bits[i]);
  return values;
}

// Random values rounded to fp16, as RandomBf16.
inline std::vector<float> RandomFp16(std::mt19937& rng, size_t n, float stddev = 1.0f) {
  return FromFp16(ToFp16(Random(rng, n, stddev)));
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

// `count` bf16 (fp16) values of a device buffer, widened.
inline std::vector<float> DownloadBf16(const DeviceBuffer& buffer, size_t count) {
  return FromBf16(Download<uint16_t>(buffer, count));
}
inline std::vector<float> DownloadFp16(const DeviceBuffer& buffer, size_t count) {
  return FromFp16(Download<uint16_t>(buffer, count));
}

// A page pool and one step's CSR page lists on the device, and the PagedKv the kernels read over
// them. Its pointers stay valid when this moves: a DeviceBuffer's device memory does not move.
struct DevicePagedKv {
  DeviceBuffer pool, page_indptr, key_pages, value_pages, kv_rows;
  PagedKv kv = {};  // over the buffers above
};

// `pool`: (pages, page_elements) bf16 bits; the lists as PagedKv describes them, uploaded as given.
inline DevicePagedKv UploadPagedKv(const std::vector<uint16_t>& pool, int64_t page_elements,
                                   int row_elements, int rows_per_page,
                                   const std::vector<int32_t>& page_indptr,
                                   const std::vector<int32_t>& key_pages,
                                   const std::vector<int32_t>& value_pages,
                                   const std::vector<int32_t>& kv_rows) {
  DevicePagedKv d{.pool = Upload(pool),
                  .page_indptr = Upload(page_indptr),
                  .key_pages = Upload(key_pages),
                  .value_pages = Upload(value_pages),
                  .kv_rows = Upload(kv_rows)};
  d.kv = PagedKv{.pool = d.pool.as<__nv_bfloat16>(),
                 .page_elements = page_elements,
                 .row_elements = row_elements,
                 .rows_per_page = rows_per_page,
                 .page_indptr = d.page_indptr.as<int32_t>(),
                 .key_pages = d.key_pages.as<int32_t>(),
                 .value_pages = d.value_pages.as<int32_t>(),
                 .kv_rows = d.kv_rows.as<int32_t>()};
  return d;
}

// The fixture of the device tests: skips without a device; otherwise a fresh seed each test
// (recorded, and traced on every failure) and a stream.
class CudaTest : public ::testing::Test {
 protected:
  // `tests` names the suite in the skip message; with `print_seed` the seed is also printed as a
  // "[seed] N" line.
  explicit CudaTest(std::string tests = "CUDA tests", bool print_seed = false)
      : tests_(std::move(tests)), print_seed_(print_seed) {}

  void SetUp() override {
    if (const std::string why = NoDeviceReason(tests_); !why.empty()) GTEST_SKIP() << why;
    const unsigned seed = std::random_device{}();
    rng_.seed(seed);
    if (print_seed_) std::printf("[seed] %u\n", seed);
    RecordProperty("seed", std::to_string(seed));
    trace_ =
        std::make_unique<::testing::ScopedTrace>(__FILE__, __LINE__, absl::StrCat("seed ", seed));
    ASSERT_CUDA(cudaStreamCreate(&stream_));
  }
  void TearDown() override {
    if (stream_) {
      EXPECT_EQ(cudaStreamDestroy(stream_), cudaSuccess);
    }
  }
  void Sync() { ASSERT_CUDA(cudaStreamSynchronize(stream_)); }

  std::mt19937 rng_;
  cudaStream_t stream_ = nullptr;

 private:
  std::string tests_;
  bool print_seed_;
  std::unique_ptr<::testing::ScopedTrace> trace_;
};

}  // namespace kvtrim::engine::cuda::testing
