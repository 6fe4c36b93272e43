// How a validated ema_update_ call reaches a device's kernel: the runner each device registers, the op entry
// points built over it, and the flat spans a runner walks.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>
#include <c10/util/string_view.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "../common/inplace.h"
#include "ema_args.h"

namespace torchutils_ext {

// Runs a validated call on the device of its tensors: behind the op, and behind the EMA plan, which validates once
// and then calls the runner directly. Each device's kernel file registers one for both callers at once with
// TUE_REGISTER_EMA_RUNNER (below): there is no second table to edit for a new device.
using EmaRunner = void (*)(const EmaCall& call, at::TensorList ema, at::TensorList model);
struct EmaRunnerRegistration {
  EmaRunnerRegistration(c10::DeviceType device, EmaRunner runner);
};
EmaRunner ema_runner(c10::DeviceType device);  // nullptr when none was built for it

// The op's two overloads over a device's runner: everything is checked before the first write, and the EMA
// tensors' versions are bumped after the last (see inplace.h).
template <EmaRunner Run>
void ema_update_op(at::TensorList ema, at::TensorList model, double decay, const std::optional<at::Tensor>& decay_tensor,
                   c10::string_view mode, const std::optional<at::Tensor>& guard) {
  const EmaCall call = check_ema_args(ema, model, decay, decay_tensor, mode, guard);
  check_writable(ema, "ema_update_");
  if (guard) check_writable({*guard}, "ema_update_ (guard)");
  Run(call, ema, model);
  bump_versions(ema);
  if (guard) bump_versions({*guard});
}
template <EmaRunner Run>
void ema_update_scalar(at::TensorList ema, at::TensorList model, double decay, c10::string_view mode,
                       const std::optional<at::Tensor>& guard) {
  ema_update_op<Run>(ema, model, decay, std::nullopt, mode, guard);
}
template <EmaRunner Run>
void ema_update_tensor(at::TensorList ema, at::TensorList model, const at::Tensor& decay, c10::string_view mode,
                       const std::optional<at::Tensor>& guard) {
  ema_update_op<Run>(ema, model, 0.0, decay, mode, guard);
}

// NOTE: [EMA spans] The kernels walk each pair as two flat spans of one layout. The other pairs (call.strided:
// strided, or dense with different strides) go through the same kernels on contiguous copies, written back
// afterwards, so each device has one copy of the math.
class EmaSpans {
 public:
  EmaSpans(const EmaCall& call, at::TensorList ema, at::TensorList model);
  const std::vector<EmaSpan>& spans() const { return spans_; }
  void write_back() const;  // the contiguous copies into their strided originals

 private:
  std::vector<EmaSpan> spans_;
  std::vector<at::Tensor> originals_, copies_, model_copies_;
};

}  // namespace torchutils_ext

// A device's runner, registered with the dispatcher (both overloads, dispatch key KEY) and with the EMA plan's
// table (ema_runner) in one place. Use at namespace scope, outside any namespace.
#define TUE_REGISTER_EMA_RUNNER(KEY, RUN)                                                          \
  static const ::torchutils_ext::EmaRunnerRegistration tue_ema_runner_##KEY(c10::DeviceType::KEY, &RUN); \
  TORCH_LIBRARY_IMPL(torchutils_ext, KEY, m) {                                                    \
    m.impl("ema_update_.Scalar", &::torchutils_ext::ema_update_scalar<&RUN>);                       \
    m.impl("ema_update_.Tensor", &::torchutils_ext::ema_update_tensor<&RUN>);                       \
  }
