// Decode-time eviction per (layer, kv-head): which cached keys survive after a decode step.
//
// CORM ("CORM: Cache Optimization with Recent Message for Large Language Model Inference",
// Dai et al. 2024): a key is important to a query that attended t keys when its attention is at
// least alpha / t (alpha = 1: 1/t, what every key gets from uniform attention); a key survives
// while at least one of the last `window` queries found it important; the `recent` newest tokens
// always survive. GQA: a key shared by a group is important when any query head of the group
// finds it so (the maximum over the group), since every head of the group reads that one row.
// The optional hard cap (beyond the paper) then evicts, among survivors outside the recent
// tokens, the lowest attention from the latest query first, then the longest since important,
// then the oldest position.
//
// What the engine tracks per cached key and kv-head (CormKeyState, 12 bytes): the key's position,
// the position of the latest query that found it important, and the latest query's attention.
// "Any of the last w queries" is then one comparison, last_important > p - w, for any w: the
// attention kernel updates a key's state in place with one compare and two stores, and nothing
// grows with the window. Query positions run on from the prompt, so prompt queries (seeded from
// the observation window) and decode queries share one clock.
//
// window: the first `sinks` tokens and the `recent` newest ones survive.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "memory/compress/observation.h"
#include "memory/compress/policy_config.h"

namespace kvtrim::memory::compress {

struct CormKeyState {
  int32_t position = 0;         // the key's token position
  int32_t last_important = -1;  // position of the latest query with attention >= alpha / t; -1 none
  float recent_attention = 0;   // attention from the latest observed query (max over the group)
};

// (n_kv_heads, n): the state of every prompt key after the w observation queries (positions
// n - w .. n - 1, the query at position p attending t = p + 1 keys). The engine keeps the states of
// the tokens it keeps. Exact CORM needs w >= min(config.window, n) observation queries.
//   probs: (n_kv_heads, group, w, n) from ObservationAttention
std::vector<CormKeyState> CormPromptStates(const CormConfig& config, std::span<const float> probs,
                                           int32_t n, int32_t w, const HeadShape& shape);

// One decode query of one kv-head at `query_position`, which attended the kv-head's
// n_keys = states.size() cached keys (t = n_keys).
//   attention: (group, n_keys) the softmaxed weights of the group's query heads, in slot order
//   states:    (n_keys) the same slots, updated in place
void CormObserve(const CormConfig& config, int32_t query_position, std::span<const float> attention,
                 int32_t group, std::span<CormKeyState> states);

// The slots (ascending) that survive after the query at `current_position` was observed.
std::vector<int32_t> CormSurvivors(const CormConfig& config, int32_t current_position,
                                   std::span<const CormKeyState> states);

// The slots (ascending) whose key position is a sink or among the `recent` newest up to
// `current_position`.
//   positions: (n_keys) the token position of each cached key
std::vector<int32_t> WindowSurvivors(const WindowConfig& config, int32_t current_position,
                                     std::span<const int32_t> positions);

}  // namespace kvtrim::memory::compress
