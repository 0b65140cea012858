// Every CUDA kernel of engine/cuda/ against its CPU twin on fresh random inputs (a new seed each
// run, printed on failure), by relative error ‖out − ref‖₂ / ‖ref‖₂: bf16 data paths within
// 1e-2, fp32 paths far tighter. Any NaN or infinity in an output fails, and every output buffer
// is filled with NaN before the kernel runs, so an element the kernel forgot to write fails too.
// Each check prints a "[parity]" line (kernel, shape, error) for docs/PERFORMANCE.md.
//
// Without a CUDA device (a CI machine with nvcc but no GPU) the device tests skip.
#include <cblas.h>
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/backend.h"
#include "engine/cuda/bf16.h"
#include "engine/cuda/device_weights.h"
#include "engine/cuda/embedding.h"
#include "engine/cuda/gemm.h"
#include "engine/cuda/gemm_small.h"
#include "engine/cuda/plan_patch.h"
#include "engine/cuda/rmsnorm.h"
#include "engine/cuda/rope.h"
#include "engine/cuda/rows.h"
#include "engine/cuda/swiglu.h"
#include "engine/model.h"
#include "engine/rope.h"
#include "engine/sampler.h"
#include "tests/engine/cuda_test_util.h"

namespace kvtrim::engine::cuda {
namespace {

using namespace kvtrim::engine::cuda::testing;  // NOLINT: the shared CUDA test helpers

std::vector<float> RoundedToBf16(const std::vector<float>& values) {
  return FromBf16(ToBf16(values));
}

class CudaKernelsTest : public CudaTest {
 protected:
  CudaKernelsTest() : CudaTest("CUDA kernel parity tests") {}
  void GemmCase(bool small_kernel);
};

// ---- bf16 conversion (host; runs without a GPU) ----

TEST(Bf16Test, HostRoundingMatchesCuda) {
  std::mt19937 rng(std::random_device{}());
  std::vector<float> values = Random(rng, 100000, 100.0f);
  const float specials[] = {0.0f,
                            -0.0f,
                            1.0f,
                            1.00390625f,  // halfway between two bf16 values: ties to even
                            1.01171875f,  // the other tie
                            std::numeric_limits<float>::denorm_min(),
                            std::numeric_limits<float>::max(),
                            std::numeric_limits<float>::infinity(),
                            -std::numeric_limits<float>::infinity(),
                            std::numeric_limits<float>::quiet_NaN()};
  values.insert(values.end(), std::begin(specials), std::end(specials));
  for (float v : values) {
    const float mine = Bf16BitsToFloat(FloatToBf16Bits(v));
    const float theirs = __bfloat162float(__float2bfloat16(v));
    if (std::isnan(theirs)) {
      EXPECT_TRUE(std::isnan(mine)) << v;
    } else {
      EXPECT_EQ(std::bit_cast<uint32_t>(mine), std::bit_cast<uint32_t>(theirs)) << v;
    }
  }
}

// ---- a buffer that cannot grow (host; runs without a GPU) ----

TEST(GrowthFailedTest, OutOfMemoryIsResourceExhaustedAndALostDeviceIsNot) {
  const absl::Status no_memory = GrowthFailed(
      "the chosen tokens", 3 << 20, MemoryKind::kDevice,
      absl::ResourceExhaustedError("cudaMalloc(3145728 bytes): cudaErrorMemoryAllocation"));
  EXPECT_EQ(no_memory.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(no_memory.message(),
            "no device memory left for the chosen tokens: 3.0 MiB could not be allocated "
            "(cudaMalloc(3145728 bytes): cudaErrorMemoryAllocation)");
  // A device lost for good makes every allocation fail too: that is not a lack of memory.
  const absl::Status lost =
      GrowthFailed("the page list changes", 2048, MemoryKind::kPinnedHost,
                   absl::InternalError("cudaMallocHost(2048 bytes): cudaErrorIllegalAddress"));
  EXPECT_EQ(lost.code(), absl::StatusCode::kInternal);
  EXPECT_EQ(lost.message(),
            "allocating 0.0 MiB of page-locked host memory for the page list changes: "
            "cudaMallocHost(2048 bytes): cudaErrorIllegalAddress");
}

// ---- embedding ----

TEST_F(CudaKernelsTest, EmbeddingMatchesTableRows) {
  struct Shape {
    int tokens, vocab, hidden;
  };
  for (const Shape s : {Shape{1, 3, 1}, Shape{5, 17, 7}, Shape{33, 1000, 576},
                        Shape{257, 301, 4096}, Shape{3, 50, 4100}}) {
    const std::vector<float> table = Random(rng_, static_cast<size_t>(s.vocab) * s.hidden);
    std::uniform_int_distribution<int32_t> pick(0, s.vocab - 1);
    std::vector<int32_t> ids(s.tokens);
    for (int32_t& id : ids) id = pick(rng_);
    DeviceBuffer d_table = Upload(ToBf16(table));
    DeviceBuffer d_ids = Upload(ids);
    DeviceBuffer d_out = Poisoned<float>(static_cast<size_t>(s.tokens) * s.hidden);
    ASSERT_CUDA(LaunchEmbedding(d_ids.as<int32_t>(), s.tokens, nullptr, d_table.as<__nv_bfloat16>(),
                                s.vocab, s.hidden, d_out.as<float>(), stream_));
    Sync();
    const std::vector<float> out = Download<float>(d_out, static_cast<size_t>(s.tokens) * s.hidden);

    // The CPU twin copies fp32 rows; the GPU's table holds them rounded to bf16, exactly.
    std::vector<float> ref, ref_bf16;
    const std::vector<float> table_bf16 = RoundedToBf16(table);
    for (int32_t id : ids) {
      const size_t row = static_cast<size_t>(id) * s.hidden;
      ref.insert(ref.end(), table.begin() + row, table.begin() + row + s.hidden);
      ref_bf16.insert(ref_bf16.end(), table_bf16.begin() + row,
                      table_bf16.begin() + row + s.hidden);
    }
    const std::string shape =
        absl::StrCat("tokens ", s.tokens, " vocab ", s.vocab, " hidden ", s.hidden);
    ExpectClose("embedding", shape, out, ref, kBf16Bound);
    EXPECT_EQ(RelativeError(out, ref_bf16), 0.0) << shape;
  }
}

TEST_F(CudaKernelsTest, EmbeddingOutOfRangeIdWritesNaN) {
  const int vocab = 4, hidden = 16;
  DeviceBuffer d_table = Upload(ToBf16(Random(rng_, vocab * hidden)));
  DeviceBuffer d_ids = Upload(std::vector<int32_t>{1, vocab, -1});
  absl::StatusOr<DeviceBuffer> d_out = DeviceBuffer::Allocate(3 * hidden * sizeof(float));
  ASSERT_TRUE(d_out.ok());
  ASSERT_CUDA(cudaMemset(d_out->as<void>(), 0, 3 * hidden * sizeof(float)));
  ASSERT_CUDA(LaunchEmbedding(d_ids.as<int32_t>(), 3, nullptr, d_table.as<__nv_bfloat16>(), vocab,
                              hidden, d_out->as<float>(), stream_));
  Sync();
  const std::vector<float> out = Download<float>(*d_out, 3 * hidden);
  for (int i = 0; i < hidden; ++i) {
    EXPECT_TRUE(std::isfinite(out[i]));
    EXPECT_TRUE(std::isnan(out[hidden + i]));
    EXPECT_TRUE(std::isnan(out[2 * hidden + i]));
  }
}

// A PreviousToken id reads its token from the previous step's tokens on the device; a token
// there outside the vocabulary writes NaN as a bad id does.
TEST_F(CudaKernelsTest, EmbeddingReadsPreviousTokens) {
  const int vocab = 6, hidden = 24;
  const std::vector<float> table = Random(rng_, vocab * hidden);
  DeviceBuffer d_table = Upload(ToBf16(table));
  DeviceBuffer d_ids = Upload(std::vector<int32_t>{2, PreviousToken(1), PreviousToken(0),
                                                   PreviousToken(2), PreviousToken(1)});
  DeviceBuffer d_previous = Upload(std::vector<int32_t>{3, 0, vocab});
  DeviceBuffer d_out = Poisoned<float>(5 * hidden);
  ASSERT_CUDA(LaunchEmbedding(d_ids.as<int32_t>(), 5, d_previous.as<int32_t>(),
                              d_table.as<__nv_bfloat16>(), vocab, hidden, d_out.as<float>(),
                              stream_));
  Sync();
  const std::vector<float> out = Download<float>(d_out, 5 * hidden);
  const std::vector<float> table_bf16 = RoundedToBf16(table);
  const int expected_rows[5] = {2, 0, 3, -1, 0};
  for (int t = 0; t < 5; ++t) {
    for (int i = 0; i < hidden; ++i) {
      const float got = out[t * hidden + i];
      if (expected_rows[t] < 0) {
        EXPECT_TRUE(std::isnan(got)) << "token " << t;
      } else {
        EXPECT_EQ(got, table_bf16[expected_rows[t] * hidden + i]) << "token " << t << " at " << i;
      }
    }
  }
}

// ---- RMSNorm fused with the residual add ----

// The CPU twin: forward.cc's residual add then RmsNorm, fp32.
void AddRmsNormReference(std::vector<float>& residual, const std::vector<float>* delta,
                         const std::vector<float>& weight, float eps, int tokens, int hidden,
                         std::vector<float>& normed) {
  if (delta) {
    for (size_t i = 0; i < residual.size(); ++i) residual[i] += (*delta)[i];
  }
  normed.resize(residual.size());
  for (int t = 0; t < tokens; ++t) {
    const float* row = &residual[static_cast<size_t>(t) * hidden];
    float sum_squares = 0.0f;
    for (int i = 0; i < hidden; ++i) sum_squares += row[i] * row[i];
    const float scale = 1.0f / std::sqrt(sum_squares / hidden + eps);
    for (int i = 0; i < hidden; ++i) {
      normed[static_cast<size_t>(t) * hidden + i] = row[i] * scale * weight[i];
    }
  }
}

TEST_F(CudaKernelsTest, AddRmsNormMatchesCpu) {
  struct Shape {
    int tokens, hidden;
  };
  const float eps = 1e-5f;
  for (const bool with_delta : {true, false}) {
    // The last two are longer than a block keeps in registers (vector and scalar paths).
    for (const Shape s : {Shape{1, 1}, Shape{3, 7}, Shape{17, 576}, Shape{64, 4096}, Shape{2, 1000},
                          Shape{9, 999}, Shape{4, 8200}, Shape{2, 40000}, Shape{3, 20001}}) {
      const size_t n = static_cast<size_t>(s.tokens) * s.hidden;
      std::vector<float> residual = Random(rng_, n, 3.0f);
      // The delta reaches the kernel as bf16 (a GEMM output); the twin gets the same values.
      const std::vector<float> delta = RandomBf16(rng_, n);
      std::uniform_real_distribution<float> uniform(0.5f, 1.5f);
      std::vector<float> weight(s.hidden);
      for (float& w : weight) w = uniform(rng_);

      DeviceBuffer d_residual = Upload(residual);
      DeviceBuffer d_delta = Upload(ToBf16(delta));
      DeviceBuffer d_weight = Upload(weight);
      DeviceBuffer d_normed = Poisoned<uint16_t>(n);
      ASSERT_CUDA(LaunchAddRmsNorm(
          d_residual.as<float>(), with_delta ? d_delta.as<__nv_bfloat16>() : nullptr,
          d_weight.as<float>(), eps, s.tokens, s.hidden, d_normed.as<__nv_bfloat16>(), stream_));
      Sync();
      std::vector<float> ref_normed;
      AddRmsNormReference(residual, with_delta ? &delta : nullptr, weight, eps, s.tokens, s.hidden,
                          ref_normed);
      const std::string shape = absl::StrCat("tokens ", s.tokens, " hidden ", s.hidden,
                                             with_delta ? " +delta" : " no delta");
      ExpectClose("rmsnorm.normed(bf16)", shape, DownloadBf16(d_normed, n), ref_normed, kBf16Bound);
      // The residual stays fp32: the same single fp32 addition on both sides.
      ExpectClose("rmsnorm.residual(fp32)", shape, Download<float>(d_residual, n), residual, 1e-7);
    }
  }
}

// ---- RoPE ----

struct RopeCase {
  int tokens, n_q_heads, n_kv_heads, head_dim;
  bool llama3_scaling;
};

TEST_F(CudaKernelsTest, RopeMatchesCpuInPackedQkv) {
  for (const RopeLayout layout : {RopeLayout::kHalves, RopeLayout::kAdjacent}) {
    for (const RopeCase c :
         {RopeCase{1, 1, 1, 2, false}, RopeCase{7, 3, 1, 6, false}, RopeCase{130, 9, 3, 64, false},
          RopeCase{33, 32, 8, 128, true}, RopeCase{5, 4, 0, 64, true}}) {
      ModelConfig config;
      config.head_dim = c.head_dim;
      config.rope_theta = c.llama3_scaling ? 500000.0f : 10000.0f;
      if (c.llama3_scaling) config.rope_scaling = {8.0f, 1.0f, 4.0f, 8192};
      const std::vector<float> inv_freq = RopeInverseFrequencies(config);

      // One packed (tokens, [q | k | v]) buffer, as a fused QKV GEMM writes it.
      const int q_width = c.n_q_heads * c.head_dim, kv_width = c.n_kv_heads * c.head_dim;
      const int row = q_width + 2 * kv_width;
      const size_t n = static_cast<size_t>(c.tokens) * row;
      const std::vector<uint16_t> qkv = ToBf16(Random(rng_, n));
      std::vector<int32_t> positions(c.tokens);
      std::uniform_int_distribution<int32_t> pick(0, 131071);
      for (int32_t& p : positions) p = pick(rng_);

      DeviceBuffer d_qkv = Upload(qkv);
      DeviceBuffer d_positions = Upload(positions);
      DeviceBuffer d_inv_freq = Upload(inv_freq);
      __nv_bfloat16* q = d_qkv.as<__nv_bfloat16>();
      ASSERT_CUDA(LaunchRope(q, row, c.n_q_heads, q + q_width, row, c.n_kv_heads, c.tokens,
                             c.head_dim, d_positions.as<int32_t>(), d_inv_freq.as<float>(), layout,
                             stream_));
      Sync();
      const std::vector<uint16_t> out_bits = Download<uint16_t>(d_qkv, n);

      // The CPU twin: ApplyRope on every q and k head of the same bf16 inputs.
      std::vector<float> ref = FromBf16(qkv);
      std::vector<float> out_qk, ref_qk;
      for (int t = 0; t < c.tokens; ++t) {
        float* token_row = &ref[static_cast<size_t>(t) * row];
        for (int h = 0; h < c.n_q_heads + c.n_kv_heads; ++h) {
          ApplyRope(token_row + h * c.head_dim, c.head_dim, positions[t], inv_freq.data(), layout);
        }
        for (int i = 0; i < row; ++i) {
          const size_t at = static_cast<size_t>(t) * row + i;
          if (i < q_width + kv_width) {
            out_qk.push_back(Bf16BitsToFloat(out_bits[at]));
            ref_qk.push_back(ref[at]);
          } else {
            EXPECT_EQ(out_bits[at], qkv[at]) << "V column " << i << " of token " << t << " changed";
          }
        }
      }
      const std::string shape = absl::StrCat(
          layout == RopeLayout::kHalves ? "halves" : "adjacent", " tokens ", c.tokens, " heads ",
          c.n_q_heads, "/", c.n_kv_heads, " dim ", c.head_dim, c.llama3_scaling ? " llama3" : "");
      ExpectClose("rope(bf16)", shape, out_qk, ref_qk, kBf16Bound);
    }
  }
}

// The launch that also appends: every token's keys, as the same launch left them rotated in the
// packed rows, and its values land in their sequence's page slots; the tokens of a sequence
// marked -1 (a compressed prompt's, which stay in the scratch) and the rest of the pool are not
// written. 16-byte copies at head_dim 64, element copies at 6.
TEST_F(CudaKernelsTest, RopeAppendsRotatedRowsToPages) {
  for (const int head_dim : {64, 6}) {
    const int n_q_heads = 4, n_kv_heads = 2, rows_per_page = 4;
    const int q_width = n_q_heads * head_dim, kv_width = n_kv_heads * head_dim;
    const int row = q_width + 2 * kv_width;
    const std::vector<int32_t> new_tokens = {1, 5, 3, 2};         // per sequence
    const std::vector<int32_t> held = {7, 0, 0, 30};              // rows before the step
    const std::vector<bool> stays = {false, false, true, false};  // sequence 2: token_seq -1
    const int seqs = static_cast<int>(new_tokens.size());
    std::vector<int32_t> token_indptr = {0}, kv_rows, page_indptr = {0}, token_seq, positions;
    for (int s = 0; s < seqs; ++s) {
      token_indptr.push_back(token_indptr.back() + new_tokens[s]);
      kv_rows.push_back(held[s] + new_tokens[s]);
      page_indptr.push_back(page_indptr.back() + (kv_rows[s] + rows_per_page - 1) / rows_per_page);
      for (int i = 0; i < new_tokens[s]; ++i) {
        token_seq.push_back(stays[s] ? -1 : s);
        positions.push_back(held[s] + i);
      }
    }
    const int tokens = token_indptr.back(), pages = page_indptr.back();
    const std::vector<int32_t> order = testing::ShuffledPages(2 * pages + 3, rng_);
    const std::vector<int32_t> key_pages(order.begin(), order.begin() + pages);
    const std::vector<int32_t> value_pages(order.begin() + pages, order.begin() + 2 * pages);
    const int64_t page_elements = static_cast<int64_t>(rows_per_page) * kv_width;
    const size_t pool_elements = static_cast<size_t>(2 * pages + 3) * page_elements;

    ModelConfig config;
    config.head_dim = head_dim;
    const std::vector<float> inv_freq = RopeInverseFrequencies(config);
    const std::vector<uint16_t> qkv = ToBf16(Random(rng_, static_cast<size_t>(tokens) * row));
    DeviceBuffer d_qkv = Upload(qkv);
    DeviceBuffer d_positions = Upload(positions);
    DeviceBuffer d_inv_freq = Upload(inv_freq);
    DeviceBuffer d_token_seq = Upload(token_seq), d_token_indptr = Upload(token_indptr);
    DeviceBuffer d_kv_rows = Upload(kv_rows), d_page_indptr = Upload(page_indptr);
    DeviceBuffer d_key_pages = Upload(key_pages), d_value_pages = Upload(value_pages);
    DeviceBuffer d_pool = Poisoned<uint16_t>(pool_elements);
    __nv_bfloat16* q = d_qkv.as<__nv_bfloat16>();
    const RopeKvAppend append{.kv = {.pool = d_pool.as<__nv_bfloat16>(),
                                     .page_elements = page_elements,
                                     .row_elements = kv_width,
                                     .rows_per_page = rows_per_page,
                                     .page_indptr = d_page_indptr.as<int32_t>(),
                                     .key_pages = d_key_pages.as<int32_t>(),
                                     .value_pages = d_value_pages.as<int32_t>(),
                                     .kv_rows = d_kv_rows.as<int32_t>()},
                              .token_seq = d_token_seq.as<int32_t>(),
                              .token_indptr = d_token_indptr.as<int32_t>(),
                              .values = q + q_width + kv_width};
    ASSERT_CUDA(LaunchRope(q, row, n_q_heads, q + q_width, row, n_kv_heads, tokens, head_dim,
                           d_positions.as<int32_t>(), d_inv_freq.as<float>(), RopeLayout::kHalves,
                           stream_, &append));
    Sync();
    const std::vector<uint16_t> rotated = Download<uint16_t>(d_qkv, qkv.size());
    const std::vector<uint16_t> pool = Download<uint16_t>(d_pool, pool_elements);

    std::vector<uint16_t> expected(pool_elements, 0xFFFF);  // Poisoned's bytes
    for (int t = 0; t < tokens; ++t) {
      const int s = token_seq[t];
      if (s < 0) continue;
      const int slot = kv_rows[s] - new_tokens[s] + (t - token_indptr[s]);
      const int64_t in_page = static_cast<int64_t>(slot % rows_per_page) * kv_width;
      const int64_t key_at = key_pages[page_indptr[s] + slot / rows_per_page] * page_elements;
      const int64_t value_at = value_pages[page_indptr[s] + slot / rows_per_page] * page_elements;
      const size_t from = static_cast<size_t>(t) * row + q_width;
      for (int i = 0; i < kv_width; ++i) {
        expected[key_at + in_page + i] = rotated[from + i];
        expected[value_at + in_page + i] = qkv[from + kv_width + i];
      }
    }
    size_t wrong = 0, first = pool_elements;
    for (size_t i = 0; i < pool_elements; ++i) {
      if (pool[i] != expected[i]) {
        ++wrong;
        first = std::min(first, i);
      }
    }
    EXPECT_EQ(wrong, 0u) << "head_dim " << head_dim << ": pool elements differ (first at " << first
                         << ")";
    // The keys in the pages are the rotated ones: some differ from the unrotated input.
    EXPECT_NE(rotated, qkv) << "head_dim " << head_dim;
  }
}

// ---- SwiGLU ----

TEST_F(CudaKernelsTest, SwigluMatchesCpu) {
  struct Shape {
    int tokens, width;
  };
  for (const bool packed : {false, true}) {
    for (const Shape s :
         {Shape{1, 1}, Shape{3, 7}, Shape{16, 1536}, Shape{5, 14336}, Shape{33, 1001}}) {
      // Separate: gate and up (tokens, width). Packed: one (tokens, 2 · width) gate|up buffer.
      const size_t n = static_cast<size_t>(s.tokens) * s.width;
      const std::vector<float> gate = RandomBf16(rng_, n, 3.0f);
      const std::vector<float> up = RandomBf16(rng_, n);
      std::vector<float> input;
      int in_stride = s.width;
      if (packed) {
        in_stride = 2 * s.width;
        for (int t = 0; t < s.tokens; ++t) {
          input.insert(input.end(), gate.begin() + t * s.width, gate.begin() + (t + 1) * s.width);
          input.insert(input.end(), up.begin() + t * s.width, up.begin() + (t + 1) * s.width);
        }
      } else {
        input = gate;
        input.insert(input.end(), up.begin(), up.end());
      }
      DeviceBuffer d_input = Upload(ToBf16(input));
      DeviceBuffer d_out = Poisoned<uint16_t>(n);
      const __nv_bfloat16* d_gate = d_input.as<__nv_bfloat16>();
      const __nv_bfloat16* d_up = packed ? d_gate + s.width : d_gate + n;
      ASSERT_CUDA(LaunchSwiglu(d_gate, d_up, in_stride, s.tokens, s.width,
                               d_out.as<__nv_bfloat16>(), s.width, stream_));
      Sync();
      // The CPU twin, as forward.cc computes it in fp32.
      std::vector<float> ref(n);
      for (size_t i = 0; i < n; ++i) ref[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
      ExpectClose(
          "swiglu(bf16)",
          absl::StrCat(packed ? "packed" : "separate", " tokens ", s.tokens, " width ", s.width),
          DownloadBf16(d_out, n), ref, kBf16Bound);
    }
  }
}

// Greedy sampling on the device: the same index as the host's Argmax on random rows, on rows
// whose largest value repeats (the lowest index wins), with NaNs (they never win), with -inf
// everywhere, and on an all-NaN row (0).
TEST_F(CudaKernelsTest, RowArgmaxMatchesHostArgmax) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  for (const int width : {1, 7, 1000, 49152, 128256}) {
    std::vector<std::vector<float>> rows;
    for (int r = 0; r < 3; ++r) rows.push_back(RandomBf16(rng_, width, 10.0f));
    std::vector<float> ties = RandomBf16(rng_, width, 1.0f);
    std::uniform_int_distribution<int> at(0, width - 1);
    const int first = at(rng_), second = at(rng_);
    ties[first] = ties[second] = 50.0f;  // the lower of the two is the answer
    rows.push_back(ties);
    std::vector<float> with_nan = RandomBf16(rng_, width, 1.0f);
    for (int i = 0; i < width; i += 3) with_nan[i] = nan;
    rows.push_back(with_nan);
    rows.push_back(std::vector<float>(width, -inf));
    rows.push_back(std::vector<float>(width, nan));
    std::vector<float> all;
    for (const std::vector<float>& row : rows) all.insert(all.end(), row.begin(), row.end());
    const int n = static_cast<int>(rows.size());
    DeviceBuffer d_logits = Upload(all);
    DeviceBuffer d_argmax = Poisoned<int32_t>(n);
    ASSERT_CUDA(LaunchRowArgmax(d_logits.as<float>(), width, n, d_argmax.as<int32_t>(), stream_));
    Sync();
    const std::vector<int32_t> got = Download<int32_t>(d_argmax, n);
    for (int r = 0; r < n; ++r) {
      EXPECT_EQ(got[r], Argmax(rows[r])) << "width " << width << " row " << r;
    }
    EXPECT_EQ(got[3], std::min(first, second)) << "width " << width;
    EXPECT_EQ(got[n - 1], 0) << "width " << width;
  }
}

// The page list patches of a kept step plan: each pair's value lands at its offset, every other
// entry is left as it was; no pairs is no launch, not an error; bad arguments are refused.
TEST_F(CudaKernelsTest, ScatterPairsWritesOnlyTheirEntries) {
  for (const int n_pairs : {1, 255, 256, 257, 5000}) {
    const int size = 3 * n_pairs + 11;
    std::vector<int32_t> before(size);
    for (int i = 0; i < size; ++i) before[i] = -1000 - i;
    std::vector<int32_t> offsets(size);
    for (int i = 0; i < size; ++i) offsets[i] = i;
    std::shuffle(offsets.begin(), offsets.end(), rng_);
    std::vector<int32_t> pairs, expected = before;
    for (int i = 0; i < n_pairs; ++i) {
      const int32_t value = static_cast<int32_t>(rng_() % 100000);
      pairs.push_back(offsets[i]);
      pairs.push_back(value);
      expected[offsets[i]] = value;
    }
    DeviceBuffer d_out = Upload(before);
    DeviceBuffer d_pairs = Upload(pairs);
    ASSERT_CUDA(LaunchScatterPairs(d_pairs.as<int32_t>(), n_pairs, d_out.as<int32_t>(), stream_));
    Sync();
    EXPECT_EQ(Download<int32_t>(d_out, size), expected) << n_pairs << " pairs";
  }
  EXPECT_EQ(LaunchScatterPairs(nullptr, 0, nullptr, stream_), cudaSuccess);
  EXPECT_EQ(LaunchScatterPairs(nullptr, 1, nullptr, stream_), cudaErrorInvalidValue);
  EXPECT_EQ(LaunchScatterPairs(nullptr, -1, nullptr, stream_), cudaErrorInvalidValue);
}

// The check itself: rows a kernel leaves unwritten stay NaN and fail the comparison, so a kernel
// that skips elements cannot pass the tests above.
TEST_F(CudaKernelsTest, UnwrittenOutputFailsTheCheck) {
  const int tokens = 4, width = 64;
  const size_t n = static_cast<size_t>(tokens) * width;
  const std::vector<float> gate = RandomBf16(rng_, n);
  const std::vector<float> up = RandomBf16(rng_, n);
  DeviceBuffer d_gate = Upload(ToBf16(gate));
  DeviceBuffer d_up = Upload(ToBf16(up));
  DeviceBuffer d_out = Poisoned<uint16_t>(n);
  ASSERT_CUDA(LaunchSwiglu(d_gate.as<__nv_bfloat16>(), d_up.as<__nv_bfloat16>(), width, tokens - 1,
                           width, d_out.as<__nv_bfloat16>(), width, stream_));
  Sync();
  std::vector<float> out = DownloadBf16(d_out, n);
  std::vector<float> ref(n);
  for (size_t i = 0; i < n; ++i) ref[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
  EXPECT_TRUE(std::isnan(out[n - 1]));
  EXPECT_EQ(RelativeError(out, ref), std::numeric_limits<double>::infinity());
  out.resize(n - width);
  ref.resize(n - width);
  EXPECT_LE(RelativeError(out, ref), kBf16Bound);
}

// ---- GEMM ----

// y (tokens, rows) = x (tokens, cols) · Wᵀ in double, for inputs already rounded as the GPU
// sees them: isolates the GEMM's own arithmetic from the bf16 rounding of its inputs.
std::vector<float> ExactLinear(const std::vector<float>& x, const std::vector<float>& w, int tokens,
                               int rows, int cols) {
  std::vector<float> y(static_cast<size_t>(tokens) * rows);
  for (int t = 0; t < tokens; ++t) {
    for (int r = 0; r < rows; ++r) {
      double sum = 0.0;
      for (int c = 0; c < cols; ++c) {
        sum += static_cast<double>(x[static_cast<size_t>(t) * cols + c]) *
               w[static_cast<size_t>(r) * cols + c];
      }
      y[static_cast<size_t>(t) * rows + r] = static_cast<float>(sum);
    }
  }
  return y;
}

// Both paths of Gemm::Linear: cuBLAS, and the small-matrix kernel (gemm_small.h) for the shapes
// it takes: one to four 16-token tiles, partial tiles and partial 8-row blocks, one K step or
// many.
TEST_F(CudaKernelsTest, GemmMatchesCpuLinear) {
  for (const bool small_kernel : {true, false}) GemmCase(small_kernel);
}

void CudaKernelsTest::GemmCase(bool small_kernel) {
  absl::StatusOr<std::unique_ptr<Gemm>> gemm = Gemm::Create(stream_, small_kernel);
  ASSERT_TRUE(gemm.ok()) << gemm.status();
  struct Shape {
    int tokens, rows, cols;
  };
  for (const Shape s : {Shape{1, 576, 576}, Shape{7, 65, 33}, Shape{129, 1536, 576},
                        Shape{64, 1000, 4096}, Shape{300, 49, 513}, Shape{17, 61, 96},
                        Shape{33, 7, 32}, Shape{48, 3072, 576}, Shape{5, 576, 1536}}) {
    const size_t x_size = static_cast<size_t>(s.tokens) * s.cols;
    const size_t y_size = static_cast<size_t>(s.tokens) * s.rows;
    const std::vector<float> x = Random(rng_, x_size);
    const std::vector<float> w = Random(rng_, static_cast<size_t>(s.rows) * s.cols,
                                        1.0f / std::sqrt(static_cast<float>(s.cols)));
    DeviceBuffer d_x = Upload(ToBf16(x));
    absl::StatusOr<DeviceBuffer> d_w = DeviceBuffer::Allocate(w.size() * sizeof(uint16_t));
    ASSERT_TRUE(d_w.ok());
    ASSERT_TRUE(CopyToDeviceBf16(w, d_w->as<__nv_bfloat16>()).ok());
    const DeviceMatrix matrix{d_w->as<__nv_bfloat16>(), s.rows, s.cols};

    // The CPU twin: forward.cc's Linear, fp32 sgemm on the unrounded inputs.
    std::vector<float> cpu(y_size);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, s.tokens, s.rows, s.cols, 1.0f, x.data(),
                s.cols, w.data(), s.cols, 0.0f, cpu.data(), s.rows);
    const std::vector<float> exact =
        ExactLinear(RoundedToBf16(x), RoundedToBf16(w), s.tokens, s.rows, s.cols);
    const bool small =
        small_kernel && SmallGemmFits(d_x.as<void>(), s.tokens, matrix, d_w->as<void>());
    const std::string shape = absl::StrCat("tokens ", s.tokens, " ", s.cols, " -> ", s.rows,
                                           small ? ", small kernel" : ", cuBLAS");
    if (small_kernel) {
      // Which shapes the small kernel takes: at most 64 tokens, K a multiple of 32, ≤ 4M weights.
      EXPECT_EQ(small, s.tokens <= 64 && s.cols % 32 == 0 &&
                           static_cast<int64_t>(s.rows) * s.cols <= (int64_t{1} << 22))
          << shape;
    }

    DeviceBuffer d_y32 = Poisoned<float>(y_size);
    ASSERT_TRUE((*gemm)
                    ->Linear(d_x.as<__nv_bfloat16>(), s.tokens, matrix, d_y32.as<void>(),
                             GemmOutput::kFloat)
                    .ok());
    DeviceBuffer d_y16 = Poisoned<uint16_t>(y_size);
    ASSERT_TRUE(
        (*gemm)
            ->Linear(d_x.as<__nv_bfloat16>(), s.tokens, matrix, d_y16.as<void>(), GemmOutput::kHalf)
            .ok());
    Sync();
    const std::vector<float> y32 = Download<float>(d_y32, y_size);
    const std::vector<float> y16 = DownloadBf16(d_y16, y_size);
    ExpectClose("gemm.fp32out vs cpu", shape, y32, cpu, kBf16Bound);
    ExpectClose("gemm.bf16out vs cpu", shape, y16, cpu, kBf16Bound);
    // Same inputs as the GPU's: only fp32 accumulation error may remain (bf16 accumulation
    // would show as ~1e-3).
    ExpectClose("gemm.fp32out vs exact", shape, y32, exact, 1e-4);

    // Accumulate into an fp32 output (the residual-add form): y = x · Wᵀ + y.
    const std::vector<float> previous = Random(rng_, y_size);
    DeviceBuffer d_acc = Upload(previous);
    ASSERT_TRUE((*gemm)
                    ->Linear(d_x.as<__nv_bfloat16>(), s.tokens, matrix, d_acc.as<void>(),
                             GemmOutput::kFloat, /*accumulate=*/true)
                    .ok());
    Sync();
    std::vector<float> ref_acc = exact;
    for (size_t i = 0; i < y_size; ++i) ref_acc[i] += previous[i];
    ExpectClose("gemm.accumulate vs exact", shape, Download<float>(d_acc, y_size), ref_acc, 1e-4);
  }
  // No tokens: nothing to do, not an error.
  EXPECT_TRUE((*gemm)
                  ->Linear(static_cast<const __nv_bfloat16*>(nullptr), 0, {nullptr, 4, 4}, nullptr,
                           GemmOutput::kFloat)
                  .ok());
}

// The small-matrix kernel's gate|up product with SwiGLU in one launch (a small model's decode MLP):
// against the exact products of the bf16-rounded inputs, then silu(gate) · up in fp32; partial
// 16-token tiles, partial 4-row blocks (ffn not a multiple of 4), one K step and many.
TEST_F(CudaKernelsTest, SwigluLinearMatchesCpu) {
  absl::StatusOr<std::unique_ptr<Gemm>> gemm = Gemm::Create(stream_);
  ASSERT_TRUE(gemm.ok()) << gemm.status();
  struct Shape {
    int tokens, ffn, cols;
  };
  for (const Shape s : {Shape{1, 96, 64}, Shape{17, 1536, 576}, Shape{33, 10, 32},
                        Shape{64, 301, 96}, Shape{8, 3, 4096}}) {
    const std::vector<float> x = Random(rng_, static_cast<size_t>(s.tokens) * s.cols);
    const std::vector<float> w = Random(rng_, static_cast<size_t>(2 * s.ffn) * s.cols,
                                        2.0f / std::sqrt(static_cast<float>(s.cols)));
    DeviceBuffer d_x = Upload(ToBf16(x));
    absl::StatusOr<DeviceBuffer> d_w = DeviceBuffer::Allocate(w.size() * sizeof(uint16_t));
    ASSERT_TRUE(d_w.ok());
    ASSERT_TRUE(CopyToDeviceBf16(w, d_w->as<__nv_bfloat16>()).ok());
    const DeviceMatrix gate_up{d_w->as<__nv_bfloat16>(), 2 * s.ffn, s.cols};
    const size_t n = static_cast<size_t>(s.tokens) * s.ffn;
    DeviceBuffer d_y = Poisoned<uint16_t>(n);
    const std::string shape = absl::StrCat("tokens ", s.tokens, " ", s.cols, " -> 2 x ", s.ffn);
    ASSERT_TRUE((*gemm)->FusesSwiglu(d_x.as<void>(), s.tokens, gate_up, d_y.as<void>())) << shape;
    const absl::Status status =
        (*gemm)->SwigluLinear(d_x.as<void>(), s.tokens, gate_up, d_y.as<void>());
    ASSERT_TRUE(status.ok()) << status;
    Sync();
    const std::vector<float> products =
        ExactLinear(RoundedToBf16(x), RoundedToBf16(w), s.tokens, 2 * s.ffn, s.cols);
    std::vector<float> ref(n);
    for (int t = 0; t < s.tokens; ++t) {
      for (int i = 0; i < s.ffn; ++i) {
        const float gate = products[static_cast<size_t>(t) * 2 * s.ffn + i];
        const float up = products[static_cast<size_t>(t) * 2 * s.ffn + s.ffn + i];
        ref[static_cast<size_t>(t) * s.ffn + i] = gate / (1.0f + std::exp(-gate)) * up;
      }
    }
    ExpectClose("swiglu_linear(bf16)", shape, DownloadBf16(d_y, n), ref, kBf16Bound);
  }
  // A shape the kernel does not take (K not a multiple of 32), or the kernel turned off: refused.
  DeviceBuffer d_x = Upload(ToBf16(std::vector<float>(64, 0.5f)));
  DeviceBuffer d_y = Poisoned<uint16_t>(64);
  const DeviceMatrix odd{d_x.as<__nv_bfloat16>(), 2, 33};
  EXPECT_FALSE((*gemm)->FusesSwiglu(d_x.as<void>(), 1, odd, d_y.as<void>()));
  EXPECT_EQ((*gemm)->SwigluLinear(d_x.as<void>(), 1, odd, d_y.as<void>()).code(),
            absl::StatusCode::kInvalidArgument);
  absl::StatusOr<std::unique_ptr<Gemm>> cublas_only = Gemm::Create(stream_, false);
  ASSERT_TRUE(cublas_only.ok());
  const DeviceMatrix fits{d_x.as<__nv_bfloat16>(), 2, 32};
  EXPECT_TRUE((*gemm)->FusesSwiglu(d_x.as<void>(), 1, fits, d_y.as<void>()));
  EXPECT_FALSE((*cublas_only)->FusesSwiglu(d_x.as<void>(), 1, fits, d_y.as<void>()));
}

// ---- weight upload ----

Model RandomModel(std::mt19937& rng, bool tied, bool bias) {
  Model model;
  ModelConfig& c = model.config;
  c.n_layers = 2;
  c.hidden = 24;
  c.ffn_hidden = 40;
  c.n_heads = 4;
  c.n_kv_heads = 2;
  c.head_dim = 6;
  c.vocab_size = 33;
  c.tied_embeddings = tied;
  c.qkv_bias = bias;
  auto matrix = [&](int rows, int cols) {
    return Matrix{rows, cols, Random(rng, static_cast<size_t>(rows) * cols)};
  };
  const int q = c.n_heads * c.head_dim, kv = c.n_kv_heads * c.head_dim;
  model.weights.token_embedding = matrix(c.vocab_size, c.hidden);
  for (int l = 0; l < c.n_layers; ++l) {
    LayerWeights& w = model.weights.layers.emplace_back();
    w.attn_norm = Random(rng, c.hidden);
    w.wq = matrix(q, c.hidden);
    w.wk = matrix(kv, c.hidden);
    w.wv = matrix(kv, c.hidden);
    if (bias) {
      w.bq = Random(rng, q);
      w.bk = Random(rng, kv);
      w.bv = Random(rng, kv);
    }
    w.wo = matrix(c.hidden, q);
    w.ffn_norm = Random(rng, c.hidden);
    w.w_gate = matrix(c.ffn_hidden, c.hidden);
    w.w_up = matrix(c.ffn_hidden, c.hidden);
    w.w_down = matrix(c.hidden, c.ffn_hidden);
  }
  model.weights.output_norm = Random(rng, c.hidden);
  if (!tied) model.weights.output = matrix(c.vocab_size, c.hidden);
  return model;
}

void ExpectUploaded(const Matrix& host, const DeviceMatrix& device) {
  ASSERT_NE(device.data, nullptr);
  EXPECT_EQ(device.rows, host.rows);
  EXPECT_EQ(device.cols, host.cols);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(device.data) % 256, 0u);
  std::vector<uint16_t> bits(host.data.size());
  ASSERT_CUDA(cudaMemcpy(bits.data(), device.data, bits.size() * 2, cudaMemcpyDeviceToHost));
  EXPECT_EQ(bits, ToBf16(host.data));
}

void ExpectUploaded(const std::vector<float>& host, const float* device) {
  if (host.empty()) {
    EXPECT_EQ(device, nullptr);
    return;
  }
  ASSERT_NE(device, nullptr);
  std::vector<float> copy(host.size());
  ASSERT_CUDA(cudaMemcpy(copy.data(), device, copy.size() * 4, cudaMemcpyDeviceToHost));
  EXPECT_EQ(copy, host);
}

// a's rows, then b's: what DeviceWeights stacks for projections of the same input.
Matrix Stacked(const Matrix& a, const Matrix& b) {
  Matrix m{.rows = a.rows + b.rows, .cols = a.cols, .data = a.data};
  m.data.insert(m.data.end(), b.data.begin(), b.data.end());
  return m;
}

TEST_F(CudaKernelsTest, DeviceWeightsHoldEveryTensor) {
  for (const bool tied : {true, false}) {
    const Model model = RandomModel(rng_, tied, /*bias=*/!tied);
    absl::StatusOr<DeviceWeights> weights = DeviceWeights::Upload(model, HalfFloat::kBf16);
    ASSERT_TRUE(weights.ok()) << weights.status();
    ExpectUploaded(model.weights.token_embedding, weights->token_embedding);
    ASSERT_EQ(weights->layers.size(), model.weights.layers.size());
    for (size_t l = 0; l < model.weights.layers.size(); ++l) {
      const LayerWeights& h = model.weights.layers[l];
      const DeviceLayerWeights& d = weights->layers[l];
      const Matrix qkv = Stacked(Stacked(h.wq, h.wk), h.wv);
      const Matrix gate_up = Stacked(h.w_gate, h.w_up);
      for (const auto& [host, device] :
           {std::pair{&qkv, &d.wqkv}, std::pair{&h.wo, &d.wo}, std::pair{&gate_up, &d.w_gate_up},
            std::pair{&h.w_down, &d.w_down}}) {
        ExpectUploaded(*host, *device);
      }
      for (const auto& [host, device] :
           {std::pair{&h.attn_norm, d.attn_norm}, std::pair{&h.ffn_norm, d.ffn_norm},
            std::pair{&h.bq, d.bq}, std::pair{&h.bk, d.bk}, std::pair{&h.bv, d.bv}}) {
        ExpectUploaded(*host, device);
      }
    }
    ExpectUploaded(model.weights.output_norm, weights->output_norm);
    ExpectUploaded(model.weights.lm_head(tied), weights->lm_head);
    if (tied) {
      EXPECT_EQ(weights->lm_head.data, weights->token_embedding.data);
    }
  }
}

}  // namespace
}  // namespace kvtrim::engine::cuda
