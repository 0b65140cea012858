#include "memory/kv_cache.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstring>
#include <map>
#include <random>
#include <set>
#include <span>
#include <vector>

namespace kvtrim::memory {
namespace {

constexpr KvShape kShape{.n_layers = 3, .n_kv_heads = 2, .head_dim = 8, .element_bytes = 4};

TEST(KvCacheTest, RowMustFitAPage) {
  PagePool pool = *PagePool::Create(64, 4);
  EXPECT_TRUE(KvCache::Create(&pool, kShape).ok());  // a 64-byte row fills a 64-byte page
  PagePool small = *PagePool::Create(64, 4);
  KvShape wide = kShape;
  wide.head_dim = 16;
  EXPECT_FALSE(KvCache::Create(&small, wide).ok());
}

// 16 full-width rows, at least 16 KiB, a power of two.
TEST(KvCacheTest, DefaultPageBytesHoldSixteenRows) {
  // Llama-3-8B (32 layers, 8 kv-heads of 128): 2 KiB bf16 rows, 4 KiB fp32 rows.
  EXPECT_EQ((KvShape{32, 8, 128, 2}.default_page_bytes()), size_t{32} << 10);
  EXPECT_EQ((KvShape{32, 8, 128, 4}.default_page_bytes()), size_t{64} << 10);
  // SmolLM2-135M (3 kv-heads of 64): 16 rows of 384 or 768 bytes fit the 16 KiB floor.
  EXPECT_EQ((KvShape{30, 3, 64, 2}.default_page_bytes()), size_t{16} << 10);
  EXPECT_EQ((KvShape{30, 3, 64, 4}.default_page_bytes()), size_t{16} << 10);
  // 16 rows of 1152 bytes (18 KiB) round up to 32 KiB.
  EXPECT_EQ((KvShape{1, 9, 64, 2}.default_page_bytes()), size_t{32} << 10);
  EXPECT_EQ(kShape.default_page_bytes(), size_t{16} << 10);
}

TEST(KvCacheTest, ReserveIsAllOrNothing) {
  PagePool pool = *PagePool::Create(256, 10);  // 4 rows of 64 bytes per page
  KvCache cache = *KvCache::Create(&pool, kShape);
  SequenceKv seq = cache.NewSequence();
  ASSERT_TRUE(cache.Reserve(seq, 4));  // 1 page x 3 layers x (K, V) = 6 pages
  EXPECT_EQ(pool.used_pages(), 6);
  EXPECT_EQ(cache.PagesFor(4), 6);
  EXPECT_FALSE(cache.Reserve(seq, 5));  // needs 6 more, 4 free
  EXPECT_EQ(pool.used_pages(), 6);
  cache.Release(seq);
  EXPECT_EQ(pool.used_pages(), 0);
}

TEST(KvCacheTest, RowsRoundTripAndBytesAreAccounted) {
  PagePool pool = *PagePool::Create(256, 64);
  KvCache cache = *KvCache::Create(&pool, kShape);
  SequenceKv seq = cache.NewSequence();
  ASSERT_TRUE(cache.Reserve(seq, 11));
  for (int layer = 0; layer < 3; ++layer) {
    for (int row = 0; row < 11; ++row) {
      std::memset(cache.Row(seq.keys[layer], row), layer * 16 + row, 64);
      std::memset(cache.Row(seq.values[layer], row), 100 + layer * 16 + row, 64);
    }
    seq.keys[layer].rows = seq.values[layer].rows = 11;
  }
  seq.tokens = 11;
  for (int layer = 0; layer < 3; ++layer) {
    for (int row = 0; row < 11; ++row) {
      EXPECT_EQ(static_cast<int>(cache.Row(seq.keys[layer], row)[63]), layer * 16 + row);
      EXPECT_EQ(static_cast<int>(cache.Row(seq.values[layer], row)[0]), 100 + layer * 16 + row);
    }
  }
  KvBytes bytes = cache.Bytes(seq);
  EXPECT_EQ(bytes.full, 2 * 3 * 11 * 64);
  EXPECT_EQ(bytes.rows, bytes.full);  // uncompressed: every row at full width
  EXPECT_EQ(bytes.metadata, 0);
  EXPECT_EQ(bytes.pages, 2 * 3 * 3 * 256);  // 11 rows -> 3 pages of 4
  EXPECT_EQ(bytes.stored, bytes.pages);
  cache.Release(seq);
}

// Many sequences growing and released in random order: the pool ends where it started and no
// page is ever held by two lists.
TEST(KvCacheTest, RandomSequencesNeverSharePages) {
  PagePool pool = *PagePool::Create(256, 300);
  KvCache cache = *KvCache::Create(&pool, kShape);
  std::vector<SequenceKv> live;
  std::mt19937 rng(11);
  for (int op = 0; op < 5000; ++op) {
    int action = rng() % 3;
    if (action == 0 || live.empty()) {
      live.push_back(cache.NewSequence());
    } else if (action == 1) {
      SequenceKv& seq = live[rng() % live.size()];
      int extra = 1 + rng() % 9;
      int before = pool.used_pages();
      if (cache.Reserve(seq, extra)) {
        for (auto& list : seq.keys) list.rows += extra;
        for (auto& list : seq.values) list.rows += extra;
        seq.tokens += extra;
      } else {
        ASSERT_EQ(pool.used_pages(), before);
      }
    } else {
      size_t i = rng() % live.size();
      cache.Release(live[i]);
      live.erase(live.begin() + i);
    }
    std::set<PageId> seen;
    int total = 0;
    for (const SequenceKv& seq : live) {
      for (const auto* lists : {&seq.keys, &seq.values}) {
        for (const PageList& list : *lists) {
          ASSERT_LE(list.rows, list.capacity());
          for (PageId p : list.pages) {
            ASSERT_TRUE(seen.insert(p).second) << "page " << p << " in two lists";
            ASSERT_TRUE(pool.is_allocated(p));
            ++total;
          }
        }
      }
    }
    ASSERT_EQ(total, pool.used_pages());
  }
  for (SequenceKv& seq : live) cache.Release(seq);
  EXPECT_EQ(pool.free_pages(), 300);
}

}  // namespace
}  // namespace kvtrim::memory
