#include "memory/compress/budgets.h"

#include <algorithm>
#include <cassert>

namespace kvtrim::memory::compress {
namespace {

// Python's // on integers: rounds toward negative infinity.
int64_t FloorDiv(int64_t a, int64_t b) {
  int64_t q = a / b;
  if ((a % b != 0) && ((a < 0) != (b < 0))) --q;
  return q;
}

}  // namespace

int32_t SnapKvKeptTokens(int32_t prompt_tokens, int32_t budget_tokens, int32_t window) {
  assert(window >= 1 && window <= prompt_tokens);
  if (prompt_tokens <= budget_tokens) return prompt_tokens;
  return std::max(budget_tokens, window);
}

std::vector<int32_t> PyramidKvKeptTokens(int32_t prompt_tokens, int32_t n_layers,
                                         int32_t budget_tokens, int32_t window, int32_t beta) {
  assert(n_layers >= 1 && beta >= 1 && window >= 1 && window <= prompt_tokens);
  const int64_t n = prompt_tokens, b = budget_tokens, w = window;
  if (n <= b || b <= w || n_layers == 1 || n < 2 * (b - w)) {
    return std::vector<int32_t>(n_layers, SnapKvKeptTokens(prompt_tokens, budget_tokens, window));
  }
  int64_t min_num = FloorDiv(b - w, beta);
  int64_t max_num = 2 * (b - w) - min_num;
  if (max_num >= n - w) {
    max_num = n - w;
    min_num = 2 * (b - w) - max_num;
  }
  const int64_t step = FloorDiv(max_num - min_num, n_layers - 1);
  std::vector<int32_t> kept(n_layers);
  for (int32_t layer = 0; layer < n_layers; ++layer) {
    kept[layer] = static_cast<int32_t>(max_num - layer * step + w);
  }
  return kept;
}

int32_t SnapKvKeptTokens(const SnapKvConfig& config, int32_t prompt_tokens) {
  return SnapKvKeptTokens(prompt_tokens, config.budget.Resolve(prompt_tokens), config.window);
}

std::vector<int32_t> PyramidKvKeptTokens(const PyramidKvConfig& config, int32_t prompt_tokens,
                                         int32_t n_layers) {
  return PyramidKvKeptTokens(prompt_tokens, n_layers, config.snap.budget.Resolve(prompt_tokens),
                             config.snap.window, config.beta);
}

}  // namespace kvtrim::memory::compress
