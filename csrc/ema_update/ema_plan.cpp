#include "ema_plan.h"

#include <ATen/ATen.h>

#include "../common/inplace.h"
#include "ema_runner.h"

namespace torchutils_ext {

EmaPlan::EmaPlan(at::TensorList ema, at::TensorList model, c10::string_view mode)
    : call_(check_ema_args(ema, model, 0.5, std::nullopt, mode)) {}

void EmaPlan::prepare(at::TensorList ema, at::TensorList model, double decay,
                      const std::optional<at::Tensor>& decay_tensor,
                      const std::optional<at::Tensor>& guard) {
  const auto device = ema.empty() ? std::nullopt : std::optional<at::Device>(ema[0].device());
  set_ema_decay(call_, decay, decay_tensor, device);
  set_ema_guard(call_, guard, device);
  check_decay_memory(call_, ema, model);
  check_writable(ema, "ModelEMA.update");
  if (guard) check_writable({*guard}, "ModelEMA.update (guard)");
}

void EmaPlan::run(at::TensorList ema, at::TensorList model) {
  if (ema.empty()) return;
  const EmaRunner run = ema_runner(ema[0].device().type());
  TORCH_CHECK(run != nullptr, "ModelEMA.update: no ema_update_ kernel was built for ", ema[0].device());
  run(call_, ema, model);
  bump_versions(ema);
  if (call_.guard) bump_versions({*call_.guard});
  call_.decay_tensor.reset();  // hold no reference between steps
  call_.guard.reset();
}

void copy_entries(at::TensorList ema, at::TensorList model, double decay, const std::optional<at::Tensor>& decay_tensor,
                  const std::optional<at::Tensor>& guard) {
  if (ema.empty()) return;
  std::optional<at::Tensor> hold;  // a 0-d bool on the device: leave them this step
  if (decay_tensor && !decay_tensor->is_cpu()) {
    hold = decay_tensor->ge(0.0).logical_and(decay_tensor->lt(1.0)).logical_not();  // 1, NaN, out of range
  } else if ((decay_tensor ? decay_tensor->item<double>() : decay) == 1.0) {  // a CPU read: no device sync
    return;
  }
  if (guard) {
    if (guard->is_cpu()) {
      if (guard->data_ptr<int64_t>()[0] != 0) return;
    } else {
      const at::Tensor skipped = guard->select(0, 0).to(at::kBool);
      hold = hold ? hold->logical_or(skipped) : skipped;
    }
  }
  if (!hold) {
    at::_foreach_copy_(ema, model);
    return;
  }
  // ema = hold ? ema : model on the device: integers by arithmetic on the flag (three foreach calls for all),
  // floats and bools by where (exact: 0 * inf would be NaN)
  std::vector<at::Tensor> es, ms;
  for (size_t i = 0; i < ema.size(); ++i) {
    if (at::isIntegralType(ema[i].scalar_type(), /*includeBool=*/false)) {
      es.push_back(ema[i]);
      ms.push_back(model[i]);
    } else {
      ema[i].copy_(at::where(*hold, ema[i], model[i]));
    }
  }
  if (es.empty()) return;
  const at::Tensor keep = hold->to(at::kLong);
  at::_foreach_mul_(es, keep);
  at::_foreach_add_(es, at::_foreach_mul(ms, 1 - keep));
}

}  // namespace torchutils_ext
