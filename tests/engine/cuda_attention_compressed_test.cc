// The compressed paged decode attention kernel (engine/cuda/attention_decode_compressed.cu)
// against a CPU reference in double, on fresh random data each run (the seed is printed on
// failure).
//
// Every case lays out its sequences as the compressed cache holds them: per kv-head a thin segment
// (keys on a random ascending channel set of key_width channels, in rows of n_kv_heads *
// key_width; values at full width) and a full-width recent segment, each kv-head with its own row
// counts. Pages are picked in shuffled order from a pool whose unused bytes are NaN, and the row
// slots a kv-head does not use are NaN too: a read outside the rows a kv-head holds poisons the
// result. Batches mix uncompressed sequences (no thin rows, key_width = head_dim), thin keys read
// 16 bytes at a time (key_width % 8 == 0), thin keys read element by element (other widths) and
// full-width thin keys (selection without ThinK, no channel set: its offset is -1). Outputs are
// NaN-poisoned before each launch; the kernel runs with 1 split, 3 splits and the heuristic's
// choice, over the sequences listed in shuffled order (split records are indexed by list place).
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "engine/cuda/attention_decode.h"
#include "engine/cuda/attention_decode_compressed.h"
#include "engine/cuda/compressed_kv.h"
#include "engine/cuda/decode_eviction.h"
#include "engine/cuda/paged_kv.h"
#include "tests/engine/cuda_test_util.h"

namespace kvtrim::engine::cuda {
namespace {

using testing::Download;
using testing::ExpectClose;
using testing::kBf16Bound;
using testing::Poisoned;

// One decoding sequence of a step. A list of one count applies to every kv-head.
struct SequenceSpec {
  int key_width;            // channels per kv-head of the thin keys
  std::vector<int> thin;    // (n_kv_heads) thin rows per kv-head
  std::vector<int> recent;  // (n_kv_heads) recent rows per kv-head, the new token included
};

SequenceSpec Uncompressed(int head_dim, int rows) { return {head_dim, {0}, {rows}}; }

struct CompressedCase {
  std::string name;
  AttentionShape shape;
  int page_bytes;
  std::vector<SequenceSpec> seqs;
};

// One kv-head's rows of one sequence, in float (bf16-exact).
struct HeadRows {
  std::vector<int> channels;                                              // (key_width) ascending
  std::vector<float> thin_keys, thin_values, recent_keys, recent_values;  // (rows, width)
};

// One step's compressed K/V over shuffled pages, its queries, and what the kernel reads.
class CompressedStep {
 public:
  CompressedStep(const CompressedCase& c, std::mt19937& rng) : c_(c) {
    const AttentionShape& s = c.shape;
    const int D = s.head_dim, H = s.n_kv_heads;
    row_elements_ = H * D;
    rows_per_page_ = c.page_bytes / (row_elements_ * 2);
    page_elements_ = c.page_bytes / 2;
    n_seqs_ = static_cast<int>(c.seqs.size());
    for (const SequenceSpec& seq : c.seqs) {
      thin_.push_back(PerHead(seq.thin));
      recent_.push_back(PerHead(seq.recent));
    }

    // Page counts first, then pages handed out from a shuffled order.
    int total_pages = 5;  // a few never used
    for (int i = 0; i < n_seqs_; ++i) {
      total_pages += 2 * ThinPages(i) + 2 * Pages(MostRows(recent_[i]), rows_per_page_);
    }
    page_order_ = testing::ShuffledPages(total_pages, rng);
    pool_.assign(static_cast<size_t>(total_pages) * page_elements_, 0xFFFF);
    thin_indptr_.push_back(0);
    page_indptr_.push_back(0);
    for (int i = 0; i < n_seqs_; ++i) AddSequence(i, rng);

    // Queries a little sharper than unit scores, so the softmax is not flat.
    q_ = testing::RandomBf16(rng, static_cast<size_t>(n_seqs_) * s.n_heads * D, 2.0f);
    token_indptr_.resize(n_seqs_ + 1);
    std::iota(token_indptr_.begin(), token_indptr_.end(), 0);
    listed_.resize(n_seqs_);
    std::iota(listed_.begin(), listed_.end(), 0);
    std::shuffle(listed_.begin(), listed_.end(), rng);
    UploadAll();
  }

  // softmax(scores) · V per query head in double, (n_seqs, n_heads * D): thin scores on the
  // kv-head's channels, recent scores on all of them, both scaled by 1 / sqrt(D).
  std::vector<float> Reference() const {
    const AttentionShape& s = c_.shape;
    const int D = s.head_dim, group = s.n_heads / s.n_kv_heads;
    std::vector<float> out(static_cast<size_t>(n_seqs_) * s.n_heads * D);
    for (int i = 0; i < n_seqs_; ++i) {
      const int kw = c_.seqs[i].key_width;
      for (int h = 0; h < s.n_heads; ++h) {
        const HeadRows& head = rows_[i][h / group];
        const float* query = &q_[(static_cast<size_t>(i) * s.n_heads + h) * D];
        const int thin = thin_[i][h / group], recent = recent_[i][h / group];
        std::vector<double> p(thin + recent);  // scores, then unnormalised probabilities
        for (int r = 0; r < thin; ++r) {
          double dot = 0.0;
          for (int i = 0; i < kw; ++i) {
            dot += static_cast<double>(query[head.channels[i]]) * head.thin_keys[r * kw + i];
          }
          p[r] = dot / std::sqrt(static_cast<double>(D));
        }
        for (int r = 0; r < recent; ++r) {
          double dot = 0.0;
          for (int d = 0; d < D; ++d) {
            dot += static_cast<double>(query[d]) * head.recent_keys[r * D + d];
          }
          p[thin + r] = dot / std::sqrt(static_cast<double>(D));
        }
        const double most = *std::max_element(p.begin(), p.end());
        double sum = 0.0;
        for (double& x : p) sum += (x = std::exp(x - most));
        for (int d = 0; d < D; ++d) {
          double acc = 0.0;
          for (int r = 0; r < thin + recent; ++r) {
            acc += p[r] * (r < thin ? head.thin_values[r * D + d]
                                    : head.recent_values[(r - thin) * D + d]);
          }
          out[(static_cast<size_t>(i) * s.n_heads + h) * D + d] = acc / sum;
        }
      }
    }
    return out;
  }

