#include "memory/compress/policy_config.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "absl/strings/str_cat.h"

namespace kvtrim::memory::compress {
namespace {

// (Debian's Abseil has its own string_view, which StrCat does not take from std::string_view.)
absl::Status Invalid(const std::string& field, const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat(field, ": ", what));
}

// "x is outside (0, 1]" style checks; NaN fails every comparison and is rejected too.
bool InHalfOpenUnit(double x, bool include_zero, bool include_one) {
  const bool above = include_zero ? x >= 0.0 : x > 0.0;
  const bool below = include_one ? x <= 1.0 : x < 1.0;
  return above && below;
}

absl::Status ValidateScoring(const SnapKvConfig& c, const std::string& policy,
                             int32_t prompt_tokens) {
  if (absl::Status s = c.budget.Validate(policy); !s.ok()) return s;
  const std::string window = absl::StrCat(policy, ".window");
  if (c.window < 1) return Invalid(window, absl::StrCat(c.window, " must be at least 1"));
  if (prompt_tokens > 0 && c.window > prompt_tokens) {
    return Invalid(
        window, absl::StrCat(c.window, " is longer than the prompt (", prompt_tokens, " tokens)"));
  }
  if (c.budget.tokens > 0 && c.budget.tokens <= c.window) {
    // The reference asserts max_capacity_prompt - window_size > 0.
    return Invalid(
        absl::StrCat(policy, ".budget_tokens"),
        absl::StrCat(c.budget.tokens, " is not larger than ", window, " (", c.window, ")"));
  }
  if (c.kernel_size < 1 || c.kernel_size % 2 == 0) {
    // Padding kernel_size / 2 keeps the pooled length equal to the input only for odd kernels;
    // an even kernel makes the reference gather past the prefix.
    return Invalid(absl::StrCat(policy, ".kernel_size"),
                   absl::StrCat(c.kernel_size, " must be a positive odd number"));
  }
  if (c.pooling != Pooling::kAvg && c.pooling != Pooling::kMax) {
    return Invalid(absl::StrCat(policy, ".pooling"), "unknown pooling");
  }
  return absl::OkStatus();
}

}  // namespace

int32_t TokenBudget::Resolve(int32_t prompt_tokens) const {
  if (tokens > 0) return std::min(tokens, prompt_tokens);
  const auto kept = static_cast<int32_t>(static_cast<double>(prompt_tokens) * ratio);
  return std::min(prompt_tokens, std::max(1, kept));
}

absl::Status TokenBudget::Validate(std::string_view policy_name) const {
  const std::string policy(policy_name);
  const std::string ratio_field = absl::StrCat(policy, ".budget_ratio");
  const std::string tokens_field = absl::StrCat(policy, ".budget_tokens");
  if (ratio != 0.0 && tokens != 0) {
    return Invalid(ratio_field, absl::StrCat("conflicts with ", tokens_field, "; set one"));
  }
  if (ratio == 0.0 && tokens == 0) {
    return Invalid(ratio_field, absl::StrCat("unset; set it or ", tokens_field));
  }
  if (tokens == 0 && !InHalfOpenUnit(ratio, false, true)) {
    return Invalid(ratio_field, absl::StrCat(ratio, " is outside (0, 1]"));
  }
  if (ratio == 0.0 && tokens < 0) {
    return Invalid(tokens_field, absl::StrCat(tokens, " must be positive"));
  }
  return absl::OkStatus();
}

absl::StatusOr<Pooling> ParsePooling(std::string_view name, std::string_view field) {
  if (name == "avgpool" || name == "avg") return Pooling::kAvg;
  if (name == "maxpool" || name == "max") return Pooling::kMax;
  return Invalid(std::string(field),
                 absl::StrCat("unknown pooling '", std::string(name), "' (avgpool or maxpool)"));
}

absl::Status SnapKvConfig::Validate(int32_t prompt_tokens) const {
  return ValidateScoring(*this, "snapkv", prompt_tokens);
}

absl::Status PyramidKvConfig::Validate(int32_t prompt_tokens) const {
  if (absl::Status s = ValidateScoring(snap, "pyramidkv", prompt_tokens); !s.ok()) return s;
  if (beta < 1) return Invalid("pyramidkv.beta", absl::StrCat(beta, " must be at least 1"));
  return absl::OkStatus();
}

absl::Status StreamingLlmConfig::Validate(int32_t prompt_tokens) const {
  if (absl::Status s = budget.Validate("streamingllm"); !s.ok()) return s;
  if (sinks < 0) return Invalid("streamingllm.sinks", absl::StrCat(sinks, " is negative"));
  if (budget.tokens > 0 && sinks >= budget.tokens) {
    return Invalid("streamingllm.sinks",
                   absl::StrCat(sinks, " leaves no recent tokens in streamingllm.budget_tokens (",
                                budget.tokens, ")"));
  }
  return absl::OkStatus();
}

int32_t ThinkConfig::KeptChannels(int32_t head_dim) const {
  if (keep_ratio > 0.0) {
    // ceil with a tolerance so that 0.3 * 10 = 3.0000000000000004 still keeps 3.
    const double kept = std::ceil(static_cast<double>(head_dim) * keep_ratio - 1e-9);
    return std::clamp(static_cast<int32_t>(kept), 1, head_dim);
  }
  return head_dim - static_cast<int32_t>(static_cast<double>(head_dim) * lambda);
}

absl::Status ThinkConfig::Validate() const {
  if (lambda != 0.0 && keep_ratio != 0.0) {
    return Invalid("think.lambda", "conflicts with think.keep_ratio; set one");
  }
  if (!InHalfOpenUnit(lambda, true, false)) {
    return Invalid("think.lambda", absl::StrCat(lambda, " is outside [0, 1)"));
  }
  if (keep_ratio != 0.0 && !InHalfOpenUnit(keep_ratio, false, true)) {
    return Invalid("think.keep_ratio", absl::StrCat(keep_ratio, " is outside (0, 1]"));
  }
  if (observation < 1) {
    return Invalid("think.observation", absl::StrCat(observation, " must be at least 1"));
  }
  if (recent < 0) return Invalid("think.recent", absl::StrCat(recent, " is negative"));
  return absl::OkStatus();
}

absl::Status CormConfig::Validate() const {
  if (window < 1) return Invalid("corm.window", absl::StrCat(window, " must be at least 1"));
  if (recent < 1) return Invalid("corm.recent", absl::StrCat(recent, " must be at least 1"));
  if (!(alpha > 0.0) || !std::isfinite(alpha)) {
    return Invalid("corm.alpha", absl::StrCat(alpha, " must be positive"));
  }
  if (max_tokens < 0) {
    return Invalid("corm.max_tokens", absl::StrCat(max_tokens, " is negative"));
  }
  if (max_tokens > 0 && max_tokens < recent) {
    return Invalid("corm.max_tokens", absl::StrCat(max_tokens, " is smaller than corm.recent (",
                                                   recent, "), which are always kept"));
  }
  return absl::OkStatus();
}

absl::Status WindowConfig::Validate() const {
  if (sinks < 0) return Invalid("window.sinks", absl::StrCat(sinks, " is negative"));
  if (recent < 1) return Invalid("window.recent", absl::StrCat(recent, " must be at least 1"));
  return absl::OkStatus();
}

}  // namespace kvtrim::memory::compress
