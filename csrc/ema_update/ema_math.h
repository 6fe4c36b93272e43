// The per-element EMA formulas and the seed's rounding steps, shared by the CPU and the CUDA kernel. In "yolov5"
// every product, sum and difference rounds once (see [separate roundings] in common/rounding.h), exactly like the
// seed's `v *= d; v += (1 - d) * m`; "lerp" is torch.lerp's fused multiply-add. Both devices give the same bits
// whatever the compiler's contraction flags.
#pragma once

#include <type_traits>

#include "../common/host_device.h"
#include "../common/rounding.h"
#include "ema_kind.h"

namespace torchutils_ext {

// The pair rule (NOTE [pair rule] in ema_kind.h) on element types E and M.
template <class Halfs, typename E, typename M>
struct EmaPair {
  static constexpr EmaDtype kE = dtype_code<Halfs, E>(), kM = dtype_code<Halfs, M>();
  static constexpr bool kOneRounding = one_rounding_pair(kE, kM);
  using W = std::conditional_t<sums_in_double(kE, kM), double, float>;  // the seed's sum
};

// v * d + (1 - d) * m, each product and the sum rounded once.
template <typename O>
TUE_HD O ema_yolov5(O v, O m, O d, O omd) {
  return add_rn(mul_rn(v, d), mul_rn(omd, m));
}

// torch.lerp(v, m, w) with w = 1 - d, bit for bit: torch computes v + w * (m - v) for |w| < 0.5 and
// m + (w - 1) * (m - v) otherwise, each as one fused multiply-add (its CPU vector loop, and its CUDA kernel built
// with nvcc's default contraction), so Ultralytics' `_foreach_lerp_` EMA and ours agree in every bit. Exact at
// both ends of [0, 1]; w - 1 is exact for w in [0.5, 1].
template <typename O>
TUE_HD O ema_lerp(O v, O m, O w) {
  const bool small = w < O(0.5) && w > O(-0.5);  // one fma with selected operands: the loop vectorises
  return fma_rn(small ? w : sub_rn(w, O(1)), sub_rn(m, v), small ? v : m);
}

// NOTE: [seed steps] The seed's `v *= d; v += (1 - d) * m` step by step, as torch runs it for an EMA of dtype E
// and a model of dtype M: v * d in E's opmath rounded to E, (1 - d) * m in M's opmath rounded to M, their sum
// in W (EmaPair::W) into s; the caller rounds s into E (from double via float for half/bf16, as c10 converts).
// On n values at a time: one on the device, an L1 block on the CPU (whose conversions are vectorised). a holds
// up(e), b up(m), both overwritten. X<T> gives T's opmath type Op and round(Op* x, n): x rounded to T's
// precision, kept in Op.
template <template <typename> class X, typename E, typename M, typename W>
TUE_HD void seed_yolov5_steps(typename X<E>::Op* a, typename X<M>::Op* b, W* s, int n, typename X<E>::Op d,
                              typename X<M>::Op omd) {
  for (int i = 0; i < n; ++i) a[i] = mul_rn(a[i], d);
  X<E>::round(a, n);
  for (int i = 0; i < n; ++i) b[i] = mul_rn(b[i], omd);
  X<M>::round(b, n);
  for (int i = 0; i < n; ++i) s[i] = add_rn(static_cast<W>(a[i]), static_cast<W>(b[i]));
}

// torch.lerp in W (rounded once into E by the caller).
template <template <typename> class X, typename E, typename M, typename W>
TUE_HD void seed_lerp_steps(const typename X<E>::Op* a, const typename X<M>::Op* b, W* s, int n, W w) {
  for (int i = 0; i < n; ++i) s[i] = ema_lerp<W>(static_cast<W>(a[i]), static_cast<W>(b[i]), w);
}

}  // namespace torchutils_ext
