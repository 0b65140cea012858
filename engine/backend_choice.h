// --device for the binaries: "cpu", "cuda" or "auto" (cuda when the binary has the CUDA backend
// and a GPU is visible) resolved to a backend and how it stores K/V rows. Header-only because the
// answer depends on whether the including binary links the CUDA backend (KVTRIM_HAVE_CUDA).
#pragma once

#include <functional>
#include <optional>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "engine/kv_pool_budget.h"
#include "engine/model.h"
#include "engine/scheduler.h"
#include "memory/kv_cache.h"
#include "memory/page_pool.h"

#ifdef KVTRIM_HAVE_CUDA
#include "engine/cuda/forward.h"
#endif

namespace kvtrim::engine {

struct BackendChoice {
  std::string name;                        // "cpu" or "cuda"
  Scheduler::BackendFactory make_backend;  // empty = the CPU reference
  int32_t kv_element_bytes = 4;            // bytes of one stored K/V element
  memory::PageStorage kv_storage = memory::PageStorage::kHost;
  // Most tokens in one engine step unless the user says otherwise: 512 on the CPU; 8192 on
  // CUDA, where an 8k prompt is then one step (Llama-3-8B on an H200: 30849 prompt tokens/s
  // against 28748 with 2048-token steps and 24171 with 512; docs/PERFORMANCE.md).
  int32_t step_tokens = 512;
  // The KV pool when its size is left to the device (--kv-pool-mib 0): for `page_bytes` pages
  // within `utilization` of the GPU's memory (cuda::AutoKvPool). Empty on the CPU, whose pool
  // is then kDefaultHostPoolBytes.
  std::function<absl::StatusOr<KvPoolSize>(const Model& model, size_t page_bytes,
                                           double utilization)>
      auto_kv_pool;
};

// The CPU reference's KV pool when its size is not given.
inline constexpr size_t kDefaultHostPoolBytes = size_t{1} << 30;

// The KV pool of `pool_bytes`; for 0, sized to the device (auto_kv_pool, `utilization` of its
// memory, in pages of `page_bytes`, 0 for the model's default), or kDefaultHostPoolBytes where the
// backend has none. KvPoolSize::account says how a size left to the device came about (empty
// otherwise).
inline absl::StatusOr<KvPoolSize> ResolveKvPool(const BackendChoice& backend, const Model& model,
                                                size_t pool_bytes, size_t page_bytes,
                                                double utilization) {
  if (pool_bytes != 0) return KvPoolSize{.bytes = pool_bytes, .account = {}};
  if (!backend.auto_kv_pool) return KvPoolSize{.bytes = kDefaultHostPoolBytes, .account = {}};
  const ModelConfig& c = model.config;
  const memory::KvShape shape{c.n_layers, c.n_kv_heads, c.head_dim, backend.kv_element_bytes};
  return backend.auto_kv_pool(model, page_bytes != 0 ? page_bytes : shape.default_page_bytes(),
                              utilization);
}

// How the chosen backend runs, where it has a choice.
struct BackendOptions {
  bool cuda_graphs = true;       // CudaOptions::graphs
  bool sample_on_device = true;  // CudaOptions::sample_on_device
  bool dependent_launch = true;  // CudaOptions::dependent_launch
  bool small_gemm = true;        // CudaOptions::small_gemm
  bool eviction_stream = true;   // CudaOptions::eviction_stream
  // Whether requests may evict while decoding (SchedulerOptions::decode_eviction): false sizes a
  // pool to the device without room for the rows' eviction state (CudaOptions::decode_eviction).
  bool decode_eviction = true;
  std::string dtype = "auto";  // --dtype, ParseDtype; CudaOptions::dtype
  // Most tokens in one step; 0 = the backend's default (BackendChoice::step_tokens). The CUDA
  // backend allocates its step buffers for it at start (CudaOptions::reserve_tokens).
  int32_t step_tokens = 0;
  // Most requests running at once (SchedulerOptions::max_running), for the buffers of their
  // logits rows in a pool sized to the device (auto_kv_pool).
  int32_t max_running = SchedulerOptions{}.max_running;
};

// --dtype: the 16-bit type of the CUDA engine's weights. "auto" (nullopt: the model's own,
// ModelConfig::dtype), "bfloat16" or "bf16", "float16", "fp16" or "half".
inline absl::StatusOr<std::optional<HalfFloat>> ParseDtype(absl::string_view dtype) {
  if (dtype == "auto") return std::nullopt;
  if (dtype == "bfloat16" || dtype == "bf16") return HalfFloat::kBf16;
  if (dtype == "float16" || dtype == "fp16" || dtype == "half") return HalfFloat::kFp16;
  return absl::InvalidArgumentError(
      absl::StrCat("--dtype must be auto, bfloat16 or float16, got \"", dtype, "\""));
}

// `binary` names the program in the error when it lacks CUDA.
inline absl::StatusOr<BackendChoice> ChooseBackend(absl::string_view device,
                                                   absl::string_view binary,
                                                   BackendOptions options = {}) {
  if (device != "cpu" && device != "cuda" && device != "auto") {
    return absl::InvalidArgumentError(
        absl::StrCat("--device must be cpu, cuda or auto, got \"", device, "\""));
  }
  // Checked on every device, so that a typo fails on the CPU too (which computes in fp32).
  absl::StatusOr<std::optional<HalfFloat>> dtype = ParseDtype(options.dtype);
  if (!dtype.ok()) return dtype.status();
  BackendChoice cpu;
  cpu.name = "cpu";
  if (options.step_tokens > 0) cpu.step_tokens = options.step_tokens;
#ifdef KVTRIM_HAVE_CUDA
  std::string why;
  if (device == "cpu" || !cuda::DeviceVisible(&why)) {
    if (device == "cuda") return absl::FailedPreconditionError("--device cuda: " + why);
    return cpu;
  }
  const int32_t step_tokens = options.step_tokens > 0 ? options.step_tokens : 8192;
  const cuda::CudaOptions cuda_options{.graphs = options.cuda_graphs,
                                       .sample_on_device = options.sample_on_device,
                                       .dependent_launch = options.dependent_launch,
                                       .small_gemm = options.small_gemm,
                                       .eviction_stream = options.eviction_stream,
                                       .decode_eviction = options.decode_eviction,
                                       .dtype = *dtype,
                                       .reserve_tokens = step_tokens};
  return BackendChoice{
      .name = "cuda",
      .make_backend = cuda::CudaBackend::Factory(cuda_options),
      .kv_element_bytes = cuda::kKvElementBytes,
      .kv_storage = cuda::kKvStorage,
      .step_tokens = step_tokens,
      .auto_kv_pool = [cuda_options, rows = options.max_running](
                          const Model& model, size_t page_bytes, double utilization) {
        return cuda::AutoKvPool(model, cuda_options, rows, page_bytes, utilization);
      }};
#else
  (void)options;
  if (device == "cuda") {
    return absl::FailedPreconditionError(
        absl::StrCat("--device cuda: this ", binary, " was built without the CUDA backend"));
  }
  return cpu;
#endif
}

}  // namespace kvtrim::engine
