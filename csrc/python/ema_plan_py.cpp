// _C.ema_plan_new(ema, model, formula) -> plan, _C.ema_plan_update(plan, decay, decay_tensor),
// _C.ema_plan_revalidations(plan). ModelEMA calls update once per training step, right after the step's
// memory traffic has evicted everything: a torchbind method call (pybind11 dispatch, IValue conversion,
// schema checks) then costs ~80 us even when empty, a METH_FASTCALL function ~6 us.
#include "functions.h"

#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <optional>
#include <vector>

#include "../common/ema_plan.h"

namespace torchutils_ext {
namespace {

constexpr const char* kName = "torchutils_ext.EmaPlan";

void destroy(PyObject* capsule) { delete static_cast<EmaPlan*>(PyCapsule_GetPointer(capsule, kName)); }

EmaPlan* unwrap(PyObject* obj) {
  if (!PyCapsule_IsValid(obj, kName)) {
    PyErr_SetString(PyExc_TypeError, "expected a plan from torchutils_ext._C.ema_plan_new");
    return nullptr;
  }
  return static_cast<EmaPlan*>(PyCapsule_GetPointer(obj, kName));
}

std::vector<at::Tensor> tensors(PyObject* list, const char* what) {
  std::vector<at::Tensor> out;
  out.reserve(PyList_GET_SIZE(list));
  for (Py_ssize_t i = 0; i < PyList_GET_SIZE(list); ++i) {
    PyObject* item = PyList_GET_ITEM(list, i);
    TORCH_CHECK_TYPE(THPVariable_Check(item), "ema_update_: ", what, "[", i, "] is a ", Py_TYPE(item)->tp_name,
                     ", not a tensor");
    out.push_back(THPVariable_Unpack(item));
  }
  return out;
}

}  // namespace

PyObject* ema_plan_new(PyObject*, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *ema, *model;
  const char* formula;
  if (!PyArg_ParseTuple(args, "O!O!s", &PyList_Type, &ema, &PyList_Type, &model, &formula)) return nullptr;
  auto* plan = new EmaPlan(tensors(ema, "ema"), tensors(model, "model"), formula);
  PyObject* capsule = PyCapsule_New(plan, kName, destroy);
  if (capsule == nullptr) delete plan;
  return capsule;
  END_HANDLE_TH_ERRORS
}

PyObject* ema_plan_update(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 3) {
    PyErr_SetString(PyExc_TypeError, "ema_plan_update(plan, decay, decay_tensor) takes 3 arguments");
    return nullptr;
  }
  EmaPlan* plan = unwrap(args[0]);
  if (plan == nullptr) return nullptr;
  const double decay = PyFloat_AsDouble(args[1]);
  if (decay == -1.0 && PyErr_Occurred()) return nullptr;
  std::optional<at::Tensor> decay_tensor;
  if (args[2] != Py_None) {
    TORCH_CHECK_TYPE(THPVariable_Check(args[2]), "ema_update_: decay_tensor must be a tensor or None");
    decay_tensor = THPVariable_Unpack(args[2]);
  }
  {
    pybind11::gil_scoped_release no_gil;  // as torch's own ops: other Python threads run during the kernel
    plan->update(decay, std::move(decay_tensor));
  }
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

PyObject* ema_plan_revalidations(PyObject*, PyObject* obj) {
  EmaPlan* plan = unwrap(obj);
  return plan == nullptr ? nullptr : PyLong_FromLongLong(plan->revalidations());
}

}  // namespace torchutils_ext
