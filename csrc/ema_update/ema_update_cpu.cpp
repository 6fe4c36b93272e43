// CPU kernel of ema_update_: one pass over all (tensor, range) chunks, plain loops the compiler vectorises.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <type_traits>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "../common/parallel.h"
#include "../common/simd.h"
#include "ema_math.h"
#include "ema_runner.h"
#include "nonfinite.h"

namespace torchutils_ext {
namespace {

// Most elements per work item, the unit the threads' ranges are cut in (item_elems in parallel.h): 16 Ki-element
// items measured no faster on 2 threads and 3% slower on 1.
constexpr int64_t kChunk = 1 << 16;
constexpr int kBlock = 256;          // elements per step of the seed-rounding pairs: buffers that stay in L1

// Element types as the CPU sees them: opmath type, widening, and rounding (from double via float for half and
// bf16, as c10 converts).
template <typename T>
struct Cpu {
  using Op = float;
  static float up(T x) { return static_cast<float>(x); }
  static T down(float x) { return static_cast<T>(x); }
  static T down(double x) { return static_cast<T>(static_cast<float>(x)); }
};
template <>
struct Cpu<double> {
  using Op = double;
  static double up(double x) { return x; }
  static double down(double x) { return x; }
};
template <>
struct Cpu<float> {
  using Op = float;
  static float up(float x) { return x; }
  static float down(float x) { return x; }
  static float down(double x) { return static_cast<float>(x); }
};

// The span is walked as two halves side by side: one core keeps more misses in flight over four streams
// (two per tensor) than over two (four halves measured no better).
template <typename E, typename M, typename F>
TUE_ALWAYS_INLINE void walk_halves(void* e_, const void* m_, int64_t n, F f) {
  E* __restrict__ e0 = static_cast<E*>(e_);
  const M* __restrict__ m0 = static_cast<const M*>(m_);
  const int64_t h = n / 2;
  E* __restrict__ e1 = e0 + h;  // disjoint from e0[0, h): the restrict promise holds
  const M* __restrict__ m1 = m0 + h;
  for (int64_t i = 0; i < h; ++i) {
    e0[i] = f(e0[i], m0[i]);
    e1[i] = f(e1[i], m1[i]);
  }
  if (n & 1) e1[h] = f(e1[h], m1[h]);
}

// Block conversions between elements and their opmath values, in loops the compiler vectorises; with F16C a
// half block converts 8 at a time (c10's software conversion is several times slower and stops vectorisation).
// The same rounding either way: to nearest even.
#if TUE_SIMD_X86
// The first n - n % 8 elements; returns how many were done.
TUE_TARGET_AVX2_F16C_FMA inline int half_to_float_f16c(const at::Half* p, float* out, int n) {
  int i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + i))));
  return i;
}

