#include "ema_plan.h"

#include "../common/inplace.h"
#include "ema_runner.h"

namespace torchutils_ext {
namespace {

// A cache hint; prefetches never fault.
inline void prefetch(const void* p) {
#if defined(__GNUC__) || defined(__clang__)
  __builtin_prefetch(p);
#else
  (void)p;
#endif
}

}  // namespace

EmaPlan::EmaPlan(std::vector<at::Tensor> ema, std::vector<at::Tensor> model, c10::string_view mode)
    : ema_(std::move(ema)), model_(std::move(model)) {
  call_ = check_ema_args(ema_, model_, 0.5, std::nullopt, mode);
  for (size_t k = 0; k < 2 * ema_.size(); ++k) {
    const auto& t = tensor(k);
    seen_.push_back({t.data_ptr(), t.scalar_type(), t.device(), t.dim(), static_cast<int64_t>(shape_.size())});
    shape_.insert(shape_.end(), t.sizes().begin(), t.sizes().end());
    shape_.insert(shape_.end(), t.strides().begin(), t.strides().end());
  }
}

// NOTE: right after a training step every tensor's metadata is out of cache, and each check is a chain of
// dependent loads (tensor -> TensorImpl -> StorageImpl): prefetching the TensorImpls some entries ahead, then
// their storages, overlaps the misses.
bool EmaPlan::current() const {
  constexpr size_t kImpl = 16, kStorage = 8;
  const size_t total = seen_.size();
  for (size_t k = 0; k < total; ++k) {
    if (k + kImpl < total) {
      const char* impl = reinterpret_cast<const char*>(tensor(k + kImpl).unsafeGetTensorImpl());
      for (int line = 0; line < 4; ++line) prefetch(impl + 64 * line);
    }
    if (k + kStorage < total) prefetch(tensor(k + kStorage).unsafeGetTensorImpl()->unsafe_storage().unsafeGetStorageImpl());
    const Seen& s = seen_[k];
    const at::Tensor& t = tensor(k);
    const at::IntArrayRef sizes(shape_.data() + s.off, s.dim), strides(shape_.data() + s.off + s.dim, s.dim);
    if (t.data_ptr() != s.ptr || t.scalar_type() != s.dtype || t.device() != s.device || t.sizes() != sizes ||
        t.strides() != strides)
      return false;
  }
  return true;
}

void EmaPlan::prepare(double decay, const std::optional<at::Tensor>& decay_tensor,
                      const std::optional<at::Tensor>& guard) {
  const auto device = ema_.empty() ? std::nullopt : std::optional<at::Device>(ema_[0].device());
  set_ema_decay(call_, decay, decay_tensor, device);
  set_ema_guard(call_, guard, device);
  check_decay_memory(call_, ema_, model_);
  check_writable(ema_, "ModelEMA.update");
  if (guard) check_writable({*guard}, "ModelEMA.update (guard)");
}

void EmaPlan::run() {
  if (ema_.empty()) return;
  const EmaRunner run = ema_runner(ema_[0].device().type());
  TORCH_CHECK(run != nullptr, "ModelEMA.update: no ema_update_ kernel was built for ", ema_[0].device());
  run(call_, ema_, model_);
  bump_versions(ema_);
  if (call_.guard) bump_versions({*call_.guard});
  call_.decay_tensor.reset();  // hold no reference between steps
  call_.guard.reset();
}

}  // namespace torchutils_ext
