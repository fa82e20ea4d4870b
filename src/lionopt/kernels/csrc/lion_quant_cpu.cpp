// Fused CPU Lion step for 8-bit blockwise momentum and for stochastically rounded bf16 weights.
//
// A plain C ABI library (no torch headers): lionopt/kernels/fused_quant_cpu.py loads it with
// ctypes. Compile with -ffp-contract=off: every rounding below is the one the torch
// implementations (lionopt/kernels/reference.py, quantized.py, rounding.py) perform, so the
// results are bitwise equal to them:
//   c      = m*beta1 + g*(1-beta1)          two rounded products, one rounded add
//   theta  = theta*decay                    (optionally only where sign(theta) == sign(c) != 0)
//   theta  = fma(sign(c), -lr, theta)        ATen's add(..., alpha=) is a fused multiply-add
//   m      = fma(g, 1-beta2, m*beta2)
// 8-bit format (see quantized.py): blocks of 256 int8 codes k in [-127, 127] and one fp32
// absmax a per block; value = (k*|k|) * (a/16129); code -128 stores a non-finite value (NaN).
// Encoding: y = |v| / (a/16129); s = floor(sqrt(y)); k = min(s + (y >= s*s + s + 0.5), 127).
// Random bits (rounding.py): bits(i) = mix32(mix32(i) ^ key); stochastic rounding to bf16
// adds the low 16 bits to the fp32 magnitude and truncates.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

constexpr int64_t kBlock = 256;
constexpr int64_t kChunk = 4096;  // work item of the plain-momentum kernel
constexpr int64_t kParallelMin = 1 << 16;  // elements below which one thread does the group
constexpr float kLevels = 16129.0f;  // 127 * 127
constexpr int8_t kNanCode = -128;
constexpr uint32_t kMultiplier = 0x045D9F3Bu;

// Storage dtypes and option bits, as numbered by fused_quant_cpu.py.
enum DType : int { kF32 = 0, kBF16 = 2 };
enum Flag : int { kDecay = 1, kCautiousDecay = 4, kMaximize = 8, kRound = 16 };

struct bf16 {
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

inline float load(float v) { return v; }
inline float load(bf16 v) { return from_bits(uint32_t(v.bits) << 16); }

// Round-to-nearest-even, NaN -> 0x7FC0 (as torch does).
inline uint16_t bf16_nearest(float f) {
  uint32_t u = to_bits(f);
  return f != f ? uint16_t(0x7FC0u) : uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= kMultiplier;
  x ^= x >> 16;
  x *= kMultiplier;
  return x ^ (x >> 16);
}

inline uint16_t bf16_stochastic(float f, uint32_t key, int64_t index) {
  uint32_t noise = mix32(mix32(uint32_t(index)) ^ key) & 0xFFFFu;
  uint32_t u = to_bits(f);
  uint32_t magnitude = ((u & 0x7FFFFFFFu) + noise) & 0xFFFF0000u;
  uint16_t rounded = uint16_t(((u & 0x80000000u) | magnitude) >> 16);
  return f != f ? uint16_t(0x7FC0u) : rounded;
}

template <bool kStochastic>
inline void store(float* p, int64_t i, float v, uint32_t) {
  p[i] = v;
}
template <bool kStochastic>
inline void store(bf16* p, int64_t i, float v, uint32_t key) {
  p[i].bits = kStochastic ? bf16_stochastic(v, key, i) : bf16_nearest(v);
}

inline float sign_of(float x) { return float(x > 0.0f) - float(x < 0.0f); }  // NaN -> 0

// The constants of one tensor's step.
struct Step {
  float beta1, one_minus_beta1, beta2, one_minus_beta2;
  float grad_sign;  // -1 to maximize
  float decay;      // 1 - lr*weight_decay (exactly 1 without decay)
  float neg_lr;
  uint32_t key;
};

// One coordinate: updates theta, returns the new momentum. Branch-free, so loops vectorise.
template <bool kCautiousDecay>
inline float lion_coordinate(float& theta, float g, float m, const Step& s) {
  g = g * s.grad_sign;
  float direction = sign_of(m * s.beta1 + g * s.one_minus_beta1);
  float decayed = theta * s.decay;
  if (kCautiousDecay) {
    bool agrees = (sign_of(theta) == direction) & (direction != 0.0f);
    theta = agrees ? decayed : theta;
  } else {
    theta = decayed;
  }
  theta = std::fma(direction, s.neg_lr, theta);
  return std::fma(g, s.one_minus_beta2, m * s.beta2);
}

inline float dequantize(int8_t code, float factor) {
  float k = float(code);
  float v = (k * std::fabs(k)) * factor;
  return k == float(kNanCode) ? NAN : v;  // a float compare, so the loop vectorises
}

// |v| for finite v, else 0.
inline float finite_magnitude(float v) {
  float magnitude = std::fabs(v);
  return magnitude < INFINITY ? magnitude : 0.0f;
}

// Which tensor a global work item belongs to: offsets[t] <= item < offsets[t + 1].
inline int64_t tensor_of(const int64_t* offsets, int64_t count, int64_t item) {
  int64_t lo = 0, hi = count;
  while (hi - lo > 1) {
    int64_t mid = (lo + hi) / 2;
    if (offsets[mid] <= item) lo = mid; else hi = mid;
  }
  return lo;
}

struct Group {
  int64_t count;
  void* const* params;
  void* const* grads;
  void* const* moments;  // codes (quantised) or momentum tensors (plain)
  float* const* scales;  // per-block absmax (quantised only)
  const int64_t* numels;
  const double* lrs;
  const uint32_t* keys;
  double beta1, beta2, weight_decay;
  int flags;

