// EmaPlan: ema_update_ for lists that stay the same from call to call (ModelEMA's). Reached two ways: the
// torchbind class torch.classes.torchutils_ext.EmaPlan, and the CPython functions in python/ema_plan_py.cpp
// (ModelEMA's per-step path: a torchbind method call alone costs ~80 us right after a cache flush).
#pragma once
#include <ATen/ATen.h>
#include <torch/custom_class.h>

#include <optional>
#include <string>
#include <vector>

#include "ema_args.h"

namespace torchutils_ext {

class EmaPlan : public torch::CustomClassHolder {
 public:
  EmaPlan(std::vector<at::Tensor> ema, std::vector<at::Tensor> model, std::string formula);
  // Rechecks every tensor (revalidating all when one changed, raising before anything is written), runs the
  // device kernel, bumps the version counters.
  void update(double decay, std::optional<at::Tensor> decay_tensor);
  int64_t revalidations() const { return revalidations_; }
  int64_t size() const { return static_cast<int64_t>(ema_.size()); }

 private:
  // What one tensor looked like when validated; its sizes and strides live in shape_.
  struct Seen {
    const void* ptr;
    at::ScalarType dtype;
    at::Device device;
    int64_t dim, off;  // sizes at shape_[off, off + dim), strides right after
  };

  const at::Tensor& tensor(size_t k) const { return k < ema_.size() ? ema_[k] : model_[k - ema_.size()]; }
  void validate();
  bool same(const Seen& s, const at::Tensor& t) const;
  bool unchanged() const;

  std::vector<at::Tensor> ema_, model_;
  std::string formula_;
  EmaCall call_;
  std::vector<Seen> seen_;
  std::vector<int64_t> shape_;
  int64_t revalidations_ = 0;
};

}  // namespace torchutils_ext
