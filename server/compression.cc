#include "server/compression.h"

#include <cmath>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"

namespace kvtrim::server {
namespace {

using memory::compress::CompressionConfig;
using memory::compress::EvictionPolicy;
using memory::compress::SelectionPolicy;
using memory::compress::SnapKvConfig;
using memory::compress::TokenBudget;

absl::Status Invalid(absl::string_view field, absl::string_view problem) {
  return absl::InvalidArgumentError(absl::StrCat("compression.", field, ": ", problem));
}

// CompressionConfig::Validate names fields by policy ("snapkv.window", "corm.alpha"); a request
// spells them by where they sit in KvCompression ("compression.window",
// "compression.eviction.corm.alpha").
absl::Status InRequestTerms(const absl::Status& status) {
  if (status.ok()) return status;
  std::string message = absl::StrReplaceAll(std::string(status.message()),
                                            {{"snapkv.", "compression."},
                                             {"pyramidkv.", "compression."},
                                             {"streamingllm.", "compression."},
                                             {"think.", "compression.think."},
                                             {"corm.", "compression.eviction.corm."},
                                             {"window.", "compression.eviction.window."}});
  if (message.rfind("compression.", 0) != 0) message = absl::StrCat("compression.", message);
  return absl::InvalidArgumentError(message);
}

// The selection fields a policy does not take are refused, not ignored: a client that sets beta
// with snapkv expects it to do something.
absl::Status CheckSelectionFields(const v1::KvCompression& m, SelectionPolicy policy) {
  const bool selects = policy != SelectionPolicy::kNone;
  const bool scores = policy == SelectionPolicy::kSnapKv || policy == SelectionPolicy::kPyramidKv;
  struct Field {
    bool set;
    const char* name;
    bool taken;
    const char* takers;
  };
  const Field fields[] = {
      {m.has_budget_ratio(), "budget_ratio", selects, "snapkv, pyramidkv and streamingllm"},
      {m.has_budget_tokens(), "budget_tokens", selects, "snapkv, pyramidkv and streamingllm"},
      {m.has_window(), "window", scores, "snapkv and pyramidkv"},
      {m.has_kernel_size(), "kernel_size", scores, "snapkv and pyramidkv"},
      {!m.pooling().empty(), "pooling", scores, "snapkv and pyramidkv"},
      {m.has_beta(), "beta", policy == SelectionPolicy::kPyramidKv, "pyramidkv"},
      {m.has_sinks(), "sinks", policy == SelectionPolicy::kStreamingLlm, "streamingllm"},
  };
  for (const Field& field : fields) {
    if (field.set && !field.taken) {
      return Invalid(field.name, absl::StrCat("only policy ", field.takers, " take it (policy is ",
                                              SelectionPolicyName(policy), ")"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<TokenBudget> Budget(const v1::KvCompression& m, SelectionPolicy policy) {
  if (m.has_budget_ratio() && m.has_budget_tokens()) {
    return Invalid("budget_ratio", "conflicts with compression.budget_tokens; set one");
  }
  if (!m.has_budget_ratio() && !m.has_budget_tokens()) {
    return Invalid("budget_ratio", absl::StrCat("unset; policy ", SelectionPolicyName(policy),
                                                " needs budget_ratio or budget_tokens"));
  }
  TokenBudget budget;
  if (m.has_budget_ratio()) {
    if (!(m.budget_ratio() > 0.0 && m.budget_ratio() <= 1.0)) {  // NaN fails too
      return Invalid("budget_ratio", absl::StrCat(m.budget_ratio(), " is outside (0, 1]"));
    }
    budget.ratio = m.budget_ratio();
  } else {
    if (m.budget_tokens() < 1) {
      return Invalid("budget_tokens", absl::StrCat(m.budget_tokens(), " must be positive"));
    }
    budget.tokens = m.budget_tokens();
  }
  return budget;
}

absl::Status ConvertSelection(const v1::KvCompression& m, CompressionConfig& config) {
  absl::StatusOr<SelectionPolicy> policy = memory::compress::ParseSelectionPolicy(
      m.policy().empty() ? "none" : m.policy(), "compression.policy");
  if (!policy.ok()) return policy.status();
  config.selection = *policy;
  if (absl::Status s = CheckSelectionFields(m, *policy); !s.ok()) return s;
  if (*policy == SelectionPolicy::kNone) return absl::OkStatus();
  absl::StatusOr<TokenBudget> budget = Budget(m, *policy);
  if (!budget.ok()) return budget.status();
  if (*policy == SelectionPolicy::kStreamingLlm) {
    config.streamingllm.budget = *budget;
    if (m.has_sinks()) config.streamingllm.sinks = m.sinks();
    return absl::OkStatus();
  }
  SnapKvConfig& snap = *policy == SelectionPolicy::kSnapKv ? config.snapkv : config.pyramidkv.snap;
  snap.budget = *budget;
  if (m.has_window()) snap.window = m.window();
  if (m.has_kernel_size()) snap.kernel_size = m.kernel_size();
  if (!m.pooling().empty()) {
    absl::StatusOr<memory::compress::Pooling> pooling =
        memory::compress::ParsePooling(m.pooling(), "compression.pooling");
    if (!pooling.ok()) return pooling.status();
    snap.pooling = *pooling;
  }
  if (m.has_beta()) config.pyramidkv.beta = m.beta();
  return absl::OkStatus();
}

absl::Status ConvertThink(const v1::KvCompression::Think& t, CompressionConfig& config) {
  if (t.has_lambda() && t.has_keep_ratio()) {
    return Invalid("think.lambda", "conflicts with compression.think.keep_ratio; set one");
  }
  if (t.has_lambda() && !(t.lambda() >= 0.0 && t.lambda() < 1.0)) {
    return Invalid("think.lambda", absl::StrCat(t.lambda(), " is outside [0, 1)"));
  }
  if (t.has_keep_ratio() && !(t.keep_ratio() > 0.0 && t.keep_ratio() <= 1.0)) {
    return Invalid("think.keep_ratio", absl::StrCat(t.keep_ratio(), " is outside (0, 1]"));
  }
  config.think.lambda = t.lambda();
  config.think.keep_ratio = t.keep_ratio();
  if (!config.think.enabled() && (t.has_recent() || t.has_observation() || t.has_rethin())) {
    return Invalid(t.has_recent()        ? "think.recent"
                   : t.has_observation() ? "think.observation"
                                         : "think.rethin",
                   "set without compression.think.lambda or compression.think.keep_ratio");
  }
  if (t.has_recent()) config.think.recent = t.recent();
  if (t.has_observation()) config.think.observation = t.observation();
  if (t.has_rethin()) config.think.rethin = t.rethin();
  return absl::OkStatus();
}

absl::Status ConvertEviction(const v1::KvCompression::Eviction& e, CompressionConfig& config) {
  absl::StatusOr<EvictionPolicy> policy = memory::compress::ParseEvictionPolicy(
      e.policy().empty() ? "none" : e.policy(), "compression.eviction.policy");
  if (!policy.ok()) return policy.status();
  config.eviction = *policy;
  const char* name = EvictionPolicyName(*policy);
  if (e.has_corm() && *policy != EvictionPolicy::kCorm) {
    return Invalid("eviction.corm",
                   absl::StrCat("only eviction.policy corm takes it (policy is ", name, ")"));
  }
  if (e.has_window() && *policy != EvictionPolicy::kWindow) {
    return Invalid("eviction.window",
                   absl::StrCat("only eviction.policy window takes it (policy is ", name, ")"));
  }
  const v1::KvCompression::Eviction::Corm& corm = e.corm();
  if (corm.has_window()) config.corm.window = corm.window();
  if (corm.has_recent()) config.corm.recent = corm.recent();
  if (corm.has_alpha()) config.corm.alpha = corm.alpha();
  if (corm.has_max_tokens()) config.corm.max_tokens = corm.max_tokens();
  if (e.window().has_sinks()) config.window.sinks = e.window().sinks();
  if (e.window().has_recent()) config.window.recent = e.window().recent();
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<CompressionConfig> ToCompressionConfig(const v1::KvCompression& message) {
  CompressionConfig config;
  if (absl::Status s = ConvertSelection(message, config); !s.ok()) return s;
  if (absl::Status s = ConvertThink(message.think(), config); !s.ok()) return s;
  if (absl::Status s = ConvertEviction(message.eviction(), config); !s.ok()) return s;
  if (absl::Status s = InRequestTerms(config.Validate()); !s.ok()) return s;
  return config;
}

absl::StatusOr<CompressionConfig> RequestCompression(const v1::GenerateRequest& request,
                                                     const CompressionConfig& server_default,
                                                     int32_t prompt_tokens) {
  if (request.has_compression()) return ToCompressionConfig(request.compression());
  if (!server_default.Validate(prompt_tokens).ok()) return CompressionConfig();
  return server_default;
}

}  // namespace kvtrim::server
