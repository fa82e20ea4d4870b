// The per-tensor bookkeeping of the fused CPU Lion step, in C++: from a parameter group's Python
// lists to the kernel's pointer table in a few hundred ns per parameter (mostly cache misses on
// the tensors' metadata), where Python takes 2-5 us.
//
// lionopt.kernels.cpu_dispatch builds this file against torch's and Python's headers and calls
// it through ctypes.PyDLL (the GIL is held on entry; it is released around the kernel). Each
// entry point first checks every tensor and only then writes anything: when one tensor is not
// what the kernel takes (another device or dtype, non-contiguous, sparse, complex, a tensor
// subclass with Python dispatch, an inference tensor, mismatched sizes) it returns kDeclined with nothing changed, and the
// caller runs its general Python path, which handles every case. The kernel is lion_cpu.cpp's,
// compiled with the same flags, so both paths are bitwise equal.
#include <Python.h>

#include <torch/csrc/autograd/python_variable.h>

#include <exception>
#include <vector>

#define LIONOPT_KERNEL_ONLY
#include "lion_cpu.cpp"

namespace {

enum Status : int { kStepped = 0, kNothingToDo = 1, kDeclined = 2, kStale = 3 };

constexpr int64_t kMaxExactFp32Count = int64_t(1) << 24;  // see fused_cpu.py

int dtype_code(c10::ScalarType t) {
  switch (t) {
    case c10::ScalarType::Float: return kF32;
    case c10::ScalarType::Double: return kF64;
    case c10::ScalarType::BFloat16: return kBF16;
    case c10::ScalarType::Half: return kF16;
    default: return -1;
  }
}

bool plain_cpu_tensor(const at::Tensor& t) {
  return t.defined() && t.layout() == c10::kStrided && t.device().is_cpu() &&
         !t.unsafeGetTensorImpl()->is_python_dispatch() && !t.is_inference() && !t.is_neg() &&
         !t.is_conj() && t.is_contiguous();
}

// The pointer table of one kernel call, collected tensor by tensor.
struct Batch {
  std::vector<void*> params, grads, moms;
  std::vector<int64_t> numels;
  std::vector<at::TensorImpl*> written;  // params and momenta, to bump their versions
  int codes[3] = {-1, -1, -1};
  bool cautious = false;

  bool add(const at::Tensor& p, const at::Tensor& g, const at::Tensor& m) {
    if (!plain_cpu_tensor(p) || !plain_cpu_tensor(g) || !plain_cpu_tensor(m)) return false;
    const int c[3] = {dtype_code(p.scalar_type()), dtype_code(g.scalar_type()),
                      dtype_code(m.scalar_type())};
    if (numels.empty()) {
      std::copy(c, c + 3, codes);
    } else if (c[0] != codes[0] || c[1] != codes[1] || c[2] != codes[2]) {
      return false;
    }
    const int64_t n = p.numel();
    if (g.numel() != n || m.numel() != n) return false;
    if (cautious && c[0] != kF64 && n > kMaxExactFp32Count) return false;
    params.push_back(p.data_ptr());
    grads.push_back(g.data_ptr());
    moms.push_back(m.data_ptr());
    numels.push_back(n);
    written.push_back(p.unsafeGetTensorImpl());
    written.push_back(m.unsafeGetTensorImpl());
    return true;
  }

