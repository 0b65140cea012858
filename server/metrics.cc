#include "server/metrics.h"

#include <algorithm>
#include <exception>

#include "absl/strings/str_cat.h"
#include "prometheus/collectable.h"
#include "prometheus/counter.h"
#include "prometheus/exposer.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"

namespace kvtrim::server {
namespace {

using prometheus::ClientMetric;
using prometheus::MetricFamily;
using prometheus::MetricType;

MetricFamily Scalar(std::string name, std::string help, MetricType type, double value) {
  ClientMetric metric;
  if (type == MetricType::Counter) {
    metric.counter.value = value;
  } else {
    metric.gauge.value = value;
  }
  return MetricFamily{std::move(name), std::move(help), type, {metric}};
}

// Latency buckets from 5 ms to 5 min; token-count buckets by powers of two.
const prometheus::Histogram::BucketBoundaries& LatencyBuckets() {
  static const prometheus::Histogram::BucketBoundaries buckets = {
      0.005, 0.01, 0.025, 0.05, 0.075, 0.1,  0.15, 0.2,  0.3,   0.5,  0.75,
      1.0,   2.5,  5.0,   7.5,  10.0,  20.0, 30.0, 60.0, 120.0, 300.0};
  return buckets;
}

// The per-request saved ratio, 1 - stored / uncompressed. The lowest bucket (le 0) also takes the
// slightly negative ratios of short uncompressed requests (partly filled last pages).
const prometheus::Histogram::BucketBoundaries& SavedRatioBuckets() {
  static const prometheus::Histogram::BucketBoundaries buckets = {0.0, 0.1, 0.2, 0.3, 0.4,  0.5,
                                                                  0.6, 0.7, 0.8, 0.9, 0.95, 0.99};
  return buckets;
}

}  // namespace

// The registry's families plus the scheduler's state, read at scrape time.
class Metrics::ScrapeTimeCollectable : public prometheus::Collectable {
 public:
  ScrapeTimeCollectable(std::shared_ptr<prometheus::Registry> registry,
                        const engine::Scheduler* scheduler)
      : registry_(std::move(registry)), scheduler_(scheduler) {}

  std::vector<MetricFamily> Collect() const override {
    std::vector<MetricFamily> families = registry_->Collect();
    const engine::SchedulerStats s = scheduler_->stats();
    families.push_back(Scalar("kvtrim_requests_running", "Requests prefilling or decoding.",
                              MetricType::Gauge, s.running));
    families.push_back(Scalar("kvtrim_requests_waiting", "Requests queued for admission.",
                              MetricType::Gauge, s.waiting));
    families.push_back(Scalar("kvtrim_kv_pool_pages_total", "Pages in the KV pool.",
                              MetricType::Gauge, s.pages_total));
    families.push_back(Scalar("kvtrim_kv_pool_pages_used", "KV pool pages held by sequences.",
                              MetricType::Gauge, s.pages_used));
    families.push_back(Scalar("kvtrim_kv_pool_bytes_total", "Bytes of the KV pool.",
                              MetricType::Gauge,
                              static_cast<double>(s.pages_total) * s.page_bytes));
    families.push_back(Scalar("kvtrim_kv_pool_bytes_used", "KV pool bytes held by sequences.",
                              MetricType::Gauge, static_cast<double>(s.pages_used) * s.page_bytes));
    families.push_back(Scalar(
        "kvtrim_kv_cache_usage_ratio", "Fraction of KV pool pages in use.", MetricType::Gauge,
        s.pages_total ? static_cast<double>(s.pages_used) / s.pages_total : 0.0));
    families.push_back(Scalar("kvtrim_kv_bytes_stored",
                              "KV bytes resident sequences take (their pages and metadata).",
                              MetricType::Gauge, static_cast<double>(s.kv_bytes_stored)));
    families.push_back(
        Scalar("kvtrim_kv_bytes_uncompressed",
               "KV bytes an uncompressed cache of the resident sequences would take.",
               MetricType::Gauge, static_cast<double>(s.kv_bytes_full)));
    families.push_back(Scalar("kvtrim_preemptions_total",
                              "Requests preempted (freed and recomputed) for lack of pages.",
                              MetricType::Counter, static_cast<double>(s.preemptions_total)));
    families.push_back(Scalar("kvtrim_engine_steps_total", "Engine steps run.", MetricType::Counter,
                              static_cast<double>(s.steps_total)));
    families.push_back(Scalar("kvtrim_engine_forward_seconds_total",
                              "Wall time of the engine steps' forward passes (host and device).",
                              MetricType::Counter, s.forward_seconds_total));
    families.push_back(Scalar(
        "kvtrim_engine_device_seconds_total",
        "Device time of the forward passes, from the first queued operation to the last (GPU "
        "backend; 0 on the CPU reference).",
        MetricType::Counter, s.device_seconds_total));
    return families;
  }

