// One arithmetic operation rounded once to nearest-even, on the host and on the device. NOTE: [separate roundings]
// Wherever the docs promise that a product and a sum round separately (the EMA's "yolov5" formula, the fold's
// shift), the kernels use these: nvcc contracts a plain `a * b + c` into one fused multiply-add unless built with
// --fmad=false, and these CUDA intrinsics are never contracted, whatever the flags. Division and sqrt are IEEE
// (correctly rounded) also under --use_fast_math. On the host, plain operators with -ffp-contract=off. Where one
// rounding is promised instead (the "lerp" mode, as torch.lerp computes), fma_rn says so explicitly.
#pragma once
#include <cmath>

#include "host_device.h"

namespace torchutils_ext {

#if defined(__CUDA_ARCH__)
TUE_HD float mul_rn(float a, float b) { return __fmul_rn(a, b); }
TUE_HD double mul_rn(double a, double b) { return __dmul_rn(a, b); }
TUE_HD float add_rn(float a, float b) { return __fadd_rn(a, b); }
TUE_HD double add_rn(double a, double b) { return __dadd_rn(a, b); }
TUE_HD float sub_rn(float a, float b) { return __fsub_rn(a, b); }
TUE_HD double sub_rn(double a, double b) { return __dsub_rn(a, b); }
TUE_HD float div_rn(float a, float b) { return __fdiv_rn(a, b); }
TUE_HD double div_rn(double a, double b) { return __ddiv_rn(a, b); }
TUE_HD float sqrt_rn(float a) { return __fsqrt_rn(a); }
TUE_HD double sqrt_rn(double a) { return __dsqrt_rn(a); }
TUE_HD float fma_rn(float a, float b, float c) { return __fmaf_rn(a, b, c); }
TUE_HD double fma_rn(double a, double b, double c) { return __fma_rn(a, b, c); }
#else
template <typename O> TUE_HD O mul_rn(O a, O b) { return a * b; }
template <typename O> TUE_HD O add_rn(O a, O b) { return a + b; }
template <typename O> TUE_HD O sub_rn(O a, O b) { return a - b; }
template <typename O> TUE_HD O div_rn(O a, O b) { return a / b; }
template <typename O> TUE_HD O sqrt_rn(O a) { return std::sqrt(a); }
// a * b + c rounded once (an FMA instruction where the target has one: see TUE_TARGET_AVX2_F16C_FMA)
template <typename O> TUE_HD O fma_rn(O a, O b, O c) { return std::fma(a, b, c); }
#endif

}  // namespace torchutils_ext
