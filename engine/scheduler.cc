// Continuous batching: see scheduler.h for the step. The engine-side containers (waiting_,
// running_) and every request's pages belong to the stepping thread; other threads only touch
// incoming_, cancelled_ and the stats snapshot, under mutex_, and no lock is held during Forward
// or while a sink runs.
#include "engine/scheduler.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <optional>
#include <string_view>
#include <tuple>
#include <utility>

#include "absl/strings/str_cat.h"
#include "engine/cpu/forward.h"
#include "engine/tokenizer/detokenizer.h"

namespace kvtrim::engine {
namespace {

// What a request or a refused submission is told once the backend's device is lost.
std::string DeviceLostMessage(const absl::Status& lost) {
  return absl::StrCat("the device failed (", lost.message(), ")");
}

// Holds back generated text that could be the start of a stop string, so that the streamed text
// never contains one nor anything after it. Text arrives as complete UTF-8 characters (from the
// Detokenizer); the held suffix starts where a stop string could start, so it starts on a
// character boundary whenever the stop strings are valid UTF-8.
class StopStringFilter {
 public:
  // Appends `text` and returns what can be streamed now. On a match, returns the text before the
  // first occurrence, drops the rest, and matched() turns true.
  std::string Add(std::string_view text, std::span<const std::string> stops) {
    held_ += text;
    if (stops.empty()) return std::exchange(held_, {});
    // An occurrence cannot start in text already released (it would have been held), so the
    // first occurrence in held_ is the first in the generated text.
    size_t first = std::string::npos;
    for (const std::string& stop : stops) first = std::min(first, held_.find(stop));
    if (first != std::string::npos) {
      matched_ = true;
      std::string before = held_.substr(0, first);
      held_.clear();
      return before;
    }
    // Keep the longest suffix of held_ that is a proper prefix of some stop string.
    size_t keep_from = held_.size();
    for (const std::string& stop : stops) {
      for (size_t k = std::min(stop.size() - 1, held_.size()); k > 0; --k) {
        if (std::string_view(held_).ends_with(std::string_view(stop).substr(0, k))) {
          keep_from = std::min(keep_from, held_.size() - k);
          break;
        }
      }
    }
    std::string released = held_.substr(0, keep_from);
    held_.erase(0, keep_from);
    return released;
  }

  std::string Flush() { return std::exchange(held_, {}); }
  bool matched() const { return matched_; }

 private:
  std::string held_;
  bool matched_ = false;
};

double Seconds(std::chrono::steady_clock::duration d) {
  return std::chrono::duration<double>(d).count();
}

// Log-softmax of the raw logits (before penalty and temperature) for the sampled token and the
// `top_n` most likely ones, most likely first (lower id first on ties).
void FillLogprobs(std::span<const float> raw, int32_t sampled, int32_t top_n, TokenOutput& out) {
  const float max_logit = *std::max_element(raw.begin(), raw.end());
  double sum = 0.0;
  for (float logit : raw) sum += std::exp(static_cast<double>(logit) - max_logit);
  const double log_normalizer = max_logit + std::log(sum);
  out.logprob = static_cast<float>(raw[sampled] - log_normalizer);
  if (top_n <= 0) return;
  std::vector<int32_t> ids(raw.size());
  std::iota(ids.begin(), ids.end(), 0);
  const size_t n = std::min(static_cast<size_t>(top_n), ids.size());
  std::partial_sort(ids.begin(), ids.begin() + n, ids.end(), [&](int32_t a, int32_t b) {
    return raw[a] > raw[b] || (raw[a] == raw[b] && a < b);
  });
  out.top_logprobs.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    out.top_logprobs.emplace_back(ids[i], static_cast<float>(raw[ids[i]] - log_normalizer));
  }
}

}  // namespace

struct Scheduler::Active {
  Active(GenerationRequest r, std::shared_ptr<RequestSink> s, const Tokenizer* tokenizer,
         memory::SequenceKv empty_kv)
      : request(std::move(r)),
        sink(std::move(s)),
        sampler(request.sampling),
        detokenizer(tokenizer, /*skip_special=*/true),
        prompt_tokens(static_cast<int32_t>(request.prompt.size())),
        tokens(std::move(request.prompt)),
        kv(std::move(empty_kv)),
        submitted(Clock::now()) {}

