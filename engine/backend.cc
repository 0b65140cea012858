// The default two-halved step of a backend that runs each step whole (backend.h).
#include "engine/backend.h"

#include <utility>

namespace kvtrim::engine {

absl::StatusOr<bool> Backend::Launch(std::span<const SequenceStep> steps, bool may_stay_in_flight) {
  (void)may_stay_in_flight;
  StepOutput out = std::move(spare_);
  if (absl::Status status = Forward(steps, out); !status.ok()) return status;
  ran_.push_back(std::move(out));
  return false;
}

absl::Status Backend::Collect(StepOutput& out) {
  if (ran_.empty()) return absl::FailedPreconditionError("Collect: no step was launched");
  std::swap(out, ran_.front());
  spare_ = std::move(ran_.front());  // the caller's previous buffers, for the next Launch
  ran_.pop_front();
  return absl::OkStatus();
}

}  // namespace kvtrim::engine
