// Plain-data interface between the fold_conv_bn host glue (fold_conv_bn_cuda.cpp, compiled with ATen) and its kernel
// (fold_conv_bn_kernel.cu, compiled by nvcc without torch headers: faster builds, no ATen in device code).
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "../common/float_dtype.h"

namespace torchutils_ext {
namespace cuda {

// fold_conv_bn: one entry per layer whose weight walks as rows (see RowLayout). BN vectors are of the weight's
// dtype, or of its math type (float/double) when vec_op. Optional vectors (bias, bn_w, bn_b) may be null. out_w
// may equal w (in place). scale: C elements of the math type on the device, the kernels' scratch. numel: the
// weight's elements (0 for an empty weight, whose bias is still written).
struct FoldEntry {
  const void* w;
  void* out_w;
  const void* bias;
  const void* bn_w;
  const void* bn_b;
  const void* mean;
  const void* var;
  void* out_b;
  void* scale;
  double eps;
  int64_t numel, K, ipg, opg;
  int32_t C, vec_op;  // 32-bit: the table must stay within the kernel parameter limits
};
// Two launches per table (channels, then weights); returns the first launch error, launching nothing after it.
cudaError_t launch_fold(const FoldEntry* entries, int n, FloatDtype dtype, cudaStream_t stream);

}  // namespace cuda
}  // namespace torchutils_ext
