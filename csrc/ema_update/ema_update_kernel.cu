// CUDA kernel of ema_update_: every (ema, model) pair of the call in one launch, any mix of dtypes.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "../common/multi_tensor_apply.cuh"
#include "ema_kind.h"
#include "ema_math.h"
#include "ema_update_kernel.h"
#include "nonfinite.h"

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

// Element types as the kernels see them: opmath type, widening, and rounding (from double via float for half
// and bf16, as c10 converts).
template <typename T> struct Dev;
template <> struct Dev<float> {
  using Op = float;
  static __device__ __forceinline__ float up(float x) { return x; }
  static __device__ __forceinline__ float down(float x) { return x; }
  static __device__ __forceinline__ float down(double x) { return __double2float_rn(x); }
};
template <> struct Dev<double> {
  using Op = double;
  static __device__ __forceinline__ double up(double x) { return x; }
  static __device__ __forceinline__ double down(double x) { return x; }
};
template <> struct Dev<__half> {
  using Op = float;
  static __device__ __forceinline__ float up(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half down(float x) { return __float2half_rn(x); }
  static __device__ __forceinline__ __half down(double x) { return __float2half_rn(__double2float_rn(x)); }
};
template <> struct Dev<__nv_bfloat16> {
  using Op = float;
  static __device__ __forceinline__ float up(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 down(float x) { return __float2bfloat16_rn(x); }
  static __device__ __forceinline__ __nv_bfloat16 down(double x) { return __float2bfloat16_rn(__double2float_rn(x)); }
};

// The per-element update of one (E, M) pair: the six fast_math_pair pairs (ema_kind.h) in one opmath rounded
// once into E, the others by the seed's three steps. d and 1 - d arrive as float64 (the seed's Python floats).
template <typename E, typename M>
struct EmaOp {
  static constexpr bool kFast =
      std::is_same<E, M>::value || (std::is_same<E, float>::value && !std::is_same<M, double>::value);
  using W = typename std::conditional<std::is_same<E, double>::value || std::is_same<M, double>::value, double,
                                      float>::type;
  using O = typename std::conditional<kFast, typename Dev<E>::Op, W>::type;
  typename Dev<E>::Op d;
  typename Dev<M>::Op omd;
  O w;  // 1 - d for lerp
  bool lerp;
  bool copy;  // [exact ends] (nonfinite.h): decay 0 writes the model's values, converted as copy_ converts them

  __device__ __forceinline__ EmaOp(double dd, bool lerp_)
      : d(static_cast<typename Dev<E>::Op>(dd)), omd(static_cast<typename Dev<M>::Op>(1.0 - dd)),
        w(static_cast<O>(1.0 - dd)), lerp(lerp_), copy(dd == 0.0) {}

  __device__ __forceinline__ E operator()(E e, M m) const {
    if (copy) return Dev<E>::down(Dev<M>::up(m));
    if constexpr (kFast) {
      const O v = Dev<E>::up(e), x = static_cast<O>(Dev<M>::up(m));
      return Dev<E>::down(lerp ? ema_lerp<O>(v, x, w) : ema_yolov5<O>(v, x, static_cast<O>(d), static_cast<O>(omd)));
    } else {
      return lerp ? ema_seed_lerp<Dev, E, M, W>(e, m, w) : ema_seed_yolov5<Dev, E, M, W>(e, m, d, omd);
    }
  }
};

// kChunk-element slice of one pair; 4-wide loads/stores where both pointers allow.
template <typename E, typename M>
__device__ void ema_chunk(E* e, const M* m, int64_t n, double dd, bool lerp) {
  const EmaOp<E, M> op(dd, lerp);
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
      for (int j = 0; j < V; ++j) a.v[j] = op(a.v[j], b.v[j]);
      ev[i] = a;
    }
    i0 = nv * V;
  }
  for (int64_t i = i0 + threadIdx.x; i < n; i += blockDim.x) e[i] = op(e[i], m[i]);
}

template <typename T>
struct Tag {
  using type = T;
};

template <typename F>
__device__ __forceinline__ void with_dtype(EmaDtype t, F&& f) {
  switch (t) {
    case EmaDtype::F32: return f(Tag<float>{});
    case EmaDtype::F16: return f(Tag<__half>{});
    case EmaDtype::BF16: return f(Tag<__nv_bfloat16>{});
    case EmaDtype::F64: return f(Tag<double>{});
  }
}

// [nonfinite guard]: each block tests its chunk of the model; the first block to find a NaN/Inf sets guard[0]
// (zeroed before the launch) and counts the skip in guard[1].
template <typename U>
__device__ __forceinline__ bool chunk_nonfinite(const void* p_, int64_t n, U mask) {
  const U* p = static_cast<const U*>(p_);
  bool hit = false;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) hit |= (p[i] & mask) == mask;
  return hit;
}

// The decay, read on the device when it is a tensor: no host sync, and a captured graph sees its current value.
__device__ __forceinline__ double load_decay(const void* dptr, bool d_is_double, double dval) {
  if (dptr == nullptr) return dval;
  return d_is_double ? *static_cast<const double*>(dptr) : static_cast<double>(*static_cast<const float*>(dptr));
}

