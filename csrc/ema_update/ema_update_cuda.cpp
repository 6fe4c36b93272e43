// CUDA glue of ema_update_: the validated call's spans, one launch on the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../common/cuda_host.h"
#include "ema_runner.h"
#include "ema_update_kernel.h"

namespace torchutils_ext {
namespace {

void ema_run_cuda(const EmaCall& call, at::TensorList ema, at::TensorList model) {
  if (ema.empty()) return;
  check_cuda(ema, "ema_update_");
  const c10::cuda::CUDAGuard device_guard(ema[0].device());
  // A CPU decay tensor would be read once on the host (its value frozen into the graph), and the strided pairs
  // would copy it to the device (a sync, which breaks the capture): refused before anything is written.
  TORCH_CHECK_VALUE(!(call.decay_tensor && !call.decay_tensor->is_cuda() &&
                      capturing(c10::cuda::getCurrentCUDAStream().stream())),
                    "ema_update_: a CPU decay tensor cannot be used while the current CUDA stream is being captured "
                    "into a graph (its value would be frozen); pass the decay as a CUDA tensor");
  cuda::EmaDecay d{nullptr, false, call.decay};
  if (call.decay_tensor.has_value()) {
    if (call.decay_tensor->is_cuda()) {
      d.ptr = call.decay_tensor->data_ptr();
      d.is_double = call.decay_tensor->scalar_type() == at::kDouble;
    } else {
      d.value = call.decay_tensor->item<double>();  // a CPU scalar: read on the host (checked), no device sync
    }
  }
  const EmaSpans spans(call, ema, model);
  const auto stream = c10::cuda::getCurrentCUDAStream().stream();
  int64_t* guard = call.guard ? call.guard->data_ptr<int64_t>() : nullptr;
  check_no_pending_error("ema_update_");
  if (guard != nullptr) C10_CUDA_CHECK(cudaMemsetAsync(guard, 0, sizeof(int64_t), stream));  // this step's flag
  check_launch("ema_update_", cuda::launch_ema(spans.spans().data(), static_cast<int>(spans.spans().size()), d,
                                               call.lerp, guard, stream));
  spans.write_back();
}

}  // namespace

}  // namespace torchutils_ext

TUE_REGISTER_EMA_RUNNER(CUDA, torchutils_ext::ema_run_cuda)
