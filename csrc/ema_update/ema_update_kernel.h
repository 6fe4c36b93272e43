// Plain-data interface between the ema_update_ host glue (ema_update_cuda.cpp, compiled with ATen) and its kernel
// (ema_update_kernel.cu, compiled by nvcc without torch headers: faster builds, no ATen in device code).
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "ema_kind.h"

namespace torchutils_ext {
namespace cuda {

// Decay from device memory (ptr, float or double) or, when ptr is null, the host value.
struct EmaDecay {
  const void* ptr;
  bool is_double;
  double value;
};
// One launch per table of spans (each with numel > 0). With a guard (int64[2] on the device, guard[0] zeroed by
// the caller), a check launch per table first (see [nonfinite guard] in nonfinite.h). Returns the first launch
// error (each launch is checked; nothing is launched after a failed one).
cudaError_t launch_ema(const EmaSpan* spans, int n, EmaDecay decay, bool lerp, int64_t* guard, cudaStream_t stream);

}  // namespace cuda
}  // namespace torchutils_ext
