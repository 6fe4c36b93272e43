// NOTE: [fold math] The per-channel math of folding BatchNorm into the preceding layer, shared by the CPU and
// CUDA kernels; the pure-torch twin (_torch_ops.scale_shift_all) keeps the same operation order. Each operation
// rounds once in O (float for fp32/fp16/bf16 weights, double for fp64; see [separate roundings] in
// common/rounding.h): scale = bn_w / sqrt(var + eps), then shift = (bias - mean) * scale (+ bn_b), then each
// weight element times its channel's scale. Division and sqrt are IEEE (correctly rounded) on both devices.
#pragma once
#include "../common/host_device.h"
#include "../common/rounding.h"

namespace torchutils_ext {

template <typename O>
TUE_HD O fold_scale(O bn_w, O var, O eps) {
  return div_rn(bn_w, sqrt_rn(add_rn(var, eps)));
}

template <typename O>
TUE_HD O fold_shift(O bias, O mean, O scale, const O* bn_b) {
  const O s = mul_rn(sub_rn(bias, mean), scale);
  return bn_b ? add_rn(s, *bn_b) : s;
}

}  // namespace torchutils_ext
