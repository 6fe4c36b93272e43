// torchutils_ext._C: importing it loads this library, whose static initialisers register the op schemas and
// kernels with the dispatcher; the module itself carries the functions ModelEMA calls every step.
#include "functions.h"

#include "../ema_update/ema_kind.h"

namespace torchutils_ext {
namespace {

// NOTE [pair rule] as data: ((ema dtype name, model dtype name, rounds once), ...) for all 16 pairs.
PyObject* ema_pair_rule(PyObject*, PyObject*) {
  PyObject* out = PyTuple_New(kEmaKinds);
  if (out == nullptr) return nullptr;
  int i = 0;
  for (FloatDtype e : kFloatDtypes)
    for (FloatDtype m : kFloatDtypes) {
      PyObject* row = Py_BuildValue("(ssO)", dtype_name(e), dtype_name(m), one_rounding_pair(e, m) ? Py_True : Py_False);
      if (row == nullptr) {
        Py_DECREF(out);
        return nullptr;
      }
      PyTuple_SET_ITEM(out, i++, row);
    }
  return out;
}

PyMethodDef methods[] = {
    {"watch_new", watch_new, METH_VARARGS,
     "watch_new(ema_ref, model_ref, every_step, full, generation, slots) -> watch (see NOTE [state watch])"},
    {"watch_read", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(watch_read)), METH_FASTCALL,
     "watch_read(watch, ema_module, model_module) -> the slots' tensors now, or None when something changed"},
    {"ema_plan_new", ema_plan_new, METH_VARARGS,
     "ema_plan_new(watch, ema_module, model_module, groups, ints, mode) -> plan"},
    {"ema_plan_step", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(ema_plan_step)), METH_FASTCALL,
     "ema_plan_step(plan, ema_module, model_module, decay, guard=None) -> True (updated) or False (stale, nothing written)"},
    {"ema_pair_rule", ema_pair_rule, METH_NOARGS,
     "ema_pair_rule() -> ((ema dtype, model dtype, rounds once), ...): the kernels' pair rule (ema_kind.h)"},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};

}  // namespace
}  // namespace torchutils_ext

extern "C" PyObject* PyInit__C(void) { return PyModule_Create(&torchutils_ext::module_def); }
