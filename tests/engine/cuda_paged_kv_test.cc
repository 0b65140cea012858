// RowsPerPage (engine/cuda/paged_kv.h): the kernels find a row's page by a multiply, and it must
// give row / rows exactly wherever row * rows < 2^32. Host code, no GPU: the host path does in 64
// bits what the device's __umulhi does.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <random>
#include <vector>

#include "engine/cuda/paged_kv.h"

namespace kvtrim::engine::cuda {
namespace {

TEST(RowsPerPageTest, PageOfIsTheQuotientUpToTheBound) {
  std::vector<int> sizes;
  for (int rows = 1; rows <= 4096; ++rows) sizes.push_back(rows);
  for (int shift = 13; shift < 31; ++shift) {
    sizes.push_back(1 << shift);
    sizes.push_back((1 << shift) - 1);
    sizes.push_back((1 << shift) + 1);
  }
  std::mt19937 rng(7);
  int checked = 0;
  for (const int rows : sizes) {
    const RowsPerPage per_page(rows);
    ASSERT_EQ(per_page.rows, rows);
    // The largest row the bound allows, as int (rows past INT32_MAX are not rows).
    const int64_t last = std::min<int64_t>((int64_t{1} << 32) / rows - 1, INT32_MAX);
    std::vector<int64_t> probes = {
        0, 1, rows - 1, rows, rows + 1, 2 * int64_t{rows} - 1, last - rows, last - 1, last};
    std::uniform_int_distribution<int64_t> any(0, last);
    for (int i = 0; i < 64; ++i) probes.push_back(any(rng));
    for (const int64_t row : probes) {
      if (row < 0 || row > last) continue;
      ASSERT_EQ(per_page.PageOf(static_cast<int>(row)), row / rows)
          << "row " << row << ", " << rows << " rows a page";
      ++checked;
    }
  }
  EXPECT_GT(checked, 4096 * 64);
}

}  // namespace
}  // namespace kvtrim::engine::cuda
