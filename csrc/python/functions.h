// The _C module's Python functions (CPython API: per-step calls that must stay cheap with a cold cache).
#pragma once
#include <Python.h>

namespace torchutils_ext {

// 1 when dicts[i][keys[i]] is values[i] for every i, 0 when not (a missing key included), -1 with an exception set.
int slots_hold(PyObject* dicts, PyObject* keys, PyObject* values);
PyObject* slots_unchanged(PyObject* self, PyObject* args);                          // slots.cpp
PyObject* ema_plan_new(PyObject* self, PyObject* args);                             // ../ema_update/ema_plan_py.cpp
PyObject* ema_plan_step(PyObject* self, PyObject* const* args, Py_ssize_t nargs);

}  // namespace torchutils_ext
