// The KV pool a server gets when it leaves the size to the device (kvtrim-server --kv-pool-mib 0,
// as vLLM's --gpu-memory-utilization): what is left of a share of the device's memory once the
// memory already in use and the backend's own allocations are counted.
#pragma once

#include <cstddef>
#include <string>

#include "absl/status/statusor.h"

namespace kvtrim::engine {

struct DeviceMemoryBudget {
  size_t total = 0;   // the device's memory
  size_t in_use = 0;  // held before the backend starts: other processes, this one's context
  // What the backend holds besides the pool's pages: weights, step buffers, scratch.
  size_t backend = 0;
  size_t page_bytes = 0;      // one pool page
  size_t per_page_extra = 0;  // device bytes the backend may add per pool page (row states)
  double utilization = 0.9;   // the share of `total` this process may hold, in (0, 1]
};

struct KvPoolSize {
  size_t bytes = 0;     // a whole number of pages
  std::string account;  // the arithmetic, for the server's log
};

// floor((utilization * total - in_use - backend) / (page_bytes + per_page_extra)) pages.
// INVALID_ARGUMENT for a utilization outside (0, 1] or no page size; RESOURCE_EXHAUSTED, with the
// numbers, when not one page is left.
absl::StatusOr<KvPoolSize> KvPoolWithin(const DeviceMemoryBudget& budget);

}  // namespace kvtrim::engine