TUE_TARGET_AVX2_F16C_FMA inline int float_to_half_f16c(const float* in, at::Half* p, int n) {
  int i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(in + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  return i;
}
#endif

template <bool F16C, typename T>
TUE_ALWAYS_INLINE void load_block(const T* p, typename Cpu<T>::Op* out, int n) {
  int i = 0;
#if TUE_SIMD_X86
  if constexpr (F16C && std::is_same_v<T, at::Half>) i = half_to_float_f16c(p, out, n);
#endif
  for (; i < n; ++i) out[i] = Cpu<T>::up(p[i]);
}

template <bool F16C, typename T>
TUE_ALWAYS_INLINE void store_block(const typename Cpu<T>::Op* in, T* p, int n) {
  int i = 0;
#if TUE_SIMD_X86
  if constexpr (F16C && std::is_same_v<T, at::Half>) i = float_to_half_f16c(in, p, n);
#endif
  for (; i < n; ++i) p[i] = Cpu<T>::down(in[i]);
}

// x rounded to T's precision, kept in T's opmath type.
template <bool F16C, typename T>
TUE_ALWAYS_INLINE void round_block(typename Cpu<T>::Op* x, int n) {
  if constexpr (!std::is_same_v<T, typename Cpu<T>::Op>) {
    alignas(64) T tmp[kBlock];
    store_block<F16C, T>(x, tmp, n);
    load_block<F16C, T>(tmp, x, n);
  }
}

// Cpu<T> with the round() the seed steps take: through the F16C conversions where the caller is built for them.
template <bool F16C>
struct CpuSteps {
  template <typename T>
  struct X : Cpu<T> {
    static TUE_ALWAYS_INLINE void round(typename Cpu<T>::Op* x, int n) { round_block<F16C, T>(x, n); }
  };
};

// The ten seed-rounding pairs: NOTE [seed steps] (ema_math.h) a block at a time through buffers in L1, where
// each step is a plain loop over one type.
template <bool F16C, typename E, typename M, typename W>
TUE_ALWAYS_INLINE void seed_span(E* e, const M* m, int64_t n, double d, double omd, bool lerp) {
  using OE = typename Cpu<E>::Op;
  using OM = typename Cpu<M>::Op;
  const OE de = static_cast<OE>(d);
  const OM om = static_cast<OM>(omd);
  const W w = static_cast<W>(omd);
  alignas(64) OE a[kBlock];
  alignas(64) OM b[kBlock];
  alignas(64) W s[kBlock];
  for (int64_t i0 = 0; i0 < n; i0 += kBlock) {
    const int k = static_cast<int>(std::min<int64_t>(kBlock, n - i0));
    load_block<F16C, E>(e + i0, a, k);
    load_block<F16C, M>(m + i0, b, k);
    if (lerp)
      seed_lerp_steps<CpuSteps<F16C>::template X, E, M, W>(a, b, s, k, w);
    else
      seed_yolov5_steps<CpuSteps<F16C>::template X, E, M, W>(a, b, s, k, de, om);
    for (int i = 0; i < k; ++i) a[i] = static_cast<OE>(s[i]);  // double -> float first, as c10 converts
    store_block<F16C, E>(a, e + i0, k);
  }
}

// A one-rounding pair with a half side (fp32 EMA of an fp16 model, fp16/fp16), through float blocks in L1: the
// same float math as the element loop below, with the conversions vectorised (F16C, round to nearest even, as
// c10 converts).
template <typename E, typename M>
TUE_ALWAYS_INLINE void one_rounding_blocked(E* e, const M* m, int64_t n, float d, float omd, bool lerp) {
  alignas(64) float a[kBlock];
  alignas(64) float b[kBlock];
  for (int64_t i0 = 0; i0 < n; i0 += kBlock) {
    const int k = static_cast<int>(std::min<int64_t>(kBlock, n - i0));
    float* __restrict__ v = a;
    if constexpr (std::is_same_v<E, float>) v = e + i0;  // an fp32 EMA is updated where it lies
    else load_block<true, E>(e + i0, a, k);
    load_block<true, M>(m + i0, b, k);
    const float* __restrict__ x = b;
    if (lerp) {
      for (int i = 0; i < k; ++i) v[i] = ema_lerp<float>(v[i], x[i], omd);
    } else {
      for (int i = 0; i < k; ++i) v[i] = ema_yolov5<float>(v[i], x[i], d, omd);
    }
    if constexpr (!std::is_same_v<E, float>) store_block<true, E>(a, e + i0, k);
  }
}

struct CpuHalfs {
  using f16 = at::Half;
  using bf16 = at::BFloat16;
};

// d and 1 - d arrive as float64 (the seed's Python floats) and are rounded here to the opmath each step uses.
template <bool F16C, typename E, typename M>
TUE_ALWAYS_INLINE void ema_span_body(void* e, const void* m, int64_t n, double d, double omd, bool lerp) {
  using P = EmaPair<CpuHalfs, E, M>;  // NOTE [pair rule]
  if constexpr (P::kOneRounding && F16C && (std::is_same_v<E, at::Half> || std::is_same_v<M, at::Half>)) {
    // a half EMA or model: one opmath (float), one rounding, a block at a time, converted 8 at a time
    const float od = static_cast<float>(d), oo = static_cast<float>(omd);
    one_rounding_blocked<E, M>(static_cast<E*>(e), static_cast<const M*>(m), n, od, oo, lerp);
  } else if constexpr (P::kOneRounding) {
    using O = typename Cpu<E>::Op;
    const O od = static_cast<O>(d), oo = static_cast<O>(omd);
    if (lerp)
      walk_halves<E, M>(e, m, n, [=](E v, M x) {
        return static_cast<E>(ema_lerp<O>(static_cast<O>(v), static_cast<O>(x), oo));
      });
    else
      walk_halves<E, M>(e, m, n, [=](E v, M x) {
        return static_cast<E>(ema_yolov5<O>(static_cast<O>(v), static_cast<O>(x), od, oo));
      });
  } else {
    seed_span<F16C, E, M, typename P::W>(static_cast<E*>(e), static_cast<const M*>(m), n, d, omd, lerp);
  }
}

template <typename E, typename M>
TUE_TARGET_AVX2_F16C_FMA void ema_span_avx2(void* e, const void* m, int64_t n, double d, double omd, bool lerp) {
  ema_span_body<true, E, M>(e, m, n, d, omd, lerp);
}

template <typename E, typename M>
void ema_span(void* e, const void* m, int64_t n, double d, double omd, bool lerp) {
  if (cpu_has_avx2_f16c_fma()) return ema_span_avx2<E, M>(e, m, n, d, omd, lerp);
  ema_span_body<false, E, M>(e, m, n, d, omd, lerp);
}

void ema_dispatch(EmaKind k, void* e, const void* m, int64_t n, double d, double omd, bool lerp) {
  with_dtype<CpuHalfs>(ema_dtype_of(k), [&](auto et) {
    with_dtype<CpuHalfs>(model_dtype_of(k), [&](auto mt) {
      ema_span<typename decltype(et)::type, typename decltype(mt)::type>(e, m, n, d, omd, lerp);
    });
  });
}

struct Work {
  char* e;
  const char* m;
  int64_t n;
  EmaKind kind;
  int32_t e_size, m_size;
};

// Software prefetch of the work items ahead. A model has hundreds of small tensors (BN vectors, biases) that
// end before the hardware prefetcher locks onto their stream, so each would cost a full memory latency per
// line; touching the first lines of the next items while this one runs overlaps those latencies (distances of
// 4 to 32 items and 256 to 1024 bytes measured alike).
constexpr int64_t kAhead = 8;
constexpr int64_t kPrefetchBytes = 512;

inline void prefetch_item(const Work& w) {
  const int64_t eb = std::min(w.n * w.e_size, kPrefetchBytes), mb = std::min(w.n * w.m_size, kPrefetchBytes);
  for (int64_t o = 0; o < eb; o += 64) __builtin_prefetch(w.e + o, 1);
  for (int64_t o = 0; o < mb; o += 64) __builtin_prefetch(w.m + o, 0);
}

// Whether n elements of one dtype hold a NaN or Inf (see [nonfinite guard]): an OR over integer tests, which
// the compiler vectorises, over four quarters side by side (more reads in flight on one core).
template <typename U>
TUE_ALWAYS_INLINE bool nonfinite_body(const void* p_, int64_t n, U mask) {
  const U* __restrict__ p = static_cast<const U*>(p_);
  const int64_t q = n / 4;
  U h0 = 0, h1 = 0, h2 = 0, h3 = 0;
  for (int64_t i = 0; i < q; ++i) {
    h0 |= static_cast<U>((p[i] & mask) == mask);
    h1 |= static_cast<U>((p[i + q] & mask) == mask);
    h2 |= static_cast<U>((p[i + 2 * q] & mask) == mask);
    h3 |= static_cast<U>((p[i + 3 * q] & mask) == mask);
  }
  for (int64_t i = 4 * q; i < n; ++i) h0 |= static_cast<U>((p[i] & mask) == mask);
  return (h0 | h1 | h2 | h3) != 0;
}

template <typename U>
TUE_TARGET_AVX2 bool nonfinite_avx2(const void* p, int64_t n, U mask) {
  return nonfinite_body<U>(p, n, mask);
}

bool span_nonfinite(EmaDtype t, const void* p, int64_t n) {
  const uint64_t mask = exponent_mask(t);
  const bool avx2 = cpu_has_avx2();
  switch (element_size(t)) {
    case 2: return avx2 ? nonfinite_avx2<uint16_t>(p, n, static_cast<uint16_t>(mask))
                        : nonfinite_body<uint16_t>(p, n, static_cast<uint16_t>(mask));
    case 4: return avx2 ? nonfinite_avx2<uint32_t>(p, n, static_cast<uint32_t>(mask))
                        : nonfinite_body<uint32_t>(p, n, static_cast<uint32_t>(mask));
    default: return avx2 ? nonfinite_avx2<uint64_t>(p, n, mask) : nonfinite_body<uint64_t>(p, n, mask);
  }
}

// Exact at any thread count: a thread stops early only once some thread has found a NaN/Inf.
bool any_nonfinite(const std::vector<Work>& work) {
  std::atomic<bool> found{false};
  parallel_items(
      CpuKernel::NonfiniteCheck, static_cast<int64_t>(work.size()), [&](int64_t w) { return work[w].n * work[w].m_size; },
      [&](int64_t lo, int64_t hi) {
        for (int64_t w = lo; w < hi && !found.load(std::memory_order_relaxed); ++w)
          if (span_nonfinite(model_dtype_of(work[w].kind), work[w].m, work[w].n)) found.store(true);
      });
  return found.load();
}

void ema_run_cpu(const EmaCall& call, at::TensorList ema, at::TensorList model) {
  const double d = call.decay_tensor ? call.decay_tensor->item<double>() : call.decay;
  const double omd = 1.0 - d;  // in double, then rounded per kind: the seed's (1 - d) is a Python float
  if (d == 1.0) {  // [exact ends] (nonfinite.h): nothing written, nothing checked
    if (call.guard) call.guard->data_ptr<int64_t>()[0] = 0;
    return;
  }

  const EmaSpans spans(call, ema, model);
  int64_t total = 0;
  for (const EmaSpan& sp : spans.spans()) total += sp.numel;
  const int64_t chunk = item_elems(total, kChunk);
  std::vector<Work> work;
  for (const EmaSpan& sp : spans.spans()) {
    const int32_t es = element_size(ema_dtype_of(sp.kind)), ms = element_size(model_dtype_of(sp.kind));
    char* ep = static_cast<char*>(sp.ema);
    const char* mp = static_cast<const char*>(sp.model);
    for (int64_t b = 0; b < sp.numel; b += chunk)
      work.push_back({ep + b * es, mp + b * ms, std::min(sp.numel - b, chunk), sp.kind, es, ms});
  }
  if (call.guard) {
    int64_t* g = call.guard->data_ptr<int64_t>();
    g[0] = any_nonfinite(work) ? 1 : 0;
    g[1] += g[0];
    if (g[0]) return;  // nothing written (the contiguous copies of strided pairs are dropped)
  }
  if (d == 0.0) {  // [exact ends]: the model's values, as copy_ converts them
    at::_foreach_copy_(ema, model);
    return;
  }
  parallel_items(
      CpuKernel::EmaUpdate, static_cast<int64_t>(work.size()),
      [&](int64_t w) { return work[w].n * (2 * work[w].e_size + work[w].m_size); },
      [&](int64_t lo, int64_t hi) {
        for (int64_t w = lo; w < std::min(hi, lo + kAhead); ++w) prefetch_item(work[w]);
        for (int64_t w = lo; w < hi; ++w) {
          if (w + kAhead < hi) prefetch_item(work[w + kAhead]);
          const Work& it = work[w];
          ema_dispatch(it.kind, it.e, it.m, it.n, d, omd, call.lerp);
        }
      });
  spans.write_back();
}

}  // namespace

}  // namespace torchutils_ext

TUE_REGISTER_EMA_RUNNER(CPU, torchutils_ext::ema_run_cpu)
