// TUE_HD marks a helper that the CPU kernels and the CUDA kernels both call: host and device under nvcc. Always
// inlined on both sides: on the host the CPU kernels inline their bodies under an AVX2 target (common/simd.h),
// and a helper left out of line would run at the baseline ISA.
#pragma once

#if defined(__CUDACC__)
#define TUE_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__) || defined(__clang__)
#define TUE_HD inline __attribute__((always_inline))
#else
#define TUE_HD inline
#endif
