// Temperature sampling on the GPU (sample.cu): the device twin of engine::SampleTempered, so a
// sampled row's token comes back instead of its logits row (512 KB at a 128k vocabulary).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace kvtrim::engine::cuda {

// One row to sample, as engine::SamplingParams and the request's draw give it.
struct SampleJob {
  int32_t row = 0;           // its logits row; its token goes to tokens[row]
  int32_t top_k = 0;         // 0: off
  float temperature = 0.0f;  // 0: the argmax of the penalised row
  float top_p = 1.0f;        // 1: off
  float min_p = 0.0f;        // 0: off
  float repetition_penalty = 1.0f;
  int32_t penalized_begin = 0, penalized_end = 0;  // its distinct ids in `penalized`
  uint64_t draw = 0;                               // sampling::kDrawBits random bits
};

// Device scratch of LaunchSampleRows for `jobs` rows of `vocab` logits.
size_t SampleWorkspaceBytes(int jobs, int vocab);

// For each job: applies the repetition penalty to its row of `logits` (in place, once per id of
// penalized[penalized_begin, penalized_end)), then writes the token SampleTempered (sampler.h)
// picks from the row into tokens[row]. logits: (rows, vocab) fp32; jobs (n_jobs), penalized and
// tokens are device memory; workspace holds SampleWorkspaceBytes(n_jobs, vocab). Each row is
// worked on by a cluster of blocks_per_row blocks (8 or 4; 0: 8 while n_jobs * 8 blocks fit the
// multiprocessors one each, else 4); the token does not depend on it.
cudaError_t LaunchSampleRows(float* logits, int vocab, const SampleJob* jobs, int n_jobs,
                             const int32_t* penalized, int32_t* tokens, void* workspace,
                             cudaStream_t stream, int blocks_per_row = 0);

// How many rows LaunchSampleRows works on at once on the current device with `blocks_per_row`
// (8 or 4): its clusters that fit the device together, by cudaOccupancyMaxActiveClusters.
// Further rows wait for a cluster to finish.
cudaError_t SampleRowsActiveClusters(int blocks_per_row, int* clusters);

}  // namespace kvtrim::engine::cuda
