// A floor under the stack size a thread may ask for, for kvtrim-server only (it is linked into
// the binary, not the kvtrim_server library).
//
// glibc carves a thread's static TLS block out of the stack size the thread asked for. Debian's
// civetweb, behind prometheus-cpp's /metrics exposer, asks for a fixed 100 KB, and this binary's
// static TLS is already ~70 KB (OpenBLAS ~60 KB, the static CUDA runtime 8 KB): a scrape then
// overflows the worker's stack (SIGSEGV in vsnprintf). Without CUDA the margin is under 4 KB.
// So any request below kMinStackBytes is raised to it; larger ones and the default (8 MiB) pass.
//
// This definition interposes on libc's for every library of the process because the executable
// comes first in symbol lookup; server/CMakeLists.txt exports it (--export-dynamic-symbol).
#include <dlfcn.h>
#include <pthread.h>

#include <algorithm>
#include <cstddef>
#include <cstdlib>

namespace {

constexpr size_t kMinStackBytes = size_t{256} << 10;

using SetStackSize = int (*)(pthread_attr_t*, size_t);

}  // namespace

extern "C" int pthread_attr_setstacksize(pthread_attr_t* attributes, size_t stack_bytes) {
  // libc's own definition, the next one after this executable's. A failed lookup would leave no
  // way to set a stack size at all, so it aborts at the first call.
  static const SetStackSize libc_set_stack_size =
      reinterpret_cast<SetStackSize>(dlsym(RTLD_NEXT, "pthread_attr_setstacksize"));
  if (libc_set_stack_size == nullptr) std::abort();
  return libc_set_stack_size(attributes, std::max(stack_bytes, kMinStackBytes));
}
