// torchutils_ext._C: importing it loads this library, whose static initialisers register the op schemas and
// kernels with the dispatcher; the module itself carries the few functions ModelEMA calls every step.
#include "functions.h"

namespace torchutils_ext {
namespace {

PyMethodDef methods[] = {
    {"same_items", same_items, METH_VARARGS, "dicts[i].get(keys[i]) is values[i] for every i"},
    {"ema_plan_new", ema_plan_new, METH_VARARGS, "ema_plan_new(ema, model, formula) -> plan"},
    {"ema_plan_update", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(ema_plan_update)), METH_FASTCALL,
     "ema_plan_update(plan, decay, decay_tensor or None)"},
    {"ema_plan_revalidations", ema_plan_revalidations, METH_O, "times the plan revalidated"},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};

}  // namespace
}  // namespace torchutils_ext

extern "C" PyObject* PyInit__C(void) { return PyModule_Create(&torchutils_ext::module_def); }
