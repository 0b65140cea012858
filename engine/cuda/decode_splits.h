// How many parts the compressed decode attention splits each kv-head's rows into, and which
// block size its launch takes: plain host arithmetic over what fits the GPU, so that the split
// heuristic and the launch make the same choice (attention_decode_compressed.cu measures the fit
// on the device and calls these).
#pragma once

#include <cstdint>

namespace kvtrim::engine::cuda {

// The kernel's two block sizes, in warps.
inline constexpr int kDecodeNarrowWarps = 4, kDecodeWideWarps = 6;

// The multiprocessors of the GPU and how many blocks of the compressed decode kernel fit one, at
// 4 warps a block and at 6 (0: no 6-warp kernel at that head dimension, or none fits).
struct DecodeBlockFit {
  int sms = 0;
  int narrow = 0;  // blocks of 4 warps
  int wide = 0;    // blocks of 6 warps
};

// Whether a launch of `blocks` blocks takes 6 warps to a block: where every block then runs at
// once with more warps on each multiprocessor than 4 warps a block would give.
bool TakesWideBlocks(int64_t blocks, const DecodeBlockFit& fit);

// The cheapest of 1, 2, 4, 8, 16 or 32 splits for a launch of `blocks` blocks a split
// whose longest kv-head holds `max_rows` rows: each split count's waves of blocks times a block's
// rows plus its fixed cost, plus the merge kernel a split adds and its share for each split. A
// 6-warp block (TakesWideBlocks) reads its rows in 4/6 of a 4-warp block's time. 1 for an empty
// launch.
int ChooseDecodeSplits(int64_t blocks, int max_rows, const DecodeBlockFit& fit);

}  // namespace kvtrim::engine::cuda
