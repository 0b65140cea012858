// The CUDA backend's step outputs (forward.h): which rows want logits and which only their token,
// the sampling jobs of the rows sampled on the device (sample.h), uploaded with the plan and run
// after the logits, and the tokens and whole rows taken back once the step has run (the rows
// sampled on the host, with CudaOptions::sample_on_device off, sampled there).
#include <cstring>
#include <span>
#include <vector>

#include "engine/cuda/forward.h"
#include "engine/cuda/sample.h"
#include "engine/cuda/status.h"
#include "engine/sampler.h"

namespace kvtrim::engine::cuda {

void CudaBackend::TakeResults(StepOutput& out, int slot) {
  int32_t* const tokens = tokens_host_[slot].as<int32_t>();
  const size_t vocab = config_.vocab_size;
  const int wanting = static_cast<int>(wanting_steps_.size());
  // The sampled rows that came back whole (CudaOptions::sample_on_device off): sampled here.
  std::vector<int> packed_row(wanting, -1);
  std::vector<int> host_sampled;
  int packed = 0;
  for (int row = 0; row < wanting; ++row) {
    if (token_only_[row]) continue;
    packed_row[row] = packed++;
    if (wanting_steps_[row]->sampling != nullptr) host_sampled.push_back(row);
  }
#pragma omp parallel for schedule(dynamic) if (host_sampled.size() > 1)
  for (size_t i = 0; i < host_sampled.size(); ++i) {
    const int row = host_sampled[i];
    const SequenceStep& step = *wanting_steps_[row];
    const std::span<float> logits(logits_host_.as<float>() + packed_row[row] * vocab, vocab);
    ApplyRepetitionPenalty(logits, step.penalized, step.sampling->repetition_penalty);
    tokens[row] = SampleTempered(logits, *step.sampling, step.draw);
  }
  out.logits.clear();
  out.tokens.clear();
  for (int row = 0; row < wanting; ++row) {
    if (wanting_steps_[row]->token_only()) {
      out.tokens.push_back(tokens[row]);
    } else {
      const float* from = logits_host_.as<float>() + packed_row[row] * vocab;
      out.logits.insert(out.logits.end(), from, from + vocab);
    }
  }
}

absl::Status CudaBackend::PlanOutputs(std::span<const SequenceStep> steps) {
  // The rows that want logits, in step order as the plan lists them, and which of them want only
  // their token (argmax or sampled on the device):
  wanting_steps_.clear();
  token_only_.clear();
  sample_jobs_.clear();
  penalized_.clear();
  for (int s = 0; s < plan_.seqs; ++s) {
    const SequenceStep& step = steps[plan_.step_of_seq[s]];
    if (!step.want_logits) continue;
    const int row = static_cast<int>(wanting_steps_.size());
    const bool sampled_here =
        step.sampling != nullptr && !step.argmax_only && options_.sample_on_device;
    wanting_steps_.push_back(&step);
    token_only_.push_back(step.argmax_only || sampled_here);
    if (sampled_here) {
      const SamplingParams& p = *step.sampling;
      const int32_t begin = static_cast<int32_t>(penalized_.size());
      if (p.repetition_penalty != 1.0f) {
        penalized_.insert(penalized_.end(), step.penalized.begin(), step.penalized.end());
      }
      sample_jobs_.push_back({.row = row,
                              .top_k = p.top_k,
                              .temperature = p.temperature,
                              .top_p = p.top_p,
                              .min_p = p.min_p,
                              .repetition_penalty = p.repetition_penalty,
                              .penalized_begin = begin,
                              .penalized_end = static_cast<int32_t>(penalized_.size()),
                              .draw = step.draw});
    }
  }
  if (sample_jobs_.empty()) return absl::OkStatus();
  const size_t job_bytes = sample_jobs_.size() * sizeof(SampleJob);
  const size_t bytes = job_bytes + penalized_.size() * sizeof(int32_t);
  KVTRIM_RETURN_IF_ERROR(Grow(sample_staging_, bytes, "the sampled rows' parameters"));
  KVTRIM_RETURN_IF_ERROR(Grow(sample_device_, bytes, "the sampled rows' parameters"));
  KVTRIM_RETURN_IF_ERROR(
      Grow(sample_workspace_,
           SampleWorkspaceBytes(static_cast<int>(sample_jobs_.size()), config_.vocab_size),
           "the sampling workspace"));
  char* staging = sample_staging_.as<char>();
  std::memcpy(staging, sample_jobs_.data(), job_bytes);
  std::memcpy(staging + job_bytes, penalized_.data(), penalized_.size() * sizeof(int32_t));
  return absl::OkStatus();
}

absl::Status CudaBackend::UploadSampling() {
  if (sample_jobs_.empty()) return absl::OkStatus();
  const size_t bytes =
      sample_jobs_.size() * sizeof(SampleJob) + penalized_.size() * sizeof(int32_t);
  return CudaStatus(cudaMemcpyAsync(sample_device_.as<void>(), sample_staging_.as<void>(), bytes,
                                    cudaMemcpyHostToDevice, stream_),
                    "cudaMemcpyAsync(sampling jobs)");
}

absl::Status CudaBackend::QueueSampling() {
  if (sample_jobs_.empty()) return absl::OkStatus();
  const size_t job_bytes = sample_jobs_.size() * sizeof(SampleJob);
  const char* device = sample_device_.as<char>();
  return CudaStatus(LaunchSampleRows(logits_.as<float>(), config_.vocab_size,
                                     reinterpret_cast<const SampleJob*>(device),
                                     static_cast<int>(sample_jobs_.size()),
                                     reinterpret_cast<const int32_t*>(device + job_bytes),
                                     tokens_.as<int32_t>(), sample_workspace_.as<void>(), stream_),
                    "SampleRows");
}

}  // namespace kvtrim::engine::cuda
