// Fused Lion step for CPU tensors: one pass per element over θ, g, m, multi-threaded with OpenMP.
//
// A plain C ABI (no torch headers), so the build takes seconds; lionopt.kernels.fused_cpu loads
// it with ctypes and passes data pointers. Compile with -ffp-contract=off: every rounding below
// is written out to match lionopt.kernels.reference bit for bit (std::fma exactly where ATen's
// add-with-alpha fuses, plain mul/add elsewhere).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

// Storage dtypes, as numbered by fused_cpu.py.
enum DType : int { kF32 = 0, kF64 = 1, kBF16 = 2, kF16 = 3 };
// Option bits, as numbered by fused_cpu.py.
enum Flag : int { kDecay = 1, kCautious = 2, kCautiousDecay = 4, kMaximize = 8 };

struct bf16 {
  uint16_t bits;
};
struct f16 {
  uint16_t bits;
};

inline float from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint32_t to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

// Load a stored value into the math type T, and round it back (round-to-nearest-even).
template <typename S, typename T>
struct Conv {
  static T load(S v) { return v; }
  static S store(T v) { return v; }
};
template <>
struct Conv<bf16, float> {
  static float load(bf16 v) { return from_bits(uint32_t(v.bits) << 16); }
  static bf16 store(float f) {
    uint32_t u = to_bits(f);
    uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return bf16{uint16_t(f != f ? 0x7FC0u : rounded)};
  }
};
// Exact IEEE binary16 <-> binary32 conversions (round-to-nearest-even), written with integer
// and float arithmetic so that the compiler vectorises them (F16C intrinsics would not be).
template <>
struct Conv<f16, float> {
  static float load(f16 v) {
    const uint32_t w = uint32_t(v.bits) << 16;
    const uint32_t sign = w & 0x80000000u;
    const uint32_t two_w = w + w;
    const float normalized = from_bits((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    const float denormalized = from_bits((two_w >> 17) | (126u << 23)) - 0.5f;
    const uint32_t magnitude = two_w < (1u << 27) ? to_bits(denormalized) : to_bits(normalized);
    return from_bits(sign | magnitude);
  }
  static f16 store(float f) {
    float base = (std::fabs(f) * 0x1.0p+112f) * 0x1.0p-110f;
    const uint32_t w = to_bits(f);
    const uint32_t shl1_w = w + w;
    const uint32_t sign = w & 0x80000000u;
    uint32_t bias = shl1_w & 0xFF000000u;
    if (bias < 0x71000000u) bias = 0x71000000u;
    base = from_bits((bias >> 1) + 0x07800000u) + base;
    const uint32_t bits = to_bits(base);
    const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
    return f16{uint16_t((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign))};
  }
};

// sign() as ATen computes it: (0 < c) - (c < 0), so NaN -> +0 and ±0 -> +0.
template <typename T>
inline T sign_of(T c) {
  return T(c > T(0)) - T(c < T(0));
}

template <typename T>
struct Hyper {
  T beta1, one_minus_beta1, beta2, one_minus_beta2, grad_sign;
};

// Per tensor: decay = 1 - lr*wd, neg_lr = -lr, and the cautious scale 1/max(mean(mask), 1e-3).
template <typename T>
struct PerTensor {
  T decay, neg_lr, scale;
};

template <typename T, typename P, typename G, typename M, bool kDoDecay, bool kDoCautious,
          bool kDoCautiousDecay>
void lion_range(P* __restrict__ p, const G* __restrict__ g, M* __restrict__ m, int64_t n,
                const Hyper<T> h, const PerTensor<T> t) {
  for (int64_t i = 0; i < n; ++i) {
    const T grad = Conv<G, T>::load(g[i]) * h.grad_sign;
    T mom = Conv<M, T>::load(m[i]);
    T theta = Conv<P, T>::load(p[i]);
    // c = m*beta1 + g*(1-beta1): two rounded products, one rounded add.
    const T c = mom * h.beta1 + grad * h.one_minus_beta1;
    T direction = sign_of(c);
    T update = direction;
    if (kDoCautious) {
      const T agree = direction * grad > T(0) ? T(1) : T(0);
      direction = direction * agree;
      update = direction * t.scale;
    }
    if (kDoDecay) {
      if (kDoCautiousDecay) {
        const bool here = direction * theta >= T(0);  // arXiv 2510.12402: I(u*theta >= 0)
        theta = here ? theta * t.decay : theta;
      } else {
        theta = theta * t.decay;
      }
    }
    // ATen's add(alpha) is a fused multiply-add: theta + (-lr)*update, m*beta2 + (1-beta2)*g.
    theta = std::fma(update, t.neg_lr, theta);
    mom = std::fma(grad, h.one_minus_beta2, mom * h.beta2);
    p[i] = Conv<P, T>::store(theta);
    m[i] = Conv<M, T>::store(mom);
  }
}

// Cautious Lion's mask count: how many coordinates have sign(c) == sign(g) != 0.
template <typename T, typename G, typename M>
int64_t count_agree(const G* __restrict__ g, const M* __restrict__ m, int64_t n,
                    const Hyper<T> h) {
  int64_t count = 0;
  for (int64_t i = 0; i < n; ++i) {
    const T grad = Conv<G, T>::load(g[i]) * h.grad_sign;
    const T c = Conv<M, T>::load(m[i]) * h.beta1 + grad * h.one_minus_beta1;
    count += sign_of(c) * grad > T(0) ? 1 : 0;
  }
  return count;
}

constexpr int64_t kMinParallel = 1 << 15;  // elements; below this one thread is faster
constexpr int64_t kChunk = 1 << 16;        // elements per work item (a multiple of 64)

// Cuts the concatenation of all tensors into chunks of kChunk elements, handed out to the
// threads dynamically (a thread that the OS delays takes fewer chunks), and calls
// fn(tensor_index, begin, end) for each piece of a tensor inside a chunk.
template <typename F>
void for_each_piece(int64_t n_tensors, const int64_t* numels, int num_threads, F&& fn) {
  std::vector<int64_t> offsets(n_tensors + 1, 0);
  for (int64_t k = 0; k < n_tensors; ++k) offsets[k + 1] = offsets[k] + numels[k];
  const int64_t total = offsets[n_tensors];
  if (total == 0) return;
  const int64_t n_chunks = (total + kChunk - 1) / kChunk;

  auto run_chunk = [&](int64_t chunk) {
    int64_t begin = chunk * kChunk;
    const int64_t end = std::min(total, begin + kChunk);
    int64_t k = std::upper_bound(offsets.begin(), offsets.end(), begin) - offsets.begin() - 1;
    while (begin < end) {
      const int64_t stop = std::min(end, offsets[k + 1]);
      if (stop > begin) fn(k, begin - offsets[k], stop - offsets[k]);
      begin = stop;
      ++k;
    }
  };
  int threads = int(std::min<int64_t>(std::max(1, num_threads), n_chunks));
  if (total < kMinParallel) threads = 1;
#ifdef _OPENMP
  if (threads > 1) {
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
    for (int64_t chunk = 0; chunk < n_chunks; ++chunk) run_chunk(chunk);
    return;
  }
#endif
  for (int64_t chunk = 0; chunk < n_chunks; ++chunk) run_chunk(chunk);
}

template <typename T, typename P, typename G, typename M>
void lion_typed(int64_t n_tensors, void* const* params, void* const* grads, void* const* moms,
                const int64_t* numels, const double* lrs, double beta1, double beta2,
                double weight_decay, int flags, int num_threads) {
  const Hyper<T> h{T(beta1), T(1.0 - beta1), T(beta2), T(1.0 - beta2),
                   (flags & kMaximize) ? T(-1) : T(1)};
  std::vector<PerTensor<T>> per(n_tensors);
  for (int64_t k = 0; k < n_tensors; ++k) {
    per[k] = PerTensor<T>{T(1.0 - lrs[k] * weight_decay), T(-lrs[k]), T(1)};
  }
  auto P_ = [&](int64_t k) { return static_cast<P*>(params[k]); };
  auto G_ = [&](int64_t k) { return static_cast<const G*>(grads[k]); };
  auto M_ = [&](int64_t k) { return static_cast<M*>(moms[k]); };

  const bool cautious = flags & kCautious;
  if (cautious) {
    // First pass: the per-tensor mask count, then scale = 1 / max(count/numel, 1e-3) in T.
    std::vector<int64_t> counts(n_tensors, 0);
    for_each_piece(n_tensors, numels, num_threads, [&](int64_t k, int64_t b, int64_t e) {
      const int64_t c = count_agree<T, G, M>(G_(k) + b, M_(k) + b, e - b, h);
#pragma omp atomic
      counts[k] += c;
    });
    for (int64_t k = 0; k < n_tensors; ++k) {
      if (numels[k] == 0) continue;
      const T mean = T(counts[k]) / T(numels[k]);
      per[k].scale = T(1) / std::max(mean, T(1e-3));
    }
  }

  auto launch = [&](auto kernel) {
    for_each_piece(n_tensors, numels, num_threads, [&](int64_t k, int64_t b, int64_t e) {
      kernel(P_(k) + b, G_(k) + b, M_(k) + b, e - b, h, per[k]);
    });
  };
  const bool decay = flags & kDecay;
  const bool cautious_decay = flags & kCautiousDecay;
  if (!decay) {
    if (cautious) launch(lion_range<T, P, G, M, false, true, false>);
    else launch(lion_range<T, P, G, M, false, false, false>);
  } else if (cautious_decay) {
    if (cautious) launch(lion_range<T, P, G, M, true, true, true>);
    else launch(lion_range<T, P, G, M, true, false, true>);
  } else {
    if (cautious) launch(lion_range<T, P, G, M, true, true, false>);
    else launch(lion_range<T, P, G, M, true, false, false>);
  }
}

// The roofline: the same bytes as a Lion step (read p, g, m; write p, m) with no math.
template <typename S>
void stream_typed(int64_t n_tensors, void* const* params, void* const* grads, void* const* moms,
                  const int64_t* numels, int num_threads) {
  for_each_piece(n_tensors, numels, num_threads, [&](int64_t k, int64_t b, int64_t e) {
    S* __restrict__ p = static_cast<S*>(params[k]) + b;
    const S* __restrict__ g = static_cast<const S*>(grads[k]) + b;
    S* __restrict__ m = static_cast<S*>(moms[k]) + b;
    for (int64_t i = 0; i < e - b; ++i) {
      const S gi = g[i];
      p[i] = S(p[i] + gi);
      m[i] = S(m[i] - gi);
    }
  });
}

// Runs the kernel variant for these storage dtypes; returns 0, or 1 for an unsupported combination.
int lion_step_any_dtype(int64_t n_tensors, void* const* params, void* const* grads,
                        void* const* moms, const int64_t* numels, const double* lrs, double beta1,
                        double beta2, double weight_decay, int param_dtype, int grad_dtype,
                        int mom_dtype, int flags, int num_threads) {
  auto args = [&](auto kernel) {
    kernel(n_tensors, params, grads, moms, numels, lrs, beta1, beta2, weight_decay, flags,
           num_threads);
    return 0;
  };
  if (param_dtype == kF32 && grad_dtype == kF32 && mom_dtype == kF32)
    return args(lion_typed<float, float, float, float>);
  if (param_dtype == kF64 && grad_dtype == kF64 && mom_dtype == kF64)
    return args(lion_typed<double, double, double, double>);
  if (param_dtype == kBF16 && grad_dtype == kBF16 && mom_dtype == kBF16)
    return args(lion_typed<float, bf16, bf16, bf16>);
  if (param_dtype == kBF16 && grad_dtype == kBF16 && mom_dtype == kF32)
    return args(lion_typed<float, bf16, bf16, float>);
  if (param_dtype == kF16 && grad_dtype == kF16 && mom_dtype == kF16)
    return args(lion_typed<float, f16, f16, f16>);
  if (param_dtype == kF16 && grad_dtype == kF16 && mom_dtype == kF32)
    return args(lion_typed<float, f16, f16, float>);
  // fp32 weights with a half-size momentum (the paper kept momentum in bf16).
  if (param_dtype == kF32 && grad_dtype == kF32 && mom_dtype == kBF16)
    return args(lion_typed<float, float, float, bf16>);
  if (param_dtype == kF32 && grad_dtype == kF32 && mom_dtype == kF16)
    return args(lion_typed<float, float, float, f16>);
  return 1;
}

}  // namespace

// lion_cpu_dispatch.cpp includes this file for the kernel, and exports its own functions.
#ifndef LIONOPT_KERNEL_ONLY
extern "C" {

int lionopt_abi_version() { return 1; }

// Returns 0 on success, 1 for an unsupported dtype combination.
int lionopt_lion_step(int64_t n_tensors, void* const* params, void* const* grads,
                      void* const* moms, const int64_t* numels, const double* lrs, double beta1,
                      double beta2, double weight_decay, int param_dtype, int grad_dtype,
                      int mom_dtype, int flags, int num_threads) {
  return lion_step_any_dtype(n_tensors, params, grads, moms, numels, lrs, beta1, beta2,
                             weight_decay, param_dtype, grad_dtype, mom_dtype, flags,
                             num_threads);
}

// Element sizes 2, 4, 8 bytes; returns 1 for any other.
int lionopt_stream(int64_t n_tensors, void* const* params, void* const* grads, void* const* moms,
                   const int64_t* numels, int element_size, int num_threads) {
  switch (element_size) {
    case 2: stream_typed<uint16_t>(n_tensors, params, grads, moms, numels, num_threads); return 0;
    case 4: stream_typed<float>(n_tensors, params, grads, moms, numels, num_threads); return 0;
    case 8: stream_typed<double>(n_tensors, params, grads, moms, numels, num_threads); return 0;
    default: return 1;
  }
}

}  // extern "C"
#endif  // LIONOPT_KERNEL_ONLY
