// CUDA glue of fold_conv_bn / fold_conv_bn_: one launch per weight dtype over every layer.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "../common/cuda_host.h"
#include "../common/float_dtype_aten.h"
#include "fold_args.h"
#include "fold_conv_bn_kernel.h"

namespace torchutils_ext {
namespace {

const void* ptr_or_null(const std::optional<at::Tensor>& t) { return t ? t->data_ptr() : nullptr; }

std::vector<at::Tensor> fold_into(const FoldArgs& a, const std::vector<at::Tensor>& out_w,
                                  std::vector<at::Tensor> out_b) {
  check_cuda(a.weight, "fold_conv_bn");
  if (a.weight.empty()) return out_b;
  const c10::cuda::CUDAGuard guard(a.weight[0].device());
  std::vector<cuda::FoldEntry> groups[4];
  std::vector<RowsIO> ios;
  std::vector<at::Tensor> hold;  // converted BN vectors and the scales, alive until the launches are queued
  ios.reserve(a.weight.size());
  for (size_t i = 0; i < a.weight.size(); ++i) {
    const auto& w = a.weight[i];
    const auto dt = float_dtype(w.scalar_type());
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
    TORCH_CHECK_VALUE(a.channels(i) <= INT32_MAX, "fold_conv_bn: weight[", i, "] has more than 2^31 output channels");
    groups[static_cast<int>(*dt)].push_back({io.src.data_ptr(), io.dst.data_ptr(), ptr_or_null(vecs[0]),
                                             ptr_or_null(vecs[1]), ptr_or_null(vecs[2]), vecs[3]->data_ptr(),
                                             vecs[4]->data_ptr(), out_b[i].data_ptr(), nullptr, a.eps[i],
                                             io.src.numel(), io.L.K, io.L.ipg, io.L.opg,
                                             static_cast<int32_t>(a.channels(i)), !as_weight});
  }
  const auto stream = c10::cuda::getCurrentCUDAStream().stream();
  check_no_pending_error("fold_conv_bn");
  for (int g = 0; g < 4; ++g) {
    if (groups[g].empty()) continue;
    // the per-channel scales of the group's layers, one scratch vector in the math type
    int64_t channels = 0;
    for (const auto& e : groups[g]) channels += e.C;
    const auto op = static_cast<FloatDtype>(g) == FloatDtype::F64 ? at::kDouble : at::kFloat;
    hold.push_back(at::empty({channels}, a.weight[0].options().dtype(op)));
    auto* scale = static_cast<char*>(hold.back().data_ptr());
    for (auto& e : groups[g]) {
      e.scale = scale;
      scale += e.C * hold.back().element_size();
    }
    check_launch("fold_conv_bn", cuda::launch_fold(groups[g].data(), static_cast<int>(groups[g].size()),
                                                   static_cast<FloatDtype>(g), stream));
  }
  for (const auto& io : ios) io.finish();  // layouts the kernel could not walk: copied back, stream-ordered
  return out_b;
}

}  // namespace

}  // namespace torchutils_ext

TUE_REGISTER_FOLD(CUDA, torchutils_ext::fold_into)
