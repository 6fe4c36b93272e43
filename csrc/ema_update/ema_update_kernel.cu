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

// Dev<T> with the round() the seed steps take.
template <typename T>
struct DevSteps : Dev<T> {
  using Op = typename Dev<T>::Op;
  static __device__ __forceinline__ void round(Op* x, int n) {
    for (int i = 0; i < n; ++i) x[i] = Dev<T>::up(Dev<T>::down(x[i]));
  }
};

struct DevHalfs {
  using f16 = __half;
  using bf16 = __nv_bfloat16;
};

// The per-element update of one (E, M) pair: NOTE [pair rule] (ema_kind.h) the six one-rounding pairs in one
// opmath rounded once into E, the others by NOTE [seed steps] (ema_math.h). d and 1 - d arrive as float64 (the
// seed's Python floats).
template <typename E, typename M>
struct EmaOp {
  using P = EmaPair<DevHalfs, E, M>;
  static constexpr bool kOneRounding = P::kOneRounding;
  using W = typename P::W;
  using O = std::conditional_t<kOneRounding, typename Dev<E>::Op, W>;
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
    if constexpr (kOneRounding) {
      const O v = Dev<E>::up(e), x = static_cast<O>(Dev<M>::up(m));
      return Dev<E>::down(lerp ? ema_lerp<O>(v, x, w) : ema_yolov5<O>(v, x, static_cast<O>(d), static_cast<O>(omd)));
    } else {
      typename Dev<E>::Op a = Dev<E>::up(e);
      typename Dev<M>::Op b = Dev<M>::up(m);
      W s;
      if (lerp) seed_lerp_steps<DevSteps, E, M, W>(&a, &b, &s, 1, w);
      else seed_yolov5_steps<DevSteps, E, M, W>(&a, &b, &s, 1, d, omd);
      return Dev<E>::down(s);
    }
  }
};

// kChunk-element slice of one pair; 4-wide loads/stores past a scalar head when both spans reach a 4-element
// boundary at the same element (views at any offset into a flat buffer, whatever the lengths before them).
template <typename E, typename M>
__device__ void ema_chunk(E* e, const M* m, int64_t n, double dd, bool lerp) {
  const EmaOp<E, M> op(dd, lerp);
  constexpr int V = 4;
  int64_t lo = 0, hi = 0;  // the vector body [lo, hi); the rest goes one element at a time
  const int64_t head = vector_head<E, V>(e, n);
  if (head == vector_head<M, V>(m, n)) {
    lo = head;
    hi = head + (n - head) / V * V;
  }
  for (int64_t i = threadIdx.x; i < lo; i += blockDim.x) e[i] = op(e[i], m[i]);
  auto* ev = reinterpret_cast<Vec<E, V>*>(e + lo);
  const auto* mv = reinterpret_cast<const Vec<M, V>*>(m + lo);
  for (int64_t i = threadIdx.x; i < (hi - lo) / V; i += blockDim.x) {
    Vec<E, V> a = ev[i];
    const Vec<M, V> b = mv[i];
#pragma unroll
    for (int j = 0; j < V; ++j) a.v[j] = op(a.v[j], b.v[j]);
    ev[i] = a;
  }
  for (int64_t i = hi + threadIdx.x; i < n; i += blockDim.x) e[i] = op(e[i], m[i]);
}

// This block's slice of the table: kChunk elements (fewer at an entry's end) of one pair.
struct EmaSlice {
  void* e;
  const void* m;
  int64_t n;
  EmaKind kind;
};

template <int CAP>
__device__ __forceinline__ EmaSlice slice_of(const EmaTable<CAP>& t) {
  const int k = entry_of_block(t.block_start, t.n);
  const int64_t start = static_cast<int64_t>(blockIdx.x - t.block_start[k]) * kChunk;
  const auto kind = static_cast<EmaKind>(t.kind[k]);
  return {static_cast<char*>(t.ema[k]) + start * element_size(ema_dtype_of(kind)),
          static_cast<const char*>(t.model[k]) + start * element_size(model_dtype_of(kind)),
          min(kChunk, t.numel[k] - start), kind};
}

// NOTE: [decay tensor] a decay read on the device is used only when it is a number in [0, 1]; any other value
// (NaN, Inf, out of range) writes nothing, and with a guard the step counts as skipped (ema_args.h).
__device__ __forceinline__ double read_decay(const void* dptr, bool d_is_double, double dval) {
  return dptr ? (d_is_double ? *static_cast<const double*>(dptr) : static_cast<double>(*static_cast<const float*>(dptr)))
              : dval;
}
__device__ __forceinline__ bool decay_ok(double d) { return d >= 0.0 && d <= 1.0; }  // false for NaN

