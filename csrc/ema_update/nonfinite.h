// NOTE: [nonfinite guard] An update called with a guard tensor (int64, 2 elements, on the tensors' device) first
// looks for a NaN or Inf in every model span; when it finds one nothing is written, guard[0] becomes 1 and
// guard[1] (the number of skipped updates) grows by one, all on the device (no host sync). A float is NaN or
// Inf exactly when all its exponent bits are set: one integer test per element serves every dtype.
//
// NOTE: [exact ends] A decay of exactly 1 writes nothing and checks nothing (guard[0] = 0: nothing was skipped);
// one of exactly 0 writes the model's values as copy_ converts them. The formula would differ there only for
// non-finite values (0 * inf = NaN) and signed zeros; ModelEMA uses 1 for the steps that do not average
// (update_every_n_steps) and 0 for the steps that copy (update_after_step), decided on the device when capturable.
#pragma once
#include <cstdint>

#include "ema_kind.h"

namespace torchutils_ext {

constexpr uint64_t exponent_mask(EmaDtype t) {
  return t == EmaDtype::F32 ? 0x7F800000ull : t == EmaDtype::F16 ? 0x7C00ull
       : t == EmaDtype::BF16 ? 0x7F80ull : 0x7FF0000000000000ull;
}

}  // namespace torchutils_ext
