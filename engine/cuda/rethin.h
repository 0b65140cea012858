// ThinK re-thinning on the GPU (rethin.cu): the device twin of the CPU engine's
// RethinCompressed (KvCache::MoveToPrompt for each row moved), for every decode of a step whose
// plan moves rows on a layer, in one launch per layer after the step's attention.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "engine/cuda/attention_decode.h"
#include "engine/cuda/compressed_kv.h"
#include "engine/cuda/paged_kv.h"

namespace kvtrim::engine::cuda {

// For each sequence s = seqs[i] (i < n_seqs) with moved[s] = n > 0 (n < 0 is
// LaunchRethinAfterEviction's, decode_eviction.h) and each kv-head h, on layer
// `kv` / `ckv` (every head at T = thin_rows[s, h] thin rows and R = recent_rows[s, h] recent rows,
// R - n >= n, the recent rows in position order, the thin lists holding pages for T + n rows):
//  - thin row T + i becomes recent row n - 1 - i, for i < n (the oldest n, highest slot first,
//    as MoveToPrompt appends them): its key on the layer's channel set, its value whole;
//  - then recent row j becomes recent row n + j, for j < R - n (the newest, in order).
// This is where KvCache::MoveToPrompt over slots n - 1, ..., 0 leaves the rows. The row counts
// are the host's to update (T + n and R - n).
cudaError_t LaunchRethin(const PagedKv& kv, const CompressedKv& ckv, const int32_t* seqs,
                         int n_seqs, const int32_t* moved, const AttentionShape& shape,
                         cudaStream_t stream);

}  // namespace kvtrim::engine::cuda
