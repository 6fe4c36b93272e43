// CUDA kernel of count_zeros: every tensor in one launch, integer bit tests, one atomic per block.
#include "../common/multi_tensor_apply.cuh"
#include "count_zeros_kernel.h"

namespace torchutils_ext {
namespace cuda {
namespace {

template <int CAP>
struct ZeroTable {
  const void* ptr[CAP];
  int64_t numel[CAP];
  uint64_t mask[CAP];
  int32_t block_start[CAP + 1];
  uint8_t size[CAP];
  int32_t n;
};

// This block's zeros: one integer test per element (sign bit masked off for floats), 16-byte loads past the
// head. Shared by every table tier (see [table tiers]).
__device__ __noinline__ uint32_t slice_zeros(const void* p, int64_t n, int size, uint64_t mask) {
  switch (size) {
    case 1: {
      const auto mk = static_cast<uint8_t>(mask);
      return count_where(static_cast<const uint8_t*>(p), n, [&](uint8_t x) { return (x & mk) == 0; });
    }
    case 2: {
      const auto mk = static_cast<uint16_t>(mask);
      return count_where(static_cast<const uint16_t*>(p), n, [&](uint16_t x) { return (x & mk) == 0; });
    }
    case 4: {
      const auto mk = static_cast<uint32_t>(mask);
      return count_where(static_cast<const uint32_t*>(p), n, [&](uint32_t x) { return (x & mk) == 0; });
    }
    default:
      return count_where(static_cast<const uint64_t*>(p), n, [&](uint64_t x) { return (x & mask) == 0; });
  }
}

template <int CAP>
__global__ void __launch_bounds__(kThreads) count_zeros_kernel(const __grid_constant__ ZeroTable<CAP> t,
                                                                unsigned long long* out) {
  const int k = entry_of_block(t.block_start, t.n);
  const int64_t start = static_cast<int64_t>(blockIdx.x - t.block_start[k]) * kChunk;
  uint32_t c = slice_zeros(static_cast<const char*>(t.ptr[k]) + start * t.size[k], min(kChunk, t.numel[k] - start),
                           t.size[k], t.mask[k]);
  // warp sums, then the block's in shared memory: one 64-bit atomic per block
  for (int off = 16; off > 0; off >>= 1) c += __shfl_down_sync(0xffffffffu, c, off);
  __shared__ uint32_t warp_sums[kThreads / 32];
  if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = c;
  __syncthreads();
  if (threadIdx.x < 32) {
    c = threadIdx.x < kThreads / 32 ? warp_sums[threadIdx.x] : 0;
    for (int off = 16; off > 0; off >>= 1) c += __shfl_down_sync(0xffffffffu, c, off);
    if (threadIdx.x == 0 && c) atomicAdd(out, static_cast<unsigned long long>(c));
  }
}

constexpr size_t kZeroExtra = 2 * sizeof(void*);
static_assert(sizeof(ZeroTable<64>) + kZeroExtra <= kSmallParams, "the 64-entry table must fit 4 KB");
static_assert(sizeof(ZeroTable<1024>) + kZeroExtra <= kLargeParams, "the 1024-entry table must fit 32 KB");

template <int CAP>
cudaError_t launch_cap(const ZeroEntry* entries, int n, int64_t* out, cudaStream_t stream) {
  return pack_and_launch<ZeroTable<CAP>, CAP>(
      entries, n,
      [](ZeroTable<CAP>& t, int s, const ZeroEntry& x) {
        t.ptr[s] = x.ptr;
        t.numel[s] = x.numel;
        t.mask[s] = x.mask;
        t.size[s] = static_cast<uint8_t>(x.elem_size);
      },
      [&](const ZeroTable<CAP>& t, unsigned blocks) {
        count_zeros_kernel<CAP><<<blocks, kThreads, 0, stream>>>(t, reinterpret_cast<unsigned long long*>(out));
      });
}

}  // namespace

cudaError_t launch_count_zeros(const ZeroEntry* entries, int n, int64_t* out, cudaStream_t stream) {
  return with_tier(n, [&](auto cap) { return launch_cap<decltype(cap)::value>(entries, n, out, stream); });
}

}  // namespace cuda
}  // namespace torchutils_ext
