// ModelEMA's per-step crossing: _C.ema_plan_new builds a ModelPlan once, _C.ema_plan_step(plan, ema_module,
// model_module, decay, guard=None) runs one step as one METH_FASTCALL call: it proves the plan current (same modules, every
// module slot and edge holds what it held, every tensor's metadata unchanged), then updates every device group.
// A stale plan answers False having written nothing; the Python side then builds a new one.
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <optional>
#include <vector>

#include "../python/functions.h"
#include "ema_plan.h"

namespace torchutils_ext {
namespace {

constexpr const char* kName = "torchutils_ext.ModelPlan";

struct Ref {  // an owned Python reference
  PyObject* p = nullptr;
  explicit Ref(PyObject* o) : p(o) { Py_XINCREF(p); }
  Ref(const Ref&) = delete;
  Ref& operator=(const Ref&) = delete;
  ~Ref() { Py_XDECREF(p); }
};

struct ModelPlan {
  Ref ema_module, model_module, dicts, keys, values;
  std::vector<EmaPlan> groups;  // one per device
};

void destroy(PyObject* capsule) { delete static_cast<ModelPlan*>(PyCapsule_GetPointer(capsule, kName)); }

std::vector<at::Tensor> tensors(PyObject* seq, const char* what) {
  TORCH_CHECK_TYPE(PyList_Check(seq), "ema_plan_new: ", what, " must be a list of tensors");
  std::vector<at::Tensor> out;
  out.reserve(PyList_GET_SIZE(seq));
  for (Py_ssize_t i = 0; i < PyList_GET_SIZE(seq); ++i) {
    PyObject* item = PyList_GET_ITEM(seq, i);
    TORCH_CHECK_TYPE(THPVariable_Check(item), "ema_update_: ", what, "[", i, "] is a ", Py_TYPE(item)->tp_name,
                     ", not a tensor");
    out.push_back(THPVariable_Unpack(item));
  }
  return out;
}

}  // namespace

PyObject* ema_plan_new(PyObject*, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *ema_module, *model_module, *dicts, *keys, *values, *groups;
  const char* mode;
  if (!PyArg_ParseTuple(args, "OOO!O!O!O!s", &ema_module, &model_module, &PyList_Type, &dicts, &PyList_Type, &keys,
                        &PyList_Type, &values, &PyList_Type, &groups, &mode))
    return nullptr;
  TORCH_CHECK_VALUE(PyList_GET_SIZE(keys) == PyList_GET_SIZE(dicts) && PyList_GET_SIZE(values) == PyList_GET_SIZE(dicts),
                    "ema_plan_new: dicts, keys and values differ in length");
  auto* plan = new ModelPlan{Ref(ema_module), Ref(model_module), Ref(dicts), Ref(keys), Ref(values), {}};
  try {
    for (Py_ssize_t g = 0; g < PyList_GET_SIZE(groups); ++g) {
      PyObject* pair = PyList_GET_ITEM(groups, g);
      TORCH_CHECK_TYPE(PyTuple_Check(pair) && PyTuple_GET_SIZE(pair) == 2,
                       "ema_plan_new: each group must be an (ema list, model list) tuple");
      plan->groups.emplace_back(tensors(PyTuple_GET_ITEM(pair, 0), "ema"), tensors(PyTuple_GET_ITEM(pair, 1), "model"),
                                mode);
    }
  } catch (...) {
    delete plan;
    throw;
  }
  PyObject* capsule = PyCapsule_New(plan, kName, destroy);
  if (capsule == nullptr) delete plan;
  return capsule;
  END_HANDLE_TH_ERRORS
}

PyObject* ema_plan_step(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 4 && nargs != 5) {
    PyErr_SetString(PyExc_TypeError,
                    "ema_plan_step(plan, ema_module, model_module, decay, guard=None) takes 4 or 5 arguments");
    return nullptr;
  }
  if (!PyCapsule_IsValid(args[0], kName)) {
    PyErr_SetString(PyExc_TypeError, "ema_plan_step: expected a plan from torchutils_ext._C.ema_plan_new");
    return nullptr;
  }
  auto* plan = static_cast<ModelPlan*>(PyCapsule_GetPointer(args[0], kName));
  if (args[1] != plan->ema_module.p || args[2] != plan->model_module.p) Py_RETURN_FALSE;
  const int held = slots_hold(plan->dicts.p, plan->keys.p, plan->values.p);
  if (held < 0) return nullptr;
  if (held == 0) Py_RETURN_FALSE;
  for (const auto& g : plan->groups)
    if (!g.current()) Py_RETURN_FALSE;
  double decay = 0.0;
  std::optional<at::Tensor> decay_tensor;
  if (THPVariable_Check(args[3])) {
    decay_tensor = THPVariable_Unpack(args[3]);
  } else {
    TORCH_CHECK_TYPE(PyFloat_Check(args[3]) || (PyLong_Check(args[3]) && !PyBool_Check(args[3])),
                     "ModelEMA.update: decay must be a float or a 0-d tensor, got ", Py_TYPE(args[3])->tp_name);
    decay = PyFloat_AsDouble(args[3]);
    if (decay == -1.0 && PyErr_Occurred()) return nullptr;
  }
  std::optional<at::Tensor> guard;
  if (nargs == 5 && args[4] != Py_None) {
    TORCH_CHECK_TYPE(THPVariable_Check(args[4]), "ModelEMA.update: guard must be a tensor or None");
    guard = THPVariable_Unpack(args[4]);
  }
  for (auto& g : plan->groups) g.prepare(decay, decay_tensor, guard);  // every check before the first write
  {
    pybind11::gil_scoped_release no_gil;  // as torch's own ops: other Python threads run during the kernels
    for (auto& g : plan->groups) g.run();
  }
  Py_RETURN_TRUE;
  END_HANDLE_TH_ERRORS
}

}  // namespace torchutils_ext
