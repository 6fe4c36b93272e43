// One launch over a list of tensors. The table (pointers, sizes, each entry's first block) travels in the
// kernel's parameters (up to 32 KB since CUDA 12.1 on sm_70+, else 4 KB), so no host-to-device copy and no sync
// is needed, and the launch can be captured in a CUDA graph. Each block handles kChunk elements of one entry and
// finds that entry by binary search over the prefix sums of blocks per entry.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <stdexcept>

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
// once per full table: one launch for up to CAP entries.
template <typename Table, int CAP, typename Entry, typename Fill, typename Launch>
void pack_and_launch(const Entry* entries, int n, Fill fill, Launch launch) {
  Table t;
  int slot = 0;
  int64_t blocks = 0;
  auto flush = [&] {
    if (slot == 0) return;
    t.n = slot;
    t.block_start[slot] = static_cast<int32_t>(blocks);
    launch(t, static_cast<unsigned>(blocks));
    slot = 0;
    blocks = 0;
  };
  for (int i = 0; i < n; ++i) {
    const int64_t c = chunks_of(entries[i].numel);
    if (c == 0) continue;
    if (c > INT32_MAX) throw std::runtime_error("torchutils_ext: tensor too large for one launch");
    if (slot == CAP || blocks + c > INT32_MAX) flush();
    t.block_start[slot] = static_cast<int32_t>(blocks);
    fill(t, slot, entries[i]);
    blocks += c;
    ++slot;
  }
  flush();
}

// Aligned vector of V elements for wide loads/stores.
template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

template <typename T, int V>
__device__ __forceinline__ bool is_aligned(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % (sizeof(T) * V) == 0;
}

}  // namespace cuda
}  // namespace torchutils_ext
