// CUDA kernels of fold_conv_bn: every layer of one weight dtype in two launches. The channel kernel computes each
// output channel's scale (into a scratch vector) and new bias; the weight kernel multiplies each element by its
// channel's scale, so the divide and the sqrt run once per channel, not per element.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../common/multi_tensor_apply.cuh"
#include "fold_conv_bn_kernel.h"
#include "fold_math.h"

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

static_assert(sizeof(FoldTable<32>) <= kSmallParams, "the 32-entry table must fit 4 KB");
static_assert(sizeof(FoldTable<256>) <= kLargeParams, "the 256-entry table must fit 32 KB");

// Channels [start, start + kChunk) of one layer: scale[c] = bn_w / sqrt(var + eps) and the bias (see [fold math]).
// The bodies are shared by both table tiers; each kernel only finds its block's entry.
template <typename T, typename O>
__device__ __noinline__ void fold_channels(const FoldEntry& f, int64_t start) {
  const int64_t end = min(static_cast<int64_t>(f.C), start + kChunk);
  for (int64_t c = start + threadIdx.x; c < end; c += blockDim.x) {
    const O scale = fold_scale<O>(f.bn_w ? vec<T, O>(f, f.bn_w, c) : O(1), vec<T, O>(f, f.var, c),
                                  static_cast<O>(f.eps));
    static_cast<O*>(f.scale)[c] = scale;
    const O bn_b = f.bn_b ? vec<T, O>(f, f.bn_b, c) : O(0);
    st(static_cast<T*>(f.out_b), c,
       fold_shift<O>(f.bias ? vec<T, O>(f, f.bias, c) : O(0), vec<T, O>(f, f.mean, c), scale, f.bn_b ? &bn_b : nullptr));
  }
}

// Output channel of weight row r (see RowLayout): r itself when ipg == 1 (every Conv and Linear).
__device__ __forceinline__ int64_t channel_of_row(int64_t r, int64_t ipg, int64_t opg) {
  return ipg == 1 ? r : (r / (ipg * opg)) * opg + r % opg;
}

// Weight elements [start, start + kChunk) of one layer: w * scale[channel], rounded once. Each thread divides
// once to find its first element's row; a step of kThreads elements then moves q = kThreads / K rows and
// rem = kThreads % K elements, with no division.
template <typename T, typename O>
__device__ __noinline__ void fold_weights(const FoldEntry& f, int64_t start) {
  const int64_t end = min(f.numel, start + kChunk), K = f.K, q = kThreads / K, rem = kThreads % K, ipg = f.ipg,
                opg = f.opg;
  int64_t i = start + threadIdx.x;
  if (i >= end) return;
  int64_t r = i / K, col = i - r * K;
  const T* w = static_cast<const T*>(f.w);
  T* out = static_cast<T*>(f.out_w);
  const O* scale = static_cast<const O*>(f.scale);
  for (; i < end; i += kThreads) {
    st(out, i, mul_rn(ld(w, i), scale[channel_of_row(r, ipg, opg)]));
    r += q;
    col += rem;
    if (col >= K) {
      col -= K;
      ++r;
    }
  }
}

template <typename T, typename O, int CAP>
__global__ void __launch_bounds__(kThreads) fold_channels_kernel(const __grid_constant__ FoldTable<CAP> t) {
  const int k = entry_of_block(t.block_start, t.n);
  fold_channels<T, O>(t.e[k], static_cast<int64_t>(blockIdx.x - t.block_start[k]) * kChunk);
}

template <typename T, typename O, int CAP>
__global__ void __launch_bounds__(kThreads) fold_weights_kernel(const __grid_constant__ FoldTable<CAP> t) {
  const int k = entry_of_block(t.block_start, t.n);
  fold_weights<T, O>(t.e[k], static_cast<int64_t>(blockIdx.x - t.block_start[k]) * kChunk);
}

template <typename T, typename O, int CAP>
cudaError_t launch_cap(const FoldEntry* entries, int n, cudaStream_t stream) {
  auto fill = [](FoldTable<CAP>& t, int s, const FoldEntry& x) { t.e[s] = x; };
  const cudaError_t err = pack_and_launch<FoldTable<CAP>, CAP>(
      entries, n, [](const FoldEntry& x) { return static_cast<int64_t>(x.C); }, fill,
      [&](const FoldTable<CAP>& t, unsigned blocks) { fold_channels_kernel<T, O, CAP><<<blocks, kThreads, 0, stream>>>(t); });
  if (err != cudaSuccess) return err;
  return pack_and_launch<FoldTable<CAP>, CAP>(entries, n, fill, [&](const FoldTable<CAP>& t, unsigned blocks) {
    fold_weights_kernel<T, O, CAP><<<blocks, kThreads, 0, stream>>>(t);
  });
}

template <typename T, typename O>
cudaError_t launch_typed(const FoldEntry* entries, int n, cudaStream_t stream) {
  if (n <= 32 || !large_kernel_params()) return launch_cap<T, O, 32>(entries, n, stream);
#if TUE_LARGE_PARAMS
  return launch_cap<T, O, 256>(entries, n, stream);
#else
  return cudaSuccess;
#endif
}

}  // namespace

cudaError_t launch_fold(const FoldEntry* entries, int n, FloatDtype dtype, cudaStream_t stream) {
  switch (dtype) {
    case FloatDtype::F32: return launch_typed<float, float>(entries, n, stream);
    case FloatDtype::F16: return launch_typed<__half, float>(entries, n, stream);
    case FloatDtype::BF16: return launch_typed<__nv_bfloat16, float>(entries, n, stream);
    case FloatDtype::F64: return launch_typed<double, double>(entries, n, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace torchutils_ext
