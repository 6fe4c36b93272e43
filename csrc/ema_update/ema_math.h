// The per-element EMA formulas, shared by the CPU loop and the CUDA kernel. Every product, sum and difference
// rounds once (see [separate roundings] in common/rounding.h), so "yolov5" rounds exactly like the seed's
// `v *= d; v += (1 - d) * m`, and both devices give the same bits whatever the compiler's contraction flags.
#pragma once

#include "../common/rounding.h"

#if defined(__CUDACC__)
#define TUE_HD __host__ __device__ __forceinline__
#else
#define TUE_HD inline
#endif

namespace torchutils_ext {

template <typename O>
TUE_HD O ema_yolov5(O v, O m, O d, O omd) {
  return add_rn(mul_rn(v, d), mul_rn(omd, m));
}

// torch.lerp(v, m, w) with w = 1 - d: the form torch uses, exact at both ends of [0, 1].
template <typename O>
TUE_HD O ema_lerp(O v, O m, O w) {
  const O diff = sub_rn(m, v);
  return (w < O(0.5) && w > O(-0.5)) ? add_rn(v, mul_rn(w, diff)) : sub_rn(m, mul_rn(diff, sub_rn(O(1), w)));
}

// The seed's `v *= d; v += (1 - d) * m` step by step, as torch runs it for an EMA of dtype E and a model of
// dtype M: v * d in E's opmath rounded to E, (1 - d) * m in M's opmath rounded to M, their sum in W (the wider
// of the two: float or double), stored into E. X<T> gives T's opmath type Op, up(T) -> Op, and down(x): x
// rounded to T (from double via float for half/bf16, as c10 converts). The CUDA kernel's per-element form; the
// CPU kernel runs the same steps a block at a time (seed_span in cpu/ema_update.cpp).
template <template <typename> class X, typename E, typename M, typename W>
TUE_HD E ema_seed_yolov5(E e, M m, typename X<E>::Op d, typename X<M>::Op omd) {
  const W a = static_cast<W>(X<E>::up(X<E>::down(mul_rn(X<E>::up(e), d))));
  const W b = static_cast<W>(X<M>::up(X<M>::down(mul_rn(X<M>::up(m), omd))));
  return X<E>::down(add_rn(a, b));
}

// torch.lerp in W, rounded once into E.
template <template <typename> class X, typename E, typename M, typename W>
TUE_HD E ema_seed_lerp(E e, M m, W w) {
  return X<E>::down(ema_lerp<W>(static_cast<W>(X<E>::up(e)), static_cast<W>(X<M>::up(m)), w));
}

}  // namespace torchutils_ext
