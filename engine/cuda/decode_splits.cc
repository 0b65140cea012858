#include "engine/cuda/decode_splits.h"

#include <algorithm>
#include <limits>

namespace kvtrim::engine::cuda {

bool TakesWideBlocks(int64_t blocks, const DecodeBlockFit& fit) {
  // Resident warps per multiprocessor with `warps` to a block, `fits` blocks to a
  // multiprocessor; 0 past one wave.
  const auto resident = [&](int warps, int fits) -> int64_t {
    if (fits <= 0 || fit.sms <= 0 || blocks > int64_t{fits} * fit.sms) return 0;
    return std::min<int64_t>(fits, (blocks + fit.sms - 1) / fit.sms) * warps;
  };
  return resident(kDecodeWideWarps, fit.wide) > resident(kDecodeNarrowWarps, fit.narrow);
}

int ChooseDecodeSplits(int64_t blocks, int max_rows, const DecodeBlockFit& fit) {
  if (blocks <= 0 || max_rows <= 0 || fit.sms <= 0) return 1;
  // Both costs in rows of a 4-warp block, fitted to an H200 (cuda_decode_attention_bench
  // --splits, docs/PERFORMANCE.md "The split count weighs the 6-warp blocks"): a compressed
  // Llama-3-8B batch of 32 with 1966 rows per kv-head takes 0.063 ms in one split (6 warps) and
  // 0.072 in three (4 warps); SmolLM2's uncompressed one (96 blocks of 8193 rows) 0.113 in one
  // and 0.063 in four.
  constexpr int64_t kBlockCost = 192, kMergeCost = 320;
  int best = 1;
  int64_t best_cost = std::numeric_limits<int64_t>::max();
  for (int splits = 1; splits <= 32; ++splits) {
    const int64_t launched = blocks * splits;
    const bool wide = TakesWideBlocks(launched, fit);
    const int warps = wide ? kDecodeWideWarps : kDecodeNarrowWarps;
    const int64_t slots = int64_t{std::max(1, wide ? fit.wide : fit.narrow)} * fit.sms;
    const int64_t waves = (launched + slots - 1) / slots;
    const int64_t rows = (int64_t{max_rows} + splits - 1) / splits;
    const int64_t cost =
        waves * (rows * kDecodeNarrowWarps / warps + kBlockCost) + (splits > 1 ? kMergeCost : 0);
    if (cost < best_cost) {
      best = splits;
      best_cost = cost;
    }
  }
  return best;
}

}  // namespace kvtrim::engine::cuda