  Step step(int64_t t) const {
    return Step{float(beta1), float(1.0 - beta1), float(beta2), float(1.0 - beta2),
                (flags & kMaximize) ? -1.0f : 1.0f,
                (flags & kDecay) ? float(1.0 - lrs[t] * weight_decay) : 1.0f,
                float(-lrs[t]), keys ? keys[t] : 0u};
  }
};

template <typename P, bool kStochastic, bool kCautiousDecay>
void quant_block(const Group& g, int64_t t, int64_t block) {
  P* param = static_cast<P*>(g.params[t]);
  const P* grad = static_cast<const P*>(g.grads[t]);
  int8_t* codes = static_cast<int8_t*>(g.moments[t]);
  float* scale = g.scales[t];
  const Step s = g.step(t);
  const int64_t begin = block * kBlock;
  const int64_t n = std::min(kBlock, g.numels[t] - begin);
  P* p = param + begin;
  const P* gr = grad + begin;
  int8_t* q = codes + begin;

  // Dequantise, step, keep the new momentum (the padding of the last block stays 0).
  alignas(32) float fresh[kBlock] = {};
  const float old_factor = scale[block] / kLevels;
  for (int64_t i = 0; i < n; ++i) {
    float theta = load(p[i]);
    fresh[i] = lion_coordinate<kCautiousDecay>(theta, load(gr[i]), dequantize(q[i], old_factor), s);
    store<kStochastic>(param, begin + i, theta, s.key);
  }
  // Block absmax over finite values: non-negative floats order as their bit patterns, and an
  // integer max reduction vectorises.
  uint32_t absmax_bits = 0;
  for (int64_t i = 0; i < kBlock; ++i) {
    uint32_t bits = to_bits(fresh[i]) & 0x7FFFFFFFu;
    bits = bits < 0x7F800000u ? bits : 0u;  // non-finite values do not count
    absmax_bits = absmax_bits > bits ? absmax_bits : bits;
  }
  const float absmax = from_bits(absmax_bits);
  scale[block] = absmax;
  // Encode: s = floor(sqrt(y)), k = min(s + [y >= s*s + s + 0.5], 127), sign applied after.
  const float factor = absmax / kLevels;
  const float divisor = factor > 0.0f ? factor : 1.0f;
  const float live = factor > 0.0f ? 1.0f : 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    float v = fresh[i];
    float y = finite_magnitude(v) / divisor;
    float root = std::floor(std::sqrt(y));
    float k = root + ((y >= root * root + root + 0.5f) ? 1.0f : 0.0f);
    k = (k < 127.0f ? k : 127.0f) * live;
    float code = std::fabs(v) < INFINITY ? (v < 0.0f ? -k : k) : float(kNanCode);
    q[i] = int8_t(int32_t(code));
  }
}

template <typename P, typename M, bool kStochastic, bool kCautiousDecay>
void plain_chunk(const Group& g, int64_t t, int64_t chunk) {
  P* param = static_cast<P*>(g.params[t]);
  const P* grad = static_cast<const P*>(g.grads[t]);
  M* moment = static_cast<M*>(g.moments[t]);
  const Step s = g.step(t);
  const int64_t begin = chunk * kChunk;
  const int64_t end = std::min(begin + kChunk, g.numels[t]);
  for (int64_t i = begin; i < end; ++i) {
    float theta = load(param[i]);
    float m = lion_coordinate<kCautiousDecay>(theta, load(grad[i]), load(moment[i]), s);
    store<kStochastic>(param, i, theta, s.key);
    store<false>(moment, i, m, 0u);
  }
}

