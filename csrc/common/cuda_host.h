// Host-side helpers of the three ops' CUDA glue (*_cuda.cpp, compiled with ATen).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>

#include "launch_error.h"

namespace torchutils_ext {

inline void check_launch(const char* op) {
  const char* err = cuda::last_launch_error();
  TORCH_CHECK(err == nullptr, op, ": CUDA launch failed: ", err);
}

inline void check_cuda(at::TensorList ts, const char* op) {
  for (size_t i = 0; i < ts.size(); ++i)
    TORCH_CHECK_VALUE(ts[i].is_cuda(), op, ": tensor ", i, " is on ", ts[i].device(),
                      "; the CUDA kernel takes CUDA tensors only");
}

inline bool capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
  return status != cudaStreamCaptureStatusNone;
}

}  // namespace torchutils_ext
