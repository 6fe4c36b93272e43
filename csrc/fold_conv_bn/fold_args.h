// Validation, the rows layout and the op entry points of fold_conv_bn, shared by the CPU and CUDA kernels.
#pragma once
#include <ATen/ATen.h>
#include <ATen/core/List.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "../common/inplace.h"

namespace torchutils_ext {

using OptTensorList = c10::List<std::optional<at::Tensor>>;

struct FoldArgs {
  at::TensorList weight;
  const OptTensorList& bias;
  const OptTensorList& bn_weight;
  const OptTensorList& bn_bias;
  at::TensorList mean, var;
  at::ArrayRef<double> eps;
  at::IntArrayRef transposed_groups;

  int64_t channels(size_t i) const;  // output channels of layer i
  std::optional<at::Tensor> get(const OptTensorList& l, size_t i) const { return l.get(i); }
};

// Checks everything (ValueError/TypeError naming the problem) before any tensor is written.
void check_fold_args(const FoldArgs& a);
// For the in-place variant: one contiguous bias output per layer, C elements of the weight's dtype, and no
// weight or bias output overlapping another.
void check_fold_outputs(const FoldArgs& a, at::TensorList bias_out);
// Bias outputs for the functional variant (undefined entries are allocated by the kernels).
std::vector<at::Tensor> bias_outputs(at::TensorList bias_out, size_t n);

// Rows layout of a weight the kernels walk: K elements per row, row r holds output channel
// (r / (ipg * opg)) * opg + r % opg (Conv/Linear: ipg = 1, opg = C, so channel = r).
struct RowLayout {
  bool ok;
  int64_t K, ipg, opg;
};
RowLayout row_layout(const at::Tensor& w, int64_t transposed_groups);

// What the kernels read (src) and write (dst) for layer i: the weight and out_w themselves when they walk as
// rows with the same strides, else contiguous copies; finish() writes dst back into out_w. So every layout
// goes through the one kernel math.
struct RowsIO {
  at::Tensor src, dst, out;
  RowLayout L;
  void finish() const {
    if (!dst.is_same(out)) out.copy_(dst);
  }
};
RowsIO rows_io(const at::Tensor& w, const at::Tensor& out_w, int64_t transposed_groups);

// A device's folding loop: writes out_w (each may be the weight itself) and out_b (undefined entries are
// allocated), returns out_b.
using FoldInto = std::vector<at::Tensor> (*)(const FoldArgs& a, const std::vector<at::Tensor>& out_w,
                                             std::vector<at::Tensor> out_b);

// The two op entry points over a device's FoldInto: fold_conv_bn (new weights, dense strides of the old:
// channels_last stays) and fold_conv_bn_ (in place). Everything is checked before anything is written.
template <FoldInto Fold>
std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> fold_functional(
    at::TensorList weight, const OptTensorList& bias, const OptTensorList& bn_weight, const OptTensorList& bn_bias,
    at::TensorList mean, at::TensorList var, at::ArrayRef<double> eps, at::IntArrayRef groups) {
  const FoldArgs a{weight, bias, bn_weight, bn_bias, mean, var, eps, groups};
  check_fold_args(a);
  std::vector<at::Tensor> out_w;
  for (const auto& w : weight) out_w.push_back(at::empty_like(w));
  auto out_b = Fold(a, out_w, bias_outputs({}, weight.size()));
  return {out_w, out_b};
}

template <FoldInto Fold>
void fold_inplace(at::TensorList weight, at::TensorList bias_out, const OptTensorList& bias,
                  const OptTensorList& bn_weight, const OptTensorList& bn_bias, at::TensorList mean,
                  at::TensorList var, at::ArrayRef<double> eps, at::IntArrayRef groups) {
  const FoldArgs a{weight, bias, bn_weight, bn_bias, mean, var, eps, groups};
  check_fold_args(a);
  check_fold_outputs(a, bias_out);
  check_writable(weight, "fold_conv_bn_");
  check_writable(bias_out, "fold_conv_bn_");
  Fold(a, weight.vec(), bias_outputs(bias_out, weight.size()));
  bump_versions(weight);
  bump_versions(bias_out);
}

}  // namespace torchutils_ext

// A device's FoldInto registered as both ops for dispatch key KEY: the one registration a new device adds (the
// shape of TUE_REGISTER_EMA_RUNNER). Use at namespace scope, outside any namespace.
#define TUE_REGISTER_FOLD(KEY, FOLD)                                              \
  TORCH_LIBRARY_IMPL(torchutils_ext, KEY, m) {                                    \
    m.impl("fold_conv_bn", &::torchutils_ext::fold_functional<&FOLD>);           \
    m.impl("fold_conv_bn_", &::torchutils_ext::fold_inplace<&FOLD>);             \
  }
