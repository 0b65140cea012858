// engine/cuda/cublas_api.cc: cuBLAS is dlopen'ed, not linked, and that keeps small thread stacks
// usable. Needs the cuBLAS library (every machine with nvcc has it), not a GPU: nothing here
// touches a device.
#include <gtest/gtest.h>
#include <pthread.h>

#include <cstring>

#include "engine/cuda/cublas_api.h"

namespace kvtrim::engine::cuda {
namespace {

TEST(CublasApiTest, LoadsEveryEntryPointOnce) {
  absl::StatusOr<const CublasApi*> cublas = LoadCublas();
  ASSERT_TRUE(cublas.ok()) << cublas.status();
  const CublasApi& api = **cublas;
  for (const void* function :
       {reinterpret_cast<const void*>(api.create), reinterpret_cast<const void*>(api.destroy),
        reinterpret_cast<const void*>(api.set_stream),
        reinterpret_cast<const void*>(api.set_workspace),
        reinterpret_cast<const void*>(api.set_math_mode),
        reinterpret_cast<const void*>(api.gemm_ex),
        reinterpret_cast<const void*>(api.get_status_name),
        reinterpret_cast<const void*>(api.get_status_string)}) {
    EXPECT_NE(function, nullptr);
  }
  // A call into the library that needs no device: the codes are named by cuBLAS itself.
  EXPECT_STREQ(api.get_status_name(CUBLAS_STATUS_NOT_INITIALIZED), "CUBLAS_STATUS_NOT_INITIALIZED");
  absl::StatusOr<const CublasApi*> again = LoadCublas();
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(*again, *cublas);
}

// Linked, cuBLAS(Lt)'s ~106 KB of TLS sat in every thread's static TLS block, so civetweb's
// threads (prometheus-cpp's /metrics), created with 100 KB stacks, failed to start. Loaded with
// dlopen its TLS is allocated lazily and such a thread starts, before and after loading.
TEST(CublasApiTest, HundredKibStackThreadStartsWithCublasLoaded) {
  const auto start_small_thread = []() -> int {
    pthread_attr_t attributes;
    pthread_attr_init(&attributes);
    pthread_attr_setstacksize(&attributes, 100 * 1024);  // civetweb's fixed stack size
    pthread_t thread;
    const int error = pthread_create(
        &thread, &attributes, [](void*) -> void* { return nullptr; }, nullptr);
    pthread_attr_destroy(&attributes);
    if (error == 0) pthread_join(thread, nullptr);
    return error;
  };
  const int before = start_small_thread();
  EXPECT_EQ(before, 0) << std::strerror(before);
  absl::StatusOr<const CublasApi*> cublas = LoadCublas();
  ASSERT_TRUE(cublas.ok()) << cublas.status();
  const int after = start_small_thread();
  EXPECT_EQ(after, 0) << std::strerror(after);
}

}  // namespace
}  // namespace kvtrim::engine::cuda
