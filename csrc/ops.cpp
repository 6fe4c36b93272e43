// Op schemas of the torchutils_ext library (kernels register per device in cpu/ and cuda/), and the _C module.
#include <Python.h>
#include <torch/library.h>

#include "python/ema_plan_py.h"

namespace {

// same_items(dicts, keys, values) -> bool: dicts[i].get(keys[i]) is values[i] for every i.
// ModelEMA's per-step proof that every module slot still holds the tensor its plan holds. In Python this is
// ~700 dependent cache misses (yolov5n: 175 us right after a cache flush, 75 us warm; this loop: 42 / 13 us):
// here the dicts, then their key tables, are prefetched a few entries ahead so the misses overlap.
PyObject* same_items(PyObject*, PyObject* args) {
  PyObject *dicts, *keys, *values;
  if (!PyArg_ParseTuple(args, "O!O!O!", &PyList_Type, &dicts, &PyList_Type, &keys, &PyList_Type, &values))
    return nullptr;
  const Py_ssize_t n = PyList_GET_SIZE(dicts);
  if (PyList_GET_SIZE(keys) != n || PyList_GET_SIZE(values) != n) {
    PyErr_SetString(PyExc_ValueError, "same_items: the three lists differ in length");
    return nullptr;
  }
  PyObject** d = &PyList_GET_ITEM(dicts, 0);
  constexpr Py_ssize_t kObj = 16, kTable = 8;  // stage 1: the dict object; stage 2: its key table
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (i + kObj < n) __builtin_prefetch(d[i + kObj]);
    if (i + kTable < n && PyDict_Check(d[i + kTable]))
      __builtin_prefetch(reinterpret_cast<PyDictObject*>(d[i + kTable])->ma_keys);
    PyObject* got;
    if (PyDict_Check(d[i])) {
      got = PyDict_GetItemWithError(d[i], PyList_GET_ITEM(keys, i));  // borrowed
      if (got == nullptr && PyErr_Occurred()) return nullptr;
    } else {  // not a dict: whatever its [] returns
      got = PyObject_GetItem(d[i], PyList_GET_ITEM(keys, i));
      if (got == nullptr) {
        PyErr_Clear();
      } else {
        Py_DECREF(got);  // only its identity is compared
      }
    }
    if (got != PyList_GET_ITEM(values, i)) Py_RETURN_FALSE;
  }
  Py_RETURN_TRUE;
}

PyMethodDef methods[] = {
    {"same_items", same_items, METH_VARARGS, "dicts[i].get(keys[i]) is values[i] for every i"},
    {"ema_plan_new", torchutils_ext::ema_plan_new, METH_VARARGS, "ema_plan_new(ema, model, formula) -> plan"},
    {"ema_plan_update", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(torchutils_ext::ema_plan_update)),
     METH_FASTCALL, "ema_plan_update(plan, decay, decay_tensor or None)"},
    {"ema_plan_revalidations", torchutils_ext::ema_plan_revalidations, METH_O, "times the plan revalidated"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

// Importing torchutils_ext._C loads this library, which registers the ops below with the dispatcher.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
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