  uint64_t handle = 0;
  GenerationRequest request;  // prompt moved into `tokens`
  std::shared_ptr<RequestSink> sink;
  Sampler sampler;  // its RNG state survives preemption
  // The draw a launched step took from the sampler, until the launch succeeds: a step that runs
  // again after a failed launch draws what it would have drawn.
  std::optional<uint64_t> pending_draw;
  Detokenizer detokenizer;
  StopStringFilter stop_filter;
  int32_t prompt_tokens;
  // The prompt, then the generated tokens (eos excluded): (prompt_tokens + completion_tokens).
  // A request feeds tokens[kv.cached_tokens(), size()): the prompt at first, all of it again
  // after a preemption, the last sampled token while decoding.
  std::vector<int32_t> tokens;
  int32_t completion_tokens = 0;
  memory::SequenceKv kv;
  RequestState state = RequestState::kQueued;
  int32_t preemptions = 0;
  Clock::time_point submitted;
  Clock::time_point admitted;        // first admission; epoch until then
  Clock::time_point first_token;     // first sampled token; epoch until then
  std::vector<TokenOutput> outputs;  // this step's, published at its end
  // Under a repetition penalty, the distinct ids of tokens[0, penalized_upto), first seen first,
  // for the backend that samples the row (SequenceStep::penalized); `seen` is (vocab_size).
  std::vector<int32_t> penalized;
  std::vector<bool> seen;
  size_t penalized_upto = 0;
  std::optional<FinishReason> finish_reason;  // set when it ends; retired at the end of the step
  std::string error;
  absl::StatusCode error_code = absl::StatusCode::kOk;  // Finish::error_code
  // It has a row in the step in flight (Scheduler::in_flight_); retired only once that step is
  // collected. in_flight_row >= 0: that row wants logits, and its token is not on the host yet;
  // the next decode feeds previous_token = PreviousToken(in_flight_row) instead.
  bool in_flight = false;
  int32_t in_flight_row = -1;
  int32_t previous_token = 0;
  // Its KV cache when its pages were freed while it had a step in flight (preempted before that
  // step was collected): what it ended with, if that step's token ends it.
  std::optional<std::pair<memory::KvBytes, memory::KvLayout>> kv_at_end;
};

struct Scheduler::Flight {
  std::vector<Active*> requests;  // every request with a row in the step
  std::vector<Active*> rows;      // those of the rows wanting logits, in the step's order
  std::vector<bool> token_only;   // per such row: the backend chose its token
};

struct Scheduler::Planned {
  Active* request;
  int32_t n_tokens;  // fed from tokens[kv.cached_tokens()]
  bool want_logits;  // the chunk reaches the end of `tokens`: sample the next token
};

absl::StatusOr<std::unique_ptr<Scheduler>> Scheduler::Create(const Model* model,
                                                             const Tokenizer* tokenizer,
                                                             const SchedulerOptions& options,
                                                             const BackendFactory& make_backend) {
  if (options.max_running <= 0 || options.max_queued < 0) {
    return absl::InvalidArgumentError(absl::StrCat("max_running must be positive (got ",
                                                   options.max_running, ") and max_queued >= 0 (",
                                                   options.max_queued, ")"));
  }
  if (options.step_tokens < options.max_running) {
    return absl::InvalidArgumentError(
        absl::StrCat("step_tokens (", options.step_tokens, ") must be at least max_running (",
                     options.max_running, "): every running request decodes once per step"));
  }
  const ModelConfig& c = model->config;
  const memory::KvShape shape{c.n_layers, c.n_kv_heads, c.head_dim, options.kv_element_bytes};
  const size_t page_bytes =
      options.page_bytes != 0 ? options.page_bytes : shape.default_page_bytes();
  const size_t pages = options.pool_bytes / page_bytes;
  if (pages == 0 || pages > INT32_MAX) {
    return absl::InvalidArgumentError(absl::StrCat(
        "a KV pool of ", options.pool_bytes, " bytes cannot hold pages of ", page_bytes, " bytes"));
  }
  std::unique_ptr<Scheduler> scheduler(new Scheduler(model, tokenizer, options));
  scheduler->options_.page_bytes = page_bytes;
  absl::StatusOr<memory::PagePool> pool =
      memory::PagePool::Create(page_bytes, static_cast<int32_t>(pages), options.kv_storage);
  if (!pool.ok()) return pool.status();
  scheduler->pool_ = std::make_unique<memory::PagePool>(*std::move(pool));
  absl::StatusOr<memory::KvCache> cache = memory::KvCache::Create(scheduler->pool_.get(), shape);
  if (!cache.ok()) return cache.status();
  scheduler->cache_ = std::make_unique<memory::KvCache>(*std::move(cache));
  if (make_backend) {
    absl::StatusOr<std::unique_ptr<Backend>> backend = make_backend(model, scheduler->cache_.get());
    if (!backend.ok()) return backend.status();
    scheduler->backend_ = *std::move(backend);
  } else {
    if (options.kv_storage != memory::PageStorage::kHost) {
      return absl::InvalidArgumentError("the CPU backend needs its KV pages in host memory");
    }
    absl::StatusOr<std::unique_ptr<CpuBackend>> backend =
        CpuBackend::Create(model, scheduler->cache_.get());
    if (!backend.ok()) return backend.status();
    scheduler->backend_ = *std::move(backend);
  }
  scheduler->PublishStats();
  return scheduler;
}

