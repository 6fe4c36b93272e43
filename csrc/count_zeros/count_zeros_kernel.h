// Plain-data interface between the count_zeros host glue (count_zeros_cuda.cpp, compiled with ATen) and its kernel
// (count_zeros_kernel.cu, compiled by nvcc without torch headers: faster builds, no ATen in device code).
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace torchutils_ext {
namespace cuda {

// count_zeros: adds the number of zero elements of every entry into *out (int64, on device).
struct ZeroEntry {
  const void* ptr;
  int64_t numel;
  uint64_t mask;
  int elem_size;
};
// Returns the first launch error (each launch is checked; nothing is launched after a failed one).
cudaError_t launch_count_zeros(const ZeroEntry* entries, int n, int64_t* out, cudaStream_t stream);

}  // namespace cuda
}  // namespace torchutils_ext
