#include "ema_runner.h"

#include <ATen/ATen.h>

namespace torchutils_ext {
namespace {

// one slot per device type, filled by TUE_REGISTER_EMA_RUNNER when the library loads
EmaRunner g_runners[c10::COMPILE_TIME_MAX_DEVICE_TYPES] = {};
int runner_slot(c10::DeviceType d) {
  const int s = static_cast<int>(d);
  return s >= 0 && s < c10::COMPILE_TIME_MAX_DEVICE_TYPES ? s : -1;
}

}  // namespace

EmaRunnerRegistration::EmaRunnerRegistration(c10::DeviceType device, EmaRunner runner) {
  const int s = runner_slot(device);
  TORCH_CHECK(s >= 0, "ema_update_: no runner slot for device type ", device);
  g_runners[s] = runner;
}

EmaRunner ema_runner(c10::DeviceType device) {
  const int s = runner_slot(device);
  return s < 0 ? nullptr : g_runners[s];
}

EmaSpans::EmaSpans(const EmaCall& call, at::TensorList ema, at::TensorList model) {
  spans_.reserve(call.dense.size() + call.strided.size());
  for (int64_t i : call.dense)
    if (ema[i].numel()) spans_.push_back({ema[i].data_ptr(), model[i].data_ptr(), ema[i].numel(), call.kinds[i]});
  for (int64_t i : call.strided) {
    if (!ema[i].numel()) continue;
    originals_.push_back(ema[i]);
    copies_.push_back(ema[i].contiguous());
    model_copies_.push_back(model[i].contiguous());
    spans_.push_back({copies_.back().data_ptr(), model_copies_.back().data_ptr(), ema[i].numel(), call.kinds[i]});
  }
}

void EmaSpans::write_back() const {
  for (size_t k = 0; k < copies_.size(); ++k)
    if (!copies_[k].is_same(originals_[k])) originals_[k].copy_(copies_[k]);
}

}  // namespace torchutils_ext
