#include "ema_args.h"

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include <algorithm>
#include <cmath>
#include <iterator>
#include <utility>
#include <vector>

namespace torchutils_ext {
namespace {

std::optional<EmaDtype> ema_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return EmaDtype::F32;
    case at::kHalf: return EmaDtype::F16;
    case at::kBFloat16: return EmaDtype::BF16;
    case at::kDouble: return EmaDtype::F64;
    default: return std::nullopt;
  }
}

std::optional<EmaKind> kind_of(at::ScalarType e, at::ScalarType m) {
  const auto de = ema_dtype(e), dm = ema_dtype(m);
  if (!de || !dm) return std::nullopt;
  return ema_kind(*de, *dm);
}

// [first byte, one past last byte] a tensor can touch.
std::pair<uintptr_t, uintptr_t> span(const at::Tensor& t) {
  auto start = reinterpret_cast<uintptr_t>(t.data_ptr());
  int64_t extent = 1;
  for (int64_t d = 0; d < t.dim(); ++d) extent += (t.size(d) - 1) * std::abs(t.stride(d));
  return {start, start + extent * t.element_size()};
}

}  // namespace

bool same_dense_layout(const at::Tensor& a, const at::Tensor& b) {
  return a.is_non_overlapping_and_dense() && b.is_non_overlapping_and_dense() && a.strides() == b.strides();
}

namespace {

// Spans that intersect prove shared memory only for tensors that fill their span; strided views (two interleaved
// columns of one buffer) intersect without sharing an element and are compared element by element, up to
// kExactLimit elements (larger ones count as overlapping, the safe answer).
constexpr int64_t kExactLimit = int64_t(1) << 22;

bool fills_span(const at::Tensor& t, std::pair<uintptr_t, uintptr_t> s) {
  return s.second - s.first == static_cast<uintptr_t>(t.numel() * t.element_size()) &&
         at::has_internal_overlap(t) == at::MemOverlap::No;
}

std::vector<uintptr_t> addresses(const at::Tensor& t) {
  std::vector<uintptr_t> out{reinterpret_cast<uintptr_t>(t.data_ptr())};
  for (int64_t d = 0; d < t.dim(); ++d) {
    std::vector<uintptr_t> next;
    next.reserve(out.size() * t.size(d));
    for (uintptr_t a : out)
      for (int64_t k = 0; k < t.size(d); ++k) next.push_back(a + k * t.stride(d) * t.element_size());
    out.swap(next);
  }
  std::sort(out.begin(), out.end());
  return out;
}

bool share_memory(const at::Tensor& a, std::pair<uintptr_t, uintptr_t> sa, const at::Tensor& b,
                  std::pair<uintptr_t, uintptr_t> sb) {
  if (fills_span(a, sa) && fills_span(b, sb)) return true;
  const auto pa = reinterpret_cast<uintptr_t>(a.data_ptr()), pb = reinterpret_cast<uintptr_t>(b.data_ptr());
  if (a.element_size() != b.element_size() || (pa > pb ? pa - pb : pb - pa) % a.element_size() ||
      std::max(a.numel(), b.numel()) > kExactLimit)
    return true;
  const auto xa = addresses(a), xb = addresses(b);
  std::vector<uintptr_t> both;
  std::set_intersection(xa.begin(), xa.end(), xb.begin(), xb.end(), std::back_inserter(both));
  return !both.empty();
}

using Span = std::pair<std::pair<uintptr_t, uintptr_t>, size_t>;  // (span, index)

}  // namespace

void check_no_overlap(at::TensorList writes, at::TensorList reads, const char* what) {
  if (writes.empty() || writes[0].is_meta()) return;
  for (size_t i = 0; i < writes.size(); ++i)  // e.g. expand()ed: a write to one element would land on others
    TORCH_CHECK_VALUE(!writes[i].defined() || at::has_internal_overlap(writes[i]) != at::MemOverlap::Yes, what,
                      ": output ", i, " has elements that share memory (an expand()ed or stride-0 tensor); it "
                      "cannot be written in place");
  std::vector<Span> w;
  for (size_t i = 0; i < writes.size(); ++i)
    if (writes[i].defined() && writes[i].numel()) w.push_back({span(writes[i]), i});
  std::sort(w.begin(), w.end());
  for (size_t k = 0; k < w.size(); ++k)
    for (size_t kk = k + 1; kk < w.size() && w[kk].first.first < w[k].first.second; ++kk)
      TORCH_CHECK_VALUE(!share_memory(writes[w[k].second], w[k].first, writes[w[kk].second], w[kk].first), what,
                        ": two output tensors overlap in memory; each must own its storage");
  std::vector<uintptr_t> starts, ends;  // ends[k]: the furthest end among spans starting at or before w[k]
  for (const auto& s : w) {
    starts.push_back(s.first.first);
    ends.push_back(std::max(ends.empty() ? 0 : ends.back(), s.first.second));
  }
  for (const auto& t : reads) {
    if (!t.defined() || !t.numel()) continue;
    const auto s = span(t);
    // the last write starting before this read ends, then back while a span can still reach it
    auto k = static_cast<int64_t>(std::lower_bound(starts.begin(), starts.end(), s.second) - starts.begin()) - 1;
    for (; k >= 0 && ends[k] > s.first; --k)
      TORCH_CHECK_VALUE(!(w[k].first.second > s.first && share_memory(writes[w[k].second], w[k].first, t, s)), what,
                        ": an output tensor shares memory with an input tensor");
  }
}

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
    call.decay_tensor = d;
  } else {
    TORCH_CHECK_VALUE(std::isfinite(decay) && decay >= 0.0 && decay <= 1.0,
                      "ema_update_: decay must be a finite number in [0, 1], got ", decay);
    call.decay = decay;
  }
}

