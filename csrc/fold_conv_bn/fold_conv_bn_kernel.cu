// CUDA kernel of fold_conv_bn: every layer of one weight dtype in one launch. Each element recomputes its
// channel's BN factor (cached loads; folding is a once-per-export job), block 0 of a layer writes its bias.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "fold_math.h"
#include "../common/multi_tensor_apply.cuh"
#include "fold_conv_bn_kernel.h"

namespace torchutils_ext {
namespace cuda {
namespace {

// FoldEntry-sized slots: 32 fit the 4 KB parameter limit, 256 the 32 KB one
template <int CAP>
struct FoldTable {
  FoldEntry e[CAP];
  int32_t block_start[CAP + 1];
  int32_t n;
};

__device__ __forceinline__ float ld(const float* p, int64_t i) { return p[i]; }
__device__ __forceinline__ double ld(const double* p, int64_t i) { return p[i]; }
__device__ __forceinline__ float ld(const __half* p, int64_t i) { return __half2float(p[i]); }
__device__ __forceinline__ float ld(const __nv_bfloat16* p, int64_t i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ void st(float* p, int64_t i, float x) { p[i] = x; }
__device__ __forceinline__ void st(double* p, int64_t i, double x) { p[i] = x; }
__device__ __forceinline__ void st(__half* p, int64_t i, float x) { p[i] = __float2half_rn(x); }
__device__ __forceinline__ void st(__nv_bfloat16* p, int64_t i, float x) { p[i] = __float2bfloat16_rn(x); }

template <typename T, typename O>
__device__ __forceinline__ O vec(const FoldEntry& f, const void* p, int64_t c) {
  return f.vec_op ? static_cast<const O*>(p)[c] : ld(static_cast<const T*>(p), c);
}

template <typename T, typename O>
__device__ __forceinline__ O scale_of(const FoldEntry& f, int64_t c) {
  return fold_scale<O>(f.bn_w ? vec<T, O>(f, f.bn_w, c) : O(1), vec<T, O>(f, f.var, c), static_cast<O>(f.eps));
}

static_assert(sizeof(FoldTable<32>) <= kSmallParams, "the 32-entry table must fit 4 KB");
static_assert(sizeof(FoldTable<256>) <= kLargeParams, "the 256-entry table must fit 32 KB");

template <typename T, typename O, int CAP>
__global__ void __launch_bounds__(kThreads) fold_kernel(const __grid_constant__ FoldTable<CAP> t) {
  const int k = entry_of_block(t.block_start, t.n);
  const FoldEntry& f = t.e[k];
  const int64_t chunk = blockIdx.x - t.block_start[k];
  if (chunk == 0) {
    for (int64_t c = threadIdx.x; c < f.C; c += blockDim.x) {
      const O bn_b = f.bn_b ? vec<T, O>(f, f.bn_b, c) : O(0);
      st(static_cast<T*>(f.out_b), c,
         fold_shift<O>(f.bias ? vec<T, O>(f, f.bias, c) : O(0), vec<T, O>(f, f.mean, c), scale_of<T, O>(f, c),
                       f.bn_b ? &bn_b : nullptr));
    }
  }
  const int64_t start = chunk * kChunk, end = f.K ? min(f.numel, start + kChunk) : start, group = f.ipg * f.opg;
  const T* w = static_cast<const T*>(f.w);
  T* out = static_cast<T*>(f.out_w);
  for (int64_t i = start + threadIdx.x; i < end; i += blockDim.x) {
    const int64_t r = i / f.K;
    const O scale = scale_of<T, O>(f, (r / group) * f.opg + r % f.opg);
    st(out, i, ld(w, i) * scale);
  }
}

template <typename T, typename O, int CAP>
void launch_cap(const FoldEntry* entries, int n, cudaStream_t stream) {
  pack_and_launch<FoldTable<CAP>, CAP>(
      entries, n, [](FoldTable<CAP>& t, int s, const FoldEntry& x) { t.e[s] = x; },
      [&](const FoldTable<CAP>& t, unsigned blocks) { fold_kernel<T, O, CAP><<<blocks, kThreads, 0, stream>>>(t); });
}

template <typename T, typename O>
void launch_typed(const FoldEntry* entries, int n, cudaStream_t stream) {
  if (n <= 32 || !large_kernel_params()) return launch_cap<T, O, 32>(entries, n, stream);
#if TUE_LARGE_PARAMS
  launch_cap<T, O, 256>(entries, n, stream);
#endif
}

}  // namespace

void launch_fold(const FoldEntry* entries, int n, FoldDtype dtype, cudaStream_t stream) {
  switch (dtype) {
    case FoldDtype::F32: return launch_typed<float, float>(entries, n, stream);
    case FoldDtype::F16: return launch_typed<__half, float>(entries, n, stream);
    case FoldDtype::BF16: return launch_typed<__nv_bfloat16, float>(entries, n, stream);
    case FoldDtype::F64: return launch_typed<double, double>(entries, n, stream);
  }
}

}  // namespace cuda
}  // namespace torchutils_ext
