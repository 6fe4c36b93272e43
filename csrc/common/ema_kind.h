// Element types of an (EMA, model) pair that the fast kernels handle; math in float (double for F64_F64).
#pragma once
#include <cstdint>

namespace torchutils_ext {
enum class EmaKind : uint8_t { F32_F32, F32_F16, F32_BF16, F16_F16, BF16_BF16, F64_F64 };
}  // namespace torchutils_ext
