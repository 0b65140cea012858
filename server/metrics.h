// Prometheus metrics on --metrics-port (/metrics). Names follow Prometheus conventions with the
// kvtrim_ prefix: base units, _total counters, _seconds and _bytes suffixes; vLLM's serving set
// (running, waiting, KV usage, TTFT, ITL, e2e, queue time, tokens) as the floor.
//
// Counters and histograms are updated as requests finish; gauges (requests, pool pages and
// bytes) are read from the scheduler at scrape time, so they are never stale.
//
// Compression: kvtrim_kv_saved_ratio (histogram, per request), kvtrim_request_kv_bytes_stored_total
// and kvtrim_request_kv_bytes_saved_total (per finished request); resident sequences' pool bytes
// (kvtrim_kv_pool_bytes_used) against their uncompressed equivalent (kvtrim_kv_bytes_uncompressed).
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "engine/request.h"
#include "engine/scheduler.h"

namespace prometheus {
class Exposer;
class Registry;
class Counter;
class Histogram;
template <typename T>
class Family;
}  // namespace prometheus

namespace kvtrim::server {

class Metrics {
 public:
  // Serves /metrics on `address` ("0.0.0.0:9090"); the scheduler must outlive the metrics.
  static absl::StatusOr<std::unique_ptr<Metrics>> Create(const std::string& address,
                                                         const engine::Scheduler* scheduler);
  ~Metrics();

  // Thread-safe.
  void RequestFinished(const engine::Finish& finish);
  void InterTokenLatency(double seconds);
  // A request refused before it was queued; `code` is the gRPC status code name.
  void RequestRejected(const std::string& code);

 private:
  class ScrapeTimeCollectable;
  Metrics() = default;

  std::shared_ptr<prometheus::Registry> registry_;
  std::shared_ptr<ScrapeTimeCollectable> collectable_;
  std::unique_ptr<prometheus::Exposer> exposer_;
  prometheus::Family<prometheus::Counter>* finished_ = nullptr;
  prometheus::Family<prometheus::Counter>* rejected_ = nullptr;
  prometheus::Counter* prompt_tokens_ = nullptr;
  prometheus::Counter* generation_tokens_ = nullptr;
  prometheus::Histogram* time_to_first_token_ = nullptr;
  prometheus::Histogram* inter_token_latency_ = nullptr;
  prometheus::Histogram* e2e_latency_ = nullptr;
  prometheus::Histogram* queue_time_ = nullptr;
  prometheus::Histogram* prompt_length_ = nullptr;
  prometheus::Histogram* kv_saved_ratio_ = nullptr;
  prometheus::Counter* kv_bytes_stored_total_ = nullptr;
  prometheus::Counter* kv_bytes_saved_total_ = nullptr;
};

}  // namespace kvtrim::server
