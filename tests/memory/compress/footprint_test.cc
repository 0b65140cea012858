#include "memory/compress/footprint.h"

#include <gtest/gtest.h>

#include <vector>

#include "memory/compress/decode_eviction.h"

namespace kvtrim::memory::compress {
namespace {

TEST(FootprintTest, PagesRoundUpToWholePages) {
  EXPECT_EQ(PagesFor(0, 32, 64), 0);
  EXPECT_EQ(PagesFor(1, 32, 64), 1);
  EXPECT_EQ(PagesFor(2, 32, 64), 1);
  EXPECT_EQ(PagesFor(3, 32, 64), 2);
  EXPECT_EQ(PagesFor(5, 24, 64), 3);  // 2 rows of 24 bytes per 64-byte page, 16 bytes unused
}

TEST(FootprintTest, HandComputedThinkAndCorm) {
  // 2 kv-heads, head_dim 8, fp16, 64-byte pages: a full row is 2 * 8 * 2 = 32 bytes (2 a page),
  // a thin row of 4 channels 16 bytes (4 a page).
  const FootprintShape shape{2, 8, 2, 64, 12};
  const std::vector<LayerFootprint> layers{
      {.thin_key_rows = 5, .key_width = 4, .full_key_rows = 3, .scored_rows = 8}};
  const CompressedBytes bytes = CountBytes(shape, 10, layers);
  EXPECT_EQ(bytes.full, 10 * 1 * 2 * 2 * 8 * 2);      // 640
  EXPECT_EQ(bytes.rows, 5 * 16 + 3 * 32 + 8 * 32);    // 432
  EXPECT_EQ(bytes.pages, (2 + 2 + 4) * 64);           // thin 2, full 2, values 4 pages
  EXPECT_EQ(bytes.metadata, 2 * 4 * 2 + 8 * 2 * 12);  // channel sets 16 + scores 192
  EXPECT_EQ(bytes.stored(), 512 + 208);
  EXPECT_DOUBLE_EQ(bytes.saved_ratio(), 1.0 - 720.0 / 640.0);
}

TEST(FootprintTest, HandComputedTwoLayersWithoutThink) {
  // fp32 rows of 1 kv-head x 4 = 16 bytes, 4 per 64-byte page; no channel sets, no scores.
  const FootprintShape shape{1, 4, 4, 64, 0};
  const std::vector<LayerFootprint> layers{
      {.thin_key_rows = 0, .key_width = 4, .full_key_rows = 9, .scored_rows = 0},
      {.thin_key_rows = 0, .key_width = 4, .full_key_rows = 4, .scored_rows = 0}};
  const CompressedBytes bytes = CountBytes(shape, 9, layers);
  EXPECT_EQ(bytes.full, 9 * 2 * 2 * 1 * 4 * 2);  // 288: the fp16 reference
  EXPECT_EQ(bytes.rows, (9 + 9 + 4 + 4) * 16);   // 416
  EXPECT_EQ(bytes.pages, (3 + 3 + 1 + 1) * 64);  // 512
  EXPECT_EQ(bytes.metadata, 0);
}

TEST(FootprintTest, CompressionSavesWhatItShould) {
  // SmolLM2-like: 3 kv-heads x 64, fp16, 4 KiB pages; 4096 prompt tokens, 12% kept, ThinK
  // halving 12% - 32 thin rows, 32 recent rows full width.
  const FootprintShape shape{3, 64, 2, 4096, 0};
  const int kept = 4096 * 12 / 100;
  std::vector<LayerFootprint> layers(
      30, {.thin_key_rows = kept - 32, .key_width = 32, .full_key_rows = 32, .scored_rows = 0});
  const CompressedBytes bytes = CountBytes(shape, 4096, layers);
  EXPECT_EQ(bytes.full, int64_t{4096} * 30 * 2 * 3 * 64 * 2);
  EXPECT_LT(bytes.stored(), bytes.full * 10 / 100);
  EXPECT_GE(bytes.pages, bytes.rows);
  EXPECT_EQ(bytes.metadata, 30 * 3 * 32 * 2);
  EXPECT_EQ(sizeof(CormKeyState), 12u);  // what score_bytes is for CORM
}

}  // namespace
}  // namespace kvtrim::memory::compress
