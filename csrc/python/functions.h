// The _C module's Python functions (CPython API: per-step calls that must stay cheap with a cold cache).
#pragma once
#include <Python.h>

namespace torchutils_ext {

PyObject* watch_new(PyObject* self, PyObject* args);                                // watch.cpp
PyObject* watch_read(PyObject* self, PyObject* const* args, Py_ssize_t nargs);
PyObject* ema_plan_new(PyObject* self, PyObject* args);                             // ../ema_update/ema_plan_py.cpp
PyObject* ema_plan_step(PyObject* self, PyObject* const* args, Py_ssize_t nargs);

}  // namespace torchutils_ext