  // Runs the kernel (GIL released) and bumps the versions, as torch's in-place ops do.
  int run(const double* lrs, double beta1, double beta2, double weight_decay, int flags,
          int num_threads) {
    if (numels.empty()) return kNothingToDo;
    if (codes[0] < 0 || codes[1] < 0 || codes[2] < 0) return kDeclined;
    const int64_t count = int64_t(numels.size());
    int status = 0;
    Py_BEGIN_ALLOW_THREADS
    status = lion_step_any_dtype(count, params.data(), grads.data(), moms.data(), numels.data(),
                                 lrs, beta1, beta2, weight_decay, codes[0], codes[1], codes[2],
                                 flags, num_threads);
    Py_END_ALLOW_THREADS
    if (status != 0) return kDeclined;  // an unsupported combination: nothing was written
    for (at::TensorImpl* impl : written) impl->bump_version();
    return kStepped;
  }
};

PyObject* exp_avg_key() {
  static PyObject* key = PyUnicode_InternFromString("exp_avg");
  return key;
}

PyObject* exp_avg_scale_key() {
  static PyObject* key = PyUnicode_InternFromString("exp_avg_scale");
  return key;
}

const at::Tensor* unpack(PyObject* object) {
  return object != nullptr && THPVariable_Check(object) ? &THPVariable_Unpack(object) : nullptr;
}

// Thousands of tensors' metadata (Python object, TensorImpl, autograd meta, storage) are out of
// cache after the kernel streamed the previous step's data, and reaching a data pointer takes a
// chain of dependent loads: one memory latency per hop, per tensor. So the collection is
// software-pipelined: tensor j is at hop s while tensor j + s * kDistance starts, with a
// prefetch for each next hop, and the misses of different tensors overlap.
constexpr Py_ssize_t kDistance = 8;

inline void prefetch(const void* address, size_t bytes = 64) {
  const char* p = static_cast<const char*>(address);
  for (size_t offset = 0; offset < bytes; offset += 64) __builtin_prefetch(p + offset);
}

// A THPVariable's tensor handle may sit in the cache line after the one its address is in.
inline void prefetch_object(PyObject* object) { prefetch(object, 2 * 64); }

inline void prefetch_impl(const at::Tensor* t) {
  if (t != nullptr) prefetch(t->unsafeGetTensorImpl(), sizeof(at::TensorImpl));
}

inline void prefetch_storage(const at::Tensor* t) {
  if (t != nullptr && t->defined())
    prefetch(t->unsafeGetTensorImpl()->unsafe_storage().unsafeGetStorageImpl());
}

// Runs stage(s, j) for s = 0..stages-1, j = 0..n-1, each tensor's stages in order and
// kDistance tensors apart. A stage returns a Status other than kStepped to stop.
template <typename Stage>
int pipeline(Py_ssize_t n, int stages, Stage&& stage) {
  for (Py_ssize_t i = 0; i < n + (stages - 1) * kDistance; ++i) {
    for (int s = 0; s < stages; ++s) {
      const Py_ssize_t j = i - s * kDistance;
      if (j < 0 || j >= n) continue;
      const int status = stage(s, j);
      if (status != kStepped) return status;
    }
  }
  return kStepped;
}

// The tensors of one step; grads[j] == nullptr skips parameter j (it has no gradient).
struct Triples {
  std::vector<const at::Tensor*> params, grads, moms;
  explicit Triples(Py_ssize_t n) : params(n), grads(n), moms(n) {}

  void prefetch_storages(Py_ssize_t j) const {
    if (grads[j] == nullptr) return;
    prefetch_storage(params[j]);
    prefetch_storage(grads[j]);
    prefetch_storage(moms[j]);
  }

  int add_to(Batch& batch, Py_ssize_t j) const {
    if (grads[j] == nullptr) return kStepped;
    return batch.add(*params[j], *grads[j], *moms[j]) ? kStepped : kDeclined;
  }
};

}  // namespace

