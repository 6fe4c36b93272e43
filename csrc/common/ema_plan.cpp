// torch.classes.torchutils_ext.EmaPlan: ema_update_ for lists that stay the same from call to call (ModelEMA's).
//
// Per call, ema_update_ pays for converting two Python lists of tensors to C++ (~0.15 us a tensor), autograd's
// fallback bookkeeping (~0.15 us a tensor) and full validation; for a 300-tensor model that is ~150 us, more
// than the CUDA kernel. The plan converts and validates once. update() then only checks, in C++, that every
// tensor still has the data pointer, dtype, device, sizes and strides it was validated with (a .to()/.half()/
// `.data =` swap changes one of them and triggers full revalidation), and runs the device kernel directly.
#include <ATen/ATen.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "ema_args.h"

namespace torchutils_ext {
namespace {

struct Seen {
  const void* ptr;
  at::ScalarType dtype;
  at::Device device;
  std::vector<int64_t> sizes, strides;

  explicit Seen(const at::Tensor& t)
      : ptr(t.data_ptr()), dtype(t.scalar_type()), device(t.device()), sizes(t.sizes().vec()),
        strides(t.strides().vec()) {}
  bool same(const at::Tensor& t) const {
    return t.data_ptr() == ptr && t.scalar_type() == dtype && t.device() == device && t.sizes() == sizes &&
           t.strides() == strides;
  }
};

class EmaPlan : public torch::CustomClassHolder {
 public:
  EmaPlan(std::vector<at::Tensor> ema, std::vector<at::Tensor> model, std::string formula)
      : ema_(std::move(ema)), model_(std::move(model)), formula_(std::move(formula)) {
    validate();
  }

  void update(double decay, std::optional<at::Tensor> decay_tensor) {
    if (!unchanged()) {
      validate();  // raises before anything is written when the tensors no longer fit together
      ++revalidations_;
    }
    if (ema_.empty()) return;
    set_ema_decay(call_, decay, decay_tensor, ema_[0].device());
    const EmaRunner run = ema_runner(ema_[0].device().type());
    TORCH_CHECK(run != nullptr, "EmaPlan: no ema_update_ kernel was built for ", ema_[0].device());
    run(call_, ema_, model_);
    call_.decay_tensor.reset();  // hold no reference between calls
    for (const auto& e : ema_) e.unsafeGetTensorImpl()->bump_version();  // as an in-place op would
  }

  int64_t revalidations() const { return revalidations_; }
  int64_t size() const { return static_cast<int64_t>(ema_.size()); }

 private:
  void validate() {
    call_ = check_ema_args(ema_, model_, 0.5, std::nullopt, formula_);
    seen_.clear();
    for (const auto* l : {&ema_, &model_})
      for (const auto& t : *l) seen_.emplace_back(t);
  }

  bool unchanged() const {
    size_t k = 0;
    for (const auto* l : {&ema_, &model_})
      for (const auto& t : *l)
        if (!seen_[k++].same(t)) return false;
    return true;
  }

  std::vector<at::Tensor> ema_, model_;
  std::string formula_;
  EmaCall call_;
  std::vector<Seen> seen_;
  int64_t revalidations_ = 0;
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(torchutils_ext, m) {
  m.class_<EmaPlan>("EmaPlan")
      .def(torch::init<std::vector<at::Tensor>, std::vector<at::Tensor>, std::string>())
      .def("update", &EmaPlan::update)
      .def("revalidations", &EmaPlan::revalidations)
      .def("size", &EmaPlan::size);
}

}  // namespace torchutils_ext
