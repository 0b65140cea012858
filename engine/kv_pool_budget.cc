#include "engine/kv_pool_budget.h"

#include <cmath>
#include <cstdint>

#include "absl/strings/str_format.h"

namespace kvtrim::engine {
namespace {

double Mib(size_t bytes) { return static_cast<double>(bytes) / (1 << 20); }

}  // namespace

absl::StatusOr<KvPoolSize> KvPoolWithin(const DeviceMemoryBudget& b) {
  if (!(b.utilization > 0.0 && b.utilization <= 1.0)) {
    return absl::InvalidArgumentError(
        absl::StrFormat("gpu memory utilization must be in (0, 1], got %g", b.utilization));
  }
  if (b.page_bytes == 0) return absl::InvalidArgumentError("KV pool: page size 0");
  const double share = std::floor(b.utilization * static_cast<double>(b.total));
  const double left = share - static_cast<double>(b.in_use) - static_cast<double>(b.backend);
  const double pages =
      left > 0 ? std::floor(left / static_cast<double>(b.page_bytes + b.per_page_extra)) : 0.0;
  const std::string account = absl::StrFormat(
      "%.2f of %.0f MiB = %.0f MiB, less %.0f MiB in use before start and %.0f MiB for weights, "
      "step buffers and scratch",
      b.utilization, Mib(b.total), Mib(static_cast<size_t>(share)), Mib(b.in_use), Mib(b.backend));
  if (pages < 1) {
    return absl::ResourceExhaustedError(absl::StrFormat(
        "no device memory left for a KV pool: %s leaves %.0f MiB, under one %.0f KiB page; raise "
        "--gpu-memory-utilization or give --kv-pool-mib",
        account, left / (1 << 20), static_cast<double>(b.page_bytes) / 1024));
  }
  // PagePool counts pages in int32.
  const double capped = std::fmin(pages, static_cast<double>(INT32_MAX));
  KvPoolSize size;
  size.bytes = static_cast<size_t>(capped) * b.page_bytes;
  size.account = absl::StrFormat("%s: %.0f pages of %.0f KiB", account, capped,
                                 static_cast<double>(b.page_bytes) / 1024);
  if (b.per_page_extra > 0) {
    absl::StrAppendFormat(&size.account, " (%.0f MiB more kept free for decode-time row states)",
                          Mib(static_cast<size_t>(capped) * b.per_page_extra));
  }
  return size;
}

}  // namespace kvtrim::engine
