// CPython functions over EmaPlan for ModelEMA's per-step path, listed in the _C module's method table.
#pragma once
#include <Python.h>

namespace torchutils_ext {

PyObject* ema_plan_new(PyObject* self, PyObject* args);
PyObject* ema_plan_update(PyObject* self, PyObject* const* args, Py_ssize_t nargs);
PyObject* ema_plan_revalidations(PyObject* self, PyObject* plan);

}  // namespace torchutils_ext
