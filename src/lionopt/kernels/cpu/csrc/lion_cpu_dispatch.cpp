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

// The 8-bit step: lion_quant_cpu.cpp's lionopt_lion_quant_step, from the library Python has
// loaded (lionopt_set_quant_kernel), so both paths run the same compiled code.
using QuantStep = int (*)(int64_t, void* const*, void* const*, void* const*, float* const*,
                          const int64_t*, const double*, const uint32_t*, double, double, double,
                          int, int, int);
QuantStep quant_step = nullptr;

constexpr int kInt8Format = -2;  // lionopt_group_step's momentum_dtype for 8-bit groups
constexpr int64_t kQuantBlock = 256;

// The 8-bit half of a step: fp32 or bf16 weights (grads alike) with int8 codes and fp32 scales.
struct QuantBatch {
  std::vector<void*> params, grads, codes;
  std::vector<float*> scales;
  std::vector<int64_t> numels;
  std::vector<at::TensorImpl*> written;
  int param_code = -1;

  bool add(const at::Tensor& p, const at::Tensor& g, const at::Tensor& c, const at::Tensor& s) {
    if (!plain_cpu_tensor(p) || !plain_cpu_tensor(g) || !plain_cpu_tensor(c) ||
        !plain_cpu_tensor(s))
      return false;
    const int code = dtype_code(p.scalar_type());
    if (code != kF32 && code != kBF16) return false;
    if (g.scalar_type() != p.scalar_type() || c.scalar_type() != c10::ScalarType::Char ||
        s.scalar_type() != c10::ScalarType::Float)
      return false;
    if (numels.empty()) {
      param_code = code;
    } else if (code != param_code) {
      return false;
    }
    const int64_t n = p.numel();
    const int64_t padded = (n + kQuantBlock - 1) / kQuantBlock * kQuantBlock;
    if (g.numel() != n || c.numel() != padded || s.numel() != padded / kQuantBlock ||
        n >= (int64_t(1) << 32))
      return false;
    params.push_back(p.data_ptr());
    grads.push_back(g.data_ptr());
    codes.push_back(c.data_ptr());
    scales.push_back(static_cast<float*>(s.data_ptr()));
    numels.push_back(n);
    written.push_back(p.unsafeGetTensorImpl());
    written.push_back(c.unsafeGetTensorImpl());
    written.push_back(s.unsafeGetTensorImpl());
    return true;
  }

  int run(const double* lrs, double beta1, double beta2, double weight_decay, int flags,
          int num_threads) {
    if (numels.empty()) return kNothingToDo;
    int status = 0;
    Py_BEGIN_ALLOW_THREADS
    status = quant_step(int64_t(numels.size()), params.data(), grads.data(), codes.data(),
                        scales.data(), numels.data(), lrs, nullptr, beta1, beta2, weight_decay,
                        param_code, flags, num_threads);
    Py_END_ALLOW_THREADS
    if (status != 0) return kDeclined;
    for (at::TensorImpl* impl : written) impl->bump_version();
    return kStepped;
  }
};

// Whether lion_step_any_dtype has a variant for these (param, grad, momentum) codes.
bool plain_supported(const int* c) {
  static const int kSupported[][3] = {{kF32, kF32, kF32},  {kF64, kF64, kF64},
                                      {kBF16, kBF16, kBF16}, {kBF16, kBF16, kF32},
                                      {kF16, kF16, kF16},  {kF16, kF16, kF32},
                                      {kF32, kF32, kBF16}, {kF32, kF32, kF16}};
  for (const auto& s : kSupported)
    if (c[0] == s[0] && c[1] == s[1] && c[2] == s[2]) return true;
  return false;
}

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

int lionopt_dispatch_abi_version() { return 3; }

void lionopt_set_quant_kernel(void* step) { quant_step = reinterpret_cast<QuantStep>(step); }

