// EmaPlan: ema_update_ over lists that stay the same from step to step (ModelEMA's).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <optional>
#include <vector>

#include "ema_args.h"

namespace torchutils_ext {

// NOTE: [EMA plan] Converting two Python lists of tensors to C++ and validating them is host work per tensor on
// every call of the op. A plan does it once. Each step then only proves that every tensor still has the data
// pointer, dtype, device, sizes and strides it was validated with (a .to()/.half()/`.data =` swap changes one);
// when one changed the plan is stale, nothing is written, and its owner builds a new plan.
class EmaPlan {
 public:
  EmaPlan(std::vector<at::Tensor> ema, std::vector<at::Tensor> model, c10::string_view mode);
  bool current() const;
  // Checks the decay, the guard (nonfinite.h) and that every EMA tensor may be written; raises before any write.
  void prepare(double decay, const std::optional<at::Tensor>& decay_tensor, const std::optional<at::Tensor>& guard);
  // Runs the device kernel on a current, prepared plan and bumps the written tensors' versions.
  void run();

 private:
  struct Seen {  // one tensor as validated; its sizes and strides live in shape_[off, off + 2 * dim)
    const void* ptr;
    at::ScalarType dtype;
    at::Device device;
    int64_t dim, off;
  };
  const at::Tensor& tensor(size_t k) const { return k < ema_.size() ? ema_[k] : model_[k - ema_.size()]; }

  std::vector<at::Tensor> ema_, model_;
  EmaCall call_;
  std::vector<Seen> seen_;
  std::vector<int64_t> shape_;
};

}  // namespace torchutils_ext
