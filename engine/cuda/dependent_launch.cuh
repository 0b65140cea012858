// Programmatic dependent launch (Hopper and later): a kernel launched with LaunchDependent may be
// scheduled while the kernel before it in its stream drains, instead of after that kernel has
// finished and flushed its writes, so its launch overlaps the previous kernel's tail. (On an H200
// this took at most 0.04 ms off a Llama-3-8B decode step of a few hundred launches:
// docs/PERFORMANCE.md.)
//
// The rule that keeps it correct: a kernel launched this way calls WaitForPrerequisites() before
// it touches global memory. That call returns once everything before the kernel in its stream has
// finished and its writes are visible, so the kernel sees exactly what a plain launch would. On a
// plain launch, or a GPU without the feature, the call does nothing. The one exception is named
// where it is made: the compressed decode attention reads its step plan and the first tiles of
// its thin segment before the call, data no kernel of the step writes before it (RoPE, which
// lets it start early, writes only the queries and the new rows).
#pragma once

#include <cuda_runtime.h>

#include <atomic>

namespace kvtrim::engine::cuda {

// Whether LaunchDependent asks for the overlap: 1 yes, 0 no (it launches as <<<...>>> would), -1
// where the current device supports it (compute capability 9.0 or later), found at the first
// launch. Process-wide: CudaBackend sets it from CudaOptions::dependent_launch.
inline std::atomic<int> dependent_launch{-1};

inline void SetDependentLaunch(bool on) { dependent_launch.store(on ? -1 : 0); }

inline bool DependentLaunchOn() {
  int on = dependent_launch.load(std::memory_order_relaxed);
  if (on < 0) {
    int device = 0, major = 0;
    on = cudaGetDevice(&device) == cudaSuccess &&
         cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) == cudaSuccess &&
         major >= 9;
    dependent_launch.store(on, std::memory_order_relaxed);
  }
  return on != 0;
}

#ifdef __CUDACC__
__device__ __forceinline__ void WaitForPrerequisites() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Lets the kernel launched after this one start its blocks now, rather than when this kernel's
// blocks have exited: they then run up to their WaitForPrerequisites() beside this kernel. Only
// worth it where the next kernel has work before that call (the decode attention's start).
__device__ __forceinline__ void LetDependentsStart() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;");
#endif
}
#endif

// kernel<<<grid, block, shared, stream>>>(args...), allowed to overlap the previous kernel's tail
// while DependentLaunchOn(). Returns the launch's error.
template <typename... Params, typename... Args>
cudaError_t LaunchDependent(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared,
                            cudaStream_t stream, Args... args) {
  cudaLaunchAttribute overlap{};
  overlap.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  overlap.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = shared;
  config.stream = stream;
  config.attrs = &overlap;
  config.numAttrs = DependentLaunchOn() ? 1 : 0;
  const cudaError_t error = cudaLaunchKernelEx(&config, kernel, static_cast<Params>(args)...);
  // A refused launch also leaves its error as the thread's last one; the caller gets it here, and
  // the next LaunchError() must not report it again.
  if (error != cudaSuccess) cudaGetLastError();
  return error;
}

}  // namespace kvtrim::engine::cuda
