// A library preloaded (LD_PRELOAD) into a process that runs on the GPU, to make that process's
// device fail for good at a moment the test picks: once the file named by
// KVTRIM_DEVICE_FAULT_FILE exists, a kernel of its own writes to address 16 on device 0. It
// runs in the device's primary context, which every CUDA runtime of the process shares, so the
// context is lost to all of them and the process's next synchronisation returns
// cudaErrorIllegalAddress, as after a fault in one of its own kernels. Without the variable the
// library does nothing. tools/gpu/device_loss.sh uses it on kvtrim-server.
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

void FaultWhenTheFileAppears(const std::string& file) {
  // The process's signals stay with its own threads (kvtrim-server takes SIGTERM in sigwait).
  sigset_t all;
  sigfillset(&all);
  pthread_sigmask(SIG_BLOCK, &all, nullptr);
  while (access(file.c_str(), F_OK) != 0) usleep(20'000);
  WriteToAddress16<<<1, 1>>>();
  const cudaError_t error = cudaDeviceSynchronize();
  std::fprintf(stderr, "device_fault: wrote to address 16 on device 0: %s\n",
               cudaGetErrorName(error));
}

__attribute__((constructor)) void Start() {
  const char* file = std::getenv("KVTRIM_DEVICE_FAULT_FILE");
  if (file == nullptr || *file == '\0') return;
  std::thread(FaultWhenTheFileAppears, std::string(file)).detach();
}

}  // namespace
