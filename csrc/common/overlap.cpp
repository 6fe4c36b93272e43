#include "overlap.h"

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include <algorithm>
#include <cmath>
#include <iterator>
#include <utility>
#include <vector>

namespace torchutils_ext {
namespace {

// [first byte, one past last byte] a tensor can touch.
std::pair<uintptr_t, uintptr_t> span(const at::Tensor& t) {
  auto start = reinterpret_cast<uintptr_t>(t.data_ptr());
  int64_t extent = 1;
  for (int64_t d = 0; d < t.dim(); ++d) extent += (t.size(d) - 1) * std::abs(t.stride(d));
  return {start, start + extent * t.element_size()};
}

}  // namespace

bool same_dense_layout(const at::Tensor& a, const at::Tensor& b) {
  return a.is_non_overlapping_and_dense() && b.is_non_overlapping_and_dense() && a.strides() == b.strides();
}

namespace {

// Spans that intersect prove shared memory only for tensors that fill their span; strided views (two interleaved
// columns of one buffer) intersect without sharing an element and are compared element by element, up to
// kExactLimit elements (larger ones count as overlapping, the safe answer).
constexpr int64_t kExactLimit = int64_t(1) << 22;

bool fills_span(const at::Tensor& t, std::pair<uintptr_t, uintptr_t> s) {
  return s.second - s.first == static_cast<uintptr_t>(t.numel() * t.element_size()) &&
         at::has_internal_overlap(t) == at::MemOverlap::No;
}

std::vector<uintptr_t> addresses(const at::Tensor& t) {
  std::vector<uintptr_t> out{reinterpret_cast<uintptr_t>(t.data_ptr())};
  for (int64_t d = 0; d < t.dim(); ++d) {
    std::vector<uintptr_t> next;
    next.reserve(out.size() * t.size(d));
    for (uintptr_t a : out)
      for (int64_t k = 0; k < t.size(d); ++k) next.push_back(a + k * t.stride(d) * t.element_size());
    out.swap(next);
  }
  std::sort(out.begin(), out.end());
  return out;
}

bool share_memory(const at::Tensor& a, std::pair<uintptr_t, uintptr_t> sa, const at::Tensor& b,
                  std::pair<uintptr_t, uintptr_t> sb) {
  if (fills_span(a, sa) && fills_span(b, sb)) return true;
  const auto pa = reinterpret_cast<uintptr_t>(a.data_ptr()), pb = reinterpret_cast<uintptr_t>(b.data_ptr());
  if (a.element_size() != b.element_size() || (pa > pb ? pa - pb : pb - pa) % a.element_size() ||
      std::max(a.numel(), b.numel()) > kExactLimit)
    return true;
  const auto xa = addresses(a), xb = addresses(b);
  std::vector<uintptr_t> both;
  std::set_intersection(xa.begin(), xa.end(), xb.begin(), xb.end(), std::back_inserter(both));
  return !both.empty();
}

using Span = std::pair<std::pair<uintptr_t, uintptr_t>, size_t>;  // (span, index)

}  // namespace

bool shares_memory(const at::Tensor& a, const at::Tensor& b) {
  if (!a.defined() || !b.defined() || !a.numel() || !b.numel()) return false;
  const auto sa = span(a), sb = span(b);
  return sa.first < sb.second && sb.first < sa.second && share_memory(a, sa, b, sb);
}

void check_no_overlap(at::TensorList writes, at::TensorList reads, const char* what) {
  if (writes.empty() || writes[0].is_meta()) return;
  for (size_t i = 0; i < writes.size(); ++i)  // e.g. expand()ed: a write to one element would land on others
    TORCH_CHECK_VALUE(!writes[i].defined() || at::has_internal_overlap(writes[i]) != at::MemOverlap::Yes, what,
                      ": output ", i, " has elements that share memory (an expand()ed or stride-0 tensor); it "
                      "cannot be written in place");
  std::vector<Span> w;
  for (size_t i = 0; i < writes.size(); ++i)
    if (writes[i].defined() && writes[i].numel()) w.push_back({span(writes[i]), i});
  std::sort(w.begin(), w.end());
  for (size_t k = 0; k < w.size(); ++k)
    for (size_t kk = k + 1; kk < w.size() && w[kk].first.first < w[k].first.second; ++kk)
      TORCH_CHECK_VALUE(!share_memory(writes[w[k].second], w[k].first, writes[w[kk].second], w[kk].first), what,
                        ": two output tensors overlap in memory; each must own its storage");
  std::vector<uintptr_t> starts, ends;  // ends[k]: the furthest end among spans starting at or before w[k]
  for (const auto& s : w) {
    starts.push_back(s.first.first);
    ends.push_back(std::max(ends.empty() ? 0 : ends.back(), s.first.second));
  }
  for (const auto& t : reads) {
    if (!t.defined() || !t.numel()) continue;
    const auto s = span(t);
    // the last write starting before this read ends, then back while a span can still reach it
    auto k = static_cast<int64_t>(std::lower_bound(starts.begin(), starts.end(), s.second) - starts.begin()) - 1;
    for (; k >= 0 && ends[k] > s.first; --k)
      TORCH_CHECK_VALUE(!(w[k].first.second > s.first && share_memory(writes[w[k].second], w[k].first, t, s)), what,
                        ": an output tensor shares memory with an input tensor");
  }
}

}  // namespace torchutils_ext