  // The compressed kernel with `splits` (0: CompressedDecodeAttentionSplits' choice for 132 SMs)
  // and `block_warps` (0: its own choice).
  std::vector<float> Run(int splits, cudaStream_t stream, int block_warps = 0) {
    if (splits == 0) splits = HeuristicSplits();
    DeviceBuffer d_out = Poisoned<uint16_t>(q_.size());
    EXPECT_EQ(Launch(c_.shape, splits, d_out, stream, block_warps), cudaSuccess);
    EXPECT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
    last_splits_ = splits;
    return testing::FromBf16(Download<uint16_t>(d_out, q_.size()));
  }

  cudaError_t Launch(const AttentionShape& shape, int splits, DeviceBuffer& d_out,
                     cudaStream_t stream, int block_warps = 0) {
    workspace_ = Poisoned<float>(WorkspaceFloats(splits));
    PagedKv kv = paged_.kv;
    kv.kv_rows = nullptr;  // not read: null makes a read fault
    return LaunchCompressedDecodeAttention(
        kv, ckv_, d_token_indptr_.as<int32_t>(), d_listed_.as<int32_t>(), n_seqs_,
        d_q_.as<__nv_bfloat16>(), QueryStride(), shape, splits, workspace_.as<float>(),
        d_out.as<__nv_bfloat16>(), stream, block_warps);
  }

  // The uncompressed kernel on the same step: every sequence must be uncompressed, every kv-head
  // holding the same rows.
  std::vector<float> RunUncompressed(int splits, cudaStream_t stream) {
    if (splits == 0) splits = HeuristicSplits();
    DeviceBuffer d_out = Poisoned<uint16_t>(q_.size());
    workspace_ = Poisoned<float>(WorkspaceFloats(splits));
    EXPECT_EQ(
        LaunchDecodeAttention(paged_.kv, d_token_indptr_.as<int32_t>(), d_listed_.as<int32_t>(),
                              n_seqs_, d_q_.as<__nv_bfloat16>(), QueryStride(), c_.shape, splits,
                              workspace_.as<float>(), d_out.as<__nv_bfloat16>(), stream),
        cudaSuccess);
    EXPECT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
    last_splits_ = splits;
    return testing::FromBf16(Download<uint16_t>(d_out, q_.size()));
  }

  std::string Describe() const {
    const AttentionShape& s = c_.shape;
    std::string seqs;
    for (int i = 0; i < n_seqs_; ++i) {
      absl::StrAppend(&seqs, i ? " " : "", "w", c_.seqs[i].key_width, ":",
                      absl::StrJoin(thin_[i], ","), "+", absl::StrJoin(recent_[i], ","));
    }
    return absl::StrCat(s.n_heads, "/", s.n_kv_heads, "x", s.head_dim, " rpp ", rows_per_page_,
                        " split ", last_splits_, " ", seqs);
  }

