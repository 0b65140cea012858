// engine/cuda/sample.cu against its host twin engine::SampleTempered: the same token, exactly,
// for every row, on fresh random rows (a new seed each run): flat rows where nearly the whole
// vocabulary has weight, peaked ones, rows of many equal logits (ties go to the lower id), rows
// with NaNs, -inf and +inf, each under a spread of temperatures, top-k, top-p, min-p and
// repetition penalties, with random draws and the extreme draws. Without a CUDA device it skips.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/cuda/sample.h"
#include "engine/sampler.h"
#include "engine/sampling_rule.h"
#include "tests/engine/cuda_test_util.h"

namespace kvtrim::engine::cuda {
namespace {

using namespace kvtrim::engine::cuda::testing;  // NOLINT: the shared CUDA test helpers

class CudaSampleTest : public CudaTest {
 protected:
  CudaSampleTest() : CudaTest("CUDA sampling tests") {}

  // One row of `vocab` logits of the given kind.
  std::vector<float> Row(int kind, int vocab) {
    const float nan = std::numeric_limits<float>::quiet_NaN();
    const float inf = std::numeric_limits<float>::infinity();
    std::uniform_int_distribution<int> at(0, vocab - 1);
    switch (kind) {
      case 0:  // flat: most of the vocabulary within reach of the largest
        return Random(rng_, vocab, 1.0f);
      case 1: {  // peaked: a few large logits over a low floor
        std::vector<float> row = Random(rng_, vocab, 3.0f);
        for (int i = 0; i < 5; ++i) row[at(rng_)] = 25.0f + i;
        return row;
      }
      case 2: {  // small integers: long runs of equal logits
        std::uniform_int_distribution<int> small(-4, 4);
        std::vector<float> row(vocab);
        for (float& l : row) l = static_cast<float>(small(rng_));
        return row;
      }
      case 3: {  // NaNs and -inf among the values
        std::vector<float> row = Random(rng_, vocab, 2.0f);
        for (int i = 0; i < vocab; i += 3) row[i] = nan;
        for (int i = 1; i < vocab; i += 7) row[i] = -inf;
        return row;
      }
      case 4: {  // +inf logits: only they can be drawn
        std::vector<float> row = Random(rng_, vocab, 2.0f);
        row[at(rng_)] = inf;
        row[at(rng_)] = inf;
        return row;
      }
      default:  // nothing above -inf: the argmax rule
        return std::vector<float>(vocab, kind == 5 ? -inf : nan);
    }
  }
};

TEST_F(CudaSampleTest, SampledTokensMatchTheHostSampler) {
  const float temperatures[] = {0.0f, 0.05f, 0.7f, 1.0f, 2.5f, 1e4f};
  const int top_ks[] = {0, 1, 7, 50, 1 << 30};
  const float top_ps[] = {1.0f, 0.95f, 0.5f, 1e-7f};
  const float min_ps[] = {0.0f, 0.05f, 1.0f};
  std::uniform_int_distribution<uint64_t> draws(0, (uint64_t{1} << sampling::kDrawBits) - 1);
  int compared = 0;
  for (const int vocab : {1, 7, 1000, 49152, 128256}) {
    std::vector<float> all;
    std::vector<SampleJob> jobs;
    std::vector<int32_t> penalized;
    std::vector<int32_t> expected;
    for (int kind = 0; kind < 7; ++kind) {
      for (int variant = 0; variant < 12; ++variant) {
        std::vector<float> row = Row(kind, vocab);
        SamplingParams params{
            .temperature = temperatures[(variant + kind) % 6],
            .top_k = top_ks[(variant / 2 + kind) % 5],
            .top_p = top_ps[(variant / 3) % 4],
            .min_p = min_ps[(variant + kind / 2) % 3],
            .repetition_penalty = variant % 4 == 1 ? 1.3f : (variant % 4 == 3 ? 0.8f : 1.0f)};
        const uint64_t draw = variant == 0   ? 0
                              : variant == 1 ? (uint64_t{1} << sampling::kDrawBits) - 1
                                             : draws(rng_);
        SampleJob job{.row = static_cast<int32_t>(jobs.size()),
                      .top_k = params.top_k,
                      .temperature = params.temperature,
                      .top_p = params.top_p,
                      .min_p = params.min_p,
                      .repetition_penalty = params.repetition_penalty,
                      .penalized_begin = static_cast<int32_t>(penalized.size()),
                      .draw = draw};
        std::vector<int32_t> ids;
        if (params.repetition_penalty != 1.0f) {
          std::vector<int32_t> every(vocab);
          for (int i = 0; i < vocab; ++i) every[i] = i;
          std::shuffle(every.begin(), every.end(), rng_);
          ids.assign(every.begin(), every.begin() + std::min(vocab, 300));
          penalized.insert(penalized.end(), ids.begin(), ids.end());
        }
        job.penalized_end = static_cast<int32_t>(penalized.size());
        jobs.push_back(job);
        all.insert(all.end(), row.begin(), row.end());
        ApplyRepetitionPenalty(row, ids, params.repetition_penalty);
        expected.push_back(SampleTempered(row, params, draw));
      }
    }
    const int n = static_cast<int>(jobs.size());
    DeviceBuffer d_jobs = Upload(jobs);
    DeviceBuffer d_penalized = Upload(penalized.empty() ? std::vector<int32_t>{0} : penalized);
    absl::StatusOr<DeviceBuffer> workspace = DeviceBuffer::Allocate(SampleWorkspaceBytes(n, vocab));
    ASSERT_TRUE(workspace.ok()) << workspace.status();
    // Clusters of 8 and of 4 blocks a row, and the launcher's choice: the same tokens.
    for (const int blocks_per_row : {8, 4, 0}) {
      DeviceBuffer d_logits = Upload(all);  // the penalty rewrites the rows in place
      DeviceBuffer d_tokens = Poisoned<int32_t>(n);
      ASSERT_CUDA(LaunchSampleRows(d_logits.as<float>(), vocab, d_jobs.as<SampleJob>(), n,
                                   d_penalized.as<int32_t>(), d_tokens.as<int32_t>(),
                                   workspace->as<void>(), stream_, blocks_per_row));
      Sync();
      const std::vector<int32_t> got = Download<int32_t>(d_tokens, n);
      for (int r = 0; r < n; ++r) {
        const SampleJob& j = jobs[r];
        EXPECT_EQ(got[r], expected[r])
            << "vocab " << vocab << " row " << r << " (kind " << r / 12 << ", temperature "
            << j.temperature << ", top_k " << j.top_k << ", top_p " << j.top_p << ", min_p "
            << j.min_p << ", penalty " << j.repetition_penalty << ", draw " << j.draw
            << "), blocks per row " << blocks_per_row;
        ++compared;
      }
    }
  }
  std::printf("[parity] SampleRows: %d rows compared with SampleTempered\n", compared);
}

// The draws of a fixed row land on its candidates in proportion to their weight: 4000 draws on
// the device over logits {2, 1, 0, -1} at temperature 1 give each token its softmax share.
TEST_F(CudaSampleTest, DrawsFollowTheSoftmax) {
  const int draws = 4000;
  const std::vector<float> row = {2.0f, 1.0f, 0.0f, -1.0f};
  std::vector<float> all;
  std::vector<SampleJob> jobs;
  std::uniform_int_distribution<uint64_t> bits(0, (uint64_t{1} << sampling::kDrawBits) - 1);
  for (int i = 0; i < draws; ++i) {
    all.insert(all.end(), row.begin(), row.end());
    jobs.push_back({.row = i, .temperature = 1.0f, .draw = bits(rng_)});
  }
  DeviceBuffer d_logits = Upload(all);
  DeviceBuffer d_jobs = Upload(jobs);
  DeviceBuffer d_penalized = Upload(std::vector<int32_t>{0});
  DeviceBuffer d_tokens = Poisoned<int32_t>(draws);
  absl::StatusOr<DeviceBuffer> workspace = DeviceBuffer::Allocate(SampleWorkspaceBytes(draws, 4));
  ASSERT_TRUE(workspace.ok()) << workspace.status();
  ASSERT_CUDA(LaunchSampleRows(d_logits.as<float>(), 4, d_jobs.as<SampleJob>(), draws,
                               d_penalized.as<int32_t>(), d_tokens.as<int32_t>(),
                               workspace->as<void>(), stream_));
  Sync();
  std::vector<int> counts(4);
  for (int32_t token : Download<int32_t>(d_tokens, draws)) {
    ASSERT_GE(token, 0);
    ASSERT_LT(token, 4);
    ++counts[token];
  }
  double sum = 0.0;
  for (float l : row) sum += std::exp(l);
  for (int t = 0; t < 4; ++t) {
    EXPECT_NEAR(counts[t] / static_cast<double>(draws), std::exp(row[t]) / sum, 0.03) << t;
  }
}

TEST_F(CudaSampleTest, BadArgumentsAreRefused) {
  EXPECT_EQ(LaunchSampleRows(nullptr, 10, nullptr, 0, nullptr, nullptr, nullptr, stream_),
            cudaSuccess);
  EXPECT_EQ(LaunchSampleRows(nullptr, 10, nullptr, -1, nullptr, nullptr, nullptr, stream_),
            cudaErrorInvalidValue);
  EXPECT_EQ(LaunchSampleRows(nullptr, 10, nullptr, 1, nullptr, nullptr, nullptr, stream_, 6),
            cudaErrorInvalidValue);
  EXPECT_EQ(LaunchSampleRows(nullptr, 0, nullptr, 1, nullptr, nullptr, nullptr, stream_),
            cudaErrorInvalidValue);
}

}  // namespace
}  // namespace kvtrim::engine::cuda