Scheduler::Scheduler(const Model* model, const Tokenizer* tokenizer,
                     const SchedulerOptions& options)
    : model_(*model), tokenizer_(*tokenizer), options_(options) {}

Scheduler::~Scheduler() { Stop(); }

absl::Status Scheduler::Validate(const GenerationRequest& r) const {
  const int32_t vocab = model_.config.vocab_size;
  if (r.prompt.empty()) return absl::InvalidArgumentError("prompt: empty");
  if (static_cast<int64_t>(r.prompt.size()) > model_.config.max_context) {
    return absl::InvalidArgumentError(absl::StrCat("prompt: ", r.prompt.size(),
                                                   " tokens exceed the model's context of ",
                                                   model_.config.max_context));
  }
  for (size_t i = 0; i < r.prompt.size(); ++i) {
    if (r.prompt[i] < 0 || r.prompt[i] >= vocab) {
      return absl::InvalidArgumentError(absl::StrCat(
          "prompt: token id ", r.prompt[i], " at position ", i, " is outside [0, ", vocab, ")"));
    }
  }
  if (absl::Status s = ValidateSamplingParams(r.sampling); !s.ok()) return s;
  if (r.max_tokens < 0) {
    return absl::InvalidArgumentError(absl::StrCat("max_tokens: must be >= 0, got ", r.max_tokens));
  }
  for (size_t i = 0; i < r.stop_ids.size(); ++i) {
    if (r.stop_ids[i] < 0 || r.stop_ids[i] >= vocab) {
      return absl::InvalidArgumentError(absl::StrCat(
          "stop_ids: token id ", r.stop_ids[i], " at index ", i, " is outside [0, ", vocab, ")"));
    }
  }
  for (size_t i = 0; i < r.stop_strings.size(); ++i) {
    if (r.stop_strings[i].empty()) {
      return absl::InvalidArgumentError(absl::StrCat("stop_strings: entry ", i, " is empty"));
    }
  }
  if (r.top_logprobs < 0 || r.top_logprobs > kMaxTopLogprobs) {
    return absl::InvalidArgumentError(
        absl::StrCat("top_logprobs: must be in [0, ", kMaxTopLogprobs, "], got ", r.top_logprobs));
  }
  if (r.compression.enabled()) {
    if (absl::Status s = CompressionSupport(r.compression); !s.ok()) return s;
    const absl::Status s = r.compression.Validate(static_cast<int32_t>(r.prompt.size()));
    if (!s.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("compression.", std::string(s.message())));
    }
  }
  return absl::OkStatus();
}

absl::Status Scheduler::CompressionSupport(
    const memory::compress::CompressionConfig& compression) const {
  if (!options_.decode_eviction &&
      compression.eviction != memory::compress::EvictionPolicy::kNone) {
    return absl::FailedPreconditionError(absl::StrCat(
        "compression: eviction=", memory::compress::EvictionPolicyName(compression.eviction),
        ": decode-time eviction is off on this server (--decode-eviction=false)"));
  }
  if (absl::Status s = backend_->SupportsCompression(compression); !s.ok()) return s;
  if (model_.config.sliding_window > 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "compression: not supported for ", model_.config.name, " (sliding-window attention)"));
  }
  return absl::OkStatus();
}

absl::StatusOr<uint64_t> Scheduler::Submit(GenerationRequest request,
                                           std::shared_ptr<RequestSink> sink) {
  if (sink == nullptr) return absl::InvalidArgumentError("sink: null");
  if (absl::Status s = Validate(request); !s.ok()) return s;
  // PagesFor and total_pages depend only on the shape and the pool size: safe off the engine.
  const int32_t prompt_tokens = static_cast<int32_t>(request.prompt.size());
  const int32_t pages = PromptPages(request.compression, prompt_tokens);
  if (pages > pool_->total_pages()) {
    return absl::ResourceExhaustedError(
        absl::StrCat("prompt: ", prompt_tokens, " tokens (plus one generated) need ", pages,
                     " KV pages, the pool has ", pool_->total_pages()));
  }
  auto active = std::make_unique<Active>(std::move(request), std::move(sink), &tokenizer_,
                                         cache_->NewSequence());
  std::lock_guard<std::mutex> lock(mutex_);
  if (!device_lost_.ok()) {
    return absl::UnavailableError(
        absl::StrCat(DeviceLostMessage(device_lost_), "; this server takes no more requests"));
  }
  const int64_t waiting = static_cast<int64_t>(incoming_.size()) + engine_waiting_;
  if (waiting >= options_.max_queued) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "queue full: ", waiting, " requests are waiting (max_queued ", options_.max_queued, ")"));
  }
  active->handle = next_handle_++;
  const uint64_t handle = active->handle;
  incoming_.push_back(std::move(active));
  work_.notify_one();
  return handle;
}

