#include "functions.h"

namespace torchutils_ext {

// NOTE: ModelEMA's per-step proof that every module slot still holds the tensor (every module edge the
// submodule) its plan holds. In Python that is a chain of dependent cache misses per slot; here the dicts, then
// their key tables, are prefetched a few entries ahead so the misses overlap. A missing key counts as changed.
int slots_hold(PyObject* dicts, PyObject* keys, PyObject* values) {
  const Py_ssize_t n = PyList_GET_SIZE(dicts);
  if (PyList_GET_SIZE(keys) != n || PyList_GET_SIZE(values) != n) {
    PyErr_SetString(PyExc_ValueError, "slots_unchanged: the three lists differ in length");
    return -1;
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
      if (got == nullptr && PyErr_Occurred()) return -1;
    } else {  // not a dict: whatever its [] returns
      got = PyObject_GetItem(d[i], PyList_GET_ITEM(keys, i));
      if (got == nullptr) {
        PyErr_Clear();
      } else {
        Py_DECREF(got);  // only its identity is compared
      }
    }
    if (got != PyList_GET_ITEM(values, i)) return 0;
  }
  return 1;
}

PyObject* slots_unchanged(PyObject*, PyObject* args) {
  PyObject *dicts, *keys, *values;
  if (!PyArg_ParseTuple(args, "O!O!O!", &PyList_Type, &dicts, &PyList_Type, &keys, &PyList_Type, &values))
    return nullptr;
  const int r = slots_hold(dicts, keys, values);
  if (r < 0) return nullptr;
  return PyBool_FromLong(r);
}

}  // namespace torchutils_ext
