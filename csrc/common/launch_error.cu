#include <cuda_runtime.h>

#include "launch_error.h"

namespace torchutils_ext {
namespace cuda {

const char* last_launch_error() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace cuda
}  // namespace torchutils_ext
