// CPU kernel of fold_conv_bn / fold_conv_bn_: per layer, BN factors per output channel (see [fold math]), then
// one scaling pass over all layers' weight rows.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <type_traits>
#include <vector>

#include "../common/parallel.h"
#include "../common/simd.h"
#include "fold_args.h"
#include "fold_math.h"

namespace torchutils_ext {
namespace {

// A per-channel vector read as O: the tensor's own memory when it already is contiguous O (the usual case, no
// allocation or dispatcher call), else a converted copy; `fill` where the tensor is absent.
template <typename O>
struct ChannelVec {
  at::Tensor hold;
  const O* p = nullptr;
  O fill;
  ChannelVec(const std::optional<at::Tensor>& t, O fill_) : fill(fill_) {
    if (!t.has_value()) return;
    constexpr auto dt = c10::CppTypeToScalarType<O>::value;
    hold = (t->scalar_type() == dt && t->is_contiguous()) ? *t : t->to(dt).contiguous();
    p = hold.data_ptr<O>();
  }
  O operator[](int64_t k) const { return p ? p[k] : fill; }
};

// Scales each K-element row by its channel's factor; built for AVX2 where the CPU has it (see simd.h). Rows
// from the four quarters of [lo, hi) go side by side: one core keeps more misses in flight over four row
// streams than over one (more than four streams measured slower).
// InPlace: each row is read through its destination pointer and the s* pointers are never touched (restrict
// allows no second name for the same memory).
template <bool InPlace, typename T, typename O>
TUE_ALWAYS_INLINE void scale_rows4(const T* __restrict__ s0, const T* __restrict__ s1, const T* __restrict__ s2,
                                   const T* __restrict__ s3, T* __restrict__ d0, T* __restrict__ d1,
                                   T* __restrict__ d2, T* __restrict__ d3, const O* f, int64_t K) {
  for (int64_t k = 0; k < K; ++k) {
    d0[k] = static_cast<T>(static_cast<O>(InPlace ? d0[k] : s0[k]) * f[0]);
    d1[k] = static_cast<T>(static_cast<O>(InPlace ? d1[k] : s1[k]) * f[1]);
    d2[k] = static_cast<T>(static_cast<O>(InPlace ? d2[k] : s2[k]) * f[2]);
    d3[k] = static_cast<T>(static_cast<O>(InPlace ? d3[k] : s3[k]) * f[3]);
  }
}

template <typename T, typename O>
TUE_ALWAYS_INLINE void scale_rows_body(const T* src, T* dst, const O* scale, int64_t lo, int64_t hi,
                                       const RowLayout& L) {
  const int64_t group = L.ipg * L.opg, K = L.K;
  auto factor = [&](int64_t r) { return scale[(r / group) * L.opg + r % L.opg]; };
  const int64_t q = (hi - lo) / 4;
  for (int64_t r = lo; r < lo + q; ++r) {
    const int64_t r1 = r + q, r2 = r + 2 * q, r3 = r + 3 * q;
    const O f[4] = {factor(r), factor(r1), factor(r2), factor(r3)};
    const T *s0 = src + r * K, *s1 = src + r1 * K, *s2 = src + r2 * K, *s3 = src + r3 * K;
    T *d0 = dst + r * K, *d1 = dst + r1 * K, *d2 = dst + r2 * K, *d3 = dst + r3 * K;
    if (src == dst) scale_rows4<true, T, O>(s0, s1, s2, s3, d0, d1, d2, d3, f, K);
    else scale_rows4<false, T, O>(s0, s1, s2, s3, d0, d1, d2, d3, f, K);
  }
  for (int64_t r = lo + 4 * q; r < hi; ++r) {  // the last (hi - lo) % 4 rows, one at a time
    const O f = factor(r);
    for (int64_t k = 0; k < K; ++k) dst[r * K + k] = static_cast<T>(static_cast<O>(src[r * K + k]) * f);
  }
}

template <typename T, typename O>
TUE_TARGET_AVX2 void scale_rows_avx2(const T* src, T* dst, const O* scale, int64_t lo, int64_t hi,
                                     const RowLayout& L) {
  scale_rows_body<T, O>(src, dst, scale, lo, hi, L);
}

// Rows [lo, hi) of one layer scaled by their channels' factors, whatever its types (see Layer).
template <typename T, typename O>
void scale_rows(const void* src, void* dst, const void* scale, int64_t lo, int64_t hi, const RowLayout& L) {
  const T* s = static_cast<const T*>(src);
  T* d = static_cast<T*>(dst);
  const O* f = static_cast<const O*>(scale);
  if (cpu_has_avx2()) scale_rows_avx2<T, O>(s, d, f, lo, hi, L);
  else scale_rows_body<T, O>(s, d, f, lo, hi, L);
}

// One layer, ready for its scaling pass: what it reads and writes, and its factors in its opmath type.
struct Layer {
  RowsIO io;
  const void* src = nullptr;
  void* dst = nullptr;
  std::vector<float> scale_f;
  std::vector<double> scale_d;
  const void* scale = nullptr;
  void (*scale_rows)(const void*, void*, const void*, int64_t, int64_t, const RowLayout&) = nullptr;
  int64_t rows = 0, row_bytes = 0;  // rows to scale, bytes read and written per row
};

// The per-channel factors and the new bias of layer i (serial: O(channels)).
template <typename T, typename O>
void prepare_layer(const FoldArgs& a, size_t i, const at::Tensor& out_b, Layer& layer) {
  const int64_t c = a.channels(i);
  const O eps = static_cast<O>(a.eps[i]);
  const ChannelVec<O> var(a.var[i], O(0)), mean(a.mean[i], O(0)), bw(a.bn_weight.get(i), O(1)),
      bb(a.bn_bias.get(i), O(0)), b(a.bias.get(i), O(0));
  std::vector<O>& scale = [&]() -> std::vector<O>& {
    if constexpr (std::is_same_v<O, double>) return layer.scale_d;
    else return layer.scale_f;
  }();
  scale.resize(c);
  T* ob = out_b.data_ptr<T>();
  for (int64_t k = 0; k < c; ++k) {
    scale[k] = fold_scale<O>(bw[k], var[k], eps);
    const O shift_b = bb[k];
    ob[k] = static_cast<T>(fold_shift<O>(b[k], mean[k], scale[k], bb.p ? &shift_b : nullptr));
  }
  layer.scale = scale.data();
  layer.src = layer.io.src.data_ptr();
  layer.dst = layer.io.dst.data_ptr();
  layer.scale_rows = &scale_rows<T, O>;
  const int64_t K = layer.io.L.K;
  layer.rows = K ? layer.io.src.numel() / K : 0;
  layer.row_bytes = 2 * K * static_cast<int64_t>(sizeof(T));
}

// Work items of the scaling pass: a range of one layer's rows, at most about kItemElems elements (item_elems in
// parallel.h; at least one row).
constexpr int64_t kItemElems = 1 << 15;
struct Item {
  int32_t layer;
  int64_t lo, hi;
};

std::vector<at::Tensor> fold_into(const FoldArgs& a, const std::vector<at::Tensor>& out_w,
                                  std::vector<at::Tensor> out_b) {
  for (size_t i = 0; i < a.weight.size(); ++i) {
    TORCH_CHECK_VALUE(a.weight[i].device().is_cpu(), "fold_conv_bn: weight[", i, "] is on ",
                      a.weight[i].device(), "; the CPU kernel takes CPU tensors only");
  }
  // Every layer's factors and bias first, then one scaling pass over all layers' rows on torch's threads
  // (outputs never overlap inputs: check_fold_outputs), then the copies back of layouts walked as copies.
  std::vector<Layer> layers(a.weight.size());
  std::vector<Item> items;
  int64_t elems = 0;
  for (const auto& w : a.weight) elems += w.numel();
  const int64_t item = item_elems(elems, kItemElems);
  for (size_t i = 0; i < a.weight.size(); ++i) {
    const auto& w = a.weight[i];
    Layer& layer = layers[i];
    layer.io = rows_io(w, out_w[i], a.transposed_groups[i]);
    if (!out_b[i].defined()) out_b[i] = at::empty({a.channels(i)}, w.options());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "fold_conv_bn", [&] {
      using O = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      prepare_layer<scalar_t, O>(a, i, out_b[i], layer);
    });
    const int64_t step = std::max<int64_t>(1, item / std::max<int64_t>(layer.io.L.K, 1));
    for (int64_t r = 0; r < layer.rows; r += step)
      items.push_back({static_cast<int32_t>(i), r, std::min(layer.rows, r + step)});
  }
  parallel_items(
      CpuKernel::FoldScale, static_cast<int64_t>(items.size()),
      [&](int64_t t) { return (items[t].hi - items[t].lo) * layers[items[t].layer].row_bytes; },
      [&](int64_t lo, int64_t hi) {
        for (int64_t t = lo, u; t < hi; t = u) {  // a layer's run of items in one call: its rows in 4 streams
          for (u = t + 1; u < hi && items[u].layer == items[t].layer;) ++u;
          const Layer& l = layers[items[t].layer];
          l.scale_rows(l.src, l.dst, l.scale, items[t].lo, items[u - 1].hi, l.io.L);
        }
      });
  for (const Layer& l : layers) l.io.finish();
  return out_b;
}

}  // namespace

}  // namespace torchutils_ext

TUE_REGISTER_FOLD(CPU, torchutils_ext::fold_into)
