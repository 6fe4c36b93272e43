// Validation of ema_update_'s arguments, shared by the CPU and CUDA kernels and the EMA plan.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/util/string_view.h>

#include <optional>
#include <vector>

#include "ema_kind.h"

namespace torchutils_ext {

// A validated call: every pair's kind, and which pairs walk as flat spans.
struct EmaCall {
  bool lerp = false;
  double decay = 0.0;                  // used when decay_tensor is empty
  std::optional<at::Tensor> decay_tensor;
  std::optional<at::Tensor> guard;     // see [nonfinite guard] in nonfinite.h
  std::vector<int64_t> dense, strided;  // pair indices: dense with equal strides / anything else
  std::vector<EmaKind> kinds;          // kind of each pair
};

// Checks everything (raising ValueError/TypeError naming the problem) before any tensor is written.
EmaCall check_ema_args(at::TensorList ema, at::TensorList model, double decay,
                       const std::optional<at::Tensor>& decay_tensor, c10::string_view mode,
                       const std::optional<at::Tensor>& guard = std::nullopt);

// NOTE: [decay tensor] A decay tensor must be 0-d float32/float64, on the tensors' device or the CPU, and own its
// memory (no element shared with an EMA or model tensor or the guard: the kernels read it while they write).
// Its value must be a number in [0, 1]. On the CPU that is checked before anything is written (ValueError, as a
// float decay). On a device it cannot be without a sync: the kernels read it, and when it is NaN, Inf or out of
// [0, 1] they write nothing, and a guard (nonfinite.h) counts the step as skipped.
// Checks decay (finite, in [0, 1]) or decay_tensor (the above, but for its memory) into call.
void set_ema_decay(EmaCall& call, double decay, const std::optional<at::Tensor>& decay_tensor,
                   std::optional<at::Device> device);

// Raises ValueError when call's decay tensor shares memory with an EMA or model tensor or the guard.
void check_decay_memory(const EmaCall& call, at::TensorList ema, at::TensorList model);

// Checks the guard (a contiguous int64 tensor of 2 elements on `device`) into call.
void set_ema_guard(EmaCall& call, const std::optional<at::Tensor>& guard, std::optional<at::Device> device);

}  // namespace torchutils_ext