void Scheduler::Cancel(uint64_t handle) {
  std::lock_guard<std::mutex> lock(mutex_);
  cancelled_.push_back(handle);
  work_.notify_one();
}

std::vector<uint64_t> Scheduler::TakeIncoming() {
  std::vector<uint64_t> cancelled;
  std::lock_guard<std::mutex> lock(mutex_);
  for (std::unique_ptr<Active>& request : incoming_) waiting_.push_back(std::move(request));
  incoming_.clear();
  cancelled.swap(cancelled_);
  engine_waiting_ = static_cast<int32_t>(waiting_.size());
  // Until the step that takes them publishes its stats, requests taken in count as waiting
  // (not as nothing at all).
  snapshot_.waiting = engine_waiting_;
  return cancelled;
}

void Scheduler::ExpireRequests(std::span<const uint64_t> cancelled) {
  const Clock::time_point now = Clock::now();
  auto expire = [&](Active& r) {
    if (r.finish_reason) return;
    if (std::find(cancelled.begin(), cancelled.end(), r.handle) != cancelled.end()) {
      r.finish_reason = FinishReason::kCancelled;
    } else if (now >= r.request.deadline) {
      r.finish_reason = FinishReason::kDeadline;
    } else if (r.state == RequestState::kQueued && r.completion_tokens == 0 &&
               (r.request.max_tokens == 0 ||
                static_cast<int64_t>(r.tokens.size()) >= model_.config.max_context)) {
      r.finish_reason = FinishReason::kLength;  // nothing to generate: no prefill either
    }
  };
  for (std::unique_ptr<Active>& r : running_) expire(*r);
  for (std::unique_ptr<Active>& r : waiting_) expire(*r);
}

bool Scheduler::Step() {
  const std::vector<uint64_t> cancelled = TakeIncoming();
  if (absl::Status lost = health(); !lost.ok()) {
    FailAll(lost);
    PublishStats();
    return false;
  }
  if (running_.empty() && waiting_.empty()) {
    PublishStats();
    return false;
  }
  ExpireRequests(cancelled);
  Publish();  // frees the pages of what ended before planning with them
  std::vector<Planned> plan;
  int32_t budget = options_.step_tokens;
  const bool preempted = PlanDecodes(plan, budget);
  PlanPrefills(plan, budget, /*admit=*/!preempted);
  Execute(plan);
  Publish();
  ++steps_total_;
  if (absl::Status lost = health(); !lost.ok()) FailAll(lost);
  PublishStats();
  return true;
}

absl::Status Scheduler::health() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return device_lost_;
}

void Scheduler::CheckDevice() { RecordDeviceLoss(backend_->DeviceStatus()); }

void Scheduler::RecordDeviceLoss(absl::Status status) {
  if (status.ok()) return;
  std::lock_guard<std::mutex> lock(mutex_);
  if (device_lost_.ok()) device_lost_ = std::move(status);
}

void Scheduler::Fail(Active& r, const absl::Status& status) {
  r.finish_reason = FinishReason::kError;
  r.error = std::string(status.message());
  r.error_code = status.ok() ? absl::StatusCode::kInternal : status.code();
}

absl::Status Scheduler::StepFailure(const absl::Status& status) const {
  if (health().ok()) return status;
  return absl::UnavailableError(status.message());  // the device failed for good
}

void Scheduler::FailAll(const absl::Status& lost) {
  if (in_flight_ != nullptr) {
    const std::unique_ptr<Flight> previous = std::move(in_flight_);
    TakeTokens(*previous);
  }
  const std::string error =
      absl::StrCat(DeviceLostMessage(lost), "; this server runs no more requests");
  const auto fail = [&](auto& requests) {
    for (std::unique_ptr<Active>& r : requests) {
      if (!r->finish_reason) Fail(*r, absl::UnavailableError(error));
    }
  };
  fail(running_);
  fail(waiting_);
  Publish();
}

