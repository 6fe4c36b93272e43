// CUDA kernel of ema_update_: every (ema, model) pair of the call in one launch, any mix of dtypes.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../common/ema_kind.h"
#include "../common/ema_math.h"
#include "launch.h"
#include "multi_tensor_apply.cuh"

namespace torchutils_ext {
namespace cuda {
namespace {

template <int CAP>
struct EmaTable {
  void* ema[CAP];
  const void* model[CAP];
  int64_t numel[CAP];
  int32_t block_start[CAP + 1];
  uint8_t kind[CAP];
  int32_t n;
};

__device__ __forceinline__ float to_op(float x) { return x; }
__device__ __forceinline__ double to_op(double x) { return x; }
__device__ __forceinline__ float to_op(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_op(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_op(float x);
template <> __device__ __forceinline__ float from_op<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_op<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_op<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

template <typename E, typename O>
__device__ __forceinline__ E store_op(O x) {
  if constexpr (sizeof(O) == 8) return x; else return from_op<E>(x);
}

template <typename E, typename M, typename O>
__device__ __forceinline__ E ema_one(E e, M m, O d, O omd, bool lerp) {
  const O v = to_op(e), x = to_op(m);
  return store_op<E, O>(lerp ? ema_lerp<O>(v, x, omd) : ema_yolov5<O>(v, x, d, omd));
}

// kChunk-element slice of one pair; 4-wide loads/stores where both pointers allow.
template <typename E, typename M, typename O>
__device__ void ema_chunk(E* e, const M* m, int64_t n, double dd, bool lerp) {
  const O d = static_cast<O>(dd), omd = static_cast<O>(1.0 - dd);
  constexpr int V = 4;
  int64_t i0 = 0;
  if (is_aligned<E, V>(e) && is_aligned<M, V>(m)) {
    const int64_t nv = n / V;
    auto* ev = reinterpret_cast<Vec<E, V>*>(e);
    const auto* mv = reinterpret_cast<const Vec<M, V>*>(m);
    for (int64_t i = threadIdx.x; i < nv; i += blockDim.x) {
      Vec<E, V> a = ev[i];
      const Vec<M, V> b = mv[i];
#pragma unroll
      for (int j = 0; j < V; ++j) a.v[j] = ema_one<E, M, O>(a.v[j], b.v[j], d, omd, lerp);
      ev[i] = a;
    }
    i0 = nv * V;
  }
  for (int64_t i = i0 + threadIdx.x; i < n; i += blockDim.x) e[i] = ema_one<E, M, O>(e[i], m[i], d, omd, lerp);
}

template <int CAP>
__global__ void __launch_bounds__(kThreads)
ema_kernel(const __grid_constant__ EmaTable<CAP> t, const void* dptr, bool d_is_double, double dval, bool lerp) {
  const int k = entry_of_block(t.block_start, t.n);
  const int64_t start = static_cast<int64_t>(blockIdx.x - t.block_start[k]) * kChunk;
  const int64_t n = min(kChunk, t.numel[k] - start);
  // decay read on the device: no host sync, and a captured graph sees the tensor's current value
  const double dd = dptr ? (d_is_double ? *static_cast<const double*>(dptr)
                                        : static_cast<double>(*static_cast<const float*>(dptr)))
                         : dval;
  char* e = static_cast<char*>(t.ema[k]);
  const char* m = static_cast<const char*>(t.model[k]);
  switch (static_cast<EmaKind>(t.kind[k])) {
    case EmaKind::F32_F32:
      return ema_chunk<float, float, float>((float*)e + start, (const float*)m + start, n, dd, lerp);
    case EmaKind::F32_F16:
      return ema_chunk<float, __half, float>((float*)e + start, (const __half*)m + start, n, dd, lerp);
    case EmaKind::F32_BF16:
      return ema_chunk<float, __nv_bfloat16, float>((float*)e + start, (const __nv_bfloat16*)m + start, n, dd, lerp);
    case EmaKind::F16_F16:
      return ema_chunk<__half, __half, float>((__half*)e + start, (const __half*)m + start, n, dd, lerp);
    case EmaKind::BF16_BF16:
      return ema_chunk<__nv_bfloat16, __nv_bfloat16, float>((__nv_bfloat16*)e + start,
                                                            (const __nv_bfloat16*)m + start, n, dd, lerp);
    case EmaKind::F64_F64:
      return ema_chunk<double, double, double>((double*)e + start, (const double*)m + start, n, dd, lerp);
  }
}

template <int CAP>
void launch_cap(const EmaEntry* entries, int n, EmaDecay decay, bool lerp, cudaStream_t stream) {
  pack_and_launch<EmaTable<CAP>, CAP>(
      entries, n,
      [](EmaTable<CAP>& t, int s, const EmaEntry& x) {
        t.ema[s] = x.ema;
        t.model[s] = x.model;
        t.numel[s] = x.numel;
        t.kind[s] = x.kind;
      },
      [&](const EmaTable<CAP>& t, unsigned blocks) {
        ema_kernel<CAP><<<blocks, kThreads, 0, stream>>>(t, decay.ptr, decay.is_double, decay.value, lerp);
      });
}

}  // namespace

void launch_ema(const EmaEntry* entries, int n, EmaDecay decay, bool lerp, cudaStream_t stream) {
  // Small tables for small lists keep the parameter block (and launch latency) small.
  if (n <= 64) launch_cap<64>(entries, n, decay, lerp, stream);
  else launch_cap<1024>(entries, n, decay, lerp, stream);
}

}  // namespace cuda
}  // namespace torchutils_ext