 private:
  // Lays out sequence i: its pages, channel sets and rows (random), on both sides.
  void AddSequence(int i, std::mt19937& rng) {
    const int D = c_.shape.head_dim, H = c_.shape.n_kv_heads;
    const SequenceSpec& seq = c_.seqs[i];
    const int kw = seq.key_width;
    const int most_thin = MostRows(thin_[i]), most_recent = MostRows(recent_[i]);
    const int key_pages = Pages(most_thin, KeyRowsPerPage(kw));
    const int value_pages = Pages(most_thin, rows_per_page_);
    const int first_thin = thin_indptr_.back(), first_recent = page_indptr_.back();
    Take(key_pages, ThinPages(i), thin_key_pages_);
    Take(value_pages, ThinPages(i), thin_value_pages_);
    Take(Pages(most_recent, rows_per_page_), Pages(most_recent, rows_per_page_), key_pages_);
    Take(Pages(most_recent, rows_per_page_), Pages(most_recent, rows_per_page_), value_pages_);
    thin_indptr_.push_back(first_thin + ThinPages(i));
    page_indptr_.push_back(first_recent + Pages(most_recent, rows_per_page_));
    key_width_.push_back(kw);
    channel_offset_.push_back(kw == D ? -1 : static_cast<int32_t>(channels_.size()));

    std::vector<HeadRows> heads(H);
    for (int h = 0; h < H; ++h) {
      HeadRows& head = heads[h];
      head.channels.resize(D);
      std::iota(head.channels.begin(), head.channels.end(), 0);
      if (kw < D) {
        std::shuffle(head.channels.begin(), head.channels.end(), rng);
        head.channels.resize(kw);
        std::sort(head.channels.begin(), head.channels.end());
        for (int channel : head.channels) channels_.push_back(static_cast<uint16_t>(channel));
      }
      head.thin_keys = testing::RandomBf16(rng, thin_[i][h] * kw);
      head.thin_values = testing::RandomBf16(rng, thin_[i][h] * D);
      head.recent_keys = testing::RandomBf16(rng, recent_[i][h] * D);
      head.recent_values = testing::RandomBf16(rng, recent_[i][h] * D);
      const int32_t* thin_keys = thin_key_pages_.data() + first_thin;
      const int32_t* thin_values = thin_value_pages_.data() + first_thin;
      const int32_t* recent_keys = key_pages_.data() + first_recent;
      const int32_t* recent_values = value_pages_.data() + first_recent;
      for (int r = 0; r < thin_[i][h]; ++r) {
        Write(thin_keys, KeyRowsPerPage(kw), H * kw, r, h * kw, &head.thin_keys[r * kw], kw);
        Write(thin_values, rows_per_page_, row_elements_, r, h * D, &head.thin_values[r * D], D);
      }
      for (int r = 0; r < recent_[i][h]; ++r) {
        Write(recent_keys, rows_per_page_, row_elements_, r, h * D, &head.recent_keys[r * D], D);
        Write(recent_values, rows_per_page_, row_elements_, r, h * D, &head.recent_values[r * D],
              D);
      }
    }
    rows_.push_back(std::move(heads));
    kv_rows_.push_back(most_recent);
  }
  // Appends `padded` entries to `list`: the next `n` pages of the shuffled order, then -1s.
  void Take(int n, int padded, std::vector<int32_t>& list) {
    for (int p = 0; p < padded; ++p) list.push_back(p < n ? page_order_[next_page_++] : -1);
  }
  std::vector<int> PerHead(const std::vector<int>& counts) const {
    if (counts.size() == 1) return std::vector<int>(c_.shape.n_kv_heads, counts[0]);
    EXPECT_EQ(counts.size(), static_cast<size_t>(c_.shape.n_kv_heads)) << c_.name;
    std::vector<int> per_head = counts;
    per_head.resize(c_.shape.n_kv_heads, counts.back());
    return per_head;
  }
  static int MostRows(const std::vector<int>& counts) {
    return *std::max_element(counts.begin(), counts.end());
  }
  static int Pages(int rows, int rows_per_page) {
    return (rows + rows_per_page - 1) / rows_per_page;
  }
  int KeyRowsPerPage(int key_width) const {
    return static_cast<int>(page_elements_ / (c_.shape.n_kv_heads * key_width));
  }
  // Entries of sequence i in both thin lists (the longer list's pages).
  int ThinPages(int i) const {
    const int most = MostRows(thin_[i]);
    return std::max(Pages(most, KeyRowsPerPage(c_.seqs[i].key_width)), Pages(most, rows_per_page_));
  }
  // Writes `count` elements at element `offset` of row `row` of a list of `pages`.
  void Write(const int32_t* pages, int rows_per_page, int row_elements, int row, int offset,
             const float* data, int count) {
    const size_t at = static_cast<size_t>(pages[row / rows_per_page]) * page_elements_ +
                      static_cast<size_t>(row % rows_per_page) * row_elements + offset;
    for (int i = 0; i < count; ++i) pool_[at + i] = FloatToBf16Bits(data[i]);
  }
  int HeuristicSplits() const {
    int most_rows = 0;
    for (int i = 0; i < n_seqs_; ++i) {
      for (int h = 0; h < c_.shape.n_kv_heads; ++h) {
        most_rows = std::max(most_rows, thin_[i][h] + recent_[i][h]);
      }
    }
    return CompressedDecodeAttentionSplits(n_seqs_, most_rows, c_.shape, 132);
  }
  size_t WorkspaceFloats(int splits) const {
    return std::max<size_t>(DecodeAttentionWorkspaceBytes(n_seqs_, splits, c_.shape) / 4, 1);
  }
  static std::vector<int32_t> NonEmpty(const std::vector<int32_t>& v) {
    return v.empty() ? std::vector<int32_t>{-1} : v;
  }

  void UploadAll() {
    d_q_ = testing::Upload(
        testing::PaddedRows(testing::ToBf16(q_), c_.shape.n_heads * c_.shape.head_dim));
    d_token_indptr_ = testing::Upload(token_indptr_);
    d_listed_ = testing::Upload(listed_);
    paged_ =
        testing::UploadPagedKv(pool_, page_elements_, row_elements_, rows_per_page_, page_indptr_,
                               NonEmpty(key_pages_), NonEmpty(value_pages_), kv_rows_);
    d_thin_indptr_ = testing::Upload(thin_indptr_);
    d_thin_key_pages_ = testing::Upload(NonEmpty(thin_key_pages_));
    d_thin_value_pages_ = testing::Upload(NonEmpty(thin_value_pages_));
    std::vector<int32_t> thin_rows, recent_rows;  // (n_seqs, n_kv_heads)
    for (int i = 0; i < n_seqs_; ++i) {
      thin_rows.insert(thin_rows.end(), thin_[i].begin(), thin_[i].end());
      recent_rows.insert(recent_rows.end(), recent_[i].begin(), recent_[i].end());
    }
    d_thin_rows_ = testing::Upload(thin_rows);
    d_recent_rows_ = testing::Upload(recent_rows);
    d_key_width_ = testing::Upload(key_width_);
    d_channel_offset_ = testing::Upload(channel_offset_);
    // At least one element, so that the pointer is a real allocation even when no sequence has
    // a channel set (full-width reads of it, which must not happen, then fault under memcheck).
    d_channels_ = testing::Upload(channels_.empty() ? std::vector<uint16_t>{0xFFFF} : channels_);
    ckv_ = CompressedKv{.thin_indptr = d_thin_indptr_.as<int32_t>(),
                        .thin_key_pages = d_thin_key_pages_.as<int32_t>(),
                        .thin_value_pages = d_thin_value_pages_.as<int32_t>(),
                        .thin_rows = d_thin_rows_.as<int32_t>(),
                        .recent_rows = d_recent_rows_.as<int32_t>(),
                        .key_width = d_key_width_.as<int32_t>(),
                        .channel_offset = d_channel_offset_.as<int32_t>(),
                        .channels = d_channels_.as<uint16_t>()};
  }