 private:
  std::shared_ptr<prometheus::Registry> registry_;
  const engine::Scheduler* scheduler_;
};

absl::StatusOr<std::unique_ptr<Metrics>> Metrics::Create(const std::string& address,
                                                         const engine::Scheduler* scheduler) {
  std::unique_ptr<Metrics> m(new Metrics());
  m->registry_ = std::make_shared<prometheus::Registry>();
  prometheus::Registry& r = *m->registry_;
  m->finished_ = &prometheus::BuildCounter()
                      .Name("kvtrim_requests_finished_total")
                      .Help("Finished requests by finish reason.")
                      .Register(r);
  m->rejected_ = &prometheus::BuildCounter()
                      .Name("kvtrim_requests_rejected_total")
                      .Help("Requests refused before they were queued, by gRPC status code.")
                      .Register(r);
  // Every finish reason and every code the server refuses with exists at 0 from the start:
  // rate() and increase() need a sample before the first event, so a series that appeared at 1
  // would hide its first request (increase(...{reason="error"}[1h]) would show 0 after one).
  for (engine::FinishReason reason :
       {engine::FinishReason::kEos, engine::FinishReason::kStop, engine::FinishReason::kLength,
        engine::FinishReason::kCancelled, engine::FinishReason::kDeadline,
        engine::FinishReason::kError}) {
    m->finished_->Add({{"reason", engine::FinishReasonName(reason)}});
  }
  for (const char* code : {"INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
                           "UNAVAILABLE", "UNAUTHENTICATED"}) {
    m->rejected_->Add({{"code", code}});
  }
  m->prompt_tokens_ = &prometheus::BuildCounter()
                           .Name("kvtrim_prompt_tokens_total")
                           .Help("Prompt tokens of finished requests.")
                           .Register(r)
                           .Add({});
  m->generation_tokens_ = &prometheus::BuildCounter()
                               .Name("kvtrim_generation_tokens_total")
                               .Help("Tokens generated for finished requests.")
                               .Register(r)
                               .Add({});
  auto latency = [&](const char* name, const char* help) {
    return &prometheus::BuildHistogram().Name(name).Help(help).Register(r).Add({},
                                                                               LatencyBuckets());
  };
  m->time_to_first_token_ = latency("kvtrim_time_to_first_token_seconds",
                                    "Time from receiving a request to its first token.");
  m->inter_token_latency_ =
      latency("kvtrim_inter_token_latency_seconds", "Time between successive tokens of a request.");
  m->e2e_latency_ = latency("kvtrim_e2e_request_latency_seconds",
                            "Time from receiving a request to its last token.");
  m->queue_time_ =
      latency("kvtrim_request_queue_time_seconds", "Time a request waited before admission.");
  m->prompt_length_ = &prometheus::BuildHistogram()
                           .Name("kvtrim_request_prompt_tokens")
                           .Help("Prompt length of finished requests, in tokens.")
                           .Register(r)
                           .Add({}, prometheus::Histogram::BucketBoundaries{
                                        16, 64, 256, 1024, 2048, 4096, 8192, 16384, 32768});
  m->kv_saved_ratio_ =
      &prometheus::BuildHistogram()
           .Name("kvtrim_kv_saved_ratio")
           .Help("Per finished request that cached tokens: 1 - KV bytes stored / uncompressed.")
           .Register(r)
           .Add({}, SavedRatioBuckets());
  m->kv_bytes_stored_total_ =
      &prometheus::BuildCounter()
           .Name("kvtrim_request_kv_bytes_stored_total")
           .Help("KV bytes finished requests took at their end (pages and metadata).")
           .Register(r)
           .Add({});
  m->kv_bytes_saved_total_ = &prometheus::BuildCounter()
                                  .Name("kvtrim_request_kv_bytes_saved_total")
                                  .Help(
                                      "KV bytes finished requests did not take, compared with "
                                      "an uncompressed cache: max(0, uncompressed - stored).")
                                  .Register(r)
                                  .Add({});
  m->collectable_ = std::make_shared<ScrapeTimeCollectable>(m->registry_, scheduler);
  try {  // prometheus-cpp's exposer (civetweb) reports a port it cannot bind by throwing
    m->exposer_ = std::make_unique<prometheus::Exposer>(address);
  } catch (const std::exception& e) {
    return absl::UnavailableError(
        absl::StrCat("cannot serve metrics on ", address, ": ", e.what()));
  }
  m->exposer_->RegisterCollectable(m->collectable_);
  return m;
}

Metrics::~Metrics() = default;

void Metrics::RequestFinished(const engine::Finish& finish) {
  finished_->Add({{"reason", engine::FinishReasonName(finish.reason)}}).Increment();
  prompt_tokens_->Increment(finish.prompt_tokens);
  generation_tokens_->Increment(finish.completion_tokens);
  prompt_length_->Observe(finish.prompt_tokens);
  e2e_latency_->Observe(finish.timings.total_seconds);
  queue_time_->Observe(finish.timings.queue_seconds);
  if (finish.completion_tokens > 0)
    time_to_first_token_->Observe(finish.timings.first_token_seconds);
  const memory::KvBytes& kv = finish.kv_bytes;
  if (kv.full > 0) kv_saved_ratio_->Observe(kv.saved_ratio());
  kv_bytes_stored_total_->Increment(static_cast<double>(kv.stored));
  kv_bytes_saved_total_->Increment(static_cast<double>(std::max<int64_t>(0, kv.full - kv.stored)));
}

void Metrics::InterTokenLatency(double seconds) { inter_token_latency_->Observe(seconds); }

void Metrics::RequestRejected(const std::string& code) {
  rejected_->Add({{"code", code}}).Increment();
}

}  // namespace kvtrim::server
