#include "watch.h"

#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <tuple>
#include <utility>

namespace torchutils_ext {
namespace {

constexpr const char* kName = "torchutils_ext.StateWatch";

// The object a weakref points to (borrowed), or nullptr when it died.
PyObject* target(PyObject* ref) {
#if PY_VERSION_HEX >= 0x030D0000
  PyObject* obj = nullptr;
  if (PyWeakref_GetRef(ref, &obj) <= 0) return nullptr;
  Py_DECREF(obj);  // the referent outlives this call: a container we hold references it, or it is compared only
  return obj;
#else
  PyObject* obj = PyWeakref_GET_OBJECT(ref);
  return obj == Py_None ? nullptr : obj;
#endif
}

Py_ssize_t size_of(PyObject* box) {
  if (PyDict_Check(box)) return PyDict_GET_SIZE(box);
  if (PyAnySet_Check(box)) return PySet_GET_SIZE(box);
  return PyObject_Size(box);  // a ScriptModule's dict wrappers
}

// box[key] as a borrowed reference, nullptr when missing (no error set), or nullptr with an error set.
PyObject* lookup(PyObject* box, PyObject* key, bool* error) {
  if (PyDict_Check(box)) {
    PyObject* got = PyDict_GetItemWithError(box, key);
    *error = got == nullptr && PyErr_Occurred();
    return got;
  }
  PyObject* got = PyObject_GetItem(box, key);  // not a dict: whatever its [] returns
  if (got == nullptr) {
    PyErr_Clear();
    return nullptr;
  }
  Py_DECREF(got);  // the container keeps it alive
  return got;
}

void destroy(PyObject* capsule) { delete static_cast<StateWatch*>(PyCapsule_GetPointer(capsule, kName)); }

std::vector<StateWatch::Entry> parse(PyObject* list, std::vector<Ref>& held, const char* what) {
  TORCH_CHECK_TYPE(PyList_Check(list), "watch_new: ", what, " must be a list");
  std::vector<StateWatch::Entry> out;
  out.reserve(PyList_GET_SIZE(list));
  for (Py_ssize_t i = 0; i < PyList_GET_SIZE(list); ++i) {
    PyObject *box, *key, *arg;
    Py_ssize_t len;
    int kind;
    if (!PyArg_ParseTuple(PyList_GET_ITEM(list, i), "OOniO", &box, &key, &len, &kind, &arg))
      throw python_error();
    TORCH_CHECK_VALUE(kind >= StateWatch::kEdge && kind <= StateWatch::kLenSet, "watch_new: bad entry kind ", kind);
    StateWatch::Entry e{box, key == Py_None ? nullptr : key, len, kind, nullptr, -1};
    if (kind == StateWatch::kEdge) {
      TORCH_CHECK_TYPE(PyWeakref_CheckRef(arg), "watch_new: a module entry needs a weakref");
      e.ref = arg;
    } else if (kind == StateWatch::kTensor || kind == StateWatch::kSame) {
      e.slot = PyLong_AsSsize_t(arg);
      if (e.slot == -1 && PyErr_Occurred()) throw python_error();
    }
    for (PyObject* o : {box, key, arg}) held.emplace_back(o);
    out.push_back(e);
  }
  return out;
}

}  // namespace

StateWatch::StateWatch(PyObject* ema_ref, PyObject* model_ref, PyObject* every_step, PyObject* full,
                       PyObject* generation, Py_ssize_t slots)
    : ema_ref_(ema_ref), model_ref_(model_ref), generation_(generation) {
  TORCH_CHECK_TYPE(PyWeakref_CheckRef(ema_ref) && PyWeakref_CheckRef(model_ref),
                   "watch_new: the two modules are passed as weakrefs");
  TORCH_CHECK_TYPE(PyList_Check(generation) && PyList_GET_SIZE(generation) == 1,
                   "watch_new: generation must be a one-element list");
  every_step_ = parse(every_step, held_, "every_step");
  full_ = parse(full, held_, "full");
  seen_generation_ = PyLong_AsLongLong(PyList_GET_ITEM(generation, 0));
  if (seen_generation_ == -1 && PyErr_Occurred()) throw python_error();
  seen_.resize(slots);
  for (const Entry& e : every_step_) {
    TORCH_CHECK_VALUE(e.kind != kTensor || (e.slot >= 0 && e.slot < slots), "watch_new: slot out of range");
    TORCH_CHECK_VALUE(e.kind != kSame || (e.slot >= 0 && e.slot < slots), "watch_new: slot out of range");
  }
  // record each slot's tensor as it is now
  for (const Entry& e : every_step_) {
    if (e.kind != kTensor) continue;
    bool error = false;
    PyObject* obj = lookup(e.box, e.key, &error);
    if (error) throw python_error();
    TORCH_CHECK_VALUE(obj != nullptr && THPVariable_Check(obj), "watch_new: a tensor slot holds no tensor");
    record(e.slot, obj);
  }
}

// Where a tensor's elements lie, read inline: its storage's data and its offset in elements (TensorImpl::data()
// reaches the same through an out-of-line call and more checks; this is per tensor per step). A tensor without
// storage takes data(), which raises as data_ptr() does.
static std::pair<const void*, int64_t> where_of(const c10::TensorImpl* impl) {
  const c10::Storage& st = impl->unsafe_storage();
  if (!st) return {impl->data(), 0};
  return {st.unsafeGetStorageImpl()->data(), impl->storage_offset()};
}

void StateWatch::record(Py_ssize_t slot, PyObject* obj) {
  const at::Tensor& t = THPVariable_Unpack(obj);
  Seen& s = seen_[slot];
  s.type = Py_TYPE(obj);
  std::tie(s.ptr, s.offset) = where_of(t.unsafeGetTensorImpl());
  s.dtype = t.dtype();
  s.device = t.device();
  s.dim = t.dim();
  s.off = static_cast<int64_t>(shape_.size());
  shape_.insert(shape_.end(), t.sizes().begin(), t.sizes().end());
  shape_.insert(shape_.end(), t.strides().begin(), t.strides().end());
}

bool StateWatch::matches(Py_ssize_t slot, PyObject* obj) const {
  const Seen& s = seen_[slot];
  if (Py_TYPE(obj) != s.type) return false;  // recorded as a tensor type: the same type is one
  const c10::TensorImpl* impl = THPVariable_Unpack(obj).unsafeGetTensorImpl();
  if (impl->dtype() != s.dtype || impl->dim() != s.dim || impl->device() != s.device) return false;
  const at::IntArrayRef sizes(shape_.data() + s.off, s.dim), strides(shape_.data() + s.off + s.dim, s.dim);
  return impl->sizes() == sizes && impl->strides() == strides && where_of(impl) == std::make_pair(s.ptr, s.offset);
}

// NOTE: right after a training step the watched objects are out of cache, and each check is a chain of dependent
// loads (container -> its key table -> the value -> its TensorImpl): the containers and key tables are prefetched
// a few entries ahead, so that the misses overlap.
int StateWatch::walk(const std::vector<Entry>& entries, std::vector<PyObject*>* out) {
  const size_t n = entries.size();
  constexpr size_t kBox = 16, kTable = 8;
  for (size_t i = 0; i < n; ++i) {
    if (i + kBox < n) __builtin_prefetch(entries[i + kBox].box);
    if (i + kTable < n && PyDict_Check(entries[i + kTable].box))
      __builtin_prefetch(reinterpret_cast<PyDictObject*>(entries[i + kTable].box)->ma_keys);
    const Entry& e = entries[i];
    if (e.len >= 0) {
      const Py_ssize_t len = size_of(e.box);
      if (len < 0) return -1;
      if (len != e.len) return 0;
    }
    if (e.kind == kLenDict || e.kind == kLenSet) continue;
    bool error = false;
    PyObject* got = lookup(e.box, e.key, &error);
    if (error) return -1;
    if (got == nullptr) return 0;  // the key is gone
    switch (e.kind) {
      case kEdge: {
        PyObject* was = target(e.ref);
        if (was == nullptr || got != was) return 0;
        break;
      }
      case kNone:
        if (got != Py_None) return 0;
        break;
      case kTensor:
        if (!matches(e.slot, got)) return 0;
        if (out) (*out)[e.slot] = got;
        break;
      case kSame:
        if (out && got != (*out)[e.slot]) return 0;
        break;
    }
  }
  return 1;
}

int StateWatch::read(PyObject* ema, PyObject* model, std::vector<PyObject*>& out) {
  if (target(ema_ref_.p) != ema || target(model_ref_.p) != model) return 0;
  const long long generation = PyLong_AsLongLong(PyList_GET_ITEM(generation_.p, 0));
  if (generation == -1 && PyErr_Occurred()) return -1;
  if (generation != seen_generation_) {  // something registered state somewhere: look at the whole EMA tree
    const int r = walk(full_, nullptr);
    if (r != 1) return r;
    seen_generation_ = generation;
  }
  out.resize(seen_.size());  // every slot is written by its kTensor entry
  return walk(every_step_, &out);
}

StateWatch* watch_from(PyObject* capsule) {
  if (!PyCapsule_IsValid(capsule, kName)) {
    PyErr_SetString(PyExc_TypeError, "expected a state watch from torchutils_ext._C.watch_new");
    return nullptr;
  }
  return static_cast<StateWatch*>(PyCapsule_GetPointer(capsule, kName));
}

PyObject* watch_new(PyObject*, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *ema_ref, *model_ref, *every_step, *full, *generation;
  Py_ssize_t slots;
  if (!PyArg_ParseTuple(args, "OOO!O!O!n", &ema_ref, &model_ref, &PyList_Type, &every_step, &PyList_Type, &full,
                        &PyList_Type, &generation, &slots))
    return nullptr;
  TORCH_CHECK_VALUE(slots >= 0, "watch_new: slots must be >= 0");
  auto* watch = new StateWatch(ema_ref, model_ref, every_step, full, generation, slots);
  PyObject* capsule = PyCapsule_New(watch, kName, destroy);
  if (capsule == nullptr) delete watch;
  return capsule;
  END_HANDLE_TH_ERRORS
}

// watch_read(watch, ema_module, model_module) -> the list of the slots' tensors now, or None when changed.
PyObject* watch_read(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 3) {
    PyErr_SetString(PyExc_TypeError, "watch_read(watch, ema_module, model_module) takes 3 arguments");
    return nullptr;
  }
  StateWatch* watch = watch_from(args[0]);
  if (watch == nullptr) return nullptr;
  std::vector<PyObject*> out;
  const int r = watch->read(args[1], args[2], out);
  if (r < 0) return nullptr;
  if (r == 0) Py_RETURN_NONE;
  PyObject* list = PyList_New(static_cast<Py_ssize_t>(out.size()));
  if (list == nullptr) return nullptr;
  for (size_t i = 0; i < out.size(); ++i) {
    PyObject* o = out[i] ? out[i] : Py_None;
    Py_INCREF(o);
    PyList_SET_ITEM(list, static_cast<Py_ssize_t>(i), o);
  }
  return list;
  END_HANDLE_TH_ERRORS
}

}  // namespace torchutils_ext
