#include "engine/cuda/cublas_api.h"

#include <dlfcn.h>

#include <string>
#include <type_traits>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace kvtrim::engine::cuda {
namespace {

// CublasGemmEx matches the exported overload exactly (the cast would not compile otherwise);
// unevaluated, so it adds no reference to the symbol.
static_assert(std::is_same_v<decltype(static_cast<CublasGemmEx>(&cublasGemmEx)), CublasGemmEx>);

// The major version the headers were compiled against: its ABI is what the table's types assume.
std::string CublasLibrary() { return absl::StrCat("libcublas.so.", CUBLAS_VER_MAJOR); }

// dlerror() as a string; "" when it has nothing to say.
std::string DlError() {
  const char* error = dlerror();
  return error ? error : "";
}

// Resolves `name` into `function`, typed by the field it fills.
template <typename Function>
absl::Status Resolve(void* library, const char* name, Function* function) {
  dlerror();  // clears any earlier error, so that a null symbol is told from a failed lookup
  *function = reinterpret_cast<Function>(dlsym(library, name));
  if (*function == nullptr) {
    return absl::FailedPreconditionError(
        absl::StrCat("the CUDA backend needs ", name, " from ", CublasLibrary(), ": ", DlError()));
  }
  return absl::OkStatus();
}

absl::StatusOr<CublasApi> Open() {
  // RTLD_LOCAL: the engine reaches cuBLAS only through this table, so its symbols need not be
  // visible to anything else loaded later.
  void* library = dlopen(CublasLibrary().c_str(), RTLD_NOW | RTLD_LOCAL);
  if (library == nullptr) {
    return absl::FailedPreconditionError(
        absl::StrCat("the CUDA backend needs ", CublasLibrary(), ": ", DlError()));
  }
  CublasApi api;
  for (const absl::Status& status : {
           Resolve(library, "cublasCreate_v2", &api.create),
           Resolve(library, "cublasDestroy_v2", &api.destroy),
           Resolve(library, "cublasSetStream_v2", &api.set_stream),
           Resolve(library, "cublasSetWorkspace_v2", &api.set_workspace),
           Resolve(library, "cublasSetMathMode", &api.set_math_mode),
           Resolve(library, "cublasGemmEx", &api.gemm_ex),
           Resolve(library, "cublasGetStatusName", &api.get_status_name),
           Resolve(library, "cublasGetStatusString", &api.get_status_string),
       }) {
    if (!status.ok()) {
      dlclose(library);
      return status;
    }
  }
  return api;
}

}  // namespace

absl::StatusOr<const CublasApi*> LoadCublas() {
  // A function-local static: initialised once, by the first caller, while others wait.
  static const absl::StatusOr<CublasApi>* const loaded = new absl::StatusOr<CublasApi>(Open());
  if (!loaded->ok()) return loaded->status();
  return &**loaded;
}

}  // namespace kvtrim::engine::cuda
