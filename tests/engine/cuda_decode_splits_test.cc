// The compressed decode attention's split count and block size (engine/cuda/decode_splits.cc),
// without a GPU: the choices the H200 measurements in docs/PERFORMANCE.md ("The split count
// weighs the 6-warp blocks", "Split counts of one or two sequences") call for, on that GPU's fit:
// 132 multiprocessors, three 4-warp or two 6-warp blocks to one at head_dim 64 and 128.
#include <gtest/gtest.h>

#include "engine/cuda/decode_splits.h"

namespace kvtrim::engine::cuda {
namespace {

constexpr DecodeBlockFit kH200{.sms = 132, .narrow = 3, .wide = 2};

TEST(DecodeSplitsTest, SixWarpBlocksWhereTheLaunchFitsAtOnceWithMoreWarps) {
  EXPECT_TRUE(TakesWideBlocks(96, kH200));    // one block a multiprocessor: 6 warps against 4
  EXPECT_TRUE(TakesWideBlocks(256, kH200));   // two of 6 against two of 4
  EXPECT_TRUE(TakesWideBlocks(264, kH200));   // every multiprocessor full of 6-warp blocks
  EXPECT_FALSE(TakesWideBlocks(265, kH200));  // past one wave of them
  EXPECT_FALSE(TakesWideBlocks(396, kH200));
  EXPECT_FALSE(TakesWideBlocks(4000, kH200));  // past one wave of either
  // No 6-warp kernel (head_dim 16, 32, 256), or none of its blocks fits.
  EXPECT_FALSE(TakesWideBlocks(96, DecodeBlockFit{.sms = 132, .narrow = 3, .wide = 0}));
}

TEST(DecodeSplitsTest, ChoosesWhatTheH200Measured) {
  // Llama-3-8B's heads (8 kv-heads, one block each), batch 32: one split of 6-warp blocks, at
  // 1966 rows (0.063 ms against 0.072 in three) as at 983 and the uncompressed 8193.
  EXPECT_EQ(ChooseDecodeSplits(32 * 8, 1966, kH200), 1);
  EXPECT_EQ(ChooseDecodeSplits(32 * 8, 983, kH200), 1);
  EXPECT_EQ(ChooseDecodeSplits(32 * 8, 8193, kH200), 1);
  // Batch 8, where one split leaves most of the GPU idle (0.034 ms against 0.026 in four).
  EXPECT_EQ(ChooseDecodeSplits(8 * 8, 1966, kH200), 4);
  // SmolLM2's heads (3 kv-heads), batch 32 uncompressed: 96 blocks of 8193 rows take four
  // splits (0.063 ms against 0.095 in one).
  EXPECT_EQ(ChooseDecodeSplits(32 * 3, 8193, kH200), 4);
  // Batch 128 fills the GPU without splitting.
  EXPECT_EQ(ChooseDecodeSplits(128 * 8, 983, kH200), 1);
}

// One or two sequences leave most of the GPU idle in one split, and past 8 to 16 splits each
// more costs more than it saves. Every range below holds the fastest split count measured
// (docs/PERFORMANCE.md "Split counts of one or two sequences") and leaves out one split.
TEST(DecodeSplitsTest, OneOrTwoSequencesSplitModerately) {
  const auto expect_between = [](int64_t blocks, int rows, int low, int high) {
    const int splits = ChooseDecodeSplits(blocks, rows, kH200);
    EXPECT_GE(splits, low) << blocks << " blocks of " << rows << " rows";
    EXPECT_LE(splits, high) << blocks << " blocks of " << rows << " rows";
  };
  // SmolLM2's heads, one sequence: 493 rows 0.012 ms in one split and in 32, 0.010 in eight;
  // 983 rows 0.017 in one, 0.010 in eight and sixteen, 0.012 in 32.
  expect_between(3, 493, 4, 16);
  expect_between(3, 983, 8, 16);
  // Two sequences, 493 rows: 0.012 in one, 0.010 in eight, 0.014 in 32.
  expect_between(6, 493, 4, 16);
  // Llama-3-8B's heads, one uncompressed sequence of 2048 rows: 0.033 in one split, 0.014 in
  // eight, 0.018 in 32; of 8192 rows 0.102 in one, 0.022 in sixteen, 0.025 in 32.
  expect_between(8, 2048, 8, 16);
  expect_between(8, 8192, 16, 32);
}

// A layer's rows grow by one each decode step, and each new set of split counts is a new CUDA
// graph of the step: the counts are powers of two, and change at most 4 times over 9000 rows (a
// count of 1 to 32 chosen freely changed 47 times for one to eight sequences).
TEST(DecodeSplitsTest, CountsArePowersOfTwoAndChangeRarelyAsRowsGrow) {
  for (const int64_t blocks : {1, 2, 3, 6, 8, 16, 24, 32, 64, 96, 256, 1024, 4096}) {
    int changes = 0, previous = ChooseDecodeSplits(blocks, 1, kH200);
    for (int rows = 1; rows <= 9000; ++rows) {
      const int splits = ChooseDecodeSplits(blocks, rows, kH200);
      ASSERT_TRUE(splits >= 1 && splits <= 32 && (splits & (splits - 1)) == 0)
          << splits << " splits for " << blocks << " blocks of " << rows << " rows";
      changes += splits != previous;
      previous = splits;
    }
    EXPECT_LE(changes, 4) << blocks << " blocks";
  }
}

TEST(DecodeSplitsTest, FourWarpBlocksAloneSplitNoLongRowsOfAFullBatch) {
  // Without 6-warp blocks, one split of 256 blocks leaves a third of the GPU's 4-warp slots
  // empty, and two splits take two waves: one split, at 983 rows as at 1966.
  const DecodeBlockFit narrow_only{.sms = 132, .narrow = 3, .wide = 0};
  EXPECT_EQ(ChooseDecodeSplits(32 * 8, 983, narrow_only), 1);
  EXPECT_EQ(ChooseDecodeSplits(32 * 8, 1966, narrow_only), 1);
}

TEST(DecodeSplitsTest, EmptyLaunchesTakeOneSplit) {
  EXPECT_EQ(ChooseDecodeSplits(0, 100, kH200), 1);
  EXPECT_EQ(ChooseDecodeSplits(256, 0, kH200), 1);
  EXPECT_EQ(ChooseDecodeSplits(256, 100, DecodeBlockFit{}), 1);
  EXPECT_FALSE(TakesWideBlocks(256, DecodeBlockFit{}));
}

}  // namespace
}  // namespace kvtrim::engine::cuda
