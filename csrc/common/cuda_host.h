// Host-side helpers of the three ops' CUDA glue (*_cuda.cpp, compiled with ATen).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>

namespace torchutils_ext {

// Before an op's first launch: an error left pending by earlier work is reported as such, not blamed on the op's
// own launches (cudaGetLastError returns the last error of any call on this thread).
inline void check_no_pending_error(const char* op) {
  const cudaError_t err = cudaGetLastError();
  TORCH_CHECK(err == cudaSuccess, op, ": a CUDA error was pending before this op launched anything (from earlier "
              "work on this thread): ", cudaGetErrorString(err));
}

// After the launches: the first failed launch's error (each launch is checked as it is made, as ATen's
// C10_CUDA_KERNEL_LAUNCH_CHECK does, and nothing is launched after a failed one).
inline void check_launch(const char* op, cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA launch failed: ", cudaGetErrorString(err));
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