  friend class EvictionCheck;
  const CompressedCase& c_;
  int row_elements_ = 0, rows_per_page_ = 0, n_seqs_ = 0, last_splits_ = 1;
  int64_t page_elements_ = 0;
  std::vector<std::vector<int>> thin_, recent_;  // (n_seqs)(n_kv_heads)
  std::vector<std::vector<HeadRows>> rows_;      // (n_seqs)(n_kv_heads)
  std::vector<uint16_t> pool_;                   // (pages, page_elements) bf16 bits
  std::vector<int32_t> page_order_;              // page ids in the order they are handed out
  int next_page_ = 0;
  // d_q_'s rows: the heads, then testing::kQueryPadding NaNs.
  int QueryStride() const { return c_.shape.n_heads * c_.shape.head_dim + testing::kQueryPadding; }

  std::vector<float> q_;  // (n_seqs, n_heads * head_dim)
  std::vector<int32_t> token_indptr_, listed_, kv_rows_, page_indptr_, key_pages_, value_pages_,
      thin_indptr_, thin_key_pages_, thin_value_pages_, key_width_, channel_offset_;
  std::vector<uint16_t> channels_;
  DeviceBuffer d_q_, d_token_indptr_, d_listed_, d_thin_indptr_, d_thin_key_pages_,
      d_thin_value_pages_, d_thin_rows_, d_recent_rows_, d_key_width_, d_channel_offset_,
      d_channels_, workspace_;
  testing::DevicePagedKv paged_;
  CompressedKv ckv_;
};

class CudaAttentionCompressedTest : public testing::CudaTest {
 protected:
  void Check(const CompressedCase& c) {
    CompressedStep step(c, rng_);
    const std::vector<float> ref = step.Reference();
    // Every block size at every head dimension: 6 warps exist at 64 and 128 only, and elsewhere
    // must run as 4.
    for (int splits : {1, 3, 0}) {
      for (int block_warps : {0, 4, 6}) {
        const std::vector<float> out = step.Run(splits, stream_, block_warps);
        ExpectClose("compressed decode",
                    absl::StrCat(c.name, " ", step.Describe(), " warps ", block_warps), out, ref,
                    kBf16Bound);
      }
    }
  }
};

// Thin keys at half width (16-byte loads), uncompressed neighbours, per-head counts around page
// boundaries.
TEST_F(CudaAttentionCompressedTest, HalfWidthKeysMatchCpu) {
  const CompressedCase cases[] = {
      // SmolLM2: 9 query / 3 kv heads of 64; 16 KiB pages hold 42 full rows, 85 thin key rows.
      {"smollm2",
       {9, 3, 64, 0},
       16 << 10,
       {Uncompressed(64, 301),
        {32, {951, 900, 1000}, {33, 1, 40}},
        {32, {0, 1, 85}, {300, 42, 43}},
        {32, {84, 86, 170}, {41, 1, 84}},
        Uncompressed(64, 1)}},
      // Llama-3-8B heads (32 / 8 x 128): 16 KiB pages hold 8 full rows, 16 thin key rows.
      {"llama3",
       {32, 8, 128, 0},
       16 << 10,
       {{64, {4100, 15, 16, 17, 31, 32, 33, 0}, {1, 8, 9, 100, 300, 7, 2, 64}},
        Uncompressed(128, 2049),
        {64, {1}, {1}},
        {64, {7, 8, 9, 127, 128, 129, 255, 256}, {17}}}},
      {"tiny",
       {4, 2, 16, 0},
       256,
       {{8, {0, 7}, {5, 1}}, {8, {8, 9}, {4, 3}}, Uncompressed(16, 17)}},
      {"group12", {12, 1, 32, 0}, 1024, {{16, {33}, {1}}, {16, {700}, {31}}, Uncompressed(32, 33)}},
      {"dim256", {8, 2, 256, 0}, 4096, {{128, {5, 300}, {3, 1}}, Uncompressed(256, 300)}},
  };
  for (const CompressedCase& c : cases) Check(c);
}

// Widths that are not a multiple of 8 (the element-by-element key path), in batches with the
// vector path and uncompressed sequences.
TEST_F(CudaAttentionCompressedTest, OddWidthKeysMatchCpu) {
  const CompressedCase cases[] = {
      {"smollm2",
       {9, 3, 64, 0},
       16 << 10,
       {{20, {0, 1, 136}, {300, 5, 1}},
        {33, {1000, 137, 138}, {2, 3, 4}},
        {32, {50}, {50}},
        Uncompressed(64, 100)}},
      // 44-wide thin key rows are 704 bytes: 23 to a 16 KiB page, 192 bytes left over.
      {"llama3",
       {32, 8, 128, 0},
       16 << 10,
       {{44, {22, 23, 24, 46, 47, 1, 0, 4100}, {1, 2, 3, 4, 5, 6, 7, 8}},
        {127, {300}, {9}},
        Uncompressed(128, 64)}},
      {"tiny",
       {4, 2, 16, 0},
       256,
       {{5, {11, 12}, {1, 2}}, {3, {21, 22}, {4, 5}}, {1, {13, 40}, {6, 1}}}},
      {"group12", {12, 1, 32, 0}, 1024, {{12, {41}, {1}}, {31, {85}, {2}}, {12, {43}, {3}}}},
      {"dim256", {8, 2, 256, 0}, 4096, {{100, {10, 11}, {1, 5}}, {255, {9}, {4}}}},
  };
  for (const CompressedCase& c : cases) Check(c);
}

// Thin keys at full width (token selection without ThinK): no channel set is read.
TEST_F(CudaAttentionCompressedTest, FullWidthThinKeysMatchCpu) {
  const CompressedCase cases[] = {
      {"smollm2", {9, 3, 64, 0}, 16 << 10, {{64, {41, 42, 43}, {1, 2, 300}}, {32, {20}, {1}}}},
      {"llama3",
       {32, 8, 128, 0},
       16 << 10,
       {{128, {951}, {33}}, {128, {0, 8, 9, 1, 2, 3, 4, 5}, {1}}}},
      {"tiny", {4, 2, 16, 0}, 256, {{16, {4, 5}, {3, 4}}}},
      {"group12", {12, 1, 32, 0}, 1024, {{32, {16}, {1}}, {32, {17}, {2}}}},
      {"dim256", {8, 2, 256, 0}, 4096, {{256, {3, 4}, {4, 5}}}},
  };
  for (const CompressedCase& c : cases) Check(c);
}

// A block serves up to 16 query heads, the rows of its mma tiles (rows 8-15 only past 8 heads);
// larger groups are cut into near-equal chunks (20 = 10 + 10).
TEST_F(CudaAttentionCompressedTest, EveryGroupSizeMatchesCpu) {
  const CompressedCase cases[] = {
      {"group1", {4, 4, 32, 0}, 2048, {{16, {0, 1, 20, 40}, {3, 1, 2, 1}}, Uncompressed(32, 9)}},
      {"group5", {10, 2, 64, 0}, 2048, {{32, {30}, {2}}, {20, {9, 17}, {1, 8}}}},
      {"group6", {12, 2, 32, 0}, 1024, {{16, {40, 7}, {3, 33}}}},
      {"group7", {14, 2, 128, 0}, 4096, {{64, {21}, {4}}, {60, {12}, {9}}}},
      {"group8", {16, 2, 64, 0}, 2048, {{32, {50, 3}, {1, 6}}, Uncompressed(64, 20)}},
      {"group9", {9, 1, 64, 0}, 1024, {{32, {30}, {5}}, {24, {17}, {2}}, Uncompressed(64, 11)}},
      {"group16", {16, 1, 128, 0}, 4096, {{64, {40}, {3}}, Uncompressed(128, 19)}},
      {"group20", {20, 1, 64, 0}, 2048, {{32, {25}, {4}}, {40, {9}, {1}}}},
  };
  for (const CompressedCase& c : cases) Check(c);
}

// On uncompressed sequences the tensor-core kernel and LaunchDecodeAttention (CUDA cores, the
// sliding-window models' kernel) compute the same attention: the outputs agree to one bf16
// rounding at every split count.
TEST_F(CudaAttentionCompressedTest, UncompressedMatchesDecodeAttention) {
  constexpr double kBf16Rounding = 1.0 / 256;
  const CompressedCase cases[] = {
      {"smollm2",
       {9, 3, 64, 0},
       64 << 10,
       {Uncompressed(64, 1), Uncompressed(64, 170), Uncompressed(64, 171), Uncompressed(64, 1001),
        Uncompressed(64, 4109)}},
      {"llama3", {32, 8, 128, 0}, 16 << 10, {Uncompressed(128, 9), Uncompressed(128, 2049)}},
      {"tiny",
       {4, 2, 16, 0},
       256,
       {Uncompressed(16, 1), Uncompressed(16, 5), Uncompressed(16, 17)}},
  };
  for (const CompressedCase& c : cases) {
    CompressedStep step(c, rng_);
    for (int splits : {1, 3, 0}) {
      const std::vector<float> expected = step.RunUncompressed(splits, stream_);
      const std::vector<float> out = step.Run(splits, stream_);
      ExpectClose("compressed vs decode", absl::StrCat(c.name, " ", step.Describe()), out, expected,
                  kBf16Rounding);
    }
  }
}

// ---- decode-time eviction (decode_eviction.cu) over the same layouts ----

struct EvictionSpec {
  int32_t kind;
  int window_or_sinks, recent;
  double alpha;
  int max_tokens;  // CORM's cap, 0 none
};

// One launch of LaunchDecodeEviction over a CompressedStep, sequence i under specs[i % size],
// every row with a random prior state (distinct positions below the step's, last_important -1 or
// among the last 16 positions), against a host model: CORM's weights in double, the survivors,
// and each segment closed up as memory::KvCache::EvictRow does it, highest evicted slot first.
// Rows kept, their keys, values (bit for bit) and states must match; recent_attention to fp32
// rounding. A head where a CORM weight lies within 0.01% of alpha / t is left out (and counted:
// the kernel's fp32 weights are within ~1e-6 of the double ones), as that row's survival or
// state may go either way.
class EvictionCheck {
 public:
  EvictionCheck(CompressedStep& step, std::vector<EvictionSpec> specs)
      : step_(step), specs_(std::move(specs)) {}

