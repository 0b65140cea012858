// ThinK re-thinning on the GPU (rethin.cu) against a host model of its moves, bit for bit: the
// oldest recent rows of each moving sequence and kv-head go to the end of its thin segment (keys
// on the sequence's channel set, values whole), the newest recent rows to the front of the recent
// segment, and nothing else in the pool changes. Pages are shuffled and shared by the lists of
// several sequences, one of which moves nothing. After decode-time eviction
// (LaunchRethinAfterEviction) the recent rows are in no order and each head holds its own count,
// so the host model there follows KvCache::MoveToPrompt row by row, states included. Skips
// without a GPU.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include "engine/cuda/attention_decode.h"
#include "engine/cuda/compressed_kv.h"
#include "engine/cuda/decode_eviction.h"
#include "engine/cuda/rethin.h"
#include "tests/engine/cuda_test_util.h"

namespace kvtrim::engine::cuda {
namespace {

using namespace kvtrim::engine::cuda::testing;  // NOLINT: the shared CUDA test helpers

constexpr int kHeads = 2, kDim = 16, kRowElements = kHeads * kDim, kRowsPerPage = 4;
constexpr int64_t kPageElements = kRowsPerPage * kRowElements;

// A step's compressed sequences on the host: page lists over shuffled pool pages, row counts and
// channel sets, as the plan lays them out.
struct Lists {
  std::vector<int32_t> free_pages;
  std::vector<int32_t> page_indptr{0}, key_pages, value_pages, thin_indptr{0}, thin_keys,
      thin_values, thin_rows, recent_rows, key_width, channel_offset;
  std::vector<uint16_t> channels;

