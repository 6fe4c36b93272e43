// One launch over a list of tensors. The table (pointers, sizes, each entry's first block) travels in the
// kernel's parameters (up to 32 KB since CUDA 12.1 on sm_70+, else 4 KB), so no host-to-device copy and no sync
// is needed, and the launch can be captured in a CUDA graph. Each block handles kChunk elements of one entry and
// finds that entry by binary search over the prefix sums of blocks per entry.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <type_traits>

namespace torchutils_ext {
namespace cuda {

constexpr int kThreads = 256;
constexpr int64_t kChunk = 8192;  // elements per block: 32 per thread, one wave for a yolov5s EMA on an H100

// Largest i in [0, n) with starts[i] <= blockIdx.x.
__device__ __forceinline__ int entry_of_block(const int32_t* starts, int n) {
  int lo = 0, hi = n - 1;
  const int b = static_cast<int>(blockIdx.x);
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (starts[mid] <= b) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// Kernel parameter limits: the classic 4 KB, and 32 KB (less 4 bytes) with a CUDA 12.1+ runtime and driver.
constexpr size_t kSmallParams = 4096;
constexpr size_t kLargeParams = 32764;
#if defined(CUDART_VERSION) && CUDART_VERSION >= 12010
#define TUE_LARGE_PARAMS 1
#else
#define TUE_LARGE_PARAMS 0
#endif

// Whether this process may launch with large parameter tables: runtime and driver both 12.1+ (every arch this
// package builds is sm_75+), asked once like ATen's supports_large_kernel_arg(). TORCHUTILS_EXT_SMALL_PARAMS=1
// forces the small tables (tests of the fallback on a new driver).
inline bool large_kernel_params() {
  static const bool ok = [] {
    const char* force = std::getenv("TORCHUTILS_EXT_SMALL_PARAMS");
    if (!TUE_LARGE_PARAMS || (force && force[0] == '1')) return false;
    int runtime = 0, driver = 0;
    if (cudaRuntimeGetVersion(&runtime) != cudaSuccess || cudaDriverGetVersion(&driver) != cudaSuccess) {
      cudaGetLastError();  // clear it: the next launch must not report this
      return false;
    }
    return runtime >= 12010 && driver >= 12010;
  }();
  return ok;
}

inline int64_t chunks_of(int64_t numel) { return (numel + kChunk - 1) / kChunk; }

// Packs entries into tables of CAP slots (Table has block_start[CAP + 1] and n) and calls launch(table, blocks)
// once per full table: one launch for up to CAP entries, chunks_of(numel(entry)) blocks per entry. Each launch is
// checked as it is made (cudaGetLastError, as ATen's C10_CUDA_KERNEL_LAUNCH_CHECK): the first error is returned
// and nothing is launched after it.
template <typename Table, int CAP, typename Entry, typename Numel, typename Fill, typename Launch>
cudaError_t pack_and_launch(const Entry* entries, int n, Numel numel, Fill fill, Launch launch) {
  Table t;
  int slot = 0;
  int64_t blocks = 0;
  auto flush = [&]() -> cudaError_t {
    if (slot == 0) return cudaSuccess;
    t.n = slot;
    t.block_start[slot] = static_cast<int32_t>(blocks);
    launch(t, static_cast<unsigned>(blocks));
    slot = 0;
    blocks = 0;
    return cudaGetLastError();
  };
  for (int i = 0; i < n; ++i) {
    const int64_t c = chunks_of(numel(entries[i]));
    if (c == 0) continue;
    if (c > INT32_MAX) throw std::runtime_error("torchutils_ext: tensor too large for one launch");
    if (slot == CAP || blocks + c > INT32_MAX) {
      const cudaError_t err = flush();
      if (err != cudaSuccess) return err;
    }
    t.block_start[slot] = static_cast<int32_t>(blocks);
    fill(t, slot, entries[i]);
    blocks += c;
    ++slot;
  }
  return flush();
}

template <typename Table, int CAP, typename Entry, typename Fill, typename Launch>
cudaError_t pack_and_launch(const Entry* entries, int n, Fill fill, Launch launch) {
  return pack_and_launch<Table, CAP>(entries, n, [](const Entry& e) { return e.numel; }, fill, launch);
}

// NOTE: [table tiers] A launch copies its whole parameter block, whatever part of the table is filled: the
// smallest tier that holds the list is taken (64 entries; 128 to 1024 with large parameters only), so a list of
// n entries passes at most about twice the bytes it needs. The kernels' bodies are shared by the tiers (only
// the entry lookup depends on the capacity), so a tier costs little code.
template <typename F>
cudaError_t with_tier(int n, F&& f) {
  if (n <= 64 || !large_kernel_params()) return f(std::integral_constant<int, 64>{});
#if TUE_LARGE_PARAMS
  if (n <= 128) return f(std::integral_constant<int, 128>{});
  if (n <= 256) return f(std::integral_constant<int, 256>{});
  if (n <= 512) return f(std::integral_constant<int, 512>{});
  return f(std::integral_constant<int, 1024>{});
#else
  return f(std::integral_constant<int, 64>{});
#endif
}

// Splits a span of n elements at p into a scalar head (up to the first element aligned for V-element vector
// access), the vector body and a scalar tail: the number of head elements, or n when p is not even aligned to its
// element size.
template <typename T, int V>
__device__ __forceinline__ int64_t vector_head(const T* p, int64_t n) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  if (a % sizeof(T)) return n;
  const int64_t off = static_cast<int64_t>((a / sizeof(T)) % V);
  return off ? min(n, static_cast<int64_t>(V) - off) : 0;
}

// Aligned vector of V elements for wide loads/stores.
template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

// Elements x of p[0, n) (this thread's share of them) with pred(x), read 16 bytes at a time past the head.
template <typename U, typename Pred>
__device__ __forceinline__ uint32_t count_where(const U* p, int64_t n, Pred pred) {
  constexpr int V = 16 / sizeof(U);
  const int64_t head = vector_head<U, V>(p, n), nv = (n - head) / V;
  uint32_t c = 0;
  for (int64_t i = threadIdx.x; i < head; i += blockDim.x) c += pred(p[i]);
  const auto* pv = reinterpret_cast<const Vec<U, V>*>(p + head);
  for (int64_t i = threadIdx.x; i < nv; i += blockDim.x) {
    const Vec<U, V> a = pv[i];
#pragma unroll
    for (int j = 0; j < V; ++j) c += pred(a.v[j]);
  }
  for (int64_t i = head + nv * V + threadIdx.x; i < n; i += blockDim.x) c += pred(p[i]);
  return c;
}

}  // namespace cuda
}  // namespace torchutils_ext
