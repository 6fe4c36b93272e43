// CPU kernel of ema_update_: one pass over all (tensor, range) chunks, plain loops the compiler vectorises.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../common/ema_args.h"
#include "../common/ema_math.h"

namespace torchutils_ext {
namespace {

constexpr int64_t kChunk = 1 << 16;  // elements per work item: big enough to amortise, small enough to balance

template <typename E, typename M, typename O>
void ema_span(void* e_, const void* m_, int64_t n, O d, O omd, bool lerp) {
  E* __restrict__ e = static_cast<E*>(e_);
  const M* __restrict__ m = static_cast<const M*>(m_);
  if (lerp) {
    for (int64_t i = 0; i < n; ++i) e[i] = static_cast<E>(ema_lerp<O>(static_cast<O>(e[i]), static_cast<O>(m[i]), omd));
  } else {
    for (int64_t i = 0; i < n; ++i)
      e[i] = static_cast<E>(ema_yolov5<O>(static_cast<O>(e[i]), static_cast<O>(m[i]), d, omd));
  }
}

void ema_dispatch(EmaKind k, void* e, const void* m, int64_t n, double d, double omd, bool lerp) {
  const float df = static_cast<float>(d), of = static_cast<float>(omd);
  switch (k) {
    case EmaKind::F32_F32: return ema_span<float, float, float>(e, m, n, df, of, lerp);
    case EmaKind::F32_F16: return ema_span<float, at::Half, float>(e, m, n, df, of, lerp);
    case EmaKind::F32_BF16: return ema_span<float, at::BFloat16, float>(e, m, n, df, of, lerp);
    case EmaKind::F16_F16: return ema_span<at::Half, at::Half, float>(e, m, n, df, of, lerp);
    case EmaKind::BF16_BF16: return ema_span<at::BFloat16, at::BFloat16, float>(e, m, n, df, of, lerp);
    case EmaKind::F64_F64: return ema_span<double, double, double>(e, m, n, d, omd, lerp);
  }
}

struct Work {
  int64_t pair, begin, end;
};

void ema_update_cpu(at::TensorList ema, at::TensorList model, double decay,
                    const std::optional<at::Tensor>& decay_tensor, c10::string_view mode) {
  const EmaCall call = check_ema_args(ema, model, decay, decay_tensor, mode);
  const double d = call.decay_tensor ? call.decay_tensor->item<double>() : call.decay;
  const double omd = 1.0 - d;  // in double, then rounded per kind: the seed's (1 - d) is a Python float

  std::vector<Work> work;
  for (int64_t i : call.fast)
    for (int64_t b = 0, n = ema[i].numel(); b < n; b += kChunk) work.push_back({i, b, std::min(n, b + kChunk)});
  at::parallel_for(0, static_cast<int64_t>(work.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t w = lo; w < hi; ++w) {
      const auto& it = work[w];
      const auto &e = ema[it.pair], &m = model[it.pair];
      char* ep = static_cast<char*>(e.data_ptr()) + it.begin * e.element_size();
      const char* mp = static_cast<const char*>(m.data_ptr()) + it.begin * m.element_size();
      ema_dispatch(call.kinds[it.pair], ep, mp, it.end - it.begin, d, omd, call.lerp);
    }
  });
  for (int64_t i : call.slow) ema_update_aten(ema[i], model[i], call);
}

}  // namespace

TORCH_LIBRARY_IMPL(torchutils_ext, CPU, m) { m.impl("ema_update_", &ema_update_cpu); }

}  // namespace torchutils_ext
