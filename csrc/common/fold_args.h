// Validation, per-channel BN factors, and the generic (ATen) path of fold_conv_bn, shared by CPU and CUDA.
#pragma once
#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

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

// Rows layout of weight i, when the fast kernels can walk it: K elements per row, row r holds output channel
// (r / (ipg * opg)) * opg + r % opg (Conv/Linear: ipg = 1, opg = C, so channel = r).
struct RowLayout {
  bool ok;
  int64_t K, ipg, opg;
};
RowLayout row_layout(const at::Tensor& w, int64_t transposed_groups);

// Layer i through ATen broadcasting (any strides); writes out_w (may alias weight) and out_b (allocated
// when undefined).
void fold_aten(const FoldArgs& a, size_t i, const at::Tensor& out_w, at::Tensor& out_b);

}  // namespace torchutils_ext
