// Memory-overlap checks of the in-place ops (ema_update_, fold_conv_bn_): their outputs must own their memory.
#pragma once
#include <ATen/core/Tensor.h>

namespace torchutils_ext {

// True when both are non-overlapping and dense with the same strides, so they can be walked as flat spans.
bool same_dense_layout(const at::Tensor& a, const at::Tensor& b);

// True when a and b have an element in common (exact for strided views, as check_no_overlap).
bool shares_memory(const at::Tensor& a, const at::Tensor& b);

// Raises ValueError when any tensor of `writes` has elements sharing memory (expand()ed), any two overlap, or one
// of `writes` overlaps one of `reads`. Strided views are compared element by element where their spans meet.
void check_no_overlap(at::TensorList writes, at::TensorList reads, const char* what);

}  // namespace torchutils_ext