EmaCall check_ema_args(at::TensorList ema, at::TensorList model, double decay,
                       const std::optional<at::Tensor>& decay_tensor, c10::string_view mode) {
  EmaCall call;
  TORCH_CHECK_VALUE(ema.size() == model.size(), "ema_update_: ema and model lists differ in length: ", ema.size(),
                    " vs ", model.size());
  TORCH_CHECK_VALUE(mode == "yolov5" || mode == "lerp", "ema_update_: mode must be 'yolov5' or 'lerp', got '",
                    std::string(mode), "'");
  call.lerp = mode == "lerp";
  set_ema_decay(call, decay, decay_tensor, ema.empty() ? std::nullopt : std::optional<at::Device>(ema[0].device()));
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
    (same_dense_layout(e, m) ? call.fast : call.slow).push_back(static_cast<int64_t>(i));
  }
  check_no_overlap(ema, model, "ema_update_");
  return call;
}

namespace {
EmaRunner g_runners[2] = {nullptr, nullptr};  // CPU, CUDA
int runner_slot(c10::DeviceType d) { return d == c10::DeviceType::CPU ? 0 : d == c10::DeviceType::CUDA ? 1 : -1; }
}  // namespace

EmaRunnerRegistration::EmaRunnerRegistration(c10::DeviceType device, EmaRunner runner) {
  g_runners[runner_slot(device)] = runner;
}

EmaRunner ema_runner(c10::DeviceType device) {
  const int s = runner_slot(device);
  return s < 0 ? nullptr : g_runners[s];
}

namespace {

at::ScalarType opmath(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// The seed's three steps (ema_seed_yolov5 / ema_seed_lerp) with ATen ops: each product in its opmath, rounded
// to its operand's dtype; the sum or the lerp in W. The decay goes to each opmath as a tensor of that opmath, so
// a half EMA multiplies by the float32 decay (a float64 device scalar would be rounded to half on CUDA).
void seed_steps_aten(const at::Tensor& ema, const at::Tensor& model, const EmaCall& call) {
  const auto E = ema.scalar_type(), M = model.scalar_type(), W = at::promote_types(E, M);
  const auto d64 = call.decay_tensor ? call.decay_tensor->to(ema.device(), at::kDouble)
                                     : at::scalar_tensor(call.decay, ema.options().dtype(at::kDouble));
  const auto omd64 = 1 - d64;  // in float64, like the seed's Python (1 - d)
  at::Tensor out;
  if (call.lerp) {
    out = at::lerp(ema.to(W), model.to(W), omd64.to(opmath(W)).to(W));
  } else {
    const auto a = ema.to(opmath(E)).mul(d64.to(opmath(E))).to(E);
    const auto b = model.to(opmath(M)).mul(omd64.to(opmath(M))).to(M);
    out = a.to(W).add(b.to(W));
  }
  ema.copy_(out.scalar_type() == at::kDouble && E != at::kFloat && E != at::kDouble ? out.to(at::kFloat) : out);
}

}  // namespace

void ema_update_aten(const at::Tensor& ema, const at::Tensor& model, const EmaCall& call) {
  const auto de = ema_dtype(ema.scalar_type()), dm = ema_dtype(model.scalar_type());
  if (!fast_math_pair(*de, *dm)) return seed_steps_aten(ema, model, call);
  const auto op = ema.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor work = ema.scalar_type() == op ? ema : ema.to(op);
  const at::Tensor m = model.to(op);
  if (call.decay_tensor.has_value()) {
    const auto d64 = call.decay_tensor->to(ema.device(), at::kDouble);
    const auto d = d64.to(op), omd = (1 - d64).to(op);  // 1 - d in float64 first, like the seed's Python
    if (call.lerp) {
      work.lerp_(m, omd);
    } else {
      work.mul_(d).add_(m.mul(omd));
    }
  } else if (call.lerp) {
    work.lerp_(m, 1.0 - call.decay);
  } else {
    work.mul_(call.decay).add_(m.mul(1.0 - call.decay));
  }
  if (!work.is_same(ema)) ema.copy_(work);
}

}  // namespace torchutils_ext