  void Run(std::mt19937& rng, cudaStream_t stream) {
    CompressedStep& st = step_;
    const AttentionShape& shape = st.c_.shape;
    const int H = shape.n_kv_heads, n = st.n_seqs_, rpp = st.rows_per_page_;
    const int64_t pages = static_cast<int64_t>(st.pool_.size()) / st.page_elements_;
    std::vector<KeyState> states(static_cast<size_t>(pages) * rpp * H,
                                 KeyState{-7, -7, std::nanf("")});
    std::vector<int32_t> params(static_cast<size_t>(n) * kEvictionParams, 0), positions(n);
    prior_.assign(n, std::vector<Segments>(H));
    int max_rows = 1;
    for (int i = 0; i < n; ++i) {
      const EvictionSpec& spec = specs_[i % specs_.size()];
      int32_t* p = &params[static_cast<size_t>(i) * kEvictionParams];
      p[0] = spec.kind;
      p[1] = spec.window_or_sinks;
      p[2] = spec.recent;
      uint64_t bits;
      std::memcpy(&bits, &spec.alpha, sizeof(bits));
      p[3] = static_cast<int32_t>(bits);
      p[4] = static_cast<int32_t>(bits >> 32);
      p[5] = spec.max_tokens;
      positions[i] = 10000 + i;
      for (int h = 0; h < H; ++h) {
        const int thin = st.thin_[i][h], recent = st.recent_[i][h];
        max_rows = std::max({max_rows, thin, recent});
        std::vector<int32_t> order(positions[i]);
        std::iota(order.begin(), order.end(), 0);
        std::shuffle(order.begin(), order.end(), rng);
        std::bernoulli_distribution none(0.4);
        std::uniform_int_distribution<int> latest(positions[i] - 16, positions[i] - 1);
        std::uniform_real_distribution<float> attention(0.0f, 1.0f);
        Segments& prior = prior_[i][h];
        for (int r = 0; r < thin + recent; ++r) {
          const KeyState state{order[r], none(rng) ? -1 : latest(rng), attention(rng)};
          (r < thin ? prior.thin : prior.recent).push_back(state);
        }
        for (int seg = 0; seg < 2; ++seg) {
          const std::vector<KeyState>& rows = seg == 0 ? prior.thin : prior.recent;
          for (int r = 0; r < static_cast<int>(rows.size()); ++r) {
            states[StateIndex(i, seg, r, h)] = rows[r];
          }
        }
      }
    }
    DeviceBuffer d_states = testing::Upload(states);
    DeviceBuffer d_params = testing::Upload(params);
    DeviceBuffer d_positions = testing::Upload(positions);
    DeviceBuffer d_counts = Poisoned<int32_t>(static_cast<size_t>(n) * H * 2);
    DeviceBuffer d_workspace =
        Poisoned<int32_t>(DecodeEvictionWorkspaceBytes(n, max_rows, shape) / sizeof(int32_t));
    ASSERT_EQ(
        LaunchDecodeEviction(st.paged_.kv, st.ckv_, st.d_token_indptr_.as<int32_t>(),
                             d_positions.as<int32_t>(), st.d_listed_.as<int32_t>(), n,
                             d_params.as<int32_t>(), st.d_q_.as<__nv_bfloat16>(), st.QueryStride(),
                             shape, DecodeStates{d_states.as<KeyState>(), rpp}, max_rows,
                             d_workspace.as<int32_t>(), d_counts.as<int32_t>(), stream),
        cudaSuccess);
    ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
    const std::vector<uint16_t> pool = Download<uint16_t>(st.paged_.pool, st.pool_.size());
    const std::vector<KeyState> got_states = Download<KeyState>(d_states, states.size());
    const std::vector<int32_t> counts = Download<int32_t>(d_counts, static_cast<size_t>(n) * H * 2);

    for (int i = 0; i < n; ++i) {
      for (int h = 0; h < H; ++h) CheckHead(i, h, positions[i], pool, got_states, counts);
    }
  }

