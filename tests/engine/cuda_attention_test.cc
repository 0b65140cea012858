// The two paged attention kernels (engine/cuda/attention_decode.cu, attention_prefill.cu) against
// a CPU reference in double, on fresh random data each run (the seed is printed on failure).
//
// Every case lays its sequences' K and V rows over pages picked in shuffled order from a pool
// whose unused bytes are NaN (a read outside the rows a sequence holds poisons the result), with
// mixed lengths around page boundaries, GQA groups of 1 to 12 heads, every supported head_dim and
// a sliding window. Outputs are NaN-poisoned before each launch: every element must be written.
// The decode kernel runs with 1 split, 3 splits and the heuristic's choice (the split-K merge).
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/cuda/attention_decode.h"
#include "engine/cuda/attention_prefill.h"
#include "engine/cuda/paged_kv.h"
#include "tests/engine/cuda_test_util.h"

namespace kvtrim::engine::cuda {
namespace {

using testing::Download;
using testing::ExpectClose;
using testing::kBf16Bound;
using testing::Poisoned;
using testing::Upload;

struct SequenceSpec {
  int cached;  // rows already in the cache
  int n_new;   // new tokens of the step (their rows are written before attention runs)
};

struct AttentionCase {
  std::string name;
  AttentionShape shape;
  int page_bytes;
  std::vector<SequenceSpec> seqs;
};

// One step's K/V over shuffled pages, its queries, and the CSR the kernels read, on both sides.
class PagedStep {
 public:
  PagedStep(const AttentionCase& c, std::mt19937& rng) : c_(c) {
    const AttentionShape& s = c.shape;
    row_elements_ = s.n_kv_heads * s.head_dim;
    rows_per_page_ = c.page_bytes / (row_elements_ * 2);
    const int64_t page_elements = c.page_bytes / 2;
    int pages_needed = 0;
    for (const SequenceSpec& seq : c.seqs) {
      pages_needed += 2 * ((seq.cached + seq.n_new + rows_per_page_ - 1) / rows_per_page_);
    }
    const int total_pages = pages_needed + 5;  // a few never used
    const std::vector<int32_t> order = testing::ShuffledPages(total_pages, rng);
    std::vector<uint16_t> pool(static_cast<size_t>(total_pages) * page_elements, 0xFFFF);

    int next_page = 0;
    token_indptr_.push_back(0);
    page_indptr_.push_back(0);
    for (const SequenceSpec& seq : c.seqs) {
      const int rows = seq.cached + seq.n_new;
      const int n_pages = (rows + rows_per_page_ - 1) / rows_per_page_;
      for (int p = 0; p < n_pages; ++p) key_pages_.push_back(order[next_page++]);
      for (int p = 0; p < n_pages; ++p) value_pages_.push_back(order[next_page++]);
      const std::vector<float> keys = testing::RandomBf16(rng, rows * row_elements_);
      const std::vector<float> values = testing::RandomBf16(rng, rows * row_elements_);
      for (int r = 0; r < rows; ++r) {
        const int page = r / rows_per_page_, slot = r % rows_per_page_;
        const size_t key_at = key_pages_[page_indptr_.back() + page] * page_elements +
                              static_cast<size_t>(slot) * row_elements_;
        const size_t value_at = value_pages_[page_indptr_.back() + page] * page_elements +
                                static_cast<size_t>(slot) * row_elements_;
        for (int i = 0; i < row_elements_; ++i) {
          pool[key_at + i] = FloatToBf16Bits(keys[r * row_elements_ + i]);
          pool[value_at + i] = FloatToBf16Bits(values[r * row_elements_ + i]);
        }
      }
      keys_.push_back(keys);
      values_.push_back(values);
      kv_rows_.push_back(rows);
      token_indptr_.push_back(token_indptr_.back() + seq.n_new);
      page_indptr_.push_back(page_indptr_.back() + n_pages);
    }
    tokens_ = token_indptr_.back();
    // Queries a little sharper than unit scores, so the softmax is not flat.
    q_ = testing::RandomBf16(rng, tokens_ * s.n_heads * s.head_dim, 2.0f);

    d_q_ = Upload(testing::PaddedRows(testing::ToBf16(q_), s.n_heads * s.head_dim));
    d_token_indptr_ = Upload(token_indptr_);
    paged_ = testing::UploadPagedKv(pool, page_elements, row_elements_, rows_per_page_,
                                    page_indptr_, key_pages_, value_pages_, kv_rows_);
  }

