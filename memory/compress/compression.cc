#include "memory/compress/compression.h"

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstdlib>
#include <optional>
#include <set>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "memory/compress/budgets.h"

namespace kvtrim::memory::compress {
namespace {

absl::Status Invalid(const std::string& field, const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat(field, ": ", what));
}

// The shortest text that parses back to the same double (StrCat keeps only 6 digits).
std::string Number(double value) {
  char text[32];
  const std::to_chars_result end = std::to_chars(text, text + sizeof(text), value);
  return std::string(text, end.ptr);
}

absl::Status ParseInt(const std::string& key, absl::string_view value, int32_t& out) {
  if (!absl::SimpleAtoi(value, &out)) {
    return Invalid(key, absl::StrCat("'", std::string(value), "' is not an integer"));
  }
  return absl::OkStatus();
}

absl::Status ParseDouble(const std::string& key, absl::string_view value, double& out) {
  if (!absl::SimpleAtod(value, &out) || !std::isfinite(out)) {
    return Invalid(key, absl::StrCat("'", std::string(value), "' is not a number"));
  }
  return absl::OkStatus();
}

// The token budget and scoring fields of the selection policy (parsed before the policy may be
// known, applied to all three and validated for the chosen one).
struct SelectionFields {
  TokenBudget budget;
  std::optional<int32_t> window, kernel_size, beta, sinks;
  std::optional<Pooling> pooling;
};

}  // namespace

const char* SelectionPolicyName(SelectionPolicy policy) {
  switch (policy) {
    case SelectionPolicy::kNone:
      return "none";
    case SelectionPolicy::kSnapKv:
      return "snapkv";
    case SelectionPolicy::kPyramidKv:
      return "pyramidkv";
    case SelectionPolicy::kStreamingLlm:
      return "streamingllm";
  }
  return "unknown";
}

const char* EvictionPolicyName(EvictionPolicy policy) {
  switch (policy) {
    case EvictionPolicy::kNone:
      return "none";
    case EvictionPolicy::kCorm:
      return "corm";
    case EvictionPolicy::kWindow:
      return "window";
  }
  return "unknown";
}

absl::StatusOr<SelectionPolicy> ParseSelectionPolicy(std::string_view name,
                                                     std::string_view field) {
  for (SelectionPolicy p : {SelectionPolicy::kNone, SelectionPolicy::kSnapKv,
                            SelectionPolicy::kPyramidKv, SelectionPolicy::kStreamingLlm}) {
    if (name == SelectionPolicyName(p)) return p;
  }
  return Invalid(std::string(field), absl::StrCat("unknown policy '", std::string(name),
                                                  "' (none, snapkv, pyramidkv or streamingllm)"));
}

absl::StatusOr<EvictionPolicy> ParseEvictionPolicy(std::string_view name, std::string_view field) {
  for (EvictionPolicy p : {EvictionPolicy::kNone, EvictionPolicy::kCorm, EvictionPolicy::kWindow}) {
    if (name == EvictionPolicyName(p)) return p;
  }
  return Invalid(std::string(field), absl::StrCat("unknown eviction policy '", std::string(name),
                                                  "' (none, corm or window)"));
}

absl::Status CompressionConfig::Validate(int32_t prompt_tokens) const {
  switch (selection) {
    case SelectionPolicy::kNone:
      break;
    case SelectionPolicy::kSnapKv:
      if (absl::Status s = snapkv.Validate(prompt_tokens); !s.ok()) return s;
      break;
    case SelectionPolicy::kPyramidKv:
      if (absl::Status s = pyramidkv.Validate(prompt_tokens); !s.ok()) return s;
      break;
    case SelectionPolicy::kStreamingLlm:
      if (absl::Status s = streamingllm.Validate(prompt_tokens); !s.ok()) return s;
      break;
  }
  if (absl::Status s = think.Validate(); !s.ok()) return s;
  if (think.enabled() && prompt_tokens > 0 && think.observation > prompt_tokens) {
    return Invalid(
        "think.observation",
        absl::StrCat(think.observation, " is longer than the prompt (", prompt_tokens, " tokens)"));
  }
  switch (eviction) {
    case EvictionPolicy::kNone:
      break;
    case EvictionPolicy::kCorm:
      if (absl::Status s = corm.Validate(); !s.ok()) return s;
      break;
    case EvictionPolicy::kWindow:
      if (absl::Status s = window.Validate(); !s.ok()) return s;
      break;
  }
  return absl::OkStatus();
}

