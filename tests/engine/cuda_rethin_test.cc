// ThinK re-thinning on the GPU (rethin.cu) against a host model of its moves, bit for bit: the
// oldest recent rows of each moving sequence and kv-head go to the end of its thin segment (keys
// on the sequence's channel set, values whole), the newest recent rows to the front of the recent
// segment, and nothing else in the pool changes. Pages are shuffled and shared by the lists of
// several sequences, one of which moves nothing. Skips without a GPU.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <random>
#include <vector>

#include "engine/cuda/attention_decode.h"
#include "engine/cuda/compressed_kv.h"
#include "engine/cuda/rethin.h"
#include "tests/engine/cuda_test_util.h"

namespace kvtrim::engine::cuda {
namespace {

using namespace kvtrim::engine::cuda::testing;  // NOLINT: the shared CUDA test helpers

class CudaRethinTest : public CudaTest {
 protected:
  CudaRethinTest() : CudaTest("CUDA re-thinning tests") {}
};

TEST_F(CudaRethinTest, MovesRowsAsTheHostModel) {
  constexpr int kHeads = 2, kDim = 16, kRowElements = kHeads * kDim;
  constexpr int kRowsPerPage = 4;
  constexpr int64_t kPageElements = kRowsPerPage * kRowElements;
  // Per sequence: thin key width, rows moved, thin rows in use per kv-head (the recent segment
  // holds 2 · moved rows, as when it reaches twice think.recent).
  struct Seq {
    int width, moved, thin[kHeads];
  };
  const std::vector<Seq> seqs = {{8, 3, {5, 7}}, {4, 0, {2, 2}}, {16, 5, {0, 9}}, {8, 1, {3, 0}}};
  const int n_seqs = static_cast<int>(seqs.size());
  const int pages = 64;
  std::vector<int32_t> free_pages = ShuffledPages(pages, rng_);
  auto take = [&](int n) {
    std::vector<int32_t> ids(free_pages.end() - n, free_pages.end());
    free_pages.resize(free_pages.size() - n);
    return ids;
  };

  std::vector<int32_t> page_indptr{0}, key_pages, value_pages, thin_indptr{0}, thin_keys,
      thin_values, thin_rows, recent_rows, key_width, channel_offset;
  std::vector<uint16_t> channels;
  for (const Seq& s : seqs) {
    const int recent = 2 * s.moved + 1;  // a row to spare: the shift must leave it be
    const int recent_pages = (recent + kRowsPerPage - 1) / kRowsPerPage;
    for (std::vector<int32_t>* list : {&key_pages, &value_pages}) {
      const std::vector<int32_t> ids = take(recent_pages);
      list->insert(list->end(), ids.begin(), ids.end());
    }
    page_indptr.push_back(static_cast<int32_t>(key_pages.size()));
    // Thin pages for the most rows any head reaches after the move.
    const int most = *std::max_element(s.thin, s.thin + kHeads) + s.moved;
    const int key_rows_per_page = static_cast<int>(kPageElements / (kHeads * s.width));
    const int key_list = (most + key_rows_per_page - 1) / key_rows_per_page;
    const int value_list = (most + kRowsPerPage - 1) / kRowsPerPage;
    const int list = std::max({key_list, value_list, 1});
    std::vector<int32_t> keys = take(key_list), values = take(value_list);
    keys.resize(list, -1);
    values.resize(list, -1);
    thin_keys.insert(thin_keys.end(), keys.begin(), keys.end());
    thin_values.insert(thin_values.end(), values.begin(), values.end());
    thin_indptr.push_back(static_cast<int32_t>(thin_keys.size()));
    for (int h = 0; h < kHeads; ++h) {
      thin_rows.push_back(s.thin[h]);
      recent_rows.push_back(2 * s.moved);
    }
    key_width.push_back(s.width);
    channel_offset.push_back(static_cast<int32_t>(channels.size()));
    for (int h = 0; h < kHeads; ++h) {
      std::vector<uint16_t> all(kDim);
      std::iota(all.begin(), all.end(), 0);
      std::shuffle(all.begin(), all.end(), rng_);
      all.resize(s.width);
      std::sort(all.begin(), all.end());
      channels.insert(channels.end(), all.begin(), all.end());
    }
  }
  ASSERT_FALSE(free_pages.empty());

  std::vector<uint16_t> pool(pages * kPageElements);
  for (uint16_t& bits : pool) bits = static_cast<uint16_t>(rng_());
  std::vector<uint16_t> want = pool;
  for (int si = 0; si < n_seqs; ++si) {
    const Seq& s = seqs[si];
    const int n = s.moved;
    const int key_rows_per_page = static_cast<int>(kPageElements / (kHeads * s.width));
    auto full = [&](const std::vector<int32_t>& list, int first, int row, int h) {
      return list[first + row / kRowsPerPage] * kPageElements +
             (row % kRowsPerPage) * kRowElements + h * kDim;
    };
    for (int h = 0; h < kHeads; ++h) {
      const int thin = s.thin[h];
      const uint16_t* set = &channels[channel_offset[si] + h * s.width];
      for (int i = 0; i < n; ++i) {
        const int row = thin + i;
        const int64_t key_at =
            thin_keys[thin_indptr[si] + row / key_rows_per_page] * kPageElements +
            (row % key_rows_per_page) * kHeads * s.width + h * s.width;
        const int64_t from_key = full(key_pages, page_indptr[si], n - 1 - i, h);
        for (int c = 0; c < s.width; ++c) want[key_at + c] = pool[from_key + set[c]];
        const int64_t value_at = full(thin_values, thin_indptr[si], row, h);
        const int64_t from_value = full(value_pages, page_indptr[si], n - 1 - i, h);
        std::copy_n(&pool[from_value], kDim, &want[value_at]);
      }
      for (int j = 0; j < n; ++j) {  // recent rows - n = n rows shift down by n
        for (const std::vector<int32_t>* list : {&key_pages, &value_pages}) {
          std::copy_n(&want[full(*list, page_indptr[si], n + j, h)], kDim,
                      &want[full(*list, page_indptr[si], j, h)]);
        }
      }
    }
  }

  DevicePagedKv d = UploadPagedKv(pool, kPageElements, kRowElements, kRowsPerPage, page_indptr,
                                  key_pages, value_pages, std::vector<int32_t>(n_seqs, 0));
  DeviceBuffer d_thin_indptr = Upload(thin_indptr), d_thin_keys = Upload(thin_keys),
               d_thin_values = Upload(thin_values), d_thin_rows = Upload(thin_rows),
               d_recent_rows = Upload(recent_rows), d_key_width = Upload(key_width),
               d_channel_offset = Upload(channel_offset), d_channels = Upload(channels);
  const CompressedKv ckv{.thin_indptr = d_thin_indptr.as<int32_t>(),
                         .thin_key_pages = d_thin_keys.as<int32_t>(),
                         .thin_value_pages = d_thin_values.as<int32_t>(),
                         .thin_rows = d_thin_rows.as<int32_t>(),
                         .recent_rows = d_recent_rows.as<int32_t>(),
                         .key_width = d_key_width.as<int32_t>(),
                         .channel_offset = d_channel_offset.as<int32_t>(),
                         .channels = d_channels.as<uint16_t>()};
  std::vector<int32_t> moved;
  for (const Seq& s : seqs) moved.push_back(s.moved);
  // The step's decodes in an order of their own, all four of them.
  DeviceBuffer d_seqs = Upload(std::vector<int32_t>{2, 0, 3, 1});
  DeviceBuffer d_moved = Upload(moved);
  const AttentionShape shape{.n_heads = kHeads, .n_kv_heads = kHeads, .head_dim = kDim};
  ASSERT_CUDA(
      LaunchRethin(d.kv, ckv, d_seqs.as<int32_t>(), n_seqs, d_moved.as<int32_t>(), shape, stream_));
  Sync();
  const std::vector<uint16_t> got = Download<uint16_t>(d.pool, pool.size());
  size_t wrong = 0, changed = 0;
  for (size_t i = 0; i < pool.size(); ++i) {
    wrong += got[i] != want[i];
    changed += want[i] != pool[i];
  }
  EXPECT_EQ(wrong, 0u) << "of " << pool.size() << " pool elements";
  EXPECT_GT(changed, 500u);  // the model moved something worth checking
}

}  // namespace
}  // namespace kvtrim::engine::cuda
