#include "engine/kv_pool_budget.h"

#include <gtest/gtest.h>

#include <cstdint>

namespace kvtrim::engine {
namespace {

constexpr size_t kMiB = size_t{1} << 20, kGiB = size_t{1} << 30;

TEST(KvPoolBudgetTest, WholePagesOfWhatIsLeft) {
  // An 80 GiB device at 0.9: 72 GiB, less 1 GiB in use and 17 GiB of weights and buffers: 54 GiB
  // of 32 KiB pages.
  const DeviceMemoryBudget budget{.total = 80 * kGiB,
                                  .in_use = kGiB,
                                  .backend = 17 * kGiB,
                                  .page_bytes = 32 << 10,
                                  .utilization = 0.9};
  absl::StatusOr<KvPoolSize> pool = KvPoolWithin(budget);
  ASSERT_TRUE(pool.ok()) << pool.status();
  const size_t share = static_cast<size_t>(0.9 * static_cast<double>(80 * kGiB));
  EXPECT_EQ(pool->bytes, (share - 18 * kGiB) / (32 << 10) * (32 << 10));
  EXPECT_EQ(pool->bytes % (32 << 10), 0u);
  EXPECT_LE(pool->bytes + 18 * kGiB, share);
  EXPECT_NE(pool->account.find("0.90 of 81920 MiB"), std::string::npos) << pool->account;
}

TEST(KvPoolBudgetTest, RoomKeptForPerPageStates) {
  // 100 pages of 1000 bytes with no extra; with 250 bytes per page more, 80 pages.
  DeviceMemoryBudget budget{
      .total = 200000, .backend = 100000, .page_bytes = 1000, .utilization = 1.0};
  ASSERT_EQ(KvPoolWithin(budget)->bytes, 100000u);
  budget.per_page_extra = 250;
  absl::StatusOr<KvPoolSize> pool = KvPoolWithin(budget);
  ASSERT_TRUE(pool.ok()) << pool.status();
  EXPECT_EQ(pool->bytes, 80000u);
  EXPECT_NE(pool->account.find("kept free for decode-time row states"), std::string::npos);
}

TEST(KvPoolBudgetTest, NothingLeftIsAnErrorNamingTheNumbers) {
  // Weights larger than the share: not one page.
  const DeviceMemoryBudget budget{.total = 24 * kGiB,
                                  .in_use = 512 * kMiB,
                                  .backend = 22 * kGiB,
                                  .page_bytes = 32 << 10,
                                  .utilization = 0.9};
  absl::StatusOr<KvPoolSize> pool = KvPoolWithin(budget);
  ASSERT_EQ(pool.status().code(), absl::StatusCode::kResourceExhausted) << pool.status();
  const std::string message(pool.status().message());
  EXPECT_NE(message.find("no device memory left for a KV pool"), std::string::npos) << message;
  EXPECT_NE(message.find("22528 MiB for weights"), std::string::npos) << message;
  EXPECT_NE(message.find("--gpu-memory-utilization"), std::string::npos) << message;
  // Exactly one page left still makes a pool.
  const DeviceMemoryBudget one_page{
      .total = 10000, .backend = 9000, .page_bytes = 1000, .utilization = 1.0};
  EXPECT_EQ(KvPoolWithin(one_page)->bytes, 1000u);
  const DeviceMemoryBudget under_one{
      .total = 10000, .backend = 9001, .page_bytes = 1000, .utilization = 1.0};
  EXPECT_EQ(KvPoolWithin(under_one).status().code(), absl::StatusCode::kResourceExhausted);
}

TEST(KvPoolBudgetTest, BadArgumentsAreRefused) {
  DeviceMemoryBudget budget{.total = kGiB, .page_bytes = 4096, .utilization = 0.0};
  EXPECT_EQ(KvPoolWithin(budget).status().code(), absl::StatusCode::kInvalidArgument);
  budget.utilization = 1.5;
  EXPECT_EQ(KvPoolWithin(budget).status().code(), absl::StatusCode::kInvalidArgument);
  budget.utilization = -0.5;
  EXPECT_EQ(KvPoolWithin(budget).status().code(), absl::StatusCode::kInvalidArgument);
  budget.utilization = 0.5;
  budget.page_bytes = 0;
  EXPECT_EQ(KvPoolWithin(budget).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(KvPoolBudgetTest, PageCountStaysWithinInt32) {
  // 16 TiB of 1-byte pages would be 2^44 pages; PagePool counts them in int32.
  const DeviceMemoryBudget budget{.total = size_t{1} << 44, .page_bytes = 1, .utilization = 1.0};
  absl::StatusOr<KvPoolSize> pool = KvPoolWithin(budget);
  ASSERT_TRUE(pool.ok()) << pool.status();
  EXPECT_EQ(pool->bytes, static_cast<size_t>(INT32_MAX));
}

}  // namespace
}  // namespace kvtrim::engine
