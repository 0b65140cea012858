// The fp16 side of the CUDA engine (a model whose weights are fp16, ModelConfig::dtype): the
// host conversions the upload uses, the kernels' fp16 overloads against their CPU twins, the
// in-place change of format between the GEMMs and attention, fp16 GEMMs and the fp16 weight
// upload. Outputs rounded once to fp16 are held to kFp16Bound, which the same outputs rounded to
// bf16 (about 1.5e-3 on these inputs) would not meet, so a kernel writing the wrong format
// fails. Device tests skip without a GPU; the host conversion test runs everywhere.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/cuda/bf16.h"
#include "engine/cuda/device_weights.h"
#include "engine/cuda/embedding.h"
#include "engine/cuda/gemm.h"
#include "engine/cuda/rmsnorm.h"
#include "engine/cuda/rope.h"
#include "engine/cuda/rows.h"
#include "engine/cuda/swiglu.h"
#include "engine/model.h"
#include "engine/rope.h"
#include "tests/engine/cuda_test_util.h"

namespace kvtrim::engine::cuda {
namespace {

using namespace kvtrim::engine::cuda::testing;  // NOLINT: the shared CUDA test helpers

// One rounding to fp16 (11 significant bits): about 2e-4 relative on random data.
constexpr double kFp16Bound = 5e-4;

class CudaFp16Test : public CudaTest {
 protected:
  CudaFp16Test() : CudaTest("CUDA fp16 tests") {}
  void Fp16GemmCase(bool small_kernel);
};

// ---- host conversions (no GPU needed) ----

TEST(Fp16Test, HostConversionsMatchCuda) {
  // Every fp16 value widens as CUDA's does.
  for (uint32_t bits = 0; bits <= 0xffffu; ++bits) {
    const float mine = Fp16BitsToFloat(static_cast<uint16_t>(bits));
    const float theirs = __half2float(std::bit_cast<__half>(static_cast<uint16_t>(bits)));
    if (std::isnan(theirs)) {
      EXPECT_TRUE(std::isnan(mine)) << bits;
    } else {
      EXPECT_EQ(std::bit_cast<uint32_t>(mine), std::bit_cast<uint32_t>(theirs)) << bits;
    }
  }
  // Random floats over fp16's whole range and past it, and the edges, round as CUDA's do.
  std::mt19937 rng(std::random_device{}());
  std::vector<float> values;
  std::uniform_int_distribution<uint32_t> any_bits(0x30000000u, 0x48000000u);  // 2^-31 .. 2^17
  for (int i = 0; i < 200000; ++i) {
    const float v = std::bit_cast<float>(any_bits(rng));
    values.push_back(i % 2 ? v : -v);
  }
  const float specials[] = {0.0f,
                            -0.0f,
                            1.0f + 0x1p-11f,  // halfway between two fp16 values: ties to even
                            1.0f + 3 * 0x1p-11f,
                            65504.0f,
                            65519.99f,  // rounds down to the largest fp16
                            65520.0f,   // the tie: to infinity
                            0x1p-14f,   // the smallest normal
                            0x1p-24f,   // the smallest subnormal
                            0x1p-25f,   // its half: ties to even (zero)
                            0x1.8p-25f,
                            std::numeric_limits<float>::denorm_min(),
                            std::numeric_limits<float>::max(),
                            std::numeric_limits<float>::infinity(),
                            -std::numeric_limits<float>::infinity(),
                            std::numeric_limits<float>::quiet_NaN()};
  values.insert(values.end(), std::begin(specials), std::end(specials));
  for (float v : values) {
    const uint16_t mine = FloatToFp16Bits(v);
    const uint16_t theirs = std::bit_cast<uint16_t>(__float2half_rn(v));
    if (std::isnan(v)) {
      EXPECT_TRUE(std::isnan(Fp16BitsToFloat(mine)));
    } else {
      EXPECT_EQ(mine, theirs) << v;
    }
  }
}

// ---- the row kernels' fp16 overloads ----

TEST_F(CudaFp16Test, EmbeddingWidensFp16Rows) {
  const int tokens = 37, vocab = 301, hidden = 576;
  const std::vector<float> table = RandomFp16(rng_, static_cast<size_t>(vocab) * hidden);
  std::uniform_int_distribution<int32_t> pick(0, vocab - 1);
  std::vector<int32_t> ids(tokens);
  for (int32_t& id : ids) id = pick(rng_);
  DeviceBuffer d_table = Upload(ToFp16(table));
  DeviceBuffer d_ids = Upload(ids);
  for (const int width : {hidden, hidden - 1}) {  // 16-byte rows, then the scalar path
    DeviceBuffer d_out = Poisoned<float>(static_cast<size_t>(tokens) * width);
    ASSERT_CUDA(LaunchEmbedding(d_ids.as<int32_t>(), tokens, nullptr, d_table.as<__half>(),
                                vocab * hidden / width, width, d_out.as<float>(), stream_));
    Sync();
    std::vector<float> ref;
    for (int32_t id : ids) {
      const size_t row = static_cast<size_t>(id) * width;
      ref.insert(ref.end(), table.begin() + row, table.begin() + row + width);
    }
    EXPECT_EQ(RelativeError(Download<float>(d_out, ref.size()), ref), 0.0) << "hidden " << width;
  }
}

TEST_F(CudaFp16Test, AddRmsNormWritesFp16) {
  const float eps = 1e-5f;
  for (const int hidden : {576, 4096, 999}) {
    const int tokens = 9;
    const size_t n = static_cast<size_t>(tokens) * hidden;
    std::vector<float> residual = Random(rng_, n, 3.0f);
    const std::vector<float> delta = RandomFp16(rng_, n);
    std::vector<float> weight = Random(rng_, hidden, 0.2f);
    for (float& w : weight) w += 1.0f;
    DeviceBuffer d_residual = Upload(residual);
    DeviceBuffer d_delta = Upload(ToFp16(delta));
    DeviceBuffer d_weight = Upload(weight);
    DeviceBuffer d_normed = Poisoned<uint16_t>(n);
    ASSERT_CUDA(LaunchAddRmsNorm(d_residual.as<float>(), d_delta.as<__half>(), d_weight.as<float>(),
                                 eps, tokens, hidden, d_normed.as<__half>(), stream_));
    Sync();
    // The CPU twin in fp32.
    std::vector<float> ref(n);
    for (int t = 0; t < tokens; ++t) {
      float* row = &residual[static_cast<size_t>(t) * hidden];
      float sum_squares = 0.0f;
      for (int i = 0; i < hidden; ++i) {
        row[i] += delta[static_cast<size_t>(t) * hidden + i];
        sum_squares += row[i] * row[i];
      }
      const float scale = 1.0f / std::sqrt(sum_squares / hidden + eps);
      for (int i = 0; i < hidden; ++i)
        ref[static_cast<size_t>(t) * hidden + i] = row[i] * scale * weight[i];
    }
    const std::string shape = absl::StrCat("tokens ", tokens, " hidden ", hidden);
    ExpectClose("rmsnorm.normed(fp16)", shape, DownloadFp16(d_normed, n), ref, kFp16Bound);
    ExpectClose("rmsnorm.residual(fp32)", shape, Download<float>(d_residual, n), residual, 1e-7);
  }
}

TEST_F(CudaFp16Test, SwigluWritesFp16) {
  for (const int width : {1536, 1001}) {
    const int tokens = 12;
    const size_t n = static_cast<size_t>(tokens) * width;
    const std::vector<float> gate = RandomFp16(rng_, n, 3.0f);
    const std::vector<float> up = RandomFp16(rng_, n);
    std::vector<uint16_t> packed;  // (tokens, 2 · width): gate|up, as the GEMM writes it
    for (int t = 0; t < tokens; ++t) {
      for (const std::vector<float>* part : {&gate, &up}) {
        const std::vector<uint16_t> bits(
            ToFp16({part->begin() + static_cast<size_t>(t) * width,
                    part->begin() + static_cast<size_t>(t + 1) * width}));
        packed.insert(packed.end(), bits.begin(), bits.end());
      }
    }
    DeviceBuffer d_in = Upload(packed);
    DeviceBuffer d_out = Poisoned<uint16_t>(n);
    ASSERT_CUDA(LaunchSwiglu(d_in.as<__half>(), d_in.as<__half>() + width, 2 * width, tokens, width,
                             d_out.as<__half>(), width, stream_));
    Sync();
    std::vector<float> ref(n);
    for (size_t i = 0; i < n; ++i) ref[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
    ExpectClose("swiglu(fp16)", absl::StrCat("packed tokens ", tokens, " width ", width),
                DownloadFp16(d_out, n), ref, kFp16Bound);
  }
}

TEST_F(CudaFp16Test, GatherRowsCopiesFp16Bits) {
  const int width = 100, n = 5;
  std::vector<uint16_t> rows(static_cast<size_t>(width) * 9);
  for (size_t i = 0; i < rows.size(); ++i) rows[i] = static_cast<uint16_t>(rng_());
  const std::vector<int32_t> pick{8, 0, 3, 3, 6};
  DeviceBuffer d_rows = Upload(rows);
  DeviceBuffer d_pick = Upload(pick);
  DeviceBuffer d_out = Poisoned<uint16_t>(static_cast<size_t>(width) * n);
  ASSERT_CUDA(LaunchGatherRows(d_rows.as<__half>(), width, d_pick.as<int32_t>(), n,
                               d_out.as<__half>(), stream_));
  Sync();
  std::vector<uint16_t> want;
  for (int32_t r : pick)
    want.insert(want.end(), rows.begin() + r * width, rows.begin() + (r + 1) * width);
  EXPECT_EQ(Download<uint16_t>(d_out, want.size()), want);
}

// ---- the change of format around attention ----

// Every fp16 value becomes the bf16 the host gives it, and back: every bf16 value becomes the
// fp16 the host gives it (±inf past 65504), in place, through the vector and the scalar paths.
TEST_F(CudaFp16Test, ConvertHalfRoundsAsTheHost) {
  std::vector<uint16_t> all(65536);
  for (size_t i = 0; i < all.size(); ++i) all[i] = static_cast<uint16_t>(i);
  for (const size_t n : {all.size(), all.size() - 3}) {
    const std::vector<uint16_t> in(all.begin(), all.begin() + n);
    for (const HalfFloat from : {HalfFloat::kFp16, HalfFloat::kBf16}) {
      DeviceBuffer d = Upload(in);
      ASSERT_CUDA(LaunchConvertHalf(d.as<void>(), static_cast<int64_t>(n), from, stream_));
      Sync();
      const std::vector<uint16_t> got = Download<uint16_t>(d, n);
      size_t wrong = 0;
      for (size_t i = 0; i < n; ++i) {
        const float value =
            from == HalfFloat::kFp16 ? Fp16BitsToFloat(in[i]) : Bf16BitsToFloat(in[i]);
        const uint16_t want =
            from == HalfFloat::kFp16 ? FloatToBf16Bits(value) : FloatToFp16Bits(value);
        const bool both_nan =
            std::isnan(value) && std::isnan(from == HalfFloat::kFp16 ? Bf16BitsToFloat(got[i])
                                                                     : Fp16BitsToFloat(got[i]));
        if (got[i] != want && !both_nan) ++wrong;
      }
      EXPECT_EQ(wrong, 0u) << "n " << n << " from " << (from == HalfFloat::kFp16 ? "fp16" : "bf16");
    }
  }
  EXPECT_EQ(LaunchConvertHalf(nullptr, 0, HalfFloat::kFp16, stream_), cudaSuccess);
  EXPECT_EQ(LaunchConvertHalf(nullptr, 8, HalfFloat::kFp16, stream_), cudaErrorInvalidValue);
}

// ---- RoPE over fp16 rows ----

// An fp16 model's packed q|k|v rows: q and k rotated as the CPU twin rotates the same fp16
// values, left as bf16; v as bf16 exactly; and the pages holding exactly the bf16 k and v rows the
// launch left, for both layouts and both vector widths (head_dim 64, then 6).
TEST_F(CudaFp16Test, RopeTurnsFp16RowsIntoRotatedBf16) {
  for (const RopeLayout layout : {RopeLayout::kHalves, RopeLayout::kAdjacent}) {
    for (const int head_dim : {64, 6}) {
      const int tokens = 5, n_q = 4, n_kv = 2;
      ModelConfig config;
      config.head_dim = head_dim;
      config.rope_theta = 10000.0f;
      const std::vector<float> inv_freq = RopeInverseFrequencies(config);
      const int q_width = n_q * head_dim, kv_width = n_kv * head_dim;
      const int row = q_width + 2 * kv_width;
      const size_t n = static_cast<size_t>(tokens) * row;
      const std::vector<uint16_t> qkv = ToFp16(Random(rng_, n));
      std::vector<int32_t> positions(tokens);
      std::uniform_int_distribution<int32_t> pick(0, 8191);
      for (int32_t& p : positions) p = pick(rng_);

      // One sequence whose 5 new rows fill pages of 2 rows, shuffled among 8.
      const int rows_per_page = 2, pages = 8;
      const std::vector<int32_t> ids = ShuffledPages(pages, rng_);
      DevicePagedKv kv = UploadPagedKv(
          std::vector<uint16_t>(static_cast<size_t>(pages) * rows_per_page * kv_width, 0xffff),
          static_cast<int64_t>(rows_per_page) * kv_width, kv_width, rows_per_page, {0, 3},
          {ids[0], ids[1], ids[2]}, {ids[3], ids[4], ids[5]}, {tokens});
      DeviceBuffer d_qkv = Upload(qkv), d_positions = Upload(positions),
                   d_inv_freq = Upload(inv_freq),
                   d_token_seq = Upload(std::vector<int32_t>(tokens, 0)),
                   d_token_indptr = Upload(std::vector<int32_t>{0, tokens});
      __half* q = d_qkv.as<__half>();
      const RopeKvAppend append{.kv = kv.kv,
                                .token_seq = d_token_seq.as<int32_t>(),
                                .token_indptr = d_token_indptr.as<int32_t>(),
                                .values = d_qkv.as<__nv_bfloat16>() + q_width + kv_width};
      ASSERT_CUDA(LaunchRope(q, row, n_q, q + q_width, row, n_kv, tokens, head_dim,
                             d_positions.as<int32_t>(), d_inv_freq.as<float>(), layout, stream_,
                             append));
      Sync();
      const std::vector<uint16_t> out = Download<uint16_t>(d_qkv, n);
      const std::vector<uint16_t> pool = Download<uint16_t>(kv.pool, kv.pool.bytes() / 2);

      std::vector<float> ref = FromFp16(qkv), got_qk, ref_qk;
      size_t wrong_values = 0, wrong_pages = 0;
      for (int t = 0; t < tokens; ++t) {
        float* token_row = &ref[static_cast<size_t>(t) * row];
        for (int h = 0; h < n_q + n_kv; ++h) {
          ApplyRope(token_row + h * head_dim, head_dim, positions[t], inv_freq.data(), layout);
        }
        const size_t at = static_cast<size_t>(t) * row;
        for (int i = 0; i < q_width + kv_width; ++i) {
          got_qk.push_back(Bf16BitsToFloat(out[at + i]));
          ref_qk.push_back(token_row[i]);
        }
        for (int i = q_width + kv_width; i < row; ++i) {
          wrong_values += out[at + i] != FloatToBf16Bits(Fp16BitsToFloat(qkv[at + i]));
        }
        const size_t key_slot =
            (static_cast<size_t>(ids[t / 2]) * rows_per_page + t % 2) * kv_width;
        const size_t value_slot =
            (static_cast<size_t>(ids[3 + t / 2]) * rows_per_page + t % 2) * kv_width;
        for (int i = 0; i < kv_width; ++i) {
          wrong_pages += pool[key_slot + i] != out[at + q_width + i];
          wrong_pages += pool[value_slot + i] != out[at + q_width + kv_width + i];
        }
      }
      const std::string shape = absl::StrCat(layout == RopeLayout::kHalves ? "halves" : "adjacent",
                                             " tokens ", tokens, " dim ", head_dim);
      ExpectClose("rope(fp16 in, bf16 out)", shape, got_qk, ref_qk, kBf16Bound);
      EXPECT_EQ(wrong_values, 0u) << shape;
      EXPECT_EQ(wrong_pages, 0u) << shape;
    }
  }
}

// ---- GEMM and weights ----

// Both paths: the small-matrix kernel (this shape fits it) and cuBLAS.
TEST_F(CudaFp16Test, Fp16GemmMatchesExactLinear) {
  for (const bool small_kernel : {true, false}) {
    Fp16GemmCase(small_kernel);
  }
}

void CudaFp16Test::Fp16GemmCase(bool small_kernel) {
  absl::StatusOr<std::unique_ptr<Gemm>> gemm = Gemm::Create(stream_, small_kernel);
  ASSERT_TRUE(gemm.ok()) << gemm.status();
  const int tokens = 33, rows = 1000, cols = 576;
  const std::vector<float> x = RandomFp16(rng_, static_cast<size_t>(tokens) * cols);
  const std::vector<float> w = Random(rng_, static_cast<size_t>(rows) * cols, 0.05f);
  DeviceBuffer d_x = Upload(ToFp16(x));
  absl::StatusOr<DeviceBuffer> d_w = DeviceBuffer::Allocate(w.size() * sizeof(uint16_t));
  ASSERT_TRUE(d_w.ok());
  ASSERT_TRUE(CopyToDevice16(w, HalfFloat::kFp16, d_w->as<void>()).ok());
  const DeviceMatrix matrix{d_w->as<void>(), rows, cols, HalfFloat::kFp16};
  const std::vector<float> w16 = FromFp16(ToFp16(w));
  std::vector<float> exact(static_cast<size_t>(tokens) * rows);
  for (int t = 0; t < tokens; ++t) {
    for (int r = 0; r < rows; ++r) {
      double sum = 0.0;
      for (int c = 0; c < cols; ++c) {
        sum += static_cast<double>(x[static_cast<size_t>(t) * cols + c]) *
               w16[static_cast<size_t>(r) * cols + c];
      }
      exact[static_cast<size_t>(t) * rows + r] = static_cast<float>(sum);
    }
  }
  DeviceBuffer d_y32 = Poisoned<float>(exact.size());
  DeviceBuffer d_y16 = Poisoned<uint16_t>(exact.size());
  ASSERT_TRUE(
      (*gemm)->Linear(d_x.as<__half>(), tokens, matrix, d_y32.as<void>(), GemmOutput::kFloat).ok());
  ASSERT_TRUE(
      (*gemm)->Linear(d_x.as<__half>(), tokens, matrix, d_y16.as<void>(), GemmOutput::kHalf).ok());
  Sync();
  const std::string shape = absl::StrCat("tokens ", tokens, " ", cols, " -> ", rows,
                                         small_kernel ? ", small kernel" : ", cuBLAS");
  ExpectClose("gemm(fp16).fp32out vs exact", shape, Download<float>(d_y32, exact.size()), exact,
              1e-5);
  ExpectClose("gemm(fp16).fp16out vs exact", shape, DownloadFp16(d_y16, exact.size()), exact,
              kFp16Bound);
  // An input of the other type is refused, not misread.
  const absl::Status mixed = (*gemm)->Linear(d_x.as<__nv_bfloat16>(), tokens, matrix,
                                             d_y32.as<void>(), GemmOutput::kFloat);
  EXPECT_EQ(mixed.code(), absl::StatusCode::kInvalidArgument) << mixed;
}

Model SmallModel(std::mt19937& rng) {
  Model model;
  ModelConfig& c = model.config;
  c.n_layers = 1;
  c.hidden = 16;
  c.ffn_hidden = 24;
  c.n_heads = 2;
  c.n_kv_heads = 1;
  c.head_dim = 8;
  c.vocab_size = 20;
  c.tied_embeddings = true;
  auto matrix = [&](int rows, int cols) {
    return Matrix{rows, cols, Random(rng, static_cast<size_t>(rows) * cols)};
  };
  model.weights.token_embedding = matrix(c.vocab_size, c.hidden);
  LayerWeights& w = model.weights.layers.emplace_back();
  w.attn_norm = Random(rng, c.hidden);
  w.wq = matrix(16, c.hidden);
  w.wk = matrix(8, c.hidden);
  w.wv = matrix(8, c.hidden);
  w.wo = matrix(c.hidden, 16);
  w.ffn_norm = Random(rng, c.hidden);
  w.w_gate = matrix(c.ffn_hidden, c.hidden);
  w.w_up = matrix(c.ffn_hidden, c.hidden);
  w.w_down = matrix(c.hidden, c.ffn_hidden);
  model.weights.output_norm = Random(rng, c.hidden);
  return model;
}

TEST_F(CudaFp16Test, UploadKeepsFp16AndRefusesWhatOverflows) {
  Model model = SmallModel(rng_);
  absl::StatusOr<DeviceWeights> weights = DeviceWeights::Upload(model, HalfFloat::kFp16);
  ASSERT_TRUE(weights.ok()) << weights.status();
  EXPECT_EQ(weights->type, HalfFloat::kFp16);
  EXPECT_EQ(weights->layers[0].w_down.type, HalfFloat::kFp16);
  const Matrix& down = model.weights.layers[0].w_down;
  DeviceBuffer copy = Poisoned<uint16_t>(down.data.size());
  ASSERT_CUDA(cudaMemcpy(copy.as<void>(), weights->layers[0].w_down.data,
                         down.data.size() * sizeof(uint16_t), cudaMemcpyDeviceToDevice));
  EXPECT_EQ(Download<uint16_t>(copy, down.data.size()), ToFp16(down.data));

  // A weight past fp16's range: refused in fp16, naming the matrix; bf16 holds it.
  model.weights.layers[0].w_gate.data[5] = 1e6f;
  absl::StatusOr<DeviceWeights> refused = DeviceWeights::Upload(model, HalfFloat::kFp16);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(refused.status().message().find("layer 0 gate|up"), std::string::npos)
      << refused.status();
  EXPECT_TRUE(DeviceWeights::Upload(model, HalfFloat::kBf16).ok());
}

}  // namespace
}  // namespace kvtrim::engine::cuda