  // softmax(q kᵀ / sqrt(D)) v for every new token and head, in double: (tokens, n_heads * D).
  std::vector<float> Reference() const {
    const AttentionShape& s = c_.shape;
    const int D = s.head_dim, group = s.n_heads / s.n_kv_heads;
    std::vector<float> out(static_cast<size_t>(tokens_) * s.n_heads * D);
    for (size_t seq = 0; seq < c_.seqs.size(); ++seq) {
      for (int i = 0; i < c_.seqs[seq].n_new; ++i) {
        const int token = token_indptr_[seq] + i, position = c_.seqs[seq].cached + i;
        const int lo = s.window > 0 ? std::max(0, position - s.window + 1) : 0;
        for (int h = 0; h < s.n_heads; ++h) {
          const float* query = &q_[(static_cast<size_t>(token) * s.n_heads + h) * D];
          const int channel0 = (h / group) * D;
          std::vector<double> scores;
          double max_score = -INFINITY;
          for (int j = lo; j <= position; ++j) {
            double dot = 0.0;
            for (int d = 0; d < D; ++d) {
              dot += static_cast<double>(query[d]) * keys_[seq][j * row_elements_ + channel0 + d];
            }
            scores.push_back(dot / std::sqrt(static_cast<double>(D)));
            max_score = std::max(max_score, scores.back());
          }
          double sum = 0.0;
          for (double& score : scores) sum += (score = std::exp(score - max_score));
          for (int d = 0; d < D; ++d) {
            double acc = 0.0;
            for (int j = lo; j <= position; ++j) {
              acc += scores[j - lo] * values_[seq][j * row_elements_ + channel0 + d];
            }
            out[(static_cast<size_t>(token) * s.n_heads + h) * D + d] = acc / sum;
          }
        }
      }
    }
    return out;
  }

  // Runs the decode kernel on the one-token sequences and the prefill kernel on the others.
  std::vector<float> Run(int splits, PrefillKernel kernel, cudaStream_t stream) {
    std::vector<int32_t> decode, items;
    for (size_t seq = 0; seq < c_.seqs.size(); ++seq) {
      if (c_.seqs[seq].n_new == 1) {
        decode.push_back(static_cast<int32_t>(seq));
        continue;
      }
      for (int first = 0; first < c_.seqs[seq].n_new; first += kPrefillQueryTile) {
        items.push_back(static_cast<int32_t>(seq));
        items.push_back(first);
      }
    }
    const size_t out_elements = q_.size();
    DeviceBuffer d_out = Poisoned<uint16_t>(out_elements);
    DeviceBuffer d_decode = Upload(decode.empty() ? std::vector<int32_t>{0} : decode);
    DeviceBuffer d_items = Upload(items.empty() ? std::vector<int32_t>{0, 0} : items);
    const int n_decode = static_cast<int>(decode.size());
    if (splits == 0) {
      int most_rows = 0;
      for (int32_t seq : decode) most_rows = std::max(most_rows, kv_rows_[seq]);
      splits = DecodeAttentionSplits(n_decode, most_rows, c_.shape, 132);
    }
    const size_t workspace_bytes = DecodeAttentionWorkspaceBytes(n_decode, splits, c_.shape);
    DeviceBuffer d_workspace = Poisoned<float>(std::max<size_t>(workspace_bytes / 4, 1));
    EXPECT_EQ(
        LaunchDecodeAttention(paged_.kv, d_token_indptr_.as<int32_t>(), d_decode.as<int32_t>(),
                              n_decode, d_q_.as<__nv_bfloat16>(), QueryStride(), c_.shape, splits,
                              d_workspace.as<float>(), d_out.as<__nv_bfloat16>(), stream),
        cudaSuccess);
    EXPECT_EQ(
        LaunchPrefillAttention(paged_.kv, d_token_indptr_.as<int32_t>(), d_items.as<int32_t>(),
                               static_cast<int>(items.size() / 2), d_q_.as<__nv_bfloat16>(),
                               QueryStride(), c_.shape, d_out.as<__nv_bfloat16>(), stream, kernel),
        cudaSuccess);
    EXPECT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
    last_splits_ = splits;
    return testing::FromBf16(Download<uint16_t>(d_out, out_elements));
  }

