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

template <typename U>
__device__ uint32_t count_chunk(const U* p, int64_t n, U mask) {
  constexpr int V = 16 / sizeof(U);  // 16-byte loads where aligned
  uint32_t c = 0;
  int64_t i0 = 0;
  if (is_aligned<U, V>(p)) {
    const int64_t nv = n / V;
    const auto* pv = reinterpret_cast<const Vec<U, V>*>(p);
    for (int64_t i = threadIdx.x; i < nv; i += blockDim.x) {
      const Vec<U, V> a = pv[i];
#pragma unroll
      for (int j = 0; j < V; ++j) c += (a.v[j] & mask) == 0;
    }
    i0 = nv * V;
  }
  for (int64_t i = i0 + threadIdx.x; i < n; i += blockDim.x) c += (p[i] & mask) == 0;
  return c;
}

template <int CAP>
__global__ void __launch_bounds__(kThreads) count_zeros_kernel(const __grid_constant__ ZeroTable<CAP> t,
                                                                unsigned long long* out) {
  const int k = entry_of_block(t.block_start, t.n);
  const int64_t start = static_cast<int64_t>(blockIdx.x - t.block_start[k]) * kChunk;
  const int64_t n = min(kChunk, t.numel[k] - start);
  const char* p = static_cast<const char*>(t.ptr[k]);
  uint32_t c = 0;
  switch (t.size[k]) {
    case 1: c = count_chunk<uint8_t>((const uint8_t*)p + start, n, (uint8_t)t.mask[k]); break;
    case 2: c = count_chunk<uint16_t>((const uint16_t*)p + start, n, (uint16_t)t.mask[k]); break;
    case 4: c = count_chunk<uint32_t>((const uint32_t*)p + start, n, (uint32_t)t.mask[k]); break;
    default: c = count_chunk<uint64_t>((const uint64_t*)p + start, n, t.mask[k]); break;
  }
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
void launch_cap(const ZeroEntry* entries, int n, int64_t* out, cudaStream_t stream) {
  pack_and_launch<ZeroTable<CAP>, CAP>(
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

void launch_count_zeros(const ZeroEntry* entries, int n, int64_t* out, cudaStream_t stream) {
  // the smallest table that holds the list (see launch_ema)
  if (n <= 64 || !large_kernel_params()) return launch_cap<64>(entries, n, out, stream);
#if TUE_LARGE_PARAMS
  if (n <= 256) return launch_cap<256>(entries, n, out, stream);
  launch_cap<1024>(entries, n, out, stream);
#endif
}

}  // namespace cuda
}  // namespace torchutils_ext
