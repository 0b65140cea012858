// Prompt tokens kept per kv-head in each layer, window included: SnapKV's one budget for every
// layer and PyramidKV's pyramid (more in lower layers), each exactly as its reference computes it.
//
// PyramidKV (Zefan-Cai/KVCache-Factory and Zefan-Cai/PyramidKV, pyramidkv_utils.py,
// PyramidKVCluster.update_kv), with B the average budget, w the window, n the prompt, L the
// layers and Python's floor division //:
//
//   min = (B - w) // beta                 the top layer's share beyond the window
//   max = 2 (B - w) - min                 the bottom layer's
//   if max >= n - w:  max = n - w,  min = 2 (B - w) - max     (no layer keeps more than the prompt)
//   step = (max - min) // (L - 1)
//   layer l keeps  max - l * step  tokens chosen by score, plus the window
//
// Fallbacks, in the reference's order: n < B keeps the whole prompt in every layer; n < 2 (B - w)
// keeps B in every layer (SnapKV). Because step is floored, the layers together keep
// L * B + (L / 2) * ((max - min) mod (L - 1)) tokens: L * B exactly when L - 1 divides max - min,
// otherwise at most L (L - 2) / 2 more.
//
// Beyond the references (which assert B > w and divide by L - 1): a budget at or below the window
// keeps exactly the window (SnapKV's window is always kept), and one layer keeps B.
#pragma once

#include <cstdint>
#include <vector>

#include "memory/compress/policy_config.h"

namespace kvtrim::memory::compress {

// SnapKVCluster: n <= B keeps all n (the reference compresses from n == B on, keeping all n then
// too); otherwise B, and never less than the window.
int32_t SnapKvKeptTokens(int32_t prompt_tokens, int32_t budget_tokens, int32_t window);

// (n_layers): tokens kept per kv-head in each layer, window included, layer 0 first.
std::vector<int32_t> PyramidKvKeptTokens(int32_t prompt_tokens, int32_t n_layers,
                                         int32_t budget_tokens, int32_t window, int32_t beta);

// The same from a policy's configuration, its budget resolved against the prompt.
int32_t SnapKvKeptTokens(const SnapKvConfig& config, int32_t prompt_tokens);
std::vector<int32_t> PyramidKvKeptTokens(const PyramidKvConfig& config, int32_t prompt_tokens,
                                         int32_t n_layers);

}  // namespace kvtrim::memory::compress