int32_t Scheduler::PromptPages(const memory::compress::CompressionConfig& compression,
                               int32_t tokens) const {
  if (!compression.enabled()) return cache_->PagesFor(tokens + 1);
  const ModelConfig& c = model_.config;
  return cache_->PagesFor(memory::compress::PlanPrompt(compression, tokens, c.n_layers, c.head_dim),
                          /*extra_rows=*/1);
}

bool Scheduler::ReservePrompt(Active& r) {
  const int32_t tokens = static_cast<int32_t>(r.tokens.size());
  if (!r.request.compression.enabled()) return cache_->Reserve(r.kv, tokens + 1);
  const ModelConfig& c = model_.config;
  return cache_->ReserveCompressed(
      r.kv, memory::compress::PlanPrompt(r.request.compression, tokens, c.n_layers, c.head_dim),
      /*extra_rows=*/1);
}

bool Scheduler::PlanDecodes(std::vector<Planned>& plan, int32_t& budget) {
  // Oldest first, so that page shortage preempts from the young end, which is not planned yet.
  bool preempted = false;
  for (size_t i = 0; i < running_.size(); ++i) {
    Active& r = *running_[i];
    if (r.state != RequestState::kDecode || r.finish_reason) continue;
    // Its token still in flight takes it to max_tokens or the context: it ends there.
    if (r.in_flight_row >= 0 &&
        (r.completion_tokens + 1 >= r.request.max_tokens ||
         static_cast<int64_t>(r.tokens.size()) + 1 >= model_.config.max_context)) {
      continue;
    }
    bool preempted_self = false;
    while (!cache_->Reserve(r.kv, 1)) {
      if (running_.size() == 1) {
        // Alone and still out of pages: the pool cannot hold a longer sequence.
        r.finish_reason = FinishReason::kLength;
        break;
      }
      std::unique_ptr<Active> victim = std::move(running_.back());
      running_.pop_back();
      preempted_self = victim.get() == &r;
      Preempt(std::move(victim));
      preempted = true;
      if (preempted_self) break;
    }
    if (preempted_self || r.finish_reason) continue;
    plan.push_back({&r, 1, true});
    --budget;
  }
  return preempted;
}

void Scheduler::Preempt(std::unique_ptr<Active> request) {
  if (request->in_flight) {
    request->kv_at_end.emplace(cache_->Bytes(request->kv), cache_->Layout(request->kv));
  }
  if (!request->finish_reason) {  // else it stopped while its last step ran: no preemption
    ++request->preemptions;
    ++preemptions_total_;
  }
  cache_->Release(request->kv);
  request->state = RequestState::kQueued;
  waiting_.push_front(std::move(request));
}

void Scheduler::PlanPrefills(std::vector<Planned>& plan, int32_t& budget, bool admit) {
  bool planned_prompt = false;  // some prefill is in this step already
  auto plan_chunk = [&](Active& r) {
    const int32_t remaining = static_cast<int32_t>(r.tokens.size()) - r.kv.cached_tokens();
    // A compressed prompt is never chunked: its layers are scored over the whole prompt.
    const int32_t n = r.request.compression.enabled() ? remaining : std::min(remaining, budget);
    plan.push_back({&r, n, n == remaining});
    budget = std::max(0, budget - n);
    planned_prompt = true;
  };
  // Prompts already being prefilled go on first, oldest first. step_tokens >= max_running leaves
  // at least one token of budget for the oldest of them.
  for (std::unique_ptr<Active>& r : running_) {
    if (budget == 0) return;
    if (r->state == RequestState::kPrefill) plan_chunk(*r);
  }
  if (!admit) return;
  // Admission in FIFO order; the head is never skipped. The pages of the whole prompt (plus the
  // first generated token) are reserved now, so a chunked prefill cannot run out halfway.
  while (budget > 0 && !waiting_.empty() &&
         static_cast<int32_t>(running_.size()) < options_.max_running) {
    Active& head = *waiting_.front();
    // A compressed prompt takes the rest of the step's budget, or a step of its own.
    if (head.request.compression.enabled() && planned_prompt &&
        static_cast<int32_t>(head.tokens.size()) > budget) {
      return;
    }
    if (head.request.compression.enabled()) {
      if (absl::Status s = backend_->Prepare(head.request.compression); !s.ok()) {
        Fail(head, s);
        return;
      }
    }
    if (!ReservePrompt(head)) {
      // With nothing running every page is free: only a preempted request that outgrew the
      // whole pool can fail here.
      if (running_.empty()) head.finish_reason = FinishReason::kLength;
      return;
    }
    if (head.admitted == Clock::time_point{}) head.admitted = Clock::now();
    head.kv_at_end.reset();
    head.state = RequestState::kPrefill;
    running_.push_back(std::move(waiting_.front()));
    waiting_.pop_front();
    plan_chunk(head);
  }
}

