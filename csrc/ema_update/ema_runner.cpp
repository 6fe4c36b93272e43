#include "ema_runner.h"

#include <ATen/ATen.h>

namespace torchutils_ext {
namespace {

EmaRunner g_runners[2] = {nullptr, nullptr};  // CPU, CUDA
int runner_slot(c10::DeviceType d) { return d == c10::DeviceType::CPU ? 0 : d == c10::DeviceType::CUDA ? 1 : -1; }

}  // namespace

EmaRunnerRegistration::EmaRunnerRegistration(c10::DeviceType device, EmaRunner runner) {
  g_runners[runner_slot(device)] = runner;
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
