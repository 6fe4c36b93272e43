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

// The integer buffers copy_buffers copies (timm's policy), after the float update of the same step. With a guard,
// a skipped step leaves them too (guard[0] says so on the device: no sync).
void copy_int_buffers(at::TensorList ema, at::TensorList model, const std::optional<at::Tensor>& guard);

}  // namespace torchutils_ext