void Scheduler::Execute(std::span<const Planned> plan) {
  // A row's token is chosen by the backend unless the request wants log-probabilities: greedy
  // rows by their argmax, the others by SampleTempered with the request's next draw.
  std::vector<SequenceStep> steps;
  steps.reserve(plan.size());
  bool may_stay = options_.overlap;  // every row's next token can be fed from the device
  for (const Planned& p : plan) {
    Active& r = *p.request;
    std::span<const int32_t> tokens = std::span(r.tokens).subspan(r.kv.cached_tokens(), p.n_tokens);
    if (r.in_flight_row >= 0) {
      r.previous_token = PreviousToken(r.in_flight_row);
      tokens = std::span(&r.previous_token, 1);
    }
    SequenceStep& step = steps.emplace_back(SequenceStep{
        .kv = &r.kv,
        .tokens = tokens,
        .want_logits = p.want_logits,
        .compression = r.request.compression.enabled() ? &r.request.compression : nullptr});
    if (!p.want_logits) continue;
    if (r.request.want_logprobs || r.request.top_logprobs > 0) {
      may_stay = false;
      continue;
    }
    if (r.sampler.greedy()) {
      step.argmax_only = true;
    } else {
      step.sampling = &r.request.sampling;
      if (!r.pending_draw) r.pending_draw = r.sampler.NextDraw();
      step.draw = *r.pending_draw;
      if (r.request.sampling.repetition_penalty != 1.0f) {
        step.penalized = Penalized(r);
        may_stay = false;
      }
    }
  }
  absl::StatusOr<bool> launched = false;
  if (!plan.empty()) {
    const Clock::time_point began = Clock::now();
    launched = backend_->Launch(steps, may_stay);
    forward_seconds_total_ += Seconds(Clock::now() - began);
  }
  if (launched.ok()) {
    for (const Planned& p : plan) p.request->pending_draw.reset();
  } else {
    CheckDevice();
    if (plan.size() > 1 && launched.status().code() == absl::StatusCode::kResourceExhausted &&
        health().ok()) {
      // Nothing of the step ran (say, there was no device memory for one request's scratch):
      // its requests run again one at a time, after the step in flight, so that only one that
      // fails alone ends with the error.
      if (in_flight_ != nullptr) {
        const std::unique_ptr<Flight> previous = std::move(in_flight_);
        TakeTokens(*previous);
      }
      for (const Planned& p : plan) {
        if (!p.request->finish_reason) Execute({&p, 1});
      }
      return;
    }
    for (const Planned& p : plan) {
      if (!p.request->finish_reason) Fail(*p.request, StepFailure(launched.status()));
    }
  }
  // The step before, if it stayed in flight: its tokens now, while the device runs this one.
  if (in_flight_ != nullptr) {
    const std::unique_ptr<Flight> previous = std::move(in_flight_);
    TakeTokens(*previous);
  }
  if (!launched.ok() || plan.empty()) return;
  auto flight = std::make_unique<Flight>();
  for (size_t i = 0; i < plan.size(); ++i) {
    Active& r = *plan[i].request;
    flight->requests.push_back(&r);
    if (!steps[i].want_logits) continue;
    if (*launched) r.in_flight_row = static_cast<int32_t>(flight->rows.size());
    r.state = RequestState::kDecode;
    flight->rows.push_back(&r);
    flight->token_only.push_back(steps[i].token_only());
  }
  if (*launched) {
    for (Active* r : flight->requests) r->in_flight = true;
    in_flight_ = std::move(flight);
  } else {
    TakeTokens(*flight);
  }
}

