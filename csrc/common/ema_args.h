// Validation and the generic (ATen) path of ema_update_, shared by the CPU and CUDA kernels.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/util/string_view.h>

#include <optional>
#include <vector>

#include "ema_kind.h"

namespace torchutils_ext {

struct EmaCall {
  bool lerp = false;
  double decay = 0.0;                  // used when decay_tensor is empty
  std::optional<at::Tensor> decay_tensor;
  std::vector<int64_t> fast, slow;     // pair indices: dense with equal strides / anything else
  std::vector<EmaKind> kinds;          // kind of each pair
};

// Checks everything (raising ValueError/TypeError naming the problem) before any tensor is written.
EmaCall check_ema_args(at::TensorList ema, at::TensorList model, double decay,
                       const std::optional<at::Tensor>& decay_tensor, c10::string_view mode);

// Checks decay (finite, in [0, 1]) or decay_tensor (0-d float/double, on `device` or the CPU) into call.
void set_ema_decay(EmaCall& call, double decay, const std::optional<at::Tensor>& decay_tensor,
                   std::optional<at::Device> device);

// Runs a validated call on the device of its tensors: the kernels behind ema_update_, and EmaPlan's fast path.
// Registered by the CPU and CUDA kernel files when the library loads.
using EmaRunner = void (*)(const EmaCall& call, at::TensorList ema, at::TensorList model);
struct EmaRunnerRegistration {
  EmaRunnerRegistration(c10::DeviceType device, EmaRunner runner);
};
EmaRunner ema_runner(c10::DeviceType device);  // nullptr when none was built for it

// One pair through ATen ops, with the same rounding steps as the fast kernels (for strided tensors).
void ema_update_aten(const at::Tensor& ema, const at::Tensor& model, const EmaCall& call);

// True when both are non-overlapping and dense with the same strides, so they can be walked as flat spans.
bool same_dense_layout(const at::Tensor& a, const at::Tensor& b);

// Raises ValueError when any two tensors of `writes` overlap, or one of `writes` overlaps one of `reads`.
void check_no_overlap(at::TensorList writes, at::TensorList reads, const char* what);

}  // namespace torchutils_ext