extern "C" {

int lionopt_dispatch_abi_version() { return 2; }

// One step of an optimizer's parameter group whose layout was cached on an earlier step.
//
// params: the group's list of parameters; cached_params: a tuple of the same parameters as
// when the cache was made; states: a tuple, per parameter, of its state dict (None if it had
// none). momentum_dtype: the dtype code every momentum must have (else the Python path converts
// it), or -1 for any. Parameters without a gradient are skipped, as torch.optim does. Returns
// kStale when the cache no longer fits (the list changed, a parameter with a gradient has no
// state or no momentum yet, or a momentum in another format), kDeclined when a tensor is not for the
// kernel, kNothingToDo when no parameter has a gradient, kStepped after the step.
int lionopt_group_step(PyObject* params, PyObject* cached_params, PyObject* states,
                       int momentum_dtype, double lr, double beta1, double beta2,
                       double weight_decay, int flags, int num_threads) {
  try {
    if (!PyList_Check(params) || !PyTuple_Check(cached_params) || !PyTuple_Check(states))
      return kStale;
    const Py_ssize_t n = PyList_GET_SIZE(params);
    if (PyTuple_GET_SIZE(cached_params) != n || PyTuple_GET_SIZE(states) != n) return kStale;
    Triples t(n);
    std::vector<PyObject*> momenta(n, nullptr);
    Batch batch;
    batch.cautious = flags & kCautious;
    const int status = pipeline(n, 6, [&](int stage, Py_ssize_t j) -> int {
      PyObject* state = PyTuple_GET_ITEM(states, j);
      const bool is_dict = PyDict_CheckExact(state);
      switch (stage) {
        case 0: {  // the parameter's Python object and its state dict
          PyObject* object = PyList_GET_ITEM(params, j);
          if (object != PyTuple_GET_ITEM(cached_params, j)) return kStale;
          prefetch_object(object);
          prefetch(state);
          return kStepped;
        }
        case 1:  // its TensorImpl and the state dict's key table
          t.params[j] = unpack(PyList_GET_ITEM(params, j));
          if (t.params[j] == nullptr) return kDeclined;
          prefetch_impl(t.params[j]);
          if (is_dict) prefetch(reinterpret_cast<PyDictObject*>(state)->ma_keys);
          return kStepped;
        case 2:  // its autograd meta (the grad) and the momentum's Python object
          prefetch(t.params[j]->unsafeGetTensorImpl()->autograd_meta());
          if (is_dict) momenta[j] = PyDict_GetItem(state, exp_avg_key());
          if (momenta[j] != nullptr) prefetch_object(momenta[j]);
          return kStepped;
        case 3: {  // the grad's and the momentum's TensorImpl
          const at::Tensor& grad = t.params[j]->unsafeGetTensorImpl()->grad();
          if (!grad.defined()) return kStepped;  // skipped, as torch.optim does
          if (state == Py_None) return kStale;    // its first gradient: state to create
          if (!is_dict) return kDeclined;
          if (momenta[j] == nullptr || PyDict_GetItem(state, exp_avg_scale_key()) != nullptr)
            return kStale;  // no momentum yet, or an 8-bit one
          t.moms[j] = unpack(momenta[j]);
          if (t.moms[j] == nullptr) return kDeclined;
          if (momentum_dtype >= 0 && dtype_code(t.moms[j]->scalar_type()) != momentum_dtype)
            return kStale;  // to convert to the group's momentum_dtype
          t.grads[j] = &grad;
          prefetch_impl(t.grads[j]);
          prefetch_impl(t.moms[j]);
          return kStepped;
        }
        case 4:
          t.prefetch_storages(j);
          return kStepped;
        default:
          return t.add_to(batch, j);
      }
    });
    if (status != kStepped) return status;
    const std::vector<double> lrs(batch.numels.size(), lr);
    return batch.run(lrs.data(), beta1, beta2, weight_decay, flags, num_threads);
  } catch (const std::exception&) {
    PyErr_Clear();  // a failed isinstance() may have left one
    return kDeclined;  // e.g. a c10::Error from a tensor without storage, before any write
  }
}

// One step over three parallel lists (or tuples) of tensors, as lionopt.functional.lion gets
// them. lrs: None for ``lr`` everywhere, or one float per tensor. Returns kStepped,
// kNothingToDo (empty lists) or kDeclined (nothing written).
int lionopt_lists_step(PyObject* params, PyObject* grads, PyObject* exp_avgs, PyObject* lrs,
                       double lr, double beta1, double beta2, double weight_decay, int flags,
                       int num_threads) {
  try {
    for (PyObject* seq : {params, grads, exp_avgs}) {
      if (!PyList_Check(seq) && !PyTuple_Check(seq)) return kDeclined;
    }
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(params);
    if (PySequence_Fast_GET_SIZE(grads) != n || PySequence_Fast_GET_SIZE(exp_avgs) != n)
      return kDeclined;
    std::vector<double> per_tensor_lrs(n, lr);
    if (lrs != Py_None) {
      if ((!PyList_Check(lrs) && !PyTuple_Check(lrs)) || PySequence_Fast_GET_SIZE(lrs) != n)
        return kDeclined;
      for (Py_ssize_t i = 0; i < n; ++i) {
        per_tensor_lrs[i] = PyFloat_AsDouble(PySequence_Fast_GET_ITEM(lrs, i));
        if (per_tensor_lrs[i] == -1.0 && PyErr_Occurred()) {
          PyErr_Clear();
          return kDeclined;
        }
      }
    }
    Triples t(n);
    Batch batch;
    batch.cautious = flags & kCautious;
    const int status = pipeline(n, 4, [&](int stage, Py_ssize_t j) -> int {
      switch (stage) {
        case 0:  // the three Python objects
          for (PyObject* seq : {params, grads, exp_avgs})
            prefetch_object(PySequence_Fast_GET_ITEM(seq, j));
          return kStepped;
        case 1:  // their TensorImpls
          t.params[j] = unpack(PySequence_Fast_GET_ITEM(params, j));
          t.grads[j] = unpack(PySequence_Fast_GET_ITEM(grads, j));
          t.moms[j] = unpack(PySequence_Fast_GET_ITEM(exp_avgs, j));
          if (t.params[j] == nullptr || t.grads[j] == nullptr || t.moms[j] == nullptr)
            return kDeclined;
          prefetch_impl(t.params[j]);
          prefetch_impl(t.grads[j]);
          prefetch_impl(t.moms[j]);
          return kStepped;
        case 2:
          t.prefetch_storages(j);
          return kStepped;
        default:
          return t.add_to(batch, j);
      }
    });
    if (status != kStepped) return status;
    return batch.run(per_tensor_lrs.data(), beta1, beta2, weight_decay, flags, num_threads);
  } catch (const std::exception&) {
    PyErr_Clear();
    return kDeclined;
  }
}

}  // extern "C"
