#pragma once
// NOTE: ops registered from C++ get no ADInplaceOrView kernel, so nothing does for them what torch's own in-place
// ops get from it. Every kernel that writes its inputs calls check_writable before its first write and
// bump_versions after its last: autograd then refuses a backward through a tensor that was overwritten.
#include <ATen/core/Tensor.h>
#include <c10/core/GradMode.h>
#include <c10/core/InferenceMode.h>

namespace torchutils_ext {

inline void check_writable(at::TensorList writes, const char* what) {
  const bool grad = c10::GradMode::is_enabled(), inference = c10::InferenceMode::is_enabled();
  for (size_t i = 0; i < writes.size(); ++i) {
    const at::Tensor& t = writes[i];
    if (!t.defined()) continue;
    TORCH_CHECK(!(grad && t.requires_grad() && t.is_leaf()), what, ": output ", i,
                " is a leaf Variable that requires grad; it cannot be written in place while grad mode is on "
                "(run the call under torch.no_grad())");
    TORCH_CHECK(inference || !t.is_inference(), what, ": output ", i,
                " is an inference tensor; it can be updated in place only inside torch.inference_mode() (or clone "
                "it first)");
  }
}

inline void bump_versions(at::TensorList writes) {
  for (const at::Tensor& t : writes)
    if (t.defined()) t.unsafeGetTensorImpl()->bump_version();
}

}  // namespace torchutils_ext
