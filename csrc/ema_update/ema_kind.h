// Element types of an (EMA, model) pair as one byte: 4 * EMA dtype code + model dtype code, for all 16 float
// pairs. Plain constexpr functions, no ATen: the CUDA kernels include this too.
#pragma once
#include <cstdint>

namespace torchutils_ext {

enum class EmaDtype : uint8_t { F32 = 0, F16 = 1, BF16 = 2, F64 = 3 };
enum class EmaKind : uint8_t {};
constexpr int kEmaKinds = 16;

constexpr EmaKind ema_kind(EmaDtype ema, EmaDtype model) {
  return static_cast<EmaKind>(4 * static_cast<int>(ema) + static_cast<int>(model));
}
constexpr EmaDtype ema_dtype_of(EmaKind k) { return static_cast<EmaDtype>(static_cast<int>(k) >> 2); }
constexpr EmaDtype model_dtype_of(EmaKind k) { return static_cast<EmaDtype>(static_cast<int>(k) & 3); }

// The six pairs whose kernels compute in fp32 (fp64 for fp64/fp64) and round once into the EMA; the other ten
// take the seed's own three rounding steps (ema_seed_yolov5 in ema_math.h).
constexpr bool fast_math_pair(EmaDtype e, EmaDtype m) {
  return e == m || (e == EmaDtype::F32 && (m == EmaDtype::F16 || m == EmaDtype::BF16));
}

constexpr int element_size(EmaDtype t) { return t == EmaDtype::F32 ? 4 : t == EmaDtype::F64 ? 8 : 2; }

// One (EMA, model) pair as the kernels walk it: two flat spans of numel elements.
struct EmaSpan {
  void* ema;
  const void* model;
  int64_t numel;
  EmaKind kind;
};

}  // namespace torchutils_ext
