// The compressed decode attention's split count and block size (engine/cuda/decode_splits.cc),
// without a GPU: the choices the H200 measurements in docs/PERFORMANCE.md ("The split count
// weighs the 6-warp blocks") call for, on that GPU's fit: 132 multiprocessors, three 4-warp or
// two 6-warp blocks to one at head_dim 64 and 128.
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
  // One sequence's long rows: as many splits as the heuristic allows.
  EXPECT_EQ(ChooseDecodeSplits(8, 8193, kH200), 32);
  // Batch 128 fills the GPU without splitting.
  EXPECT_EQ(ChooseDecodeSplits(128 * 8, 983, kH200), 1);
}

TEST(DecodeSplitsTest, FourWarpBlocksAloneSplitLongerRows) {
  // Without 6-warp blocks, one split of 256 blocks leaves a third of the GPU's 4-warp slots
  // empty, and past about 1500 rows three splits in two waves cost less.
  const DecodeBlockFit narrow_only{.sms = 132, .narrow = 3, .wide = 0};
  EXPECT_EQ(ChooseDecodeSplits(32 * 8, 983, narrow_only), 1);
  EXPECT_EQ(ChooseDecodeSplits(32 * 8, 1966, narrow_only), 3);
}

TEST(DecodeSplitsTest, EmptyLaunchesTakeOneSplit) {
  EXPECT_EQ(ChooseDecodeSplits(0, 100, kH200), 1);
  EXPECT_EQ(ChooseDecodeSplits(256, 0, kH200), 1);
  EXPECT_EQ(ChooseDecodeSplits(256, 100, DecodeBlockFit{}), 1);
  EXPECT_FALSE(TakesWideBlocks(256, DecodeBlockFit{}));
}

}  // namespace
}  // namespace kvtrim::engine::cuda
