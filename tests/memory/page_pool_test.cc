#include "memory/page_pool.h"

#include <gtest/gtest.h>

#include <random>
#include <set>
#include <vector>

namespace kvtrim::memory {
namespace {

TEST(PagePoolTest, RejectsBadSizes) {
  EXPECT_FALSE(PagePool::Create(0, 4).ok());
  EXPECT_FALSE(PagePool::Create(100, 4).ok());  // not a multiple of 64
  EXPECT_FALSE(PagePool::Create(64, 0).ok());
}

TEST(PagePoolTest, ExhaustionIsAValue) {
  PagePool pool = *PagePool::Create(128, 3);
  std::set<PageId> got;
  for (int i = 0; i < 3; ++i) got.insert(*pool.Allocate());
  EXPECT_EQ(got, (std::set<PageId>{0, 1, 2}));
  EXPECT_EQ(pool.Allocate(), std::nullopt);
  pool.Free(1);
  EXPECT_EQ(pool.Allocate(), 1);
}

TEST(PagePoolTest, PagesAreDisjointAndAligned) {
  PagePool pool = *PagePool::Create(256, 8);
  for (PageId p = 0; p < 8; ++p) {
    EXPECT_EQ(reinterpret_cast<uintptr_t>(pool.data(p)) % 64, 0u);
    if (p > 0) {
      EXPECT_EQ(pool.data(p) - pool.data(p - 1), 256);
    }
  }
}

// Accounting only (a device backend holds the bytes): the same ids, no host memory.
TEST(PagePoolTest, PoolWithoutHostStorageHandsOutTheSameIds) {
  PagePool pool = *PagePool::Create(1 << 20, 4096, PageStorage::kNone);
  EXPECT_FALSE(pool.has_host_storage());
  EXPECT_EQ(pool.page_bytes(), 1u << 20);
  EXPECT_EQ(pool.total_pages(), 4096);
  EXPECT_EQ(pool.Allocate(), 0);
  EXPECT_EQ(pool.Allocate(), 1);
  pool.Free(0);
  EXPECT_EQ(pool.Allocate(), 0);
  EXPECT_EQ(pool.used_pages(), 2);
  EXPECT_TRUE(PagePool::Create(64, 1).value().has_host_storage());
}

// Random allocate/free interleavings: no page is ever handed out twice, none is lost.
TEST(PagePoolTest, RandomInterleavingsKeepInvariants) {
  constexpr int kPages = 97;
  PagePool pool = *PagePool::Create(64, kPages);
  std::mt19937 rng(7);
  std::vector<PageId> held;
  std::set<PageId> owned;
  for (int op = 0; op < 100000; ++op) {
    if (rng() % 2 == 0) {
      std::optional<PageId> page = pool.Allocate();
      if (owned.size() == kPages) {
        ASSERT_EQ(page, std::nullopt);
        continue;
      }
      ASSERT_TRUE(page.has_value());
      ASSERT_TRUE(owned.insert(*page).second) << "page " << *page << " handed out twice";
      held.push_back(*page);
    } else if (!held.empty()) {
      size_t i = rng() % held.size();
      pool.Free(held[i]);
      owned.erase(held[i]);
      held[i] = held.back();
      held.pop_back();
    }
    ASSERT_EQ(pool.used_pages(), static_cast<int>(owned.size()));
    ASSERT_EQ(pool.free_pages() + pool.used_pages(), kPages);
  }
  for (PageId p = 0; p < kPages; ++p) EXPECT_EQ(pool.is_allocated(p), owned.count(p) == 1);
  for (PageId p : held) pool.Free(p);
  EXPECT_EQ(pool.free_pages(), kPages);
}

}  // namespace
}  // namespace kvtrim::memory