void Scheduler::TakeTokens(Flight& flight) {
  const Clock::time_point began = Clock::now();
  const absl::Status status = backend_->Collect(output_);
  forward_seconds_total_ += Seconds(Clock::now() - began);
  if (const std::optional<StepProfile> profile = backend_->LastStepProfile(); profile) {
    device_seconds_total_ += profile->device_ms * 1e-3;
  }
  for (Active* r : flight.requests) {
    r->in_flight = false;
    r->in_flight_row = -1;
  }
  if (!status.ok()) {
    CheckDevice();
    for (Active* r : flight.requests) {
      if (!r->finish_reason) Fail(*r, StepFailure(status));
    }
    return;
  }
  // The backend's tokens are taken as they are; every other row (log-probabilities wanted) is
  // sampled on its own thread (its sampler, tokens and logits row are its own; a row over a 128k
  // vocabulary takes milliseconds on one core), then the tokens are taken in order.
  struct Row {
    Active* request;
    int64_t logits_row;  // -1: the backend's token
    int32_t token;
  };
  std::vector<Row> rows;
  size_t logits_rows = 0, tokens = 0;
  for (size_t i = 0; i < flight.rows.size(); ++i) {
    if (flight.token_only[i]) {
      rows.push_back({flight.rows[i], -1, output_.tokens[tokens++]});
    } else {
      rows.push_back({flight.rows[i], static_cast<int64_t>(logits_rows++), 0});
    }
  }
  const size_t vocab = static_cast<size_t>(model_.config.vocab_size);
  std::vector<TokenOutput> sampled(rows.size());
#pragma omp parallel for schedule(static) if (logits_rows > 1)
  for (size_t i = 0; i < rows.size(); ++i) {
    if (rows[i].logits_row < 0) {
      sampled[i].id = rows[i].token;
    } else {
      sampled[i] = Sample(*rows[i].request,
                          std::span(output_.logits).subspan(rows[i].logits_row * vocab, vocab));
    }
  }
  // A request that ended while this step ran (it stopped in the step before, or was cancelled)
  // drops its token.
  for (size_t i = 0; i < rows.size(); ++i) {
    if (!rows[i].request->finish_reason) Accept(*rows[i].request, std::move(sampled[i]));
  }
}

std::span<const int32_t> Scheduler::Penalized(Active& r) const {
  r.seen.resize(static_cast<size_t>(model_.config.vocab_size));
  AddDistinctIds(std::span(r.tokens).subspan(r.penalized_upto), r.seen, r.penalized);
  r.penalized_upto = r.tokens.size();
  return r.penalized;
}

// The next token from `logits` (vocab_size, modified in place), with its log-probabilities when
// asked for.
TokenOutput Scheduler::Sample(Active& r, std::span<float> logits) {
  const GenerationRequest& q = r.request;
  std::vector<float> raw;
  if (q.want_logprobs || q.top_logprobs > 0) raw.assign(logits.begin(), logits.end());
  TokenOutput out;
  out.id = r.sampler.Sample(logits, r.tokens);
  if (!raw.empty()) FillLogprobs(raw, out.id, q.top_logprobs, out);
  return out;
}

// Takes the sampled token `out` and applies the stop rules.
void Scheduler::Accept(Active& r, TokenOutput out) {
  const GenerationRequest& q = r.request;
  const int32_t id = out.id;
  if (r.first_token == Clock::time_point{}) r.first_token = Clock::now();
  if (id == model_.tokenizer.eos_id && !q.ignore_eos) {
    r.finish_reason = FinishReason::kEos;
    return;
  }
  r.tokens.push_back(id);
  ++r.completion_tokens;
  if (std::find(q.stop_ids.begin(), q.stop_ids.end(), id) != q.stop_ids.end()) {
    r.finish_reason = FinishReason::kStop;  // streamed as an id; its text is not part of the output
  } else {
    out.text = r.stop_filter.Add(r.detokenizer.Add(id), q.stop_strings);
    if (r.stop_filter.matched()) r.finish_reason = FinishReason::kStop;
  }
  r.outputs.push_back(std::move(out));
  if (!r.finish_reason && (r.completion_tokens >= q.max_tokens ||
                           static_cast<int64_t>(r.tokens.size()) >= model_.config.max_context)) {
    r.finish_reason = FinishReason::kLength;
  }
}

void Scheduler::Publish() {
  auto publish = [&](auto& requests) {
    for (std::unique_ptr<Active>& r : requests) {
      if (!r->outputs.empty()) r->sink->OnTokens(std::exchange(r->outputs, {}));
      if (r->finish_reason && !r->in_flight) Retire(*r);
    }
    std::erase_if(requests, [](const std::unique_ptr<Active>& r) {
      return r->state == RequestState::kFinished;
    });
  };
  publish(running_);
  publish(waiting_);
}

