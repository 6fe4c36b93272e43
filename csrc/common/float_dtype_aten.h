// ATen's ScalarType as a FloatDtype (host side): the one mapping every op's glue uses.
#pragma once
#include <c10/core/ScalarType.h>

#include <optional>

#include "float_dtype.h"

namespace torchutils_ext {

inline std::optional<FloatDtype> float_dtype(c10::ScalarType t) {
  switch (t) {
    case c10::ScalarType::Float: return FloatDtype::F32;
    case c10::ScalarType::Half: return FloatDtype::F16;
    case c10::ScalarType::BFloat16: return FloatDtype::BF16;
    case c10::ScalarType::Double: return FloatDtype::F64;
    default: return std::nullopt;
  }
}

}  // namespace torchutils_ext