std::string CompressionConfig::Spec() const {
  if (!enabled()) return "none";
  std::vector<std::string> parts;
  auto budget = [&](const TokenBudget& b) {
    parts.push_back(b.tokens > 0 ? absl::StrCat("budget_tokens=", b.tokens)
                                 : absl::StrCat("budget_ratio=", Number(b.ratio)));
  };
  auto scoring = [&](const SnapKvConfig& c) {
    budget(c.budget);
    parts.push_back(absl::StrCat("window=", c.window));
    parts.push_back(absl::StrCat("kernel_size=", c.kernel_size));
    parts.push_back(c.pooling == Pooling::kAvg ? "pooling=avgpool" : "pooling=maxpool");
  };
  if (selection != SelectionPolicy::kNone) {
    parts.push_back(absl::StrCat("policy=", SelectionPolicyName(selection)));
  }
  if (selection == SelectionPolicy::kSnapKv) scoring(snapkv);
  if (selection == SelectionPolicy::kPyramidKv) {
    scoring(pyramidkv.snap);
    parts.push_back(absl::StrCat("beta=", pyramidkv.beta));
  }
  if (selection == SelectionPolicy::kStreamingLlm) {
    budget(streamingllm.budget);
    parts.push_back(absl::StrCat("sinks=", streamingllm.sinks));
  }
  if (think.enabled()) {
    parts.push_back(think.keep_ratio > 0.0
                        ? absl::StrCat("think.keep_ratio=", Number(think.keep_ratio))
                        : absl::StrCat("think.lambda=", Number(think.lambda)));
    parts.push_back(absl::StrCat("think.recent=", think.recent));
    parts.push_back(absl::StrCat("think.observation=", think.observation));
    if (think.rethin) parts.push_back("think.rethin=1");
  }
  if (eviction != EvictionPolicy::kNone) {
    parts.push_back(absl::StrCat("eviction=", EvictionPolicyName(eviction)));
  }
  if (eviction == EvictionPolicy::kCorm) {
    parts.push_back(absl::StrCat("corm.window=", corm.window));
    parts.push_back(absl::StrCat("corm.recent=", corm.recent));
    parts.push_back(absl::StrCat("corm.alpha=", Number(corm.alpha)));
    if (corm.max_tokens > 0) parts.push_back(absl::StrCat("corm.max_tokens=", corm.max_tokens));
  }
  if (eviction == EvictionPolicy::kWindow) {
    parts.push_back(absl::StrCat("window.sinks=", window.sinks));
    parts.push_back(absl::StrCat("window.recent=", window.recent));
  }
  std::string spec;
  for (const std::string& part : parts) absl::StrAppend(&spec, spec.empty() ? "" : ",", part);
  return spec;
}

