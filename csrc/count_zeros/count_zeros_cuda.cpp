// CUDA glue of count_zeros: dense tensors of a known bit layout in one launch, the rest through ATen.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../common/cuda_host.h"
#include "count_zeros_kernel.h"
#include "count_args.h"

namespace torchutils_ext {
namespace {

at::Tensor count_zeros_cuda(at::TensorList tensors) {
  const CountArgs a = check_count_args(tensors, c10::DeviceType::CUDA);
  if (tensors.empty()) return at::zeros({}, at::TensorOptions().dtype(at::kLong).device(at::kCUDA));
  const c10::cuda::CUDAGuard guard(tensors[0].device());
  const auto stream = c10::cuda::getCurrentCUDAStream().stream();
  at::Tensor out = at::empty({}, tensors[0].options().dtype(at::kLong));
  C10_CUDA_CHECK(cudaMemsetAsync(out.data_ptr(), 0, sizeof(int64_t), stream));  // no fill kernel
  std::vector<cuda::ZeroEntry> entries;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const auto& t = tensors[i];
    const ZeroBits& z = a.bits[i];
    if (a.direct[i]) {
      if (t.numel()) entries.push_back({t.data_ptr(), t.numel(), z.mask, z.elem_size});
    } else {
      out.add_(t.eq(0).sum());  // eq serves more dtypes than count_nonzero
    }
  }
  check_no_pending_error("count_zeros");
  check_launch("count_zeros", cuda::launch_count_zeros(entries.data(), static_cast<int>(entries.size()),
                                                       out.data_ptr<int64_t>(), stream));
  return out;
}

}  // namespace

}  // namespace torchutils_ext

TUE_REGISTER_COUNT(CUDA, torchutils_ext::count_zeros_cuda)
