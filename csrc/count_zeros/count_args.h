// What both count_zeros kernels take, checked and sorted in one place: every tensor on the kernel's device (that
// of tensors[0]), each either a span the bit test walks (a dtype zero_bits knows, dense with positive strides:
// data_ptr is its lowest address and its elements fill numel slots) or left to ATen. An empty list counts 0 on
// both devices.
#pragma once
#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

#include "zero_bits.h"

namespace torchutils_ext {

struct CountArgs {
  std::vector<ZeroBits> bits;
  std::vector<bool> direct;  // walked by the kernel; the others are counted through ATen
  int64_t direct_elems = 0;
};

inline CountArgs check_count_args(at::TensorList tensors, c10::DeviceType kernel) {
  CountArgs a;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK_VALUE(t.device().type() == kernel && t.device() == tensors[0].device(), "count_zeros: tensors[",
                      i, "] is on ", t.device(), "; the ", c10::DeviceTypeName(kernel),
                      " kernel takes tensors of one such device (tensors[0] is on ", tensors[0].device(), ")");
    a.bits.push_back(zero_bits(t.scalar_type()));
    a.direct.push_back(a.bits.back().supported && t.is_non_overlapping_and_dense());
    if (a.direct.back()) a.direct_elems += t.numel();
  }
  return a;
}

}  // namespace torchutils_ext

// A device's count_zeros kernel registered for dispatch key KEY (the shape of the other ops' registrations).
#define TUE_REGISTER_COUNT(KEY, COUNT) \
  TORCH_LIBRARY_IMPL(torchutils_ext, KEY, m) { m.impl("count_zeros", &COUNT); }
