// CPU kernel of fold_conv_bn / fold_conv_bn_: per layer, BN factors per output channel, then one scaling
// pass over the weight rows. Layers whose weights cannot be walked as rows go through ATen broadcasting.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

#include "../common/ema_args.h"
#include "../common/fold_args.h"

namespace torchutils_ext {
namespace {

template <typename O>
std::vector<O> as_vec(const std::optional<at::Tensor>& t, int64_t n, O fill) {
  std::vector<O> v(n, fill);
  if (t.has_value()) {
    const at::Tensor c = t->to(c10::CppTypeToScalarType<O>::value).contiguous();
    const O* p = c.data_ptr<O>();
    std::copy(p, p + n, v.begin());
  }
  return v;
}

template <typename T, typename O>
void fold_layer(const FoldArgs& a, size_t i, const RowLayout& L, const at::Tensor& out_w, const at::Tensor& out_b) {
  const int64_t c = a.channels(i);
  const O eps = static_cast<O>(a.eps[i]);
  const auto var = as_vec<O>(a.var[i], c, O(0)), mean = as_vec<O>(a.mean[i], c, O(0));
  const auto bw = as_vec<O>(a.bn_weight.get(i), c, O(1)), bb = as_vec<O>(a.bn_bias.get(i), c, O(0));
  const auto b = as_vec<O>(a.bias.get(i), c, O(0));
  const bool has_bw = a.bn_weight.get(i).has_value(), has_bb = a.bn_bias.get(i).has_value();
  std::vector<O> scale(c);
  T* ob = out_b.data_ptr<T>();
  for (int64_t k = 0; k < c; ++k) {  // same operation order as fold_aten, so both paths round alike
    scale[k] = (has_bw ? bw[k] : O(1)) / std::sqrt(var[k] + eps);
    O s = (b[k] - mean[k]) * scale[k];
    if (has_bb) s = s + bb[k];
    ob[k] = static_cast<T>(s);
  }
  const T* __restrict__ src = a.weight[i].data_ptr<T>();
  T* __restrict__ dst = out_w.data_ptr<T>();
  const int64_t rows = a.weight[i].numel() / L.K, group = L.ipg * L.opg;
  at::parallel_for(0, rows, std::max<int64_t>(1, (1 << 15) / L.K), [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const O f = scale[(r / group) * L.opg + r % L.opg];
      const T* s = src + r * L.K;
      T* d = dst + r * L.K;
      for (int64_t k = 0; k < L.K; ++k) d[k] = static_cast<T>(static_cast<O>(s[k]) * f);
    }
  });
}

void fold_one(const FoldArgs& a, size_t i, const at::Tensor& out_w, at::Tensor& out_b) {
  const auto& w = a.weight[i];
  const RowLayout L = row_layout(w, a.transposed_groups[i]);
  if (!L.ok || (!out_w.is_same(w) && out_w.strides() != w.strides())) {
    fold_aten(a, i, out_w, out_b);
    return;
  }
  if (!out_b.defined()) out_b = at::empty({a.channels(i)}, w.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "fold_conv_bn", [&] {
    using O = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    fold_layer<scalar_t, O>(a, i, L, out_w, out_b);
  });
}

std::vector<at::Tensor> fold_into(const FoldArgs& a, const std::vector<at::Tensor>& out_w,
                                  std::vector<at::Tensor> out_b) {
  for (size_t i = 0; i < a.weight.size(); ++i) {
    TORCH_CHECK_VALUE(a.weight[i].device().is_cpu(), "fold_conv_bn: weight[", i, "] is on ",
                      a.weight[i].device(), "; the CPU kernel takes CPU tensors only");
  }
  for (size_t i = 0; i < a.weight.size(); ++i) fold_one(a, i, out_w[i], out_b[i]);
  return out_b;
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> fold_conv_bn_cpu(
    at::TensorList weight, const OptTensorList& bias, const OptTensorList& bn_weight, const OptTensorList& bn_bias,
    at::TensorList mean, at::TensorList var, at::ArrayRef<double> eps, at::IntArrayRef groups) {
  const FoldArgs a{weight, bias, bn_weight, bn_bias, mean, var, eps, groups};
  check_fold_args(a);
  std::vector<at::Tensor> out_w;
  for (const auto& w : weight) out_w.push_back(at::empty_like(w));  // keeps dense strides (channels_last)
  auto out_b = fold_into(a, out_w, bias_outputs({}, weight.size()));
  return {out_w, out_b};
}

void fold_conv_bn_inplace_cpu(
    at::TensorList weight, at::TensorList bias_out, const OptTensorList& bias, const OptTensorList& bn_weight, const OptTensorList& bn_bias,
    at::TensorList mean, at::TensorList var, at::ArrayRef<double> eps, at::IntArrayRef groups) {
  const FoldArgs a{weight, bias, bn_weight, bn_bias, mean, var, eps, groups};
  check_fold_args(a);
  check_fold_outputs(a, bias_out);
  fold_into(a, weight.vec(), bias_outputs(bias_out, weight.size()));
}

}  // namespace

TORCH_LIBRARY_IMPL(torchutils_ext, CPU, m) {
  m.impl("fold_conv_bn", &fold_conv_bn_cpu);
  m.impl("fold_conv_bn_", &fold_conv_bn_inplace_cpu);
}

}  // namespace torchutils_ext