absl::StatusOr<CompressionConfig> ParseCompressionSpec(std::string_view spec_view) {
  CompressionConfig config;
  const absl::string_view spec =
      absl::StripAsciiWhitespace(absl::string_view(spec_view.data(), spec_view.size()));
  if (spec.empty() || spec == "none") return config;
  SelectionFields fields;
  std::set<std::string> seen;
  for (absl::string_view part : absl::StrSplit(spec, ',', absl::SkipWhitespace())) {
    part = absl::StripAsciiWhitespace(part);
    const size_t eq = part.find('=');
    if (eq == absl::string_view::npos) {
      return Invalid(std::string(part), "expected key=value");
    }
    const std::string key(absl::StripAsciiWhitespace(part.substr(0, eq)));
    const absl::string_view value = absl::StripAsciiWhitespace(part.substr(eq + 1));
    if (!seen.insert(key).second) return Invalid(key, "given twice");
    absl::Status s;
    if (key == "policy") {
      absl::StatusOr<SelectionPolicy> p =
          ParseSelectionPolicy(std::string_view(value.data(), value.size()), key);
      if (!p.ok()) return p.status();
      config.selection = *p;
    } else if (key == "budget_ratio") {
      s = ParseDouble(key, value, fields.budget.ratio);
    } else if (key == "budget_tokens") {
      s = ParseInt(key, value, fields.budget.tokens);
    } else if (key == "window" || key == "kernel_size" || key == "beta" || key == "sinks") {
      int32_t v = 0;
      s = ParseInt(key, value, v);
      (key == "window"        ? fields.window
       : key == "kernel_size" ? fields.kernel_size
       : key == "beta"        ? fields.beta
                              : fields.sinks) = v;
    } else if (key == "pooling") {
      absl::StatusOr<Pooling> p = ParsePooling(std::string_view(value.data(), value.size()), key);
      if (!p.ok()) return p.status();
      fields.pooling = *p;
    } else if (key == "think.lambda") {
      s = ParseDouble(key, value, config.think.lambda);
    } else if (key == "think.keep_ratio") {
      s = ParseDouble(key, value, config.think.keep_ratio);
    } else if (key == "think.recent") {
      s = ParseInt(key, value, config.think.recent);
    } else if (key == "think.observation") {
      s = ParseInt(key, value, config.think.observation);
    } else if (key == "think.rethin") {
      if (value == "1" || value == "true") {
        config.think.rethin = true;
      } else if (value != "0" && value != "false") {
        return Invalid(key, absl::StrCat("'", std::string(value), "' is not 0, 1, true or false"));
      }
    } else if (key == "eviction") {
      absl::StatusOr<EvictionPolicy> p =
          ParseEvictionPolicy(std::string_view(value.data(), value.size()), key);
      if (!p.ok()) return p.status();
      config.eviction = *p;
    } else if (key == "corm.window") {
      s = ParseInt(key, value, config.corm.window);
    } else if (key == "corm.recent") {
      s = ParseInt(key, value, config.corm.recent);
    } else if (key == "corm.alpha") {
      s = ParseDouble(key, value, config.corm.alpha);
    } else if (key == "corm.max_tokens") {
      s = ParseInt(key, value, config.corm.max_tokens);
    } else if (key == "window.sinks") {
      s = ParseInt(key, value, config.window.sinks);
    } else if (key == "window.recent") {
      s = ParseInt(key, value, config.window.recent);
    } else {
      return Invalid(key, "unknown key");
    }
    if (!s.ok()) return s;
  }
  // Selection fields belong to the selection policy; given without one they are a conflict.
  const SelectionPolicy p = config.selection;
  const bool scoring = p == SelectionPolicy::kSnapKv || p == SelectionPolicy::kPyramidKv;
  for (const char* key : {"budget_ratio", "budget_tokens"}) {
    if (seen.count(key) && p == SelectionPolicy::kNone) {
      return Invalid(key, "set without a selection policy (policy=snapkv|pyramidkv|streamingllm)");
    }
  }
  for (const char* key : {"window", "kernel_size", "pooling"}) {
    if (seen.count(key) && !scoring) return Invalid(key, "only snapkv and pyramidkv take it");
  }
  if (seen.count("beta") && p != SelectionPolicy::kPyramidKv) {
    return Invalid("beta", "only pyramidkv takes it");
  }
  if (seen.count("sinks") && p != SelectionPolicy::kStreamingLlm) {
    return Invalid("sinks", "only streamingllm takes it");
  }
  for (const char* prefix : {"corm.", "window."}) {
    const EvictionPolicy needed =
        std::string_view(prefix) == "corm." ? EvictionPolicy::kCorm : EvictionPolicy::kWindow;
    for (const std::string& key : seen) {
      if (key.rfind(prefix, 0) == 0 && config.eviction != needed) {
        return Invalid(key, absl::StrCat("set without eviction=", EvictionPolicyName(needed)));
      }
    }
  }
  for (const std::string& key : seen) {
    if (key.rfind("think.", 0) == 0 && key != "think.lambda" && key != "think.keep_ratio" &&
        !config.think.enabled()) {
      return Invalid(key, "set without think.lambda or think.keep_ratio");
    }
  }
  SnapKvConfig* snap = p == SelectionPolicy::kSnapKv      ? &config.snapkv
                       : p == SelectionPolicy::kPyramidKv ? &config.pyramidkv.snap
                                                          : nullptr;
  if (snap != nullptr) {
    snap->budget = fields.budget;
    if (fields.window) snap->window = *fields.window;
    if (fields.kernel_size) snap->kernel_size = *fields.kernel_size;
    if (fields.pooling) snap->pooling = *fields.pooling;
  }
  if (fields.beta) config.pyramidkv.beta = *fields.beta;
  if (p == SelectionPolicy::kStreamingLlm) {
    config.streamingllm.budget = fields.budget;
    if (fields.sinks) config.streamingllm.sinks = *fields.sinks;
  }
  if (absl::Status s = config.Validate(); !s.ok()) return s;
  return config;
}

std::vector<LayerPlan> PlanPrompt(const CompressionConfig& config, int32_t prompt_tokens,
                                  int32_t n_layers, int32_t head_dim) {
  std::vector<int32_t> kept(n_layers, prompt_tokens);
  switch (config.selection) {
    case SelectionPolicy::kNone:
      break;
    case SelectionPolicy::kSnapKv:
      kept.assign(n_layers, SnapKvKeptTokens(config.snapkv, prompt_tokens));
      break;
    case SelectionPolicy::kPyramidKv:
      kept = PyramidKvKeptTokens(config.pyramidkv, prompt_tokens, n_layers);
      break;
    case SelectionPolicy::kStreamingLlm:
      kept.assign(n_layers, config.streamingllm.budget.Resolve(prompt_tokens));
      break;
  }
  std::vector<LayerPlan> plan(n_layers);
  for (int32_t layer = 0; layer < n_layers; ++layer) {
    LayerPlan& p = plan[layer];
    p.kept_tokens = std::min(kept[layer], prompt_tokens);
    if (config.think.enabled()) {
      p.full_rows = std::min(p.kept_tokens, config.think.recent);
      p.key_width = config.think.KeptChannels(head_dim);
    } else {
      p.key_width = head_dim;
    }
    p.thin_rows = p.kept_tokens - p.full_rows;
  }
  return plan;
}

}  // namespace kvtrim::memory::compress
