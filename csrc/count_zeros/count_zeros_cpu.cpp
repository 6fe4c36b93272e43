// CPU kernel of count_zeros: one pass over every tensor's memory, int64 totals, one 0-d result.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../common/parallel.h"
#include "../common/simd.h"
#include "count_args.h"

namespace torchutils_ext {
namespace {

constexpr int64_t kChunk = 1 << 16;  // < 2^32, so the inner loop can count in uint32 (vectorises well)

// Walks the span as four interleaved streams: a read-only loop on one core is bound by how many cache misses
// are in flight, and four streams keep more of them going than one.
template <typename U>
TUE_ALWAYS_INLINE int64_t count_span_body(const void* p_, int64_t n, uint64_t mask64) {
  const U* __restrict__ p = static_cast<const U*>(p_);
  const U mask = static_cast<U>(mask64);
  const int64_t q = n / 4;
  const U *p0 = p, *p1 = p + q, *p2 = p + 2 * q, *p3 = p + 3 * q;
  uint32_t c = 0;
  for (int64_t i = 0; i < q; ++i)
    c += ((p0[i] & mask) == 0) + ((p1[i] & mask) == 0) + ((p2[i] & mask) == 0) + ((p3[i] & mask) == 0);
  for (int64_t i = 4 * q; i < n; ++i) c += (p[i] & mask) == 0;
  return c;
}

template <typename U>
TUE_TARGET_AVX2 int64_t count_span_avx2(const void* p, int64_t n, uint64_t mask) {
  return count_span_body<U>(p, n, mask);
}

template <typename U>
int64_t count_span(const void* p, int64_t n, uint64_t mask) {
  return cpu_has_avx2() ? count_span_avx2<U>(p, n, mask) : count_span_body<U>(p, n, mask);
}

int64_t count_dispatch(const ZeroBits& z, const void* p, int64_t n) {
  switch (z.elem_size) {
    case 1: return count_span<uint8_t>(p, n, z.mask);
    case 2: return count_span<uint16_t>(p, n, z.mask);
    case 4: return count_span<uint32_t>(p, n, z.mask);
    default: return count_span<uint64_t>(p, n, z.mask);
  }
}

struct Work {
  int64_t tensor, begin, end;
};

at::Tensor count_zeros_cpu(at::TensorList tensors) {
  const CountArgs a = check_count_args(tensors, c10::DeviceType::CPU);
  const std::vector<ZeroBits>& bits = a.bits;
  const std::vector<bool>& direct = a.direct;
  std::vector<Work> work;
  int64_t total = 0;
  const int64_t elems = a.direct_elems;
  const int64_t chunk = item_elems(elems, kChunk);
  for (size_t i = 0; i < tensors.size(); ++i) {
    const auto& t = tensors[i];
    if (direct[i]) {
      for (int64_t b = 0, n = t.numel(); b < n; b += chunk)
        work.push_back({static_cast<int64_t>(i), b, std::min(n, b + chunk)});
    } else {
      total += t.eq(0).sum().item<int64_t>();  // eq serves more dtypes than count_nonzero
    }
  }
  // one count per item, summed in item order afterwards: an exact int64 total at any thread count
  std::vector<int64_t> counts(work.size());
  parallel_items(
      CpuKernel::CountZeros, static_cast<int64_t>(work.size()),
      [&](int64_t w) { return (work[w].end - work[w].begin) * bits[work[w].tensor].elem_size; },
      [&](int64_t lo, int64_t hi) {
        for (int64_t w = lo; w < hi; ++w) {
          const auto& it = work[w];
          const auto& t = tensors[it.tensor];
          const char* p = static_cast<const char*>(t.data_ptr()) + it.begin * t.element_size();
          counts[w] = count_dispatch(bits[it.tensor], p, it.end - it.begin);
        }
      });
  for (int64_t c : counts) total += c;
  return at::scalar_tensor(total, at::TensorOptions().dtype(at::kLong));
}

}  // namespace

}  // namespace torchutils_ext

TUE_REGISTER_COUNT(CPU, torchutils_ext::count_zeros_cpu)
