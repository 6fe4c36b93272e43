#include "fold_args.h"

#include <ATen/ATen.h>

#include <cmath>

#include "../common/overlap.h"

namespace torchutils_ext {

int64_t FoldArgs::channels(size_t i) const {
  const auto& w = weight[i];
  return transposed_groups[i] ? w.size(1) * transposed_groups[i] : w.size(0);
}

void check_fold_args(const FoldArgs& a) {
  const size_t n = a.weight.size();
  const size_t sizes[] = {a.bias.size(), a.bn_weight.size(), a.bn_bias.size(), a.mean.size(), a.var.size(),
                          a.eps.size(), a.transposed_groups.size()};
  for (size_t s : sizes)
    TORCH_CHECK_VALUE(s == n, "fold_conv_bn: every argument list must have one entry per weight (", n,
                      "), one has ", s);
  for (size_t i = 0; i < n; ++i) {
    const auto& w = a.weight[i];
    TORCH_CHECK_TYPE(at::isFloatingType(w.scalar_type()), "fold_conv_bn: weight[", i, "] has dtype ",
                     w.scalar_type(), "; only floating-point layers can be folded");
    TORCH_CHECK_VALUE(w.dim() >= 2, "fold_conv_bn: weight[", i, "] must have at least 2 dims, got ", w.sizes());
    const int64_t g = a.transposed_groups[i];
    TORCH_CHECK_VALUE(g >= 0 && (g == 0 || w.size(0) % g == 0), "fold_conv_bn: transposed_groups[", i, "]=", g,
                      " does not divide the ", w.size(0), " input channels");
    const int64_t c = a.channels(i);
    auto check_vec = [&](const std::optional<at::Tensor>& x, const char* name) {
      if (!x.has_value()) return;
      TORCH_CHECK_VALUE(x->dim() == 1 && x->numel() == c, "fold_conv_bn: ", name, "[", i, "] has shape ",
                        x->sizes(), ", expected (", c, ",) output channels");
      TORCH_CHECK_TYPE(at::isFloatingType(x->scalar_type()), "fold_conv_bn: ", name, "[", i, "] has dtype ",
                       x->scalar_type(), "; expected floating point");
      TORCH_CHECK_VALUE(x->device() == w.device(), "fold_conv_bn: ", name, "[", i, "] is on ", x->device(),
                        ", weight[", i, "] on ", w.device());
    };
    check_vec(a.bias.get(i), "bias");
    check_vec(a.bn_weight.get(i), "bn_weight");
    check_vec(a.bn_bias.get(i), "bn_bias");
    check_vec(a.mean[i], "running_mean");
    check_vec(a.var[i], "running_var");
    TORCH_CHECK_VALUE(std::isfinite(a.eps[i]) && a.eps[i] >= 0, "fold_conv_bn: eps[", i,
                      "] must be finite and >= 0, got ", a.eps[i]);
  }
}

RowLayout row_layout(const at::Tensor& w, int64_t g) {
  if (w.numel() == 0) return {true, 0, 1, 1};  // no rows to walk; the biases are still written
  if (g == 0) {
    const int64_t c = w.size(0), k = w.numel() / c;
    // output channel outermost and each channel's K elements contiguous (contiguous or channels_last)
    return {w.is_non_overlapping_and_dense() && (c == 1 || w.stride(0) == k), k, 1, c};
  }
  const int64_t cin = w.size(0), opg = w.size(1);
  return {w.is_contiguous(), w.numel() / (cin * opg), cin / g, opg};
}

void check_fold_outputs(const FoldArgs& a, at::TensorList bias_out) {
  TORCH_CHECK_VALUE(bias_out.size() == a.weight.size(), "fold_conv_bn_: bias_out has ", bias_out.size(),
                    " entries, weight has ", a.weight.size());
  for (size_t i = 0; i < bias_out.size(); ++i) {
    const auto &b = bias_out[i], &w = a.weight[i];
    TORCH_CHECK_VALUE(b.dim() == 1 && b.numel() == a.channels(i) && b.is_contiguous(), "fold_conv_bn_: bias_out[",
                      i, "] must be a contiguous (", a.channels(i), ",) tensor, got ", b.sizes());
    TORCH_CHECK_TYPE(b.scalar_type() == w.scalar_type(), "fold_conv_bn_: bias_out[", i, "] has dtype ",
                     b.scalar_type(), ", weight[", i, "] ", w.scalar_type());
    TORCH_CHECK_VALUE(b.device() == w.device(), "fold_conv_bn_: bias_out[", i, "] is on ", b.device(),
                      ", weight[", i, "] on ", w.device());
  }
  std::vector<at::Tensor> outs(a.weight.begin(), a.weight.end());
  outs.insert(outs.end(), bias_out.begin(), bias_out.end());
  std::vector<at::Tensor> reads(a.mean.begin(), a.mean.end());
  reads.insert(reads.end(), a.var.begin(), a.var.end());
  for (const auto* l : {&a.bias, &a.bn_weight, &a.bn_bias})
    for (size_t i = 0; i < l->size(); ++i)
      if (auto t = l->get(i)) reads.push_back(*t);
  check_no_overlap(outs, reads, "fold_conv_bn_");
}

std::vector<at::Tensor> bias_outputs(at::TensorList bias_out, size_t n) {
  return bias_out.empty() ? std::vector<at::Tensor>(n) : bias_out.vec();
}

RowsIO rows_io(const at::Tensor& w, const at::Tensor& out_w, int64_t g) {
  const RowLayout L = row_layout(w, g);
  if (L.ok && (out_w.is_same(w) || out_w.strides() == w.strides())) return {w, out_w, out_w, L};
  const at::Tensor src = w.contiguous();
  // in place on a non-walkable weight: the contiguous copy is written, then copied back
  const at::Tensor dst = out_w.is_same(w) && !src.is_same(w) ? src : at::empty_like(src, at::MemoryFormat::Contiguous);
  return {src, dst, out_w, row_layout(src, g)};
}

}  // namespace torchutils_ext