  Lists(int pages, std::mt19937& rng) : free_pages(ShuffledPages(pages, rng)) {}
  std::vector<int32_t> Take(int n) {
    std::vector<int32_t> ids(free_pages.end() - n, free_pages.end());
    free_pages.resize(free_pages.size() - n);
    return ids;
  }
  // A sequence with full-width lists for `recent_capacity` rows, thin lists for `thin_capacity`
  // rows at key width `width` (the shorter list padded with -1), the heads' row counts and a
  // random channel set of `width` per kv-head.
  void Add(int recent_capacity, int thin_capacity, int width, const int (&thin)[kHeads],
           const int (&recent)[kHeads], std::mt19937& rng) {
    const int recent_pages = (recent_capacity + kRowsPerPage - 1) / kRowsPerPage;
    for (std::vector<int32_t>* list : {&key_pages, &value_pages}) {
      const std::vector<int32_t> ids = Take(recent_pages);
      list->insert(list->end(), ids.begin(), ids.end());
    }
    page_indptr.push_back(static_cast<int32_t>(key_pages.size()));
    const int key_rows_per_page = static_cast<int>(kPageElements / (kHeads * width));
    const int key_list = (thin_capacity + key_rows_per_page - 1) / key_rows_per_page;
    const int value_list = (thin_capacity + kRowsPerPage - 1) / kRowsPerPage;
    const int list = std::max({key_list, value_list, 1});
    std::vector<int32_t> keys = Take(key_list), values = Take(value_list);
    keys.resize(list, -1);
    values.resize(list, -1);
    thin_keys.insert(thin_keys.end(), keys.begin(), keys.end());
    thin_values.insert(thin_values.end(), values.begin(), values.end());
    thin_indptr.push_back(static_cast<int32_t>(thin_keys.size()));
    for (int h = 0; h < kHeads; ++h) {
      thin_rows.push_back(thin[h]);
      recent_rows.push_back(recent[h]);
    }
    key_width.push_back(width);
    channel_offset.push_back(static_cast<int32_t>(channels.size()));
    for (int h = 0; h < kHeads; ++h) {
      std::vector<uint16_t> all(kDim);
      std::iota(all.begin(), all.end(), 0);
      std::shuffle(all.begin(), all.end(), rng);
      all.resize(width);
      std::sort(all.begin(), all.end());
      channels.insert(channels.end(), all.begin(), all.end());
    }
  }
  // Where kv-head h of full-width row `row` of sequence s starts in the pool (the value list's
  // when `values`).
  int64_t Full(int s, int row, int h, bool values) const {
    const std::vector<int32_t>& list = values ? value_pages : key_pages;
    return list[page_indptr[s] + row / kRowsPerPage] * kPageElements +
           (row % kRowsPerPage) * kRowElements + h * kDim;
  }
  int64_t ThinValue(int s, int row, int h) const {
    return thin_values[thin_indptr[s] + row / kRowsPerPage] * kPageElements +
           (row % kRowsPerPage) * kRowElements + h * kDim;
  }
  int64_t ThinKey(int s, int row, int h) const {
    const int width = key_width[s];
    const int rows_per_page = static_cast<int>(kPageElements / (kHeads * width));
    return thin_keys[thin_indptr[s] + row / rows_per_page] * kPageElements +
           (row % rows_per_page) * kHeads * width + h * width;
  }
  const uint16_t* ChannelSet(int s, int h) const {
    return &channels[channel_offset[s] + h * key_width[s]];
  }
};

// Lists on the device, and the CompressedKv over them.
struct DeviceLists {
  DeviceBuffer thin_indptr, thin_keys, thin_values, thin_rows, recent_rows, key_width,
      channel_offset, channels;
  CompressedKv ckv = {};
};
DeviceLists UploadLists(const Lists& l) {
  DeviceLists d{.thin_indptr = Upload(l.thin_indptr),
                .thin_keys = Upload(l.thin_keys),
                .thin_values = Upload(l.thin_values),
                .thin_rows = Upload(l.thin_rows),
                .recent_rows = Upload(l.recent_rows),
                .key_width = Upload(l.key_width),
                .channel_offset = Upload(l.channel_offset),
                .channels = Upload(l.channels)};
  d.ckv = CompressedKv{.thin_indptr = d.thin_indptr.as<int32_t>(),
                       .thin_key_pages = d.thin_keys.as<int32_t>(),
                       .thin_value_pages = d.thin_values.as<int32_t>(),
                       .thin_rows = d.thin_rows.as<int32_t>(),
                       .recent_rows = d.recent_rows.as<int32_t>(),
                       .key_width = d.key_width.as<int32_t>(),
                       .channel_offset = d.channel_offset.as<int32_t>(),
                       .channels = d.channels.as<uint16_t>()};
  return d;
}

class CudaRethinTest : public CudaTest {
 protected:
  CudaRethinTest() : CudaTest("CUDA re-thinning tests") {}
};

TEST_F(CudaRethinTest, MovesRowsAsTheHostModel) {
  // Per sequence: thin key width, rows moved, thin rows in use per kv-head (the recent segment
  // holds 2 · moved rows, as when it reaches twice think.recent).
  struct Seq {
    int width, moved, thin[kHeads];
  };
  const std::vector<Seq> seqs = {{8, 3, {5, 7}}, {4, 0, {2, 2}}, {16, 5, {0, 9}}, {8, 1, {3, 0}}};
  const int n_seqs = static_cast<int>(seqs.size());
  const int pages = 64;
  Lists l(pages, rng_);
  for (const Seq& s : seqs) {
    // A row to spare past the recent ones (the shift must leave it be); thin pages for the most
    // rows any head reaches after the move.
    const int recent[kHeads] = {2 * s.moved, 2 * s.moved};
    l.Add(2 * s.moved + 1, *std::max_element(s.thin, s.thin + kHeads) + s.moved, s.width, s.thin,
          recent, rng_);
  }
  ASSERT_FALSE(l.free_pages.empty());

  std::vector<uint16_t> pool(pages * kPageElements);
  for (uint16_t& bits : pool) bits = static_cast<uint16_t>(rng_());
  std::vector<uint16_t> want = pool;
  for (int si = 0; si < n_seqs; ++si) {
    const int n = seqs[si].moved, width = seqs[si].width;
    for (int h = 0; h < kHeads; ++h) {
      const int thin = seqs[si].thin[h];
      const uint16_t* set = l.ChannelSet(si, h);
      for (int i = 0; i < n; ++i) {
        const int64_t key_at = l.ThinKey(si, thin + i, h),
                      from_key = l.Full(si, n - 1 - i, h, false);
        for (int c = 0; c < width; ++c) want[key_at + c] = pool[from_key + set[c]];
        std::copy_n(&pool[l.Full(si, n - 1 - i, h, true)], kDim,
                    &want[l.ThinValue(si, thin + i, h)]);
      }
      for (int j = 0; j < n; ++j) {  // recent rows - n = n rows shift down by n
        for (bool values : {false, true}) {
          std::copy_n(&want[l.Full(si, n + j, h, values)], kDim, &want[l.Full(si, j, h, values)]);
        }
      }
    }
  }

  DevicePagedKv d = UploadPagedKv(pool, kPageElements, kRowElements, kRowsPerPage, l.page_indptr,
                                  l.key_pages, l.value_pages, std::vector<int32_t>(n_seqs, 0));
  const DeviceLists dl = UploadLists(l);
  std::vector<int32_t> moved;
  for (const Seq& s : seqs) moved.push_back(s.moved);
  // The step's decodes in an order of their own, all four of them.
  DeviceBuffer d_seqs = Upload(std::vector<int32_t>{2, 0, 3, 1});
  DeviceBuffer d_moved = Upload(moved);
  const AttentionShape shape{.n_heads = kHeads, .n_kv_heads = kHeads, .head_dim = kDim};
  ASSERT_CUDA(LaunchRethin(d.kv, dl.ckv, d_seqs.as<int32_t>(), n_seqs, d_moved.as<int32_t>(), shape,
                           stream_));
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

// Re-thinning after eviction: per (sequence, kv-head), once the recent rows (counts, as eviction
// left them) reach 2 max(keep, 1), the R - keep of the lowest positions move to the thin
// segment highest slot first, each slot filled by the recent segment's last row, states along;
// slots past a head's new count are not compared (MoveToPrompt leaves rows there that no count
// reaches, the kernel leaves them be). One sequence re-thins on one head only, one keeps 0 rows
// (all move), one does not re-thin, and the recent positions are shuffled.
TEST_F(CudaRethinTest, MovesRowsAfterEvictionAsMoveToPrompt) {
  constexpr int kMaxRows = 16;
  // Per sequence: thin key width, think.recent (-1: the sequence does not re-thin), and the thin
  // and recent rows eviction left each kv-head.
  struct Seq {
    int width, keep, thin[kHeads], recent[kHeads];
  };
  const std::vector<Seq> seqs = {{8, 2, {5, 3}, {7, 3}},
                                 {4, -1, {2, 2}, {6, 6}},
                                 {4, 0, {0, 9}, {2, 5}},
                                 {8, 3, {0, 1}, {9, 6}}};
  const int n_seqs = static_cast<int>(seqs.size());
  const int pages = 96;
  Lists l(pages, rng_);
  std::vector<int32_t> codes, counts;
  for (const Seq& s : seqs) {
    // A row past the counts; thin lists for every recent row moved, the most there can be.
    int most = 0;
    for (int h = 0; h < kHeads; ++h) most = std::max(most, s.thin[h] + s.recent[h]);
    l.Add(std::max(s.recent[0], s.recent[1]) + 1, most, s.width, s.thin, s.recent, rng_);
    for (int h = 0; h < kHeads; ++h) {
      counts.push_back(s.thin[h]);
      counts.push_back(s.recent[h]);
    }
    codes.push_back(s.keep >= 0 ? -(s.keep + 1) : 0);
  }
  ASSERT_FALSE(l.free_pages.empty());

  std::vector<uint16_t> pool(pages * kPageElements);
  for (uint16_t& bits : pool) bits = static_cast<uint16_t>(rng_());
  std::vector<KeyState> states(static_cast<size_t>(pages) * kRowsPerPage * kHeads);
  for (KeyState& state : states) {
    state = KeyState{static_cast<int32_t>(rng_() % 100000), static_cast<int32_t>(rng_() % 100),
                     static_cast<float>(rng_() % 1000) / 1000.0f};
  }
  // A row's state follows its value row's page, slot and kv-head.
  const auto state_of = [](int64_t value_at) {
    const int64_t in_page = value_at % kPageElements;
    return DecodeStateIndex(value_at / kPageElements, static_cast<int>(in_page / kRowElements),
                            static_cast<int>(in_page % kRowElements / kDim), kHeads, kRowsPerPage);
  };
  // Each head's recent rows hold distinct positions in no order.
  for (int si = 0; si < n_seqs; ++si) {
    for (int h = 0; h < kHeads; ++h) {
      std::vector<int32_t> positions(seqs[si].recent[h]);
      std::iota(positions.begin(), positions.end(), 1000);
      std::shuffle(positions.begin(), positions.end(), rng_);
      for (int r = 0; r < seqs[si].recent[h]; ++r) {
        states[state_of(l.Full(si, r, h, true))].position = positions[r];
      }
    }
  }

  std::vector<uint16_t> want = pool;
  std::vector<KeyState> want_states = states;
  std::vector<int32_t> want_counts = counts;
  std::vector<bool> unused(pool.size(), false), unused_states(states.size(), false);
  int moved_rows = 0;
  for (int si = 0; si < n_seqs; ++si) {
    const Seq& s = seqs[si];
    for (int h = 0; h < kHeads; ++h) {
      int thin = s.thin[h], rows = s.recent[h];
      if (s.keep < 0 || rows < 2 * std::max(s.keep, 1)) continue;
      const uint16_t* set = l.ChannelSet(si, h);
      const auto position = [&](int slot) {
        return want_states[state_of(l.Full(si, slot, h, true))].position;
      };
      std::vector<int> slots(rows);
      std::iota(slots.begin(), slots.end(), 0);
      std::sort(slots.begin(), slots.end(),
                [&](int a, int b) { return position(a) < position(b); });
      slots.resize(rows - s.keep);
      std::sort(slots.begin(), slots.end(), std::greater<>());
      for (int slot : slots) {
        // KvCache::MoveToPrompt: the row to the thin segment's end ...
        const int64_t key_at = l.ThinKey(si, thin, h), from = l.Full(si, slot, h, false);
        for (int c = 0; c < s.width; ++c) want[key_at + c] = want[from + set[c]];
        const int64_t value_at = l.ThinValue(si, thin, h), value_from = l.Full(si, slot, h, true);
        std::copy_n(&want[value_from], kDim, &want[value_at]);
        want_states[state_of(value_at)] = want_states[state_of(value_from)];
        ++thin;
        // ... then KvCache::EvictRow: the last recent row fills its slot.
        const int last = rows - 1;
        if (slot != last) {
          for (bool values : {false, true}) {
            std::copy_n(&want[l.Full(si, last, h, values)], kDim,
                        &want[l.Full(si, slot, h, values)]);
          }
          want_states[state_of(value_from)] = want_states[state_of(l.Full(si, last, h, true))];
        }
        --rows;
        ++moved_rows;
      }
      want_counts[(si * kHeads + h) * 2] = thin;
      want_counts[(si * kHeads + h) * 2 + 1] = rows;
      // Slots past the new count hold no row: what is left there is not compared.
      for (int slot = rows; slot < s.recent[h]; ++slot) {
        for (bool values : {false, true}) {
          std::fill_n(unused.begin() + l.Full(si, slot, h, values), kDim, true);
        }
        unused_states[state_of(l.Full(si, slot, h, true))] = true;
      }
    }
  }
  EXPECT_EQ(moved_rows, 5 + 2 + 5 + 6 + 3);

  DevicePagedKv d = UploadPagedKv(pool, kPageElements, kRowElements, kRowsPerPage, l.page_indptr,
                                  l.key_pages, l.value_pages, std::vector<int32_t>(n_seqs, 0));
  const DeviceLists dl = UploadLists(l);
  DeviceBuffer d_states = Upload(states), d_counts = Upload(counts), d_codes = Upload(codes);
  DeviceBuffer d_seqs = Upload(std::vector<int32_t>{2, 0, 3, 1});
  DeviceBuffer d_workspace = Upload(std::vector<int32_t>(n_seqs * kHeads * 2 * kMaxRows, -7));
  const AttentionShape shape{.n_heads = 2 * kHeads, .n_kv_heads = kHeads, .head_dim = kDim};
  const DecodeStates device_states{.states = d_states.as<KeyState>(),
                                   .rows_per_page = kRowsPerPage};
  ASSERT_CUDA(LaunchRethinAfterEviction(
      d.kv, dl.ckv, d_seqs.as<int32_t>(), n_seqs, d_codes.as<int32_t>(), shape, device_states,
      kMaxRows, d_workspace.as<int32_t>(), d_counts.as<int32_t>(), stream_));
  Sync();
  const std::vector<uint16_t> got = Download<uint16_t>(d.pool, pool.size());
  size_t wrong = 0, changed = 0;
  for (size_t i = 0; i < pool.size(); ++i) {
    if (unused[i]) continue;
    wrong += got[i] != want[i];
    changed += want[i] != pool[i];
  }
  EXPECT_EQ(wrong, 0u) << "of " << pool.size() << " pool elements";
  EXPECT_GT(changed, 500u);
  const std::vector<KeyState> got_states = Download<KeyState>(d_states, states.size());
  size_t wrong_states = 0;
  for (size_t i = 0; i < states.size(); ++i) {
    if (unused_states[i]) continue;
    wrong_states += std::memcmp(&got_states[i], &want_states[i], sizeof(KeyState)) != 0;
  }
  EXPECT_EQ(wrong_states, 0u) << "of " << states.size() << " states";
  EXPECT_EQ(Download<int32_t>(d_counts, counts.size()), want_counts);
}

}  // namespace
}  // namespace kvtrim::engine::cuda