  std::string Describe() const {
    const AttentionShape& s = c_.shape;
    std::string rows;
    for (const SequenceSpec& seq : c_.seqs) {
      absl::StrAppend(&rows, rows.empty() ? "" : ",", seq.cached, "+", seq.n_new);
    }
    return absl::StrCat(s.n_heads, "/", s.n_kv_heads, "x", s.head_dim,
                        s.window ? absl::StrCat(" w", s.window) : "", " rpp ", rows_per_page_,
                        " rows ", rows, " split ", last_splits_);
  }

 private:
  const AttentionCase& c_;
  int row_elements_ = 0, rows_per_page_ = 0, tokens_ = 0, last_splits_ = 1;
  std::vector<std::vector<float>> keys_, values_;  // per sequence (rows, row_elements)
  // d_q_'s rows: the heads, then testing::kQueryPadding NaNs.
  int QueryStride() const { return c_.shape.n_heads * c_.shape.head_dim + testing::kQueryPadding; }

  std::vector<float> q_;  // (tokens, n_heads * head_dim)
  std::vector<int32_t> token_indptr_, kv_rows_, page_indptr_, key_pages_, value_pages_;
  DeviceBuffer d_q_, d_token_indptr_;
  testing::DevicePagedKv paged_;
};

class CudaAttentionTest : public testing::CudaTest {
 protected:
  void Check(const std::string& kernel, const AttentionCase& c, std::vector<int> splits,
             PrefillKernel prefill = PrefillKernel::kAuto) {
    PagedStep step(c, rng_);
    const std::vector<float> ref = step.Reference();
    for (int split : splits) {
      const std::vector<float> out = step.Run(split, prefill, stream_);
      ExpectClose(kernel, absl::StrCat(c.name, " ", step.Describe()), out, ref, kBf16Bound);
    }
  }
};

std::vector<SequenceSpec> Decodes(std::initializer_list<int> rows) {
  std::vector<SequenceSpec> seqs;
  for (int r : rows) seqs.push_back({r - 1, 1});
  return seqs;
}

TEST_F(CudaAttentionTest, DecodeMatchesCpu) {
  const AttentionCase cases[] = {
      // SmolLM2: 9 query / 3 kv heads of 64; 64 KiB pages hold 170 rows.
      {"smollm2", {9, 3, 64, 0}, 64 << 10, Decodes({301})},
      {"smollm2", {9, 3, 64, 0}, 64 << 10, Decodes({1, 170, 171, 341, 1001, 4109})},
      // Llama-3-8B heads (32 / 8 x 128), small pages: 8 rows each.
      {"llama3", {32, 8, 128, 0}, 16 << 10, Decodes({1, 8, 9, 100, 2049})},
      {"tiny", {4, 2, 16, 0}, 256, Decodes({1, 2, 3, 4, 5, 17})},
      {"group12", {12, 1, 32, 0}, 1024, Decodes({33, 700})},
      {"dim256", {8, 2, 256, 0}, 4096, Decodes({5, 300})},
      {"window", {9, 3, 64, 100}, 8 << 10, Decodes({50, 100, 101, 777})},
  };
  for (const AttentionCase& c : cases) Check("decode", c, {1, 3, 0});
}

const std::vector<AttentionCase>& PrefillCases() {
  static const std::vector<AttentionCase> cases = {
      {"smollm2", {9, 3, 64, 0}, 8 << 10, {{0, 37}, {250, 100}, {63, 5}, {169, 64}}},
      {"smollm2", {9, 3, 64, 0}, 64 << 10, {{0, 512}}},
      {"llama3", {32, 8, 128, 0}, 16 << 10, {{0, 130}, {500, 64}}},
      {"llama3", {32, 8, 128, 0}, 32 << 10, {{0, 257}, {127, 129}}},
      {"window", {32, 8, 128, 200}, 16 << 10, {{300, 257}, {0, 140}}},
      {"smollm2", {9, 3, 64, 0}, 16 << 10, {{0, 129}, {127, 3}, {1000, 2}}},
      {"tiny", {4, 2, 16, 0}, 256, {{0, 40}, {3, 7}, {1, 2}}},
      {"window", {4, 2, 16, 16}, 256, {{0, 40}, {20, 30}}},
      {"window", {9, 3, 64, 100}, 8 << 10, {{0, 300}, {90, 20}}},
      {"group12", {12, 1, 32, 0}, 1024, {{10, 70}}},
      {"dim256", {8, 2, 256, 0}, 4096, {{7, 66}}},
      {"dim32", {8, 4, 32, 0}, 2048, {{100, 129}}},
  };
  return cases;
}

TEST_F(CudaAttentionTest, PrefillMatchesCpu) {
  for (const AttentionCase& c : PrefillCases()) {
    Check("prefill, mma.sync", c, {1}, PrefillKernel::kMmaSync);
    Check("prefill, default", c, {1});
  }
}

// Hopper's warpgroup kernel, where it runs, on every case of its head dims; refused elsewhere.
TEST_F(CudaAttentionTest, WarpgroupPrefillMatchesCpu) {
  const bool runs = WarpgroupPrefillRuns();
  std::printf("warpgroup prefill kernel: %s\n", runs ? "runs here" : "does not run here");
  for (const AttentionCase& c : PrefillCases()) {
    const int d = c.shape.head_dim;
    if (runs && (d == 64 || d == 128)) {
      Check("prefill, warpgroup", c, {1}, PrefillKernel::kWarpgroup);
      continue;
    }
    // Pages that match the shape, so that the kernel choice is the only thing refused.
    PagedKv kv{};
    kv.row_elements = c.shape.n_kv_heads * d;
    kv.rows_per_page = 1;
    EXPECT_EQ(LaunchPrefillAttention(kv, nullptr, nullptr, 0, nullptr, c.shape.n_heads * d, c.shape,
                                     nullptr, stream_, PrefillKernel::kWarpgroup),
              cudaErrorInvalidValue)
        << c.name;
    EXPECT_EQ(LaunchPrefillAttention(kv, nullptr, nullptr, 0, nullptr, c.shape.n_heads * d, c.shape,
                                     nullptr, stream_, PrefillKernel::kMmaSync),
              cudaSuccess)
        << c.name;
  }
}

// A step as the scheduler packs it: decodes and prefill chunks of different sequences in one
// CSR, both kernels writing their own rows of one output.
TEST_F(CudaAttentionTest, MixedStepMatchesCpu) {
  const AttentionCase cases[] = {
      {"mixed", {9, 3, 64, 0}, 8 << 10, {{40, 1}, {0, 33}, {700, 1}, {21, 100}, {0, 1}}},
      {"mixed", {4, 2, 16, 16}, 256, {{40, 1}, {0, 33}, {5, 1}, {17, 12}}},
  };
  for (const AttentionCase& c : cases) Check("decode+prefill", c, {1, 0});
}

}  // namespace
}  // namespace kvtrim::engine::cuda
