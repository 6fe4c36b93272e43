// ModelEMA's per-step crossing: _C.ema_plan_new builds a ModelPlan once over a state watch (python/watch.h);
// _C.ema_plan_step(plan, ema_module, model_module, decay, guard=None) runs one step as one METH_FASTCALL call: the
// watch proves both module trees unchanged and hands over the tensors they hold now, then every device group is
// updated (and the copied entries copied: copy_buffers' integer buffers, buffers='copy'). A changed tree answers
// False having written nothing; the Python side then builds a new plan.
#include <c10/core/GradMode.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <memory>
#include <optional>
#include <vector>

#include "../common/inplace.h"
#include "../python/functions.h"
#include "../python/watch.h"
#include "ema_plan.h"

namespace torchutils_ext {
namespace {

constexpr const char* kName = "torchutils_ext.ModelPlan";
// A CPU group this large releases the GIL during its kernel, as torch's own ops do; it then owns its tensors for
// the duration (another thread could drop them). Smaller groups keep the GIL and borrow: a reference count per
// tensor is a measurable share of a small model's step.
constexpr int64_t kReleaseGilBytes = 1 << 20;

// The tensors of one step, borrowed from the Python objects the watch read: no reference counts, and vectors the
// plan keeps (no allocation per step). Between steps they still point at the last step's tensors but own nothing
// (torch.utils.swap_tensors counts owners) and are never read before being overwritten.
struct Borrowed {
  std::vector<at::Tensor> ts;
  Borrowed() = default;
  Borrowed(Borrowed&&) = default;
  Borrowed(const Borrowed&) = delete;
  void fill(const std::vector<PyObject*>& now, const std::vector<Py_ssize_t>& slots) {
    if (ts.size() != slots.size()) {
      release();
      ts.resize(slots.size());
    }
    for (size_t i = 0; i < slots.size(); ++i)
      c10::MaybeOwnedTraits<at::Tensor>::assignBorrow(ts[i], THPVariable_Unpack(now[slots[i]]));
  }
  void release() {
    for (auto& t : ts) c10::MaybeOwnedTraits<at::Tensor>::destroyBorrow(t);  // never a decref
    ts.clear();
  }
  ~Borrowed() { release(); }
};

struct Group {
  std::vector<Py_ssize_t> ema, model;  // slots of the watch
  EmaPlan plan;
  bool release_gil;
  Borrowed ema_now, model_now;
};

struct ModelPlan {
  Ref watch;
  std::vector<Group> groups;          // one per device
  std::vector<Py_ssize_t> int_ema, int_model;  // the copied pairs (empty without copy_buffers / buffers='copy')
  Borrowed int_ema_now, int_model_now;
  std::vector<PyObject*> now;  // the watch's answer
  bool busy = false;           // a step in progress (its kernels may run without the GIL)
};

// Marks a step in progress, however it ends.
struct StepScope {
  ModelPlan* plan;
  explicit StepScope(ModelPlan* p) : plan(p) { plan->busy = true; }
  ~StepScope() { plan->busy = false; }
};

void destroy(PyObject* capsule) { delete static_cast<ModelPlan*>(PyCapsule_GetPointer(capsule, kName)); }

std::vector<Py_ssize_t> slot_list(PyObject* seq, Py_ssize_t slots) {
  TORCH_CHECK_TYPE(PyList_Check(seq), "ema_plan_new: slot lists must be lists of ints");
  std::vector<Py_ssize_t> out;
  for (Py_ssize_t i = 0; i < PyList_GET_SIZE(seq); ++i) {
    const Py_ssize_t s = PyLong_AsSsize_t(PyList_GET_ITEM(seq, i));
    if (s == -1 && PyErr_Occurred()) throw python_error();
    TORCH_CHECK_VALUE(s >= 0 && s < slots, "ema_plan_new: slot ", s, " out of range");
    out.push_back(s);
  }
  return out;
}

// The objects of `slots` as tensors (owned: the plan is built once).
std::vector<at::Tensor> tensors(const std::vector<PyObject*>& now, const std::vector<Py_ssize_t>& slots) {
  std::vector<at::Tensor> out;
  for (Py_ssize_t s : slots) out.push_back(THPVariable_Unpack(now[s]));
  return out;
}

}  // namespace

// ema_plan_new(watch, ema_module, model_module, groups=[(ema slots, model slots)], ints=(ema slots, model slots), mode)
PyObject* ema_plan_new(PyObject*, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *watch_capsule, *ema_module, *model_module, *groups, *ints;
  const char* mode;
  if (!PyArg_ParseTuple(args, "OOOO!O!s", &watch_capsule, &ema_module, &model_module, &PyList_Type, &groups,
                        &PyTuple_Type, &ints, &mode))
    return nullptr;
  StateWatch* watch = watch_from(watch_capsule);
  if (watch == nullptr) return nullptr;
  std::vector<PyObject*> now;
  const int r = watch->read(ema_module, model_module, now);
  if (r < 0) return nullptr;
  TORCH_CHECK(r == 1, "ema_plan_new: the modules changed since the state watch was made");
  auto plan = std::make_unique<ModelPlan>();
  plan->watch = Ref(watch_capsule);
  for (Py_ssize_t g = 0; g < PyList_GET_SIZE(groups); ++g) {
    PyObject* pair = PyList_GET_ITEM(groups, g);
    TORCH_CHECK_TYPE(PyTuple_Check(pair) && PyTuple_GET_SIZE(pair) == 2,
                     "ema_plan_new: each group must be an (ema slots, model slots) tuple");
    auto es = slot_list(PyTuple_GET_ITEM(pair, 0), watch->slots());
    auto ms = slot_list(PyTuple_GET_ITEM(pair, 1), watch->slots());
    const auto ema = tensors(now, es), model = tensors(now, ms);
    int64_t bytes = 0;
    for (const auto& t : ema) bytes += t.numel() * static_cast<int64_t>(t.element_size());
    const bool cpu = !ema.empty() && ema[0].device().is_cpu();
    plan->groups.push_back({std::move(es), std::move(ms), EmaPlan(ema, model, mode), cpu && bytes >= kReleaseGilBytes,
                            {}, {}});
  }
  TORCH_CHECK_TYPE(PyTuple_GET_SIZE(ints) == 2, "ema_plan_new: ints must be an (ema slots, model slots) tuple");
  plan->int_ema = slot_list(PyTuple_GET_ITEM(ints, 0), watch->slots());
  plan->int_model = slot_list(PyTuple_GET_ITEM(ints, 1), watch->slots());
  TORCH_CHECK_VALUE(plan->int_ema.size() == plan->int_model.size(), "ema_plan_new: int slot lists differ in length");
  PyObject* capsule = PyCapsule_New(plan.get(), kName, destroy);
  if (capsule != nullptr) plan.release();
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
  TORCH_CHECK(!plan->busy, "ModelEMA.update: called again while an update of the same EMA is running (another "
              "thread?); updates of one EMA must not overlap");
  StateWatch* watch = watch_from(plan->watch.p);
  const int r = watch->read(args[1], args[2], plan->now);
  if (r < 0) return nullptr;
  if (r == 0) Py_RETURN_FALSE;
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
  const StepScope scope(plan);
  for (auto& g : plan->groups) {
    g.ema_now.fill(plan->now, g.ema);
    g.model_now.fill(plan->now, g.model);
  }
  plan->int_ema_now.fill(plan->now, plan->int_ema);
  plan->int_model_now.fill(plan->now, plan->int_model);
  // the seed updates under torch.no_grad(): an EMA whose parameters require grad is written all the same
  const c10::NoGradGuard no_grad;
  for (auto& g : plan->groups)  // every check before the first write
    g.plan.prepare(g.ema_now.ts, g.model_now.ts, decay, decay_tensor, guard);
  check_writable(plan->int_ema_now.ts, "ModelEMA.update (integer buffers)");
  for (auto& g : plan->groups) {
    if (!g.release_gil) {
      g.plan.run(g.ema_now.ts, g.model_now.ts);
      continue;
    }
    const std::vector<at::Tensor> own_ema(g.ema_now.ts.begin(), g.ema_now.ts.end()),
        own_model(g.model_now.ts.begin(), g.model_now.ts.end());
    pybind11::gil_scoped_release no_gil;
    g.plan.run(own_ema, own_model);
  }
  copy_entries(plan->int_ema_now.ts, plan->int_model_now.ts, decay, decay_tensor, guard);
  Py_RETURN_TRUE;
  END_HANDLE_TH_ERRORS
}

}  // namespace torchutils_ext