  int heads = 0, ambiguous = 0, evicted = 0, moved = 0, capped = 0;

 private:
  struct Segments {
    std::vector<KeyState> thin, recent;
  };
  // One segment's rows of one head on the host: key (its width), value, state.
  struct Row {
    std::vector<float> key, value;
    KeyState state;
  };

  size_t StateIndex(int i, int seg, int row, int h) const {
    const CompressedStep& st = step_;
    const int32_t* pages = seg == 0 ? st.thin_value_pages_.data() + st.thin_indptr_[i]
                                    : st.value_pages_.data() + st.page_indptr_[i];
    const int rpp = st.rows_per_page_;
    return static_cast<size_t>(
        DecodeStateIndex(pages[row / rpp], row % rpp, h, st.c_.shape.n_kv_heads, rpp));
  }

  // Element offset of head h's key (seg 0: thin) or value of `row`.
  size_t At(int i, int seg, bool value, int row, int h) const {
    const CompressedStep& st = step_;
    const int D = st.c_.shape.head_dim, H = st.c_.shape.n_kv_heads;
    const int kw = st.c_.seqs[i].key_width;
    const int32_t* pages =
        seg == 0 ? (value ? st.thin_value_pages_ : st.thin_key_pages_).data() + st.thin_indptr_[i]
                 : (value ? st.value_pages_ : st.key_pages_).data() + st.page_indptr_[i];
    const bool thin_key = seg == 0 && !value;
    const int rows_per_page = thin_key ? st.KeyRowsPerPage(kw) : st.rows_per_page_;
    const int row_elements = thin_key ? H * kw : st.row_elements_;
    return static_cast<size_t>(pages[row / rows_per_page]) * st.page_elements_ +
           static_cast<size_t>(row % rows_per_page) * row_elements + h * (thin_key ? kw : D);
  }

