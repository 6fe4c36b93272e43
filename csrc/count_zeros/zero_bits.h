// count_zeros compares bit patterns: an element is zero when its bits, less a float's sign bit, are all zero.
// That makes one integer loop per element size serve every dtype (and counts -0.0 as zero, as `p == 0` does).
#pragma once
#include <c10/core/ScalarType.h>

#include <cstdint>

namespace torchutils_ext {

struct ZeroBits {
  int elem_size;   // 1, 2, 4 or 8 bytes
  uint64_t mask;   // bits that must all be clear
  bool supported;  // false for complex and other dtypes (counted through ATen instead)
};

inline ZeroBits zero_bits(c10::ScalarType t) {
  using c10::ScalarType;
  switch (t) {
    case ScalarType::Bool: case ScalarType::Byte: case ScalarType::Char: return {1, 0xFF, true};
    case ScalarType::Short: case ScalarType::UInt16: return {2, 0xFFFF, true};
    case ScalarType::Int: case ScalarType::UInt32: return {4, 0xFFFFFFFFull, true};
    case ScalarType::Long: case ScalarType::UInt64: return {8, ~0ull, true};
    // float8 with a negative zero (0x80) clear the sign; the "fnuz" formats have none (0x80 is their NaN)
    case ScalarType::Float8_e4m3fn: case ScalarType::Float8_e5m2: return {1, 0x7F, true};
    case ScalarType::Float8_e4m3fnuz: case ScalarType::Float8_e5m2fnuz: return {1, 0xFF, true};
    case ScalarType::Half: case ScalarType::BFloat16: return {2, 0x7FFF, true};
    case ScalarType::Float: return {4, 0x7FFFFFFFull, true};
    case ScalarType::Double: return {8, ~0ull >> 1, true};
    default: return {static_cast<int>(c10::elementSize(t)), 0, false};
  }
}

}  // namespace torchutils_ext
