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
  // Costs in rows of a 4-warp block, fitted to an H200 (cuda_decode_attention_bench --splits,
  // docs/PERFORMANCE.md "The split count weighs the 6-warp blocks" and "Split counts of one or
  // two sequences"): a compressed Llama-3-8B batch of 32 with 1966 rows per kv-head takes 0.063
  // ms in one split (6 warps) and 0.072 in three (4 warps); SmolLM2's uncompressed one (96
  // blocks of 8193 rows) 0.113 in one and 0.063 in four. Each split adds a share to the merge:
  // one sequence of SmolLM2's heads with 983 rows takes 0.017 ms in one split, 0.010 in eight
  // and 0.012 in 32.
  constexpr double kBlockCost = 192, kMergeCost = 160, kSplitCost = 8;
  // Powers of two only, and each count's cost linear in the rows (a split's share of them not
  // rounded): a layer's rows grow by one each decode step, and each new set of counts is a new
  // CUDA graph of the step. The cheapest of these lines changes a few times as the rows grow;
  // counts of 1 to 32 with rounded shares changed back and forth (31, 32, 31) every few rows.
  int best = 1;
  double best_cost = std::numeric_limits<double>::infinity();
  for (int splits = 1; splits <= 32; splits *= 2) {
    const int64_t launched = blocks * splits;
    const bool wide = TakesWideBlocks(launched, fit);
    const int warps = wide ? kDecodeWideWarps : kDecodeNarrowWarps;
    const int64_t slots = int64_t{std::max(1, wide ? fit.wide : fit.narrow)} * fit.sms;
    const int64_t waves = (launched + slots - 1) / slots;
    const double rows = static_cast<double>(max_rows) / splits;
    const double cost =
        static_cast<double>(waves) * (rows * kDecodeNarrowWarps / warps + kBlockCost) +
        (splits > 1 ? kMergeCost + kSplitCost * splits : 0);
    if (cost < best_cost) {
      best = splits;
      best_cost = cost;
    }
  }
  return best;
}

}  // namespace kvtrim::engine::cuda
