// Op schemas of the torchutils_ext library, nothing else: kernels register per device in cpu/ and cuda/.
#include <Python.h>
#include <torch/library.h>

// Importing torchutils_ext._C loads this library, which registers the ops below with the dispatcher.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(torchutils_ext, m) {
  // ema[i] = d * ema[i] + (1 - d) * model[i] for every i; decay_tensor (0-d, on device) overrides decay.
  m.def("ema_update_(Tensor(a!)[] ema, Tensor[] model, float decay, Tensor? decay_tensor=None, "
        "str formula=\"yolov5\") -> ()");
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
