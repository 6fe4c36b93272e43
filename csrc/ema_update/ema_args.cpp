#include "ema_args.h"

#include <ATen/ATen.h>

#include <cmath>
#include <string>

#include "../common/float_dtype_aten.h"
#include "../common/overlap.h"

namespace torchutils_ext {
namespace {

std::optional<EmaKind> kind_of(at::ScalarType e, at::ScalarType m) {
  const auto de = float_dtype(e), dm = float_dtype(m);
  if (!de || !dm) return std::nullopt;
  return ema_kind(*de, *dm);
}

}  // namespace

void set_ema_decay(EmaCall& call, double decay, const std::optional<at::Tensor>& decay_tensor,
                   std::optional<at::Device> device) {
  call.decay_tensor.reset();
  if (decay_tensor.has_value()) {
    const auto& d = *decay_tensor;
    TORCH_CHECK_TYPE(d.dim() == 0, "ema_update_: decay tensor must be 0-d, got shape ", d.sizes());
    TORCH_CHECK_TYPE(d.scalar_type() == at::kFloat || d.scalar_type() == at::kDouble,
                     "ema_update_: decay tensor must be float32 or float64, got ", d.scalar_type());
    TORCH_CHECK_VALUE(!device || d.device() == *device || d.device().is_cpu(), "ema_update_: decay tensor is on ",
                      d.device(), ", the tensors on ", *device);
    if (d.is_cpu()) {  // a host read, no sync: refused like a float (a device value: see [decay tensor])
      const double v = d.scalar_type() == at::kDouble ? *d.const_data_ptr<double>() : *d.const_data_ptr<float>();
      TORCH_CHECK_VALUE(std::isfinite(v) && v >= 0.0 && v <= 1.0,
                        "ema_update_: decay must be a finite number in [0, 1], got ", v, " (a CPU decay tensor)");
    }
    call.decay_tensor = d;
  } else {
    TORCH_CHECK_VALUE(std::isfinite(decay) && decay >= 0.0 && decay <= 1.0,
                      "ema_update_: decay must be a finite number in [0, 1], got ", decay);
    call.decay = decay;
  }
}

void set_ema_guard(EmaCall& call, const std::optional<at::Tensor>& guard, std::optional<at::Device> device) {
  call.guard.reset();
  if (!guard.has_value()) return;
  const auto& g = *guard;
  TORCH_CHECK_TYPE(g.scalar_type() == at::kLong && g.dim() == 1 && g.numel() == 2 && g.is_contiguous(),
                   "ema_update_: guard must be a contiguous int64 tensor of 2 elements (skipped now, skipped in all), "
                   "got ", g.scalar_type(), " of shape ", g.sizes());
  TORCH_CHECK_VALUE(!device || g.device() == *device, "ema_update_: guard is on ", g.device(), ", the tensors on ",
                    *device);
  call.guard = g;
}

void check_decay_memory(const EmaCall& call, at::TensorList ema, at::TensorList model) {
  if (!call.decay_tensor || call.decay_tensor->is_meta()) return;
  const at::Tensor& d = *call.decay_tensor;
  // NOTE: once per step of ModelEMA's plan with a decay tensor, over every tensor: the usual contiguous tensor is
  // decided from its pointer and size alone; the exact test only where the decay's bytes fall in its span
  const auto lo = reinterpret_cast<uintptr_t>(d.const_data_ptr()), hi = lo + d.element_size();
  auto shares = [&](const at::Tensor& t) {
    const auto start = reinterpret_cast<uintptr_t>(t.const_data_ptr());
    if (start >= hi || !t.numel()) return false;
    if (t.is_contiguous()) return lo < start + t.numel() * t.element_size();
    return shares_memory(d, t);
  };
  auto refuse = [](const char* what, size_t i) {
    TORCH_CHECK_VALUE(false, "ema_update_: the decay tensor shares memory with ", what, i,
                      "]; it must own its memory (the kernels read it while they write the EMA)");
  };
  for (size_t i = 0; i < ema.size(); ++i)
    if (shares(ema[i])) refuse("ema[", i);
  for (size_t i = 0; i < model.size(); ++i)
    if (shares(model[i])) refuse("model[", i);
  TORCH_CHECK_VALUE(!call.guard || !shares_memory(d, *call.guard),
                    "ema_update_: the decay tensor shares memory with the guard; it must own its memory");
}

EmaCall check_ema_args(at::TensorList ema, at::TensorList model, double decay,
                       const std::optional<at::Tensor>& decay_tensor, c10::string_view mode,
                       const std::optional<at::Tensor>& guard) {
  EmaCall call;
  TORCH_CHECK_VALUE(ema.size() == model.size(), "ema_update_: ema and model lists differ in length: ", ema.size(),
                    " vs ", model.size());
  TORCH_CHECK_VALUE(mode == "yolov5" || mode == "lerp", "ema_update_: mode must be 'yolov5' or 'lerp', got '",
                    std::string(mode), "'");
  call.lerp = mode == "lerp";
  const auto device = ema.empty() ? std::nullopt : std::optional<at::Device>(ema[0].device());
  set_ema_decay(call, decay, decay_tensor, device);
  set_ema_guard(call, guard, device);
  for (size_t i = 0; i < ema.size(); ++i) {
    const auto &e = ema[i], &m = model[i];
    auto k = kind_of(e.scalar_type(), m.scalar_type());
    TORCH_CHECK_TYPE(k.has_value(), "ema_update_: ema[", i, "] (", e.scalar_type(), ") with model[", i, "] (",
                     m.scalar_type(), ") is not supported: EMA and model must each be "
                     "float32/float16/bfloat16/float64");
    TORCH_CHECK_VALUE(e.sizes() == m.sizes(), "ema_update_: ema[", i, "] shape ", e.sizes(),
                      " differs from model[", i, "] shape ", m.sizes());
    TORCH_CHECK_VALUE(e.device() == m.device() && e.device() == ema[0].device(), "ema_update_: ema[", i, "] (",
                      e.device(), ") and model[", i, "] (", m.device(), ") must be on the device of ema[0] (",
                      ema[0].device(), ")");
    call.kinds.push_back(*k);
    (same_dense_layout(e, m) ? call.dense : call.strided).push_back(static_cast<int64_t>(i));
  }
  check_decay_memory(call, ema, model);
  if (guard) {  // the guard is written too
    std::vector<at::Tensor> writes(ema.begin(), ema.end());
    writes.push_back(*guard);
    check_no_overlap(writes, model, "ema_update_");
  } else {
    check_no_overlap(ema, model, "ema_update_");
  }
  return call;
}

}  // namespace torchutils_ext