// Runs body(tensor, item) over every work item of every tensor, split across threads.
template <typename Body>
int run_items(const Group& g, int64_t item_size, int threads, Body body) {
  int64_t* offsets = new int64_t[g.count + 1];
  offsets[0] = 0;
  for (int64_t t = 0; t < g.count; ++t)
    offsets[t + 1] = offsets[t] + (g.numels[t] + item_size - 1) / item_size;
  const int64_t total = offsets[g.count];
  // Small groups run on the calling thread: waking a team costs more than it saves.
  const bool parallel = threads > 1 && total * item_size >= kParallelMin;
#pragma omp parallel for schedule(static) num_threads(threads > 0 ? threads : 1) if (parallel)
  for (int64_t item = 0; item < total; ++item) {
    int64_t t = tensor_of(offsets, g.count, item);
    body(t, item - offsets[t]);
  }
  delete[] offsets;
  return 0;
}

// Instantiates kernel<kStochastic, kCautiousDecay> for the runtime flags and runs it.
template <template <bool, bool> class Kernel>
int dispatch(const Group& g, int64_t item_size, int threads) {
  const bool stochastic = g.flags & kRound, cautious = g.flags & kCautiousDecay;
  if (stochastic && cautious) return run_items(g, item_size, threads, Kernel<true, true>{g});
  if (stochastic) return run_items(g, item_size, threads, Kernel<true, false>{g});
  if (cautious) return run_items(g, item_size, threads, Kernel<false, true>{g});
  return run_items(g, item_size, threads, Kernel<false, false>{g});
}

template <typename P>
struct Quant {
  template <bool kStochastic, bool kCautiousDecay>
  struct Kernel {
    const Group& g;
    void operator()(int64_t t, int64_t b) const { quant_block<P, kStochastic, kCautiousDecay>(g, t, b); }
  };
};

template <typename P, typename M>
struct Plain {
  template <bool kStochastic, bool kCautiousDecay>
  struct Kernel {
    const Group& g;
    void operator()(int64_t t, int64_t c) const {
      plain_chunk<P, M, kStochastic, kCautiousDecay>(g, t, c);
    }
  };
};

}  // namespace

extern "C" {

int lionopt_quant_abi_version() { return 2; }

// Lion with 8-bit blockwise momentum. param_dtype: 0 fp32, 2 bf16 (grads the same dtype).
int lionopt_lion_quant_step(int64_t count, void* const* params, void* const* grads,
                            void* const* codes, float* const* scales, const int64_t* numels,
                            const double* lrs, const uint32_t* keys, double beta1, double beta2,
                            double weight_decay, int param_dtype, int flags, int threads) {
  Group g{count, params, grads, codes, scales, numels, lrs, keys, beta1, beta2, weight_decay, flags};
  if (param_dtype == kF32) return dispatch<Quant<float>::Kernel>(g, kBlock, threads);
  if (param_dtype == kBF16) return dispatch<Quant<bf16>::Kernel>(g, kBlock, threads);
  return 1;
}

// Lion with an fp32 or bf16 momentum on bf16 weights (optionally stochastically rounded),
// or on fp32 weights with a bf16 momentum. Grads have the weights' dtype.
int lionopt_lion_plain_step(int64_t count, void* const* params, void* const* grads,
                            void* const* moments, const int64_t* numels, const double* lrs,
                            const uint32_t* keys, double beta1, double beta2, double weight_decay,
                            int param_dtype, int moment_dtype, int flags, int threads) {
  Group g{count, params, grads, moments, nullptr, numels, lrs, keys,
          beta1, beta2, weight_decay, flags};
  if (param_dtype == kBF16 && moment_dtype == kF32)
    return dispatch<Plain<bf16, float>::Kernel>(g, kChunk, threads);
  if (param_dtype == kBF16 && moment_dtype == kBF16)
    return dispatch<Plain<bf16, bf16>::Kernel>(g, kChunk, threads);
  if (param_dtype == kF32 && moment_dtype == kBF16)
    return dispatch<Plain<float, bf16>::Kernel>(g, kChunk, threads);
  return 1;
}

}  // extern "C"
