#include "parallel.h"

namespace torchutils_ext {
namespace {

std::atomic<int> g_threads_used[static_cast<int>(CpuKernel::Count)];

}  // namespace

void record_threads_used(CpuKernel k, int threads) {
  g_threads_used[static_cast<int>(k)].store(threads, std::memory_order_relaxed);
}

}  // namespace torchutils_ext

// For tests (through ctypes, no op or Python binding): threads that ran kernel k's last call (see CpuKernel), 0
// before its first call, -1 for an unknown k.
extern "C" int torchutils_ext_cpu_threads_used(int k) {
  using torchutils_ext::CpuKernel;
  if (k < 0 || k >= static_cast<int>(CpuKernel::Count)) return -1;
  return torchutils_ext::g_threads_used[k].load(std::memory_order_relaxed);
}