void Scheduler::Retire(Active& r) {
  const Clock::time_point now = Clock::now();
  Finish finish;
  finish.reason = *r.finish_reason;
  finish.error = std::move(r.error);
  finish.error_code = r.error_code;
  if (!r.stop_filter.matched()) finish.text = r.stop_filter.Flush() + r.detokenizer.Finish();
  finish.prompt_tokens = r.prompt_tokens;
  finish.completion_tokens = r.completion_tokens;
  const bool admitted = r.admitted != Clock::time_point{};
  finish.timings.queue_seconds = Seconds((admitted ? r.admitted : now) - r.submitted);
  if (r.first_token != Clock::time_point{}) {
    finish.timings.first_token_seconds = Seconds(r.first_token - r.submitted);
  }
  finish.timings.total_seconds = Seconds(now - r.submitted);
  if (r.kv_at_end) {
    std::tie(finish.kv_bytes, finish.kv_layout) = *r.kv_at_end;
  } else {
    finish.kv_bytes = cache_->Bytes(r.kv);
    finish.kv_layout = cache_->Layout(r.kv);
  }
  finish.preemptions = r.preemptions;
  cache_->Release(r.kv);
  r.state = RequestState::kFinished;
  r.sink->OnFinish(finish);
}

void Scheduler::PublishStats() {
  SchedulerStats stats;
  stats.running = static_cast<int32_t>(running_.size());
  stats.waiting = static_cast<int32_t>(waiting_.size());
  stats.pages_total = pool_->total_pages();
  stats.pages_used = pool_->used_pages();
  stats.page_bytes = static_cast<int64_t>(pool_->page_bytes());
  for (const std::unique_ptr<Active>& r : running_) {
    const memory::KvBytes bytes = cache_->Bytes(r->kv);
    stats.kv_bytes_stored += bytes.stored;
    stats.kv_bytes_full += bytes.full;
  }
  stats.preemptions_total = preemptions_total_;
  stats.steps_total = steps_total_;
  stats.forward_seconds_total = forward_seconds_total_;
  stats.device_seconds_total = device_seconds_total_;
  std::lock_guard<std::mutex> lock(mutex_);
  snapshot_ = stats;
  engine_waiting_ = stats.waiting;
}

SchedulerStats Scheduler::stats() const {
  std::lock_guard<std::mutex> lock(mutex_);
  SchedulerStats stats = snapshot_;
  stats.waiting += static_cast<int32_t>(incoming_.size());
  return stats;
}

const memory::PagePool& Scheduler::pool() const { return *pool_; }

void Scheduler::RunUntilIdle() {
  while (Step()) {
  }
}

void Scheduler::EngineLoop() {
  // A step or an idle probe, timed for busy_for: a device that does not respond holds either.
  const auto timed = [&](auto&& run) {
    step_began_.store(std::max<Clock::rep>(Clock::now().time_since_epoch().count(), 1));
    run();
    step_began_.store(0);
  };
  while (true) {
    {
      std::unique_lock<std::mutex> lock(mutex_);
      // running_ and waiting_ belong to this thread; reading them here is safe.
      const auto has_work = [&] {
        return stop_requested_ || !incoming_.empty() || !cancelled_.empty() || !running_.empty() ||
               !waiting_.empty();
      };
      bool idle = false;
      if (options_.idle_device_check.count() <= 0 || !device_lost_.ok()) {
        work_.wait(lock, has_work);
      } else {
        idle = !work_.wait_for(lock, options_.idle_device_check, has_work);
      }
      if (stop_requested_) return;
      if (idle) {
        lock.unlock();
        // A loss shows in health(), and the next Submit is refused.
        timed([&] { RecordDeviceLoss(backend_->Probe()); });
        continue;
      }
    }
    timed([&] { Step(); });
  }
}

std::chrono::steady_clock::duration Scheduler::busy_for() const {
  const Clock::rep began = step_began_.load();
  if (began == 0) return Clock::duration::zero();
  return std::max(Clock::now().time_since_epoch() - Clock::duration(began),
                  Clock::duration::zero());
}

void Scheduler::Start() {
  if (thread_.joinable()) return;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_requested_ = false;
  }
  thread_ = std::thread([this] { EngineLoop(); });
}

void Scheduler::Stop() {
  if (thread_.joinable()) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_requested_ = true;
    }
    work_.notify_all();
    thread_.join();
  }
  if (cache_ == nullptr) return;  // Create failed before the pool and cache were built
  if (in_flight_ != nullptr) {
    const std::unique_ptr<Flight> last = std::move(in_flight_);
    TakeTokens(*last);
  }
  TakeIncoming();
  for (std::unique_ptr<Active>& r : running_) {
    if (!r->finish_reason) r->finish_reason = FinishReason::kCancelled;
  }
  for (std::unique_ptr<Active>& r : waiting_) {
    if (!r->finish_reason) r->finish_reason = FinishReason::kCancelled;
  }
  Publish();
  PublishStats();
}

}  // namespace kvtrim::engine