// [nonfinite guard]: whether this block's chunk of the model holds a NaN/Inf. The bodies below are shared by
// every table tier (see [table tiers]); each kernel only finds its block's slice.
__device__ __noinline__ bool slice_nonfinite(const void* m, int64_t n, EmaDtype md) {
  const uint64_t mask = exponent_mask(md);
  const int size = element_size(md);
  const auto all_set = [](auto x, auto mk) { return (x & mk) == mk; };
  if (size == 2) {
    const auto mk = static_cast<uint16_t>(mask);
    return count_where(static_cast<const uint16_t*>(m), n, [&](uint16_t x) { return all_set(x, mk); }) != 0;
  }
  if (size == 4) {
    const auto mk = static_cast<uint32_t>(mask);
    return count_where(static_cast<const uint32_t*>(m), n, [&](uint32_t x) { return all_set(x, mk); }) != 0;
  }
  return count_where(static_cast<const uint64_t*>(m), n, [&](uint64_t x) { return all_set(x, mask); }) != 0;
}

// Each block tests its chunk of the model (and the decay); the first block to find a NaN/Inf or a decay out of
// [0, 1] sets guard[0] (zeroed before the launch) and counts the skip in guard[1]. A decay of exactly 1 checks
// nothing: [exact ends] (nonfinite.h).
template <int CAP>
__global__ void __launch_bounds__(kThreads)
nonfinite_kernel(const __grid_constant__ EmaTable<CAP> t, const void* dptr, bool d_is_double, double dval,
                 unsigned long long* guard) {
  const double dd = read_decay(dptr, d_is_double, dval);
  if (dd == 1.0) return;  // [exact ends]: nothing checked, guard[0] stays 0
  const EmaSlice s = slice_of(t);
  bool hit = slice_nonfinite(s.m, s.n, model_dtype_of(s.kind));
  if (threadIdx.x == 0) hit |= !decay_ok(dd);
  if (__syncthreads_or(hit) && threadIdx.x == 0 && atomicCAS(&guard[0], 0ull, 1ull) == 0ull) atomicAdd(&guard[1], 1ull);
}

__device__ __noinline__ void ema_slice(EmaSlice s, double dd, bool lerp) {
  with_dtype<DevHalfs>(ema_dtype_of(s.kind), [&](auto et) {
    with_dtype<DevHalfs>(model_dtype_of(s.kind), [&](auto mt) {
      using E = typename decltype(et)::type;
      using M = typename decltype(mt)::type;
      ema_chunk<E, M>(static_cast<E*>(s.e), static_cast<const M*>(s.m), s.n, dd, lerp);
    });
  });
}

template <int CAP>
__global__ void __launch_bounds__(kThreads)
ema_kernel(const __grid_constant__ EmaTable<CAP> t, const void* dptr, bool d_is_double, double dval, bool lerp,
           const unsigned long long* skip) {
  if (skip != nullptr && *skip) return;  // the guard found a NaN/Inf or a bad decay: nothing is written
  // decay read on the device: no host sync, and a captured graph sees the tensor's current value
  const double dd = read_decay(dptr, d_is_double, dval);
  if (!decay_ok(dd) || dd == 1.0) return;  // [decay tensor]; [exact ends]: 1 writes nothing
  ema_slice(slice_of(t), dd, lerp);
}

// Each table with the kernel's other parameters (and their alignment padding) within the limit it is launched
// under: 64 entries with any runtime, up to 1024 with large parameters only.
constexpr size_t kEmaExtra = 3 * sizeof(const void*) + 2 * sizeof(double);
static_assert(sizeof(EmaTable<64>) + kEmaExtra <= kSmallParams, "the 64-entry table must fit 4 KB");
static_assert(sizeof(EmaTable<1024>) + kEmaExtra <= kLargeParams, "the 1024-entry table must fit 32 KB");

template <int CAP>
cudaError_t launch_cap(const EmaSpan* entries, int n, EmaDecay decay, bool lerp, int64_t* guard,
                       cudaStream_t stream) {
  auto fill = [](EmaTable<CAP>& t, int s, const EmaSpan& x) {
    t.ema[s] = x.ema;
    t.model[s] = x.model;
    t.numel[s] = x.numel;
    t.kind[s] = static_cast<uint8_t>(x.kind);
  };
  auto* g = reinterpret_cast<unsigned long long*>(guard);
  if (g != nullptr) {  // every table's check before any table's update: the whole EMA or nothing
    const cudaError_t err =
        pack_and_launch<EmaTable<CAP>, CAP>(entries, n, fill, [&](const EmaTable<CAP>& t, unsigned blocks) {
          nonfinite_kernel<CAP><<<blocks, kThreads, 0, stream>>>(t, decay.ptr, decay.is_double, decay.value, g);
        });
    if (err != cudaSuccess) return err;
  }
  return pack_and_launch<EmaTable<CAP>, CAP>(entries, n, fill, [&](const EmaTable<CAP>& t, unsigned blocks) {
    ema_kernel<CAP><<<blocks, kThreads, 0, stream>>>(t, decay.ptr, decay.is_double, decay.value, lerp, g);
  });
}

}  // namespace

cudaError_t launch_ema(const EmaSpan* entries, int n, EmaDecay decay, bool lerp, int64_t* guard,
                       cudaStream_t stream) {
  return with_tier(n, [&](auto cap) { return launch_cap<decltype(cap)::value>(entries, n, decay, lerp, guard, stream); });
}

}  // namespace cuda
}  // namespace torchutils_ext
