// The _C module's Python functions (CPython API: per-step calls that must stay cheap with a cold cache).
#pragma once
#include <Python.h>

namespace torchutils_ext {

PyObject* same_items(PyObject* self, PyObject* args);  // same_items.cpp
PyObject* ema_plan_new(PyObject* self, PyObject* args);  // ema_plan_py.cpp
PyObject* ema_plan_update(PyObject* self, PyObject* const* args, Py_ssize_t nargs);
PyObject* ema_plan_revalidations(PyObject* self, PyObject* plan);

}  // namespace torchutils_ext
