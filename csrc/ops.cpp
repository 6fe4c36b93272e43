// Op schemas of the torchutils_ext library. Each op's folder (ema_update/, fold_conv_bn/, count_zeros/) holds its
// validation, its CPU kernel, its CUDA kernel and glue; the _C module's Python functions live in python/.
#include <torch/library.h>

TORCH_LIBRARY(torchutils_ext, m) {
  // the fake (meta) kernels of every op below are registered from this Python module
  m.set_python_module("torchutils_ext._fake");
  // ema[i] = d * ema[i] + (1 - d) * model[i] for every i; the decay a float, or a 0-d float32/float64 tensor
  // read on the device (no host sync, and a captured graph sees its current value; see [decay tensor] in
  // ema_update/ema_args.h for the values it may hold). NOTE: the mode is named
  // ema_mode here because torch's functionalization wrapper (torch.compile) takes a keyword named `mode`.
  // guard (int64, 2 elements): skip the whole update when a model value is NaN/Inf, counting it (nonfinite.h).
  // NOTE: .Tensor is defined first. Called through the packet (torch.ops.torchutils_ext.ema_update_(...)), torch
  // tries the overloads in this order, and a `float` parameter accepts a 1-element tensor through .item(): with
  // .Scalar first a decay tensor would be read on the host (a device sync, and an invalidated graph capture).
  m.def("ema_update_.Tensor(Tensor(a!)[] ema, Tensor[] model, Tensor decay, str ema_mode=\"yolov5\", "
        "Tensor(b!)? guard=None) -> ()");
  m.def("ema_update_.Scalar(Tensor(a!)[] ema, Tensor[] model, float decay, str ema_mode=\"yolov5\", "
        "Tensor(b!)? guard=None) -> ()");
  // Elements equal to zero over all tensors, as a 0-d int64 tensor on their device.
  m.def("count_zeros(Tensor[] tensors) -> Tensor");
  // Fold BatchNorm into the preceding conv/linear for many layers; transposed_groups[i] = groups of a
  // ConvTranspose (output channels on axis 1), 0 for Conv/Linear (output channels on axis 0).
  m.def("fold_conv_bn(Tensor[] weight, Tensor?[] bias, Tensor?[] bn_weight, Tensor?[] bn_bias, "
        "Tensor[] running_mean, Tensor[] running_var, float[] eps, int[] transposed_groups) "
        "-> (Tensor[], Tensor[])");
  // The same, overwriting the weights and writing the new biases into bias_out (one per layer, contiguous,
  // the weight's dtype): no output aliases an input, so torch.compile can functionalize it.
  m.def("fold_conv_bn_(Tensor(a!)[] weight, Tensor(b!)[] bias_out, Tensor?[] bias, Tensor?[] bn_weight, "
        "Tensor?[] bn_bias, Tensor[] running_mean, Tensor[] running_var, float[] eps, int[] transposed_groups) "
        "-> ()");
}
