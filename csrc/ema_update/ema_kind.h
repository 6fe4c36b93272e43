// Element types of an (EMA, model) pair as one byte: 4 * EMA dtype code + model dtype code, for all 16 float
// pairs, and the pair rule. Plain constexpr functions, no ATen: the CUDA kernels include this too.
#pragma once
#include <cstdint>
#include <type_traits>

#include "../common/host_device.h"

namespace torchutils_ext {

enum class EmaDtype : uint8_t { F32 = 0, F16 = 1, BF16 = 2, F64 = 3 };
constexpr EmaDtype kEmaDtypes[] = {EmaDtype::F32, EmaDtype::F16, EmaDtype::BF16, EmaDtype::F64};
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

constexpr int element_size(EmaDtype t) { return t == EmaDtype::F32 ? 4 : t == EmaDtype::F64 ? 8 : 2; }
// torch's name of the dtype (torch.<name>)
constexpr const char* dtype_name(EmaDtype t) {
  return t == EmaDtype::F32 ? "float32" : t == EmaDtype::F16 ? "float16" : t == EmaDtype::BF16 ? "bfloat16"
                                                                                            : "float64";
}

// The element type of each code, per side: Halfs names the 16-bit types (at::Half/at::BFloat16 on the host,
// __half/__nv_bfloat16 on the device).
template <class Halfs, typename T>
constexpr EmaDtype dtype_code() {
  if constexpr (std::is_same_v<T, float>) return EmaDtype::F32;
  else if constexpr (std::is_same_v<T, double>) return EmaDtype::F64;
  else if constexpr (std::is_same_v<T, typename Halfs::f16>) return EmaDtype::F16;
  else {
    static_assert(std::is_same_v<T, typename Halfs::bf16>, "not an EMA element type");
    return EmaDtype::BF16;
  }
}

template <typename T>
struct Tag {
  using type = T;
};

// f(Tag<T>{}) with T the element type of code t.
template <class Halfs, typename F>
TUE_HD void with_dtype(EmaDtype t, F&& f) {
  switch (t) {
    case EmaDtype::F32: return f(Tag<float>{});
    case EmaDtype::F16: return f(Tag<typename Halfs::f16>{});
    case EmaDtype::BF16: return f(Tag<typename Halfs::bf16>{});
    case EmaDtype::F64: return f(Tag<double>{});
  }
}

// One (EMA, model) pair as the kernels walk it: two flat spans of numel elements.
struct EmaSpan {
  void* ema;
  const void* model;
  int64_t numel;
  EmaKind kind;
};

}  // namespace torchutils_ext
