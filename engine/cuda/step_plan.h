// The host half of a CUDA forward step: what every sequence of the step reads and writes, as
// int32 arrays packed back to back in one vector so that a single copy uploads them all. Built
// before any device work is queued; the device run (CudaBackend::Forward) only reads it. Plain
// host code, no CUDA.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "absl/status/status.h"
#include "engine/backend.h"

namespace kvtrim::engine::cuda {

struct StepPlan {
  int32_t tokens = 0;           // T: new tokens of the step, packed in step order
  int32_t seqs = 0;             // S: sequences with at least one new token
  int32_t pages = 0;            // P: pages per layer over all sequences (page_indptr[S])
  int32_t decode_seqs = 0;      // sequences with exactly one new token: the decode kernel's
  int32_t prefill_items = 0;    // query tiles of the other sequences: the prefill kernel's
  int32_t logit_rows = 0;       // tokens whose logits the step returns
  int32_t max_decode_rows = 0;  // most rows a decode query sees (split-K heuristic)

  // Where each array starts in `data`, in int32 elements.
  struct Offsets {
    size_t token_ids = 0;     // (T) the model's input ids
    size_t positions = 0;     // (T) position of each token (= its row in its sequence's cache)
    size_t token_seq = 0;     // (T) sequence index of each token
    size_t token_indptr = 0;  // (S + 1) sequence s's tokens: [token_indptr[s], token_indptr[s+1])
    size_t kv_rows = 0;       // (S) rows of each sequence once this step's are written
    size_t page_indptr = 0;   // (S + 1) sequence s's pages: [page_indptr[s], page_indptr[s+1])
    size_t key_pages = 0;     // (n_layers, P) page ids of the keys, layer-major
    size_t value_pages = 0;   // (n_layers, P) page ids of the values
    size_t decode = 0;        // (decode_seqs) sequence indices for the decode kernel
    size_t prefill = 0;       // (prefill_items, 2) (sequence, first new token) query tiles
    size_t logits = 0;        // (logit_rows) token rows whose logits are returned, in step order
  } at;
  std::vector<int32_t> data;
  std::vector<int32_t> step_of_seq;  // (S) index in `steps` of each planned sequence

  size_t bytes() const { return data.size() * sizeof(int32_t); }
};

// Plans `steps` (steps without new tokens are skipped). INVALID_ARGUMENT for a token id outside
// [0, vocab_size); INTERNAL when a sequence's pages were not reserved for its new rows or its
// layers disagree (both are bugs of the caller). `window` is the model's sliding window (0 = none)
// and `query_tile` the prefill kernel's tile (kPrefillQueryTile). Reuses `plan`'s storage.
absl::Status BuildStepPlan(std::span<const SequenceStep> steps, int n_layers, int vocab_size,
                           int window, int query_tile, StepPlan& plan);

}  // namespace kvtrim::engine::cuda
