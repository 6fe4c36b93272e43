// The four float dtypes the kernels compute on, as one plain code shared by every op and both devices (no ATen:
// the CUDA kernels include this), with each code's element type per side. float_dtype_aten.h maps ATen's
// ScalarType to it.
#pragma once
#include <cstdint>
#include <type_traits>

#include "host_device.h"

namespace torchutils_ext {

enum class FloatDtype : uint8_t { F32 = 0, F16 = 1, BF16 = 2, F64 = 3 };
constexpr FloatDtype kFloatDtypes[] = {FloatDtype::F32, FloatDtype::F16, FloatDtype::BF16, FloatDtype::F64};

constexpr int element_size(FloatDtype t) { return t == FloatDtype::F32 ? 4 : t == FloatDtype::F64 ? 8 : 2; }
// torch's name of the dtype (torch.<name>)
constexpr const char* dtype_name(FloatDtype t) {
  return t == FloatDtype::F32 ? "float32" : t == FloatDtype::F16 ? "float16" : t == FloatDtype::BF16 ? "bfloat16"
                                                                                                  : "float64";
}

// The element type of each code, per side: Halfs names the 16-bit types (at::Half/at::BFloat16 on the host,
// __half/__nv_bfloat16 on the device).
template <class Halfs, typename T>
constexpr FloatDtype dtype_code() {
  if constexpr (std::is_same_v<T, float>) return FloatDtype::F32;
  else if constexpr (std::is_same_v<T, double>) return FloatDtype::F64;
  else if constexpr (std::is_same_v<T, typename Halfs::f16>) return FloatDtype::F16;
  else {
    static_assert(std::is_same_v<T, typename Halfs::bf16>, "not a float element type");
    return FloatDtype::BF16;
  }
}

template <typename T>
struct Tag {
  using type = T;
};

// f(Tag<T>{}) with T the element type of code t.
template <class Halfs, typename F>
TUE_HD void with_dtype(FloatDtype t, F&& f) {
  switch (t) {
    case FloatDtype::F32: return f(Tag<float>{});
    case FloatDtype::F16: return f(Tag<typename Halfs::f16>{});
    case FloatDtype::BF16: return f(Tag<typename Halfs::bf16>{});
    case FloatDtype::F64: return f(Tag<double>{});
  }
}

}  // namespace torchutils_ext