// One step of an optimizer's parameter group whose layout was cached on an earlier step.
//
// params: the group's list of parameters; cached_params: a tuple of the same parameters as
// when the cache was made; states: a tuple, per parameter, of its state dict (None if it had
// none). momentum_dtype: the dtype code every momentum must have (else the Python path converts
// it), -1 for any, or kInt8Format for the 8-bit format: a floating-point parameter of at least
// min_numel elements has int8 codes and fp32 scales (exp_avg_scale), any other an fp32 (fp64
// for fp64 weights) momentum; those go to the 8-bit and the plain kernel, one call each. Parameters without a gradient are skipped, as torch.optim does. Returns
// kStale when the cache no longer fits (the list changed, a parameter with a gradient has no
// state or no momentum yet, or a momentum in another format), kDeclined when a tensor is not for the
// kernel, kNothingToDo when no parameter has a gradient, kStepped after the step.
int lionopt_group_step(PyObject* params, PyObject* cached_params, PyObject* states,
                       int momentum_dtype, int64_t min_numel, double lr, double beta1,
                       double beta2, double weight_decay, int flags, int num_threads) {
  try {
    if (!PyList_Check(params) || !PyTuple_Check(cached_params) || !PyTuple_Check(states))
      return kStale;
    const Py_ssize_t n = PyList_GET_SIZE(params);
    if (PyTuple_GET_SIZE(cached_params) != n || PyTuple_GET_SIZE(states) != n) return kStale;
    const bool int8_format = momentum_dtype == kInt8Format;
    if (int8_format && quant_step == nullptr) return kDeclined;
    Triples t(n);
    std::vector<PyObject*> momenta(n, nullptr);
    std::vector<const at::Tensor*> scales(n, nullptr);  // 8-bit momenta only
    Batch batch;
    QuantBatch quant;
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
          if (momenta[j] == nullptr) return kStale;  // no momentum yet
          PyObject* scale = PyDict_GetItem(state, exp_avg_scale_key());
          t.moms[j] = unpack(momenta[j]);
          if (t.moms[j] == nullptr) return kDeclined;
          if (int8_format) {
            const at::Tensor& p = *t.params[j];
            const int code = dtype_code(p.scalar_type());
            const bool quantized = code >= 0 && p.numel() >= min_numel;
            if (quantized != (scale != nullptr)) return kStale;  // to (de)quantise
            if (quantized) {
              scales[j] = unpack(scale);
              if (scales[j] == nullptr) return kDeclined;
            } else if (code >= 0 && dtype_code(t.moms[j]->scalar_type()) !=
                                        (code == kF64 ? kF64 : kF32)) {
              return kStale;  // the format keeps small tensors' momenta in fp32
            }
          } else if (scale != nullptr) {
            return kStale;  // an 8-bit momentum, to convert
          } else if (momentum_dtype >= 0 &&
                     dtype_code(t.moms[j]->scalar_type()) != momentum_dtype) {
            return kStale;  // to convert to the group's momentum_dtype
          }
          t.grads[j] = &grad;
          prefetch_impl(t.grads[j]);
          prefetch_impl(t.moms[j]);
          return kStepped;
        }
        case 4:
          t.prefetch_storages(j);
          return kStepped;
        default:
          if (scales[j] != nullptr) {
            if (flags & kCautious) return kDeclined;  // the 8-bit kernel has no cautious mode
            return quant.add(*t.params[j], *t.grads[j], *t.moms[j], *scales[j]) ? kStepped
                                                                                : kDeclined;
          }
          return t.add_to(batch, j);
      }
    });
    if (status != kStepped) return status;
    // Every tensor is checked; the plain kernel declines only unsupported dtype triples,
    // which must be known before the 8-bit half writes anything.
    if (!batch.numels.empty() && !plain_supported(batch.codes)) return kDeclined;
    const std::vector<double> lrs(std::max(batch.numels.size(), quant.numels.size()), lr);
    const int quant_status = quant.run(lrs.data(), beta1, beta2, weight_decay, flags, num_threads);
    if (quant_status == kDeclined) return kDeclined;
    const int plain_status = batch.run(lrs.data(), beta1, beta2, weight_decay, flags, num_threads);
    if (plain_status == kNothingToDo) return quant_status;
    return plain_status;
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