  void CheckHead(int i, int h, int position, const std::vector<uint16_t>& pool,
                 const std::vector<KeyState>& got_states, const std::vector<int32_t>& counts) {
    const CompressedStep& st = step_;
    const AttentionShape& shape = st.c_.shape;
    const int D = shape.head_dim, group = shape.n_heads / shape.n_kv_heads;
    const int kw = st.c_.seqs[i].key_width;
    const EvictionSpec& spec = specs_[i % specs_.size()];
    if (spec.kind == kEvictNone) return;
    ++heads;
    const HeadRows& head = st.rows_[i][h];
    const int thin = st.thin_[i][h], recent = st.recent_[i][h], t = thin + recent;
    std::vector<Row> rows[2];
    for (int r = 0; r < t; ++r) {
      const bool is_thin = r < thin;
      const int k = is_thin ? r : r - thin;
      Row row;
      row.key = is_thin
                    ? std::vector<float>(&head.thin_keys[k * kw], &head.thin_keys[k * kw] + kw)
                    : std::vector<float>(&head.recent_keys[k * D], &head.recent_keys[k * D] + D);
      row.value =
          is_thin ? std::vector<float>(&head.thin_values[k * D], &head.thin_values[k * D] + D)
                  : std::vector<float>(&head.recent_values[k * D], &head.recent_values[k * D] + D);
      row.state = (is_thin ? prior_[i][h].thin : prior_[i][h].recent)[k];
      rows[is_thin ? 0 : 1].push_back(std::move(row));
    }
    rows[1].back().state = KeyState{position, -1, 0.0f};  // the step's token
    // CORM: the group's weights in double; a row is decided under alpha / t and under 0.01% above
    // and below it.
    std::vector<int> fate(t, 0);  // 0: the same either way; else which way the band goes
    std::vector<bool> important(t, false), strict(t, false), loose(t, false);
    if (spec.kind == kEvictCorm) {
      std::vector<double> weight(t, 0.0);
      for (int g = 0; g < group; ++g) {
        const float* query = &st.q_[(static_cast<size_t>(i) * shape.n_heads + h * group + g) * D];
        std::vector<double> p(t);
        for (int r = 0; r < t; ++r) {
          const Row& row = rows[r < thin ? 0 : 1][r < thin ? r : r - thin];
          double dot = 0.0;
          for (int c = 0; c < static_cast<int>(row.key.size()); ++c) {
            dot += static_cast<double>(query[r < thin ? head.channels[c] : c]) * row.key[c];
          }
          p[r] = dot / std::sqrt(static_cast<double>(D));
        }
        const double most = *std::max_element(p.begin(), p.end());
        double sum = 0.0;
        for (double& x : p) sum += (x = std::exp(x - most));
        for (int r = 0; r < t; ++r) weight[r] = std::max(weight[r], p[r] / sum);
      }
      const double threshold = spec.alpha / t;
      for (int r = 0; r < t; ++r) {
        KeyState& state = rows[r < thin ? 0 : 1][r < thin ? r : r - thin].state;
        state.recent_attention = static_cast<float>(weight[r]);
        important[r] = weight[r] >= threshold;
        strict[r] = weight[r] >= threshold * 1.0001;
        loose[r] = weight[r] >= threshold * 0.9999;
        if (important[r]) state.last_important = position;
      }
    }
    const auto survives = [&](const KeyState& s, bool newly_important) {
      const bool recent_token = s.position > position - spec.recent;
      if (spec.kind == kEvictCorm) {
        const bool kept = newly_important || (s.last_important >= 0 &&
                                              s.last_important > position - spec.window_or_sinks);
        return recent_token || kept;
      }
      return recent_token || s.position < spec.window_or_sinks;
    };
    bool unsure = false;
    std::vector<bool> keep(t);
    for (int r = 0; r < t; ++r) {
      KeyState before = (r < thin     ? prior_[i][h].thin[r]
                         : r == t - 1 ? KeyState{position, -1, 0.0f}
                                      : prior_[i][h].recent[r - thin]);
      keep[r] = survives(before, important[r]);
      // Within the band the kernel's fp32 weight may fall either side: the row's survival, or
      // only its last_important (a row important within the window survives either way), may
      // differ.
      if (spec.kind == kEvictCorm && strict[r] != loose[r]) unsure = true;
    }
    // The cap (ApplyCap): the weakest survivors outside the recent rows, by the new states.
    const int survivors = static_cast<int>(std::count(keep.begin(), keep.end(), true));
    if (spec.kind == kEvictCorm && spec.max_tokens > 0 && survivors > spec.max_tokens) {
      std::vector<std::pair<KeyState, int>> candidates;  // (state, slot)
      for (int r = 0; r < t; ++r) {
        const KeyState& state = rows[r < thin ? 0 : 1][r < thin ? r : r - thin].state;
        if (keep[r] && state.position <= position - spec.recent) candidates.push_back({state, r});
      }
      std::sort(candidates.begin(), candidates.end(), [](const auto& a, const auto& b) {
        const KeyState &x = a.first, &y = b.first;
        if (x.recent_attention != y.recent_attention)
          return x.recent_attention < y.recent_attention;
        if (x.last_important != y.last_important) return x.last_important < y.last_important;
        return x.position < y.position;
      });
      const size_t evict =
          std::min(static_cast<size_t>(survivors - spec.max_tokens), candidates.size());
      for (size_t j = 0; j < evict; ++j) keep[candidates[j].second] = false;
      // Weights within fp32 rounding of each other across the cut may order either way.
      if (evict > 0 && evict < candidates.size()) {
        const float below = candidates[evict - 1].first.recent_attention;
        const float above = candidates[evict].first.recent_attention;
        if (above - below <= 1e-4f * above) unsure = true;
      }
      ++capped;
    }
    if (unsure) {
      ++ambiguous;
      return;
    }
    // Each segment closed up as KvCache::EvictRow leaves it.
    for (int seg = 0; seg < 2; ++seg) {
      std::vector<Row>& list = rows[seg];
      const int first = seg == 0 ? 0 : thin;
      for (int r = static_cast<int>(list.size()) - 1; r >= 0; --r) {
        if (keep[first + r]) continue;
        ++evicted;
        if (r != static_cast<int>(list.size()) - 1) {
          list[r] = list.back();
          ++moved;
        }
        list.pop_back();
      }
      const std::string where =
          absl::StrCat("sequence ", i, " head ", h, seg == 0 ? " thin" : " recent");
      const int count = counts[(static_cast<size_t>(i) * shape.n_kv_heads + h) * 2 + seg];
      ASSERT_EQ(count, static_cast<int>(list.size())) << where;
      for (int r = 0; r < count; ++r) {
        const Row& want = list[r];
        const size_t key_at = At(i, seg, false, r, h), value_at = At(i, seg, true, r, h);
        for (size_t c = 0; c < want.key.size(); ++c) {
          ASSERT_EQ(pool[key_at + c], FloatToBf16Bits(want.key[c])) << where << " row " << r;
        }
        for (int c = 0; c < D; ++c) {
          ASSERT_EQ(pool[value_at + c], FloatToBf16Bits(want.value[c])) << where << " row " << r;
        }
        const KeyState& got = got_states[StateIndex(i, seg, r, h)];
        EXPECT_EQ(got.position, want.state.position) << where << " row " << r;
        EXPECT_EQ(got.last_important, want.state.last_important) << where << " row " << r;
        EXPECT_NEAR(got.recent_attention, want.state.recent_attention,
                    1e-6 + 1e-4 * want.state.recent_attention)
            << where << " row " << r;
      }
    }
  }

