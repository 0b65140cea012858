// A library preloaded (LD_PRELOAD) into a process that runs on the GPU, to make that process's
// device fail at a moment the test picks: once the file named by KVTRIM_DEVICE_FAULT_FILE exists,
// kernels of its own run in device 0's primary context, which every CUDA runtime of the process
// shares. KVTRIM_DEVICE_FAULT_MODE says how the device fails:
//   lost (the default): a kernel writes to address 16, so the context is lost to the whole
//     process and its next synchronisation returns cudaErrorIllegalAddress, as after a fault in
//     one of its own kernels;
//   hang: blocks that never return take every SM, so the process's next kernels never start and
//     its next synchronisation never returns, as with a kernel that does not terminate.
// Without KVTRIM_DEVICE_FAULT_FILE the library does nothing. tools/gpu/device_loss.sh uses it on
// kvtrim-server.
#include <cuda_runtime_api.h>
#include <pthread.h>
#include <signal.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>

namespace {

__global__ void WriteToAddress16() { *reinterpret_cast<volatile int*>(16) = 1; }

constexpr int kSpinThreads = 1024;

// Until *release is non-zero: never, as nothing writes it.
__global__ void __launch_bounds__(kSpinThreads) Spin(const volatile int* release) {
  while (*release == 0) __nanosleep(1000);
}

void Hang() {
  int sms = 0, per_sm = 0;
  int* release = nullptr;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, Spin, kSpinThreads, 0);
  cudaMalloc(&release, sizeof(int));
  cudaMemset(release, 0, sizeof(int));
  cudaStream_t stream;
  cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking);
  Spin<<<sms * per_sm, kSpinThreads, 0, stream>>>(release);
  std::fprintf(stderr, "device_fault: %d blocks of %d threads spinning on device 0's %d SMs: %s\n",
               sms * per_sm, kSpinThreads, sms, cudaGetErrorName(cudaGetLastError()));
}

void FaultWhenTheFileAppears(const std::string& file, bool hang) {
  // The process's signals stay with its own threads (kvtrim-server takes SIGTERM in sigwait).
  sigset_t all;
  sigfillset(&all);
  pthread_sigmask(SIG_BLOCK, &all, nullptr);
  while (access(file.c_str(), F_OK) != 0) usleep(20'000);
  if (hang) {
    Hang();
    return;
  }
  WriteToAddress16<<<1, 1>>>();
  const cudaError_t error = cudaDeviceSynchronize();
  std::fprintf(stderr, "device_fault: wrote to address 16 on device 0: %s\n",
               cudaGetErrorName(error));
}

__attribute__((constructor)) void Start() {
  const char* file = std::getenv("KVTRIM_DEVICE_FAULT_FILE");
  if (file == nullptr || *file == '\0') return;
  const char* mode = std::getenv("KVTRIM_DEVICE_FAULT_MODE");
  const bool hang = mode != nullptr && std::string(mode) == "hang";
  std::thread(FaultWhenTheFileAppears, std::string(file), hang).detach();
}

}  // namespace