template <int CAP>
__global__ void __launch_bounds__(kThreads)
nonfinite_kernel(const __grid_constant__ EmaTable<CAP> t, const void* dptr, bool d_is_double, double dval,
                 unsigned long long* guard) {
  if (load_decay(dptr, d_is_double, dval) == 1.0) return;  // [exact ends]: nothing checked, guard[0] stays 0
  const int k = entry_of_block(t.block_start, t.n);
  const int64_t start = static_cast<int64_t>(blockIdx.x - t.block_start[k]) * kChunk;
  const int64_t n = min(kChunk, t.numel[k] - start);
  const EmaDtype md = model_dtype_of(static_cast<EmaKind>(t.kind[k]));
  const uint64_t mask = exponent_mask(md);
  const int size = element_size(md);
  const char* m = static_cast<const char*>(t.model[k]) + start * size;
  const bool hit = size == 2   ? chunk_nonfinite<uint16_t>(m, n, static_cast<uint16_t>(mask))
                   : size == 4 ? chunk_nonfinite<uint32_t>(m, n, static_cast<uint32_t>(mask))
                               : chunk_nonfinite<uint64_t>(m, n, mask);
  if (__syncthreads_or(hit) && threadIdx.x == 0 && atomicCAS(&guard[0], 0ull, 1ull) == 0ull) atomicAdd(&guard[1], 1ull);
}

template <int CAP>
__global__ void __launch_bounds__(kThreads)
ema_kernel(const __grid_constant__ EmaTable<CAP> t, const void* dptr, bool d_is_double, double dval, bool lerp,
           const unsigned long long* skip) {
  if (skip != nullptr && *skip) return;  // the guard found a NaN/Inf: nothing is written
  const double dd = load_decay(dptr, d_is_double, dval);
  if (dd == 1.0) return;  // [exact ends]: nothing written
  const int k = entry_of_block(t.block_start, t.n);
  const int64_t start = static_cast<int64_t>(blockIdx.x - t.block_start[k]) * kChunk;
  const int64_t n = min(kChunk, t.numel[k] - start);
  const EmaKind kind = static_cast<EmaKind>(t.kind[k]);
  void* e = t.ema[k];
  const void* m = t.model[k];
  with_dtype(ema_dtype_of(kind), [&](auto et) {
    with_dtype(model_dtype_of(kind), [&](auto mt) {
      using E = typename decltype(et)::type;
      using M = typename decltype(mt)::type;
      ema_chunk<E, M>(static_cast<E*>(e) + start, static_cast<const M*>(m) + start, n, dd, lerp);
    });
  });
}

// Each table with the kernel's other parameters (and their alignment padding) within the limit it is launched
// under: 64 entries with any runtime, 256 and 1024 with large parameters only.
constexpr size_t kEmaExtra = 3 * sizeof(const void*) + 2 * sizeof(double);
static_assert(sizeof(EmaTable<64>) + kEmaExtra <= kSmallParams, "the 64-entry table must fit 4 KB");
static_assert(sizeof(EmaTable<1024>) + kEmaExtra <= kLargeParams, "the 1024-entry table must fit 32 KB");

template <int CAP>
void launch_cap(const EmaSpan* entries, int n, EmaDecay decay, bool lerp, int64_t* guard, cudaStream_t stream) {
  auto fill = [](EmaTable<CAP>& t, int s, const EmaSpan& x) {
    t.ema[s] = x.ema;
    t.model[s] = x.model;
    t.numel[s] = x.numel;
    t.kind[s] = static_cast<uint8_t>(x.kind);
  };
  auto* g = reinterpret_cast<unsigned long long*>(guard);
  if (g != nullptr)  // every table's check before any table's update: the whole EMA or nothing
    pack_and_launch<EmaTable<CAP>, CAP>(entries, n, fill, [&](const EmaTable<CAP>& t, unsigned blocks) {
      nonfinite_kernel<CAP><<<blocks, kThreads, 0, stream>>>(t, decay.ptr, decay.is_double, decay.value, g);
    });
  pack_and_launch<EmaTable<CAP>, CAP>(entries, n, fill, [&](const EmaTable<CAP>& t, unsigned blocks) {
    ema_kernel<CAP><<<blocks, kThreads, 0, stream>>>(t, decay.ptr, decay.is_double, decay.value, lerp, g);
  });
}

}  // namespace

void launch_ema(const EmaSpan* entries, int n, EmaDecay decay, bool lerp, int64_t* guard, cudaStream_t stream) {
  // The smallest table that holds the list: a smaller parameter block to copy per launch.
  if (n <= 64 || !large_kernel_params()) return launch_cap<64>(entries, n, decay, lerp, guard, stream);
#if TUE_LARGE_PARAMS
  if (n <= 256) return launch_cap<256>(entries, n, decay, lerp, guard, stream);
  launch_cap<1024>(entries, n, decay, lerp, guard, stream);
#endif
}

}  // namespace cuda
}  // namespace torchutils_ext
