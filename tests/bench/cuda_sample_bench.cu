// Temperature sampling on the device (LaunchSampleRows) against the number of rows it samples.
//
// Each row is --vocab fp32 logits, uniform in [-spread, spread): spread 1 is the flat row of a
// model with dummy weights, where nearly every token keeps a weight and every selection pass
// sees them all; spread 16 leaves a few hundred tokens within reach of the top at temperature
// 0.7. Every row is sampled at temperature 0.7 and top-p 0.9, with its own draw, by clusters of 8
// and of 4 blocks a row; the last column is the launcher's choice. The first lines say how many
// rows the device samples at once with each (SampleRowsActiveClusters); a step with more rows
// takes further waves. Each time is the median of --repeats timed launches (CUDA events around
// each) after --warmup. Prints tables; never fails on time.
#include <cuda_runtime_api.h>

#include <cstdint>
#include <cstdio>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "engine/cuda/sample.h"
#include "tests/bench/cuda_bench_util.h"

ABSL_FLAG(int, repeats, 20, "timed runs per row (the median is printed)");
ABSL_FLAG(int, warmup, 3, "untimed runs before each row");
ABSL_FLAG(int, vocab, 128256, "logits per row (Llama-3's vocabulary)");

namespace kvtrim::engine::cuda {
namespace {

__global__ void FillLogits(float* out, size_t n, uint32_t seed, float spread) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    out[i] = bench::RandomValue(i, seed, spread);
  }
}

int Run() {
  bench::PrintDevice();
  for (const int blocks : {8, 4}) {
    int clusters = 0;
    CHECK_CUDA(SampleRowsActiveClusters(blocks, &clusters));
    std::printf("rows sampled at once with %d blocks a row (clusters resident together): %d\n",
                blocks, clusters);
  }
  std::printf("\n");
  const int vocab = absl::GetFlag(FLAGS_vocab);
  const std::vector<int> row_counts = {1, 2, 4, 8, 16, 24, 32, 48, 64};
  const int most = row_counts.back();
  DeviceBuffer logits = bench::Empty(static_cast<size_t>(most) * vocab * sizeof(float));
  DeviceBuffer jobs = bench::Empty(most * sizeof(SampleJob));
  DeviceBuffer tokens = bench::Empty(most * sizeof(int32_t));
  DeviceBuffer workspace = bench::Empty(SampleWorkspaceBytes(most, vocab));
  cudaStream_t stream = nullptr;
  CHECK_CUDA(cudaStreamCreate(&stream));
  std::printf("| logits spread | rows | 8 blocks a row, ms | 4 blocks a row, ms | chosen, ms |\n");
  std::printf("|--:|--:|--:|--:|--:|\n");
  for (const float spread : {1.0f, 16.0f}) {
    FillLogits<<<bench::kFillBlocks, bench::kFillThreads, 0, stream>>>(
        logits.as<float>(), static_cast<size_t>(most) * vocab, 7, spread);
    CHECK_CUDA(cudaGetLastError());
    for (const int rows : row_counts) {
      std::vector<SampleJob> host(rows);
      for (int r = 0; r < rows; ++r) {
        host[r] = {.row = r,
                   .temperature = 0.7f,
                   .top_p = 0.9f,
                   .draw = 0x9e3779b97f4a7c15ull * static_cast<uint64_t>(r + 1) >> 11};
      }
      CHECK_CUDA(cudaMemcpy(jobs.as<void>(), host.data(), rows * sizeof(SampleJob),
                            cudaMemcpyHostToDevice));
      double ms[3];
      const int choices[3] = {8, 4, 0};
      for (int c = 0; c < 3; ++c) {
        ms[c] =
            bench::TimeRuns(stream, absl::GetFlag(FLAGS_warmup), absl::GetFlag(FLAGS_repeats),
                            [&](int) {
                              CHECK_CUDA(LaunchSampleRows(
                                  logits.as<float>(), vocab, jobs.as<SampleJob>(), rows, nullptr,
                                  tokens.as<int32_t>(), workspace.as<void>(), stream, choices[c]));
                            })
                .median_ms;
      }
      std::printf("| %.0f | %d | %.3f | %.3f | %.3f |\n", spread, rows, ms[0], ms[1], ms[2]);
    }
  }
  CHECK_CUDA(cudaStreamDestroy(stream));
  return 0;
}

}  // namespace
}  // namespace kvtrim::engine::cuda

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  return kvtrim::engine::cuda::Run();
}
