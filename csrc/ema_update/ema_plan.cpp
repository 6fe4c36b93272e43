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

void copy_int_buffers(at::TensorList ema, at::TensorList model, const std::optional<at::Tensor>& guard) {
  if (ema.empty()) return;
  if (!guard) {
    at::_foreach_copy_(ema, model);
    return;
  }
  // ema = skipped ? ema : model, as integer arithmetic on the device's flag (0 or 1): three foreach calls
  const at::Tensor skipped = (*guard).select(0, 0), taken = 1 - skipped;
  std::vector<at::Tensor> es, ms;
  for (size_t i = 0; i < ema.size(); ++i) {
    if (ema[i].scalar_type() == at::kBool) {  // no integer arithmetic in place on bool
      ema[i].copy_(at::where(skipped.to(at::kBool), ema[i], model[i]));
    } else {
      es.push_back(ema[i]);
      ms.push_back(model[i]);
    }
  }
  if (es.empty()) return;
  at::_foreach_mul_(es, skipped);
  at::_foreach_add_(es, at::_foreach_mul(ms, taken));
}

}  // namespace torchutils_ext
