// How the CPU kernels use the threads torch is given (torch.get_num_threads()): a kernel's work items, each
// with its bytes, are cut into one contiguous range of near-equal bytes per thread, and at::parallel_for runs
// one range on each thread. No thread of our own: where torch runs serially, so do we. In an OpenMP build of
// torch, at::parallel_for is inline OpenMP, so setup.py compiles with torch's OpenMP flags (else it would run
// serially here while torch's own ops use every core).
//
// Each element is computed by the same code whichever thread takes it, and the reductions are exact (an OR,
// int64 sums), so every result has the same bits at any thread count.
#pragma once
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <bitset>
#include <cstdint>
#include <vector>

namespace torchutils_ext {

// The kernels, for the threads-used record below.
enum class CpuKernel : int { EmaUpdate = 0, NonfiniteCheck = 1, CountZeros = 2, FoldScale = 3, Count = 4 };

// A thread is given at least this many bytes: a fork-join of torch's OpenMP threads costs ~2.5 us, and an EMA
// update or zero count of 512 KiB in cache measured as fast on 2 threads as on 1 (0.99x / 1.10x; 256 KiB:
// 0.90x / 0.75x), while the same calls on cold memory gain from 64 KiB on (1.1-1.3x).
constexpr int64_t kMinBytesPerThread = 256 << 10;

// Elements per work item for a call of `total` elements: at most max_elems, and small enough for ~16 items per
// thread (each thread's range then holds its share of the bytes to within ~1/16; with 8 threads and 64 Ki-element
// items, yolov5n's update would be 17% off), at least 4 Ki.
inline int64_t item_elems(int64_t total, int64_t max_elems) {
  const int64_t want = total / (16 * std::max<int64_t>(1, at::get_num_threads()));
  return std::clamp<int64_t>(want & ~int64_t{1023}, std::min<int64_t>(4096, max_elems), max_elems);
}

// How many threads ran the kernel's last call (distinct at::get_thread_num() values): a debug record that tells
// a test whether this build runs its kernels on torch's threads. Read through torchutils_ext_cpu_threads_used.
void record_threads_used(CpuKernel k, int threads);

// Runs body(lo, hi) over items [0, n), whose item i has bytes(i) bytes, split into contiguous ranges of
// near-equal bytes (one per thread; a range ends at an item boundary). Ranges of fewer than
// kMinBytesPerThread bytes are not split off.
template <typename Bytes, typename Body>
void parallel_items(CpuKernel kernel, int64_t n, const Bytes& bytes, const Body& body) {
  std::vector<int64_t> cum(n + 1, 0);
  for (int64_t i = 0; i < n; ++i) cum[i + 1] = cum[i] + bytes(i);
  const int64_t total = cum[n];
  const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  const int64_t parts = std::clamp<int64_t>(total / kMinBytesPerThread, 1, std::max<int64_t>(threads, 1));
  if (parts == 1) {
    record_threads_used(kernel, 1);
    if (n) body(0, n);
    return;
  }
  // part p ends at the first item boundary at or past p/parts of the bytes
  std::vector<int64_t> bound(parts + 1, n);
  bound[0] = 0;
  for (int64_t p = 1; p < parts; ++p)
    bound[p] = std::lower_bound(cum.begin(), cum.end(), total * p / parts) - cum.begin();
  std::atomic<uint64_t> ran{0};
  at::parallel_for(0, parts, 1, [&](int64_t plo, int64_t phi) {
    ran.fetch_or(uint64_t{1} << (at::get_thread_num() & 63), std::memory_order_relaxed);
    for (int64_t p = plo; p < phi; ++p)
      if (bound[p] < bound[p + 1]) body(bound[p], bound[p + 1]);
  });
  record_threads_used(kernel, static_cast<int>(std::bitset<64>(ran.load()).count()));
}

}  // namespace torchutils_ext
