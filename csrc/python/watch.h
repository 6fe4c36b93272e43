// StateWatch: the proof, on every ModelEMA step, that the two module trees still hold what the plan was built
// over, and the tensors they hold now.
#pragma once
#include <Python.h>
#include <ATen/core/Tensor.h>

#include <vector>

#include "ref.h"

namespace torchutils_ext {

// NOTE: [state watch] The seed walks both state_dicts on every update, so it averages whatever the EMA holds
// at that moment. A plan instead holds a list of (container, key) entries, built once by _ema_plan.Layout:
//   kEdge    a submodule slot that leads to state: must hold the same module (compared through a weakref);
//   kNone    a parameter/buffer slot that held None: must still (a filled slot is new EMA state);
//   kTensor  a parameter/buffer slot: must hold a tensor with the data pointer, dtype, device, sizes and strides
//            it had (a .to()/.half()/`.data =`/swap_tensors/load_state_dict(assign=True) changes one); it
//            becomes slot `slot` of the step's tensors;
//   kSame    a slot tied to an earlier kTensor slot: must hold that very object (tied weights update once);
//   kLenDict, kLenSet  a container's size (full list only).
// EMA-side entries also compare their container's size (a key added beside watched ones). State added where no
// entry looks (a new parameter on a stateless module, a buffer made persistent) goes through nn.Module's
// registration hooks, which bump a generation counter; a changed generation makes the step walk the full list:
// every container size and every submodule slot of the EMA tree. No tensor is referenced between steps (a
// reference would block torch.utils.swap_tensors and keep replaced tensors alive): only containers (held) and
// modules (weakly).
class StateWatch {
 public:
  enum Kind : int { kEdge = 0, kNone = 1, kTensor = 2, kSame = 3, kLenDict = 4, kLenSet = 5 };
  struct Entry {
    PyObject* box;     // the container (a module's _parameters/_buffers/_modules dict, or a set)
    PyObject* key;     // nullptr for the size entries
    Py_ssize_t len;    // the container's size, or -1: not compared
    int kind;
    PyObject* ref;     // kEdge: a weakref to the module
    Py_ssize_t slot;   // kTensor / kSame: the step's tensor index
  };

  // Takes the entry lists from Python (see _ema_plan.Layout) and records every watched tensor's metadata.
  StateWatch(PyObject* ema_ref, PyObject* model_ref, PyObject* every_step, PyObject* full, PyObject* generation,
             Py_ssize_t slots);
  StateWatch(const StateWatch&) = delete;
  StateWatch& operator=(const StateWatch&) = delete;

  // 1: current, and out[s] is the (borrowed) tensor object in slot s; 0: something changed; -1: a Python error.
  int read(PyObject* ema, PyObject* model, std::vector<PyObject*>& out);
  Py_ssize_t slots() const { return static_cast<Py_ssize_t>(seen_.size()); }

 private:
  struct Seen {  // one slot's tensor as recorded; sizes and strides live in shape_[off, off + 2 * dim)
    PyTypeObject* type = nullptr;
    const void* ptr = nullptr;  // the storage's data (where_of in watch.cpp)
    int64_t offset = 0;         // and the tensor's offset into it, in elements
    caffe2::TypeMeta dtype;
    at::Device device = at::kCPU;
    int64_t dim = 0, off = 0;
  };
  int walk(const std::vector<Entry>& entries, std::vector<PyObject*>* out);
  bool matches(Py_ssize_t slot, PyObject* obj) const;
  void record(Py_ssize_t slot, PyObject* obj);

  Ref ema_ref_, model_ref_, generation_;
  long long seen_generation_ = 0;
  std::vector<Ref> held_;  // every container and key the entries point to
  std::vector<Entry> every_step_, full_;  // walked each step / when the registration generation moved
  std::vector<Seen> seen_;
  std::vector<int64_t> shape_;
};

StateWatch* watch_from(PyObject* capsule);  // nullptr with a TypeError set

}  // namespace torchutils_ext