  CompressedStep& step_;
  std::vector<EvictionSpec> specs_;
  std::vector<std::vector<Segments>> prior_;  // (n_seqs)(n_kv_heads)
};

// CORM (with its cap above, at and below what survives) and the window policy over the layouts
// of the attention tests: thin keys at half, odd and full width, uncompressed neighbours (their
// params none), per-head counts across page boundaries, every group size the kernel takes.
TEST_F(CudaAttentionCompressedTest, DecodeEvictionMatchesHostModel) {
  const CompressedCase cases[] = {
      {"smollm2",
       {9, 3, 64, 0},
       16 << 10,
       {Uncompressed(64, 301),
        {32, {951, 900, 1000}, {33, 1, 40}},
        {32, {0, 1, 85}, {300, 42, 43}},
        {20, {84, 86, 170}, {41, 1, 84}},
        {64, {41, 42, 43}, {1, 2, 300}}}},
      {"llama3",
       {32, 8, 128, 0},
       16 << 10,
       {{64, {4100, 15, 16, 17, 31, 32, 33, 0}, {1, 8, 9, 100, 300, 7, 2, 64}},
        {44, {22, 23, 24, 46, 47, 1, 0, 410}, {1, 2, 3, 4, 5, 6, 7, 8}},
        {128, {951}, {33}}}},
      {"tiny",
       {4, 2, 16, 0},
       256,
       {{8, {0, 7}, {5, 1}}, {5, {11, 12}, {1, 2}}, {16, {4, 5}, {3, 4}}}},
      {"group8", {16, 2, 64, 0}, 2048, {{32, {50, 3}, {1, 6}}, {24, {17, 9}, {2, 30}}}},
      {"dim256", {8, 2, 256, 0}, 4096, {{128, {5, 300}, {3, 1}}, {100, {10, 11}, {1, 5}}}},
  };
  // CORM with a window short of the prior states' spread (some rows important, some not), and
  // the window policy; both with recent rows that always stay.
  // CORM with a cap above, at and below what survives.
  const std::vector<std::vector<EvictionSpec>> spec_sets = {
      {{kEvictCorm, 8, 4, 1.0, 0}, {kEvictWindow, 3, 8, 0.0, 0}},
      {{kEvictWindow, 0, 2, 0.0, 0}, {kEvictCorm, 4, 1, 0.5, 0}, {kEvictNone, 0, 0, 0.0, 0}},
      {{kEvictCorm, 12, 2, 2.0, 0}},
      {{kEvictCorm, 8, 4, 1.0, 40}, {kEvictCorm, 16, 8, 0.5, 8}, {kEvictCorm, 4, 2, 1.0, 300}}};
  int heads = 0, ambiguous = 0, evicted = 0, moved = 0, capped = 0;
  for (const CompressedCase& c : cases) {
    for (const std::vector<EvictionSpec>& specs : spec_sets) {
      CompressedStep step(c, rng_);
      EvictionCheck check(step, specs);
      check.Run(rng_, stream_);
      if (HasFatalFailure()) return;
      heads += check.heads;
      ambiguous += check.ambiguous;
      evicted += check.evicted;
      moved += check.moved;
      capped += check.capped;
    }
  }
  std::printf(
      "[parity] decode eviction: %d heads checked, %d left out (a weight within 0.01%% of "
      "alpha / t), %d rows evicted, %d moved\n",
      heads - ambiguous, ambiguous, evicted, moved);
  std::printf("[parity] decode eviction: %d heads over CORM's cap\n", capped);
  EXPECT_GT(moved, 0);
  EXPECT_GT(capped, 0);
  EXPECT_LE(ambiguous * 4, heads);
}

// Compression refuses sliding windows, and so does the kernel.
TEST_F(CudaAttentionCompressedTest, RefusesSlidingWindow) {
  const CompressedCase c{"window", {9, 3, 64, 0}, 16 << 10, {{32, {10}, {2}}}};
  CompressedStep step(c, rng_);
  DeviceBuffer d_out = Poisoned<uint16_t>(9 * 64);
  AttentionShape windowed = c.shape;
  windowed.window = 100;
  EXPECT_EQ(step.Launch(windowed, 1, d_out, stream_), cudaErrorInvalidValue);
  EXPECT_EQ(step.Launch(c.shape, 1, d_out, stream_, /*block_warps=*/5), cudaErrorInvalidValue);
  EXPECT_EQ(step.Launch(c.shape, 1, d_out, stream_), cudaSuccess);
  EXPECT_EQ(cudaStreamSynchronize(stream_), cudaSuccess);
}

}  // namespace
}  // namespace kvtrim::engine::cuda
