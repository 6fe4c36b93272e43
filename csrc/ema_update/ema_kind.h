// Element types of an (EMA, model) pair as one byte: 4 * EMA dtype code + model dtype code, for all 16 float
// pairs, and the pair rule. Plain constexpr functions, no ATen: the CUDA kernels include this too.
#pragma once
#include <cstdint>

#include "../common/float_dtype.h"

namespace torchutils_ext {

using EmaDtype = FloatDtype;  // an EMA or model element type (common/float_dtype.h)
enum class EmaKind : uint8_t {};
constexpr int kEmaKinds = 16;

constexpr EmaKind ema_kind(EmaDtype ema, EmaDtype model) {
  return static_cast<EmaKind>(4 * static_cast<int>(ema) + static_cast<int>(model));
}
constexpr EmaDtype ema_dtype_of(EmaKind k) { return static_cast<EmaDtype>(static_cast<int>(k) >> 2); }
constexpr EmaDtype model_dtype_of(EmaKind k) { return static_cast<EmaDtype>(static_cast<int>(k) & 3); }

// NOTE: [pair rule] The one definition of how an (EMA, model) pair rounds; the CPU and CUDA kernels take it
// through EmaPair (ema_math.h), the Python side through _C.ema_pair_rule() (a test ties _validate.py's copy to
// it). Six pairs compute in one opmath (fp32; fp64 for fp64/fp64) and round once into the EMA; the other ten take
// the seed's own three rounding steps (NOTE [seed steps] in ema_math.h).
constexpr bool one_rounding_pair(EmaDtype e, EmaDtype m) {
  return e == m || (e == EmaDtype::F32 && (m == EmaDtype::F16 || m == EmaDtype::BF16));
}
// The seed's sum is taken in the wider of the two opmath types: double when either side is fp64.
constexpr bool sums_in_double(EmaDtype e, EmaDtype m) { return e == EmaDtype::F64 || m == EmaDtype::F64; }

// One (EMA, model) pair as the kernels walk it: two flat spans of numel elements.
struct EmaSpan {
  void* ema;
  const void* model;
  int64_t numel;
  EmaKind kind;
};

}  // namespace torchutils_ext
