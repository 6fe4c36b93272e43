// The per-element EMA formulas, shared by the CPU loop and the CUDA kernel.
// Built with FP contraction off (see setup.py), so "yolov5" rounds after each product and after the sum
// exactly like the seed's `v *= d; v += (1 - d) * m`.
#pragma once

#if defined(__CUDACC__)
#define TUE_HD __host__ __device__ __forceinline__
#else
#define TUE_HD inline
#endif

namespace torchutils_ext {

template <typename O>
TUE_HD O ema_yolov5(O v, O m, O d, O omd) {
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(O) == 4) return __fadd_rn(__fmul_rn(v, d), __fmul_rn(omd, m));
  else return __dadd_rn(__dmul_rn(v, d), __dmul_rn(omd, m));
#else
  const O a = v * d;
  const O b = omd * m;
  return a + b;
#endif
}

// torch.lerp(v, m, w) with w = 1 - d: the form torch uses, exact at both ends of [0, 1].
template <typename O>
TUE_HD O ema_lerp(O v, O m, O w) {
  const O diff = m - v;
  return (w < O(0.5) && w > O(-0.5)) ? v + w * diff : m - diff * (O(1) - w);
}

}  // namespace torchutils_ext
