// CUDA registrations: validate (shared with CPU), build the plain-data tables, launch on the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include "../common/inplace.h"

#include "../common/ema_args.h"
#include "../common/fold_args.h"
#include "../common/zero_bits.h"
#include "launch.h"

namespace torchutils_ext {
namespace {

void check_launch(const char* op) {
  const char* err = cuda::last_launch_error();
  TORCH_CHECK(err == nullptr, op, ": CUDA launch failed: ", err);
}

void check_cuda(at::TensorList ts, const char* op) {
  for (size_t i = 0; i < ts.size(); ++i)
    TORCH_CHECK_VALUE(ts[i].is_cuda(), op, ": tensor ", i, " is on ", ts[i].device(),
                      "; the CUDA kernel takes CUDA tensors only");
}

bool capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
  return status != cudaStreamCaptureStatusNone;
}

void ema_run_cuda(const EmaCall& call, at::TensorList ema, at::TensorList model) {
  if (ema.empty()) return;
  check_cuda(ema, "ema_update_");
  const c10::cuda::CUDAGuard guard(ema[0].device());
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
      d.value = call.decay_tensor->item<double>();  // a CPU scalar: read on the host, no device sync
    }
  }
  std::vector<cuda::EmaEntry> entries;
  entries.reserve(call.fast.size());
  for (int64_t i : call.fast)
    if (ema[i].numel())
      entries.push_back({ema[i].data_ptr(), model[i].data_ptr(), ema[i].numel(), static_cast<uint8_t>(call.kinds[i])});
  cuda::launch_ema(entries.data(), static_cast<int>(entries.size()), d, call.lerp,
                   c10::cuda::getCurrentCUDAStream().stream());
  check_launch("ema_update_");
  for (int64_t i : call.slow) ema_update_aten(ema[i], model[i], call);
}

void ema_update_cuda(at::TensorList ema, at::TensorList model, double decay,
                     const std::optional<at::Tensor>& decay_tensor, c10::string_view mode) {
  const EmaCall call = check_ema_args(ema, model, decay, decay_tensor, mode);
  check_writable(ema, "ema_update_");
  ema_run_cuda(call, ema, model);
  bump_versions(ema);
}

const EmaRunnerRegistration register_cuda_runner(c10::DeviceType::CUDA, &ema_run_cuda);

at::Tensor count_zeros_cuda(at::TensorList tensors) {
  check_cuda(tensors, "count_zeros");
  TORCH_CHECK_VALUE(!tensors.empty(), "count_zeros: empty list on the CUDA kernel");
  const c10::cuda::CUDAGuard guard(tensors[0].device());
  const auto stream = c10::cuda::getCurrentCUDAStream().stream();
  at::Tensor out = at::empty({}, tensors[0].options().dtype(at::kLong));
  C10_CUDA_CHECK(cudaMemsetAsync(out.data_ptr(), 0, sizeof(int64_t), stream));  // no fill kernel
  std::vector<cuda::ZeroEntry> entries;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const auto& t = tensors[i];
    TORCH_CHECK_VALUE(t.device() == tensors[0].device(), "count_zeros: tensors[", i, "] is on ", t.device(),
                      ", tensors[0] on ", tensors[0].device());
    const ZeroBits z = zero_bits(t.scalar_type());
    if (z.supported && t.is_non_overlapping_and_dense()) {
      if (t.numel()) entries.push_back({t.data_ptr(), t.numel(), z.mask, z.elem_size});
    } else {
      out.add_(t.eq(0).sum());  // eq serves more dtypes than count_nonzero
    }
  }
  cuda::launch_count_zeros(entries.data(), static_cast<int>(entries.size()), out.data_ptr<int64_t>(), stream);
  check_launch("count_zeros");
  return out;
}

std::optional<cuda::FoldDtype> fold_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cuda::FoldDtype::F32;
    case at::kHalf: return cuda::FoldDtype::F16;
    case at::kBFloat16: return cuda::FoldDtype::BF16;
    case at::kDouble: return cuda::FoldDtype::F64;
    default: return std::nullopt;
  }
}

const void* ptr_or_null(const std::optional<at::Tensor>& t) { return t ? t->data_ptr() : nullptr; }

std::vector<at::Tensor> fold_into(const FoldArgs& a, const std::vector<at::Tensor>& out_w,
                                  std::vector<at::Tensor> out_b) {
  check_cuda(a.weight, "fold_conv_bn");
  if (a.weight.empty()) return out_b;
  const c10::cuda::CUDAGuard guard(a.weight[0].device());
  std::vector<cuda::FoldEntry> groups[4];
  std::vector<RowsIO> ios;
  std::vector<at::Tensor> hold;  // converted BN vectors, alive until the launches are queued
  ios.reserve(a.weight.size());
  for (size_t i = 0; i < a.weight.size(); ++i) {
    const auto& w = a.weight[i];
    const auto dt = fold_dtype(w.scalar_type());
    TORCH_CHECK_TYPE(dt.has_value(), "fold_conv_bn: weight[", i, "] has dtype ", w.scalar_type(),
                     "; the CUDA kernel takes float32/float16/bfloat16/float64");
    ios.push_back(rows_io(w, out_w[i], a.transposed_groups[i]));
    const RowsIO& io = ios.back();
    std::optional<at::Tensor> vecs[] = {a.bias.get(i), a.bn_weight.get(i), a.bn_bias.get(i), a.mean[i], a.var[i]};
    // the kernel reads BN vectors contiguous, as the weight's dtype or else as its math type
    bool as_weight = true;
    for (const auto& v : vecs) as_weight = as_weight && (!v || (v->scalar_type() == w.scalar_type() && v->is_contiguous()));
    if (!as_weight) {
      const auto op = w.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
      for (auto& v : vecs)
        if (v) hold.push_back(*v = v->to(op).contiguous());
    }
    if (!out_b[i].defined()) out_b[i] = at::empty({a.channels(i)}, w.options());
    const int64_t elems = io.src.numel();
    groups[static_cast<int>(*dt)].push_back({io.src.data_ptr(), io.dst.data_ptr(), ptr_or_null(vecs[0]),
                                             ptr_or_null(vecs[1]), ptr_or_null(vecs[2]), vecs[3]->data_ptr(),
                                             vecs[4]->data_ptr(), out_b[i].data_ptr(), a.eps[i],
                                             std::max<int64_t>(elems, 1), elems, io.L.K, io.L.ipg, io.L.opg,
                                             a.channels(i), !as_weight});
  }
  const auto stream = c10::cuda::getCurrentCUDAStream().stream();
  for (int g = 0; g < 4; ++g)
    if (!groups[g].empty())
      cuda::launch_fold(groups[g].data(), static_cast<int>(groups[g].size()), static_cast<cuda::FoldDtype>(g), stream);
  check_launch("fold_conv_bn");
  for (const auto& io : ios) io.finish();  // layouts the kernel could not walk: copied back, stream-ordered
  return out_b;
}

}  // namespace

TORCH_LIBRARY_IMPL(torchutils_ext, CUDA, m) {
  m.impl("ema_update_", &ema_update_cuda);
  m.impl("count_zeros", &count_zeros_cuda);
  m.impl("fold_conv_bn", &fold_functional<&fold_into>);
  m.impl("fold_conv_bn_", &fold_inplace<&fold_into>);
}

}  // namespace torchutils_ext
