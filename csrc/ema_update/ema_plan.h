// EmaPlan: ema_update_ over the same (EMA, model) pairs from step to step (ModelEMA's), validated once.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <optional>
#include <vector>

#include "ema_args.h"

namespace torchutils_ext {

// NOTE: [EMA plan] Validating the lists is host work per tensor on every call of the op. A plan validates once;
// it holds no tensor (see [state watch] in python/watch.h, which proves each step that the tensors handed in
// have the metadata the plan was validated with), only what the validation decided.
class EmaPlan {
 public:
  EmaPlan(at::TensorList ema, at::TensorList model, c10::string_view mode);
  // Checks the decay, the guard (nonfinite.h) and that every EMA tensor may be written; raises before any write.
  void prepare(at::TensorList ema, at::TensorList model, double decay, const std::optional<at::Tensor>& decay_tensor,
               const std::optional<at::Tensor>& guard);
  // Runs the device kernel over the prepared call and bumps the written tensors' versions.
  void run(at::TensorList ema, at::TensorList model);

 private:
  EmaCall call_;
};

// The entries copied at each update (copy_buffers' integer buffers, buffers='copy'), after the average of the same
// step. A step that averaged nothing leaves them too: decay exactly 1 (ModelEMA's update_every_n_steps), a device
// decay outside [0, 1] ([decay tensor]), or a skip by the guard (guard[0]); where only the device knows, decided
// there (no sync).
void copy_entries(at::TensorList ema, at::TensorList model, double decay, const std::optional<at::Tensor>& decay_tensor,
                  const std::optional<at::Tensor>& guard);

}  // namespace torchutils_ext
