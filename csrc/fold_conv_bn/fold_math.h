// NOTE: [fold math] The per-channel math of folding BatchNorm into the preceding layer, shared by the CPU and
// CUDA kernels; the pure-torch twin (_reference.scale_shift_all) keeps the same operation order. Each operation
// rounds once in O (float for fp32/fp16/bf16 weights, double for fp64): scale = bn_w / sqrt(var + eps), then
// shift = (bias - mean) * scale (+ bn_b). sqrt is correctly rounded on both devices.
#pragma once
#include <cmath>

#if defined(__CUDACC__)
#define TUE_FOLD_HD __host__ __device__ __forceinline__
#else
#define TUE_FOLD_HD inline
#endif

namespace torchutils_ext {

template <typename O>
TUE_FOLD_HD O fold_scale(O bn_w, O var, O eps) {
#if defined(__CUDA_ARCH__)
  return bn_w / sqrt(var + eps);
#else
  return bn_w / std::sqrt(var + eps);
#endif
}

template <typename O>
TUE_FOLD_HD O fold_shift(O bias, O mean, O scale, const O* bn_b) {
  const O s = (bias - mean) * scale;
  return bn_b ? s + *bn_b : s;
}

}  // namespace torchutils_ext
