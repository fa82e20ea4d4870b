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
//
// Layout of the work: with AVX2 + FMA (the build passes -mavx2 -mfma where the CPU has them)
// the loops are written with intrinsics, eight or sixteen coordinates at a time; the scalar
// functions define the arithmetic and handle tails (and whole builds without AVX2). An 8-bit
// block takes two passes over a 256-float stack buffer: (1) dequantise, step, store the
// weights, keep the new momentum and its max magnitude; (2) encode with that absmax. The
// encoder replaces sqrt by an rsqrt-based estimate and the clamp/NaN selects by integer
// saturation where that is provably the same code (see simd::quantize8). Blocks with NaN
// codes, non-finite momenta or subnormal scale factors take the general variants.
// Threads take units of 16K elements dynamically (run_items).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define LIONOPT_AVX2 1
#else
#define LIONOPT_AVX2 0
#endif

namespace {

constexpr int64_t kBlock = 256;
constexpr int64_t kChunk = 4096;  // work item of the plain-momentum kernel
constexpr int64_t kParallelMin = 1 << 16;  // elements below which one thread does the group
constexpr int64_t kQuantUnit = 64;  // blocks per unit of work handed to a thread (16K elements)
constexpr int64_t kPlainUnit = 4;   // chunks per unit of work (16K elements)
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
    bool agrees = direction * theta >= 0.0f;  // arXiv 2510.12402: I(u*theta >= 0)
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

#if LIONOPT_AVX2
// ---------------------------------------------------------------------------------------------
// AVX2 + FMA: eight coordinates at a time, each operation the same IEEE operation as the scalar
// code above (no contraction: every fused multiply-add below is a std::fma above), so the
// results are bitwise equal; the scalar code handles tails.
namespace simd {

using V = __m256;
using VI = __m256i;

inline V splat(float x) { return _mm256_set1_ps(x); }
inline VI splat_i(uint32_t x) { return _mm256_set1_epi32(int32_t(x)); }
inline V bits_v(VI x) { return _mm256_castsi256_ps(x); }
inline VI bits_i(V x) { return _mm256_castps_si256(x); }

inline V load8(const float* p) { return _mm256_loadu_ps(p); }
inline V load8(const bf16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return bits_v(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// Eight uint32 values below 2**16 as eight uint16.
inline __m128i narrow16(VI x) {
  return _mm_packus_epi32(_mm256_castsi256_si128(x), _mm256_extracti128_si256(x, 1));
}

inline VI nan_to_bf16_nan(V f, VI rounded) {
  const V nan = _mm256_cmp_ps(f, f, _CMP_UNORD_Q);
  return _mm256_blendv_epi8(rounded, splat_i(0x7FC0u), bits_i(nan));
}

inline VI bf16_nearest8(V f) {
  const VI u = bits_i(f);
  const VI lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), splat_i(1u));
  const VI r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, splat_i(0x7FFFu)), lsb), 16);
  return nan_to_bf16_nan(f, r);
}

inline VI mix32_8(VI x) {
  const VI mul = splat_i(kMultiplier);
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
  x = _mm256_mullo_epi32(x, mul);
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
  x = _mm256_mullo_epi32(x, mul);
  return _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
}

// idx: the tensor's element index of each lane. For a non-NaN value, |u| + noise < 2**31
// (|u| <= 0x7F800000, noise < 2**16), so adding the noise to u itself never carries into the
// sign bit, and the shift drops the low half: the scalar code's
// ((u & sign) | ((|u| + noise) & 0xFFFF0000)) >> 16 is (u + noise) >> 16.
inline VI bf16_stochastic_bits(V f, VI idx, VI key) {
  const VI noise =
      _mm256_and_si256(mix32_8(_mm256_xor_si256(mix32_8(idx), key)), splat_i(0xFFFFu));
  const VI r = _mm256_srli_epi32(_mm256_add_epi32(bits_i(f), noise), 16);
  return nan_to_bf16_nan(f, r);
}

// index: the element index of lane 0 (lanes are consecutive).
inline VI bf16_stochastic8(V f, uint32_t key, int64_t index) {
  const VI idx = _mm256_add_epi32(splat_i(uint32_t(index)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  return bf16_stochastic_bits(f, idx, splat_i(key));
}

// Sixteen consecutive values as two fp32 vectors whose lanes interleave by quarters:
// lo = elements 0-3 and 8-11, hi = elements 4-7 and 12-15 (the in-lane order of AVX2 unpacks
// and packs, so bf16 values widen and narrow with one instruction per vector).
constexpr int kLoLanes[8] = {0, 1, 2, 3, 8, 9, 10, 11};
constexpr int kHiLanes[8] = {4, 5, 6, 7, 12, 13, 14, 15};
inline VI lanes_vector(const int* lanes) {
  return _mm256_setr_epi32(lanes[0], lanes[1], lanes[2], lanes[3], lanes[4], lanes[5], lanes[6],
                           lanes[7]);
}
inline void load16(const bf16* p, V& lo, V& hi) {
  const VI x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  lo = bits_v(_mm256_unpacklo_epi16(_mm256_setzero_si256(), x));
  hi = bits_v(_mm256_unpackhi_epi16(_mm256_setzero_si256(), x));
}
inline void load16(const float* p, V& lo, V& hi) {
  const V a = _mm256_loadu_ps(p), b = _mm256_loadu_ps(p + 8);
  lo = _mm256_permute2f128_ps(a, b, 0x20);
  hi = _mm256_permute2f128_ps(a, b, 0x31);
}
// bf16 bits (in the low halves of the lanes) of lo and hi, stored in element order.
inline void store16_bits(bf16* p, VI lo, VI hi) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm256_packus_epi32(lo, hi));
}
inline void store16(float* p, V lo, V hi) {
  _mm256_storeu_ps(p, _mm256_permute2f128_ps(lo, hi, 0x20));
  _mm256_storeu_ps(p + 8, _mm256_permute2f128_ps(lo, hi, 0x31));
}
inline void store16(bf16* p, V lo, V hi) {
  store16_bits(p, bf16_nearest8(lo), bf16_nearest8(hi));
}

template <bool kStochastic>
inline void store8(float* p, int64_t i, V v, uint32_t) {
  _mm256_storeu_ps(p + i, v);
}
template <bool kStochastic>
inline void store8(bf16* p, int64_t i, V v, uint32_t key) {
  const VI r = kStochastic ? bf16_stochastic8(v, key, i) : bf16_nearest8(v);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p + i), narrow16(r));
}

inline V sign8(V x) {
  const V zero = _mm256_setzero_ps(), one = splat(1.0f);
  return _mm256_sub_ps(_mm256_and_ps(_mm256_cmp_ps(x, zero, _CMP_GT_OQ), one),
                       _mm256_and_ps(_mm256_cmp_ps(x, zero, _CMP_LT_OQ), one));
}

// The step's constants in lanes. The gradient's sign (-1 to maximize) is folded into the
// products' other factor: g*(-1) is exact, so (g*sign)*x and g*(sign*x) round alike.
struct VStep {
  V beta1, one_minus_beta1, beta2, one_minus_beta2, decay, neg_lr, lr, zero_update;
  explicit VStep(const Step& s)
      : beta1(splat(s.beta1)), one_minus_beta1(splat(s.grad_sign * s.one_minus_beta1)),
        beta2(splat(s.beta2)), one_minus_beta2(splat(s.grad_sign * s.one_minus_beta2)),
        decay(splat(s.decay)), neg_lr(splat(s.neg_lr)), lr(splat(-s.neg_lr)),
        zero_update(splat(0.0f * s.neg_lr)) {}
};

// lion_coordinate on eight lanes. fma(sign(c), -lr, theta) is theta + (-lr), theta + lr or
// theta + 0*(-lr) (products exact), so it is one rounded add of a selected update.
template <bool kCautiousDecay>
inline V lion8(V& theta, V g, V m, const VStep& s) {
  const V c = _mm256_add_ps(_mm256_mul_ps(m, s.beta1), _mm256_mul_ps(g, s.one_minus_beta1));
  const V decayed = _mm256_mul_ps(theta, s.decay);
  if (kCautiousDecay) {
    const V direction = sign8(c);
    const V agrees =  // arXiv 2510.12402: I(u*theta >= 0); false where theta is NaN
        _mm256_cmp_ps(_mm256_mul_ps(direction, theta), _mm256_setzero_ps(), _CMP_GE_OQ);
    theta = _mm256_fmadd_ps(direction, s.neg_lr, _mm256_blendv_ps(theta, decayed, agrees));
  } else {
    // c < 0 (sign bit set) -> +lr, c > 0 -> -lr; c = ±0 or NaN -> 0*(-lr).
    const V update = _mm256_blendv_ps(
        s.zero_update, _mm256_blendv_ps(s.neg_lr, s.lr, c),
        _mm256_cmp_ps(c, _mm256_setzero_ps(), _CMP_NEQ_OQ));
    theta = _mm256_add_ps(decayed, update);
  }
  return _mm256_fmadd_ps(g, s.one_minus_beta2, _mm256_mul_ps(m, s.beta2));
}

// Values of eight codes, for a block without code -128 (NaN).
inline V dequantize8_finite(const int8_t* q, V factor) {
  const V k = _mm256_cvtepi32_ps(
      _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q))));
  const V magnitude = _mm256_andnot_ps(splat(-0.0f), k);
  return _mm256_mul_ps(_mm256_mul_ps(k, magnitude), factor);
}

inline V dequantize8(const int8_t* q, V factor) {
  const V k = _mm256_cvtepi32_ps(
      _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q))));
  const V magnitude = _mm256_andnot_ps(splat(-0.0f), k);
  const V v = _mm256_mul_ps(_mm256_mul_ps(k, magnitude), factor);
  return _mm256_blendv_ps(v, splat(NAN), _mm256_cmp_ps(k, splat(-128.0f), _CMP_EQ_OQ));
}

template <bool kNan>
inline V dequantize_lanes(VI codes, V factor) {
  const V k = _mm256_cvtepi32_ps(codes);
  const V v = _mm256_mul_ps(_mm256_mul_ps(k, _mm256_andnot_ps(splat(-0.0f), k)), factor);
  if (!kNan) return v;
  return _mm256_blendv_ps(v, splat(NAN), _mm256_cmp_ps(k, splat(-128.0f), _CMP_EQ_OQ));
}

// Values of sixteen codes in the lanes of load16 (kNan: the block may hold code -128).
template <bool kNan>
inline void dequantize16(const int8_t* q, V factor, V& lo, V& hi) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
  const __m128i order = _mm_setr_epi8(0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15);
  const __m128i codes = _mm_shuffle_epi8(raw, order);
  lo = dequantize_lanes<kNan>(_mm256_cvtepi8_epi32(codes), factor);
  hi = dequantize_lanes<kNan>(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(codes, codes)), factor);
}

// Whether any of the n codes (n a multiple of 32) is -128.
inline bool has_nan_code(const int8_t* q, int64_t n) {
  VI any = _mm256_setzero_si256();
  const VI nan = _mm256_set1_epi8(kNanCode);
  for (int64_t i = 0; i < n; i += 32)
    any = _mm256_or_si256(any, _mm256_cmpeq_epi8(
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + i)), nan));
  return !_mm256_testz_si256(any, any);
}

// The codes of eight values as int32 lanes, for a block whose factor = absmax/16129 > 0 (the
// divisor). The scalar encoder's s = floor(sqrt(y)) is replaced by an estimate s' = floor(r),
// r ~ sqrt(y): with K(y) = #{j >= 0 : y >= j*j + j + 0.5}, the scalar code is min(K(y), 127),
// and any s' in {K(y) - 1, K(y)} gives s' + [y >= s'*s' + s' + 0.5] = K(y) (s = floor(sqrt(y))
// is one such). sqrt(y) lies in (K - 0.5, K + 0.75), so |r - sqrt(y)| < 0.25 suffices. Here
// y <= 1.5 * 16129 (|v| <= absmax, and a subnormal factor is at least 2/3 of absmax/16129), so
// sqrt(y) < 156, and rsqrt and rcp have relative errors of at most 1.5 * 2**-12 each (the ISA
// bound): r = y * rsqrt(max(y, FLT_MIN)) errs by less than 0.06, r = rcp(rsqrt(y)) by less than
// 0.12. The threshold s'*s' + s' + 0.5 is exact in fp32 (s' < 2**11), so one fma or three
// rounded operations compute it alike. Both estimates were checked exhaustively against the
// scalar formula for every float y in [0, 30000] (rcp: [0, 16130]).
//   kSafe = false: a normal factor and no infinity in the block, so y <= 16129 * (1 + 2**-23)
//     < 127*127 + 127 + 0.5 and k <= 127 without a clamp; r = rcp(rsqrt(y)) (y = 0 gives
//     rcp(inf) = 0).
//   kSafe = true: any block; an infinite v gives y = inf and r = inf * rsqrt(inf) = NaN.
// A non-finite v thus has root NaN and k = INT32_MIN (cvtt of NaN), which the packing
// saturates to -128, the NaN code.
template <bool kSafe>
inline VI quantize8(const float* v8, V divisor) {
  const V v = _mm256_load_ps(v8);
  const V magnitude = _mm256_andnot_ps(splat(-0.0f), v);
  const V y = _mm256_div_ps(magnitude, divisor);
  const V r = kSafe ? _mm256_mul_ps(y, _mm256_rsqrt_ps(_mm256_max_ps(y, splat(0x1p-126f))))
                    : _mm256_rcp_ps(_mm256_rsqrt_ps(y));
  const V root = _mm256_floor_ps(r);
  const V threshold = _mm256_fmadd_ps(root, root, _mm256_add_ps(root, splat(0.5f)));
  // k = root + [y >= threshold]: a true compare is the integer -1.
  VI k = _mm256_sub_epi32(_mm256_cvttps_epi32(root),
                          bits_i(_mm256_cmp_ps(y, threshold, _CMP_GE_OQ)));
  if (kSafe) k = _mm256_min_epi32(k, splat_i(127u));
  return _mm256_sign_epi32(k, bits_i(v));  // -k where v < 0 (v = -0 has k = 0)
}

// Stores 32 codes (int32 lanes of a, b, c, d, each in [-128, 127] after saturation) as 32 int8
// in element order: a, b, c, d hold elements 0-7, 8-15, 16-23, 24-31, or with kInterleaved
// the lanes of two load16 pairs (a = elements 0-3 and 8-11, b = 4-7 and 12-15, c and d alike).
template <bool kInterleaved>
inline void store_codes32(int8_t* q, VI a, VI b, VI c, VI d) {
  const VI bytes = _mm256_packs_epi16(_mm256_packs_epi32(a, b), _mm256_packs_epi32(c, d));
  const VI ordered = kInterleaved ? _mm256_permute4x64_epi64(bytes, _MM_SHUFFLE(3, 1, 2, 0))
                                  : _mm256_permutevar8x32_epi32(
                                        bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), ordered);
}

inline void store_codes8(int8_t* q, VI a) {
  const __m128i halves = _mm_packs_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(q), _mm_packs_epi16(halves, halves));
}

// Encodes fresh[0, n) into q up to the last multiple of 8; returns where the scalar code goes
// on. kInterleaved: fresh holds a whole block in the lane order of load16 pairs.
template <bool kSafe, bool kInterleaved>
inline int64_t quantize_block(const float* fresh, int8_t* q, int64_t n, V divisor) {
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    store_codes32<kInterleaved>(q + i, quantize8<kSafe>(fresh + i, divisor),
                  quantize8<kSafe>(fresh + i + 8, divisor),
                  quantize8<kSafe>(fresh + i + 16, divisor),
                  quantize8<kSafe>(fresh + i + 24, divisor));
  }
  for (; i + 8 <= n; i += 8) store_codes8(q + i, quantize8<kSafe>(fresh + i, divisor));
  return i;
}

// The running max of |m| as bits: non-negative floats order as their bit patterns (NaN above
// infinity), and integer max and and run on every vector pipe.
inline VI max_magnitude(VI acc, V m) {
  return _mm256_max_epi32(acc, _mm256_and_si256(bits_i(m), splat_i(0x7FFFFFFFu)));
}

inline uint32_t max_lane(VI x) {
  __m128i m = _mm_max_epi32(_mm256_castsi256_si128(x), _mm256_extracti128_si256(x, 1));
  m = _mm_max_epi32(m, _mm_shuffle_epi32(m, _MM_SHUFFLE(1, 0, 3, 2)));
  m = _mm_max_epi32(m, _mm_shuffle_epi32(m, _MM_SHUFFLE(2, 3, 0, 1)));
  return uint32_t(_mm_cvtsi128_si32(m));
}

}  // namespace simd
#endif  // LIONOPT_AVX2

// Encodes n fresh values (finite ones at most absmax in magnitude) into q.
inline void quantize_scalar(const float* fresh, int8_t* q, int64_t begin, int64_t n,
                            float divisor, float live) {
  for (int64_t i = begin; i < n; ++i) {
    float v = fresh[i];
    float y = finite_magnitude(v) / divisor;
    float root = std::floor(std::sqrt(y));
    float k = root + ((y >= root * root + root + 0.5f) ? 1.0f : 0.0f);
    k = (k < 127.0f ? k : 127.0f) * live;
    float code = std::fabs(v) < INFINITY ? (v < 0.0f ? -k : k) : float(kNanCode);
    q[i] = int8_t(int32_t(code));
  }
}

#if LIONOPT_AVX2
// Pass 1 of a whole block of bf16 weights, sixteen coordinates at a time in load16 lanes:
// dequantise, step, store the weights, keep the new momentum (in those lanes) in fresh.
// Returns the bits of the block's max |m| (NaN and infinity included).
template <bool kStochastic, bool kCautiousDecay, bool kNan>
inline uint32_t quant_pass_bf16(bf16* p, const bf16* gr, const int8_t* q, float* fresh,
                                float old_factor, const Step& s, const simd::VStep& vs,
                                int64_t begin) {
  const simd::V factor = simd::splat(old_factor);
  const simd::VI key = simd::splat_i(s.key);
  simd::VI idx_lo = _mm256_add_epi32(simd::splat_i(uint32_t(begin)),
                                     simd::lanes_vector(simd::kLoLanes));
  simd::VI idx_hi = _mm256_add_epi32(simd::splat_i(uint32_t(begin)),
                                     simd::lanes_vector(simd::kHiLanes));
  simd::VI absmax8 = _mm256_setzero_si256();
  for (int64_t i = 0; i < kBlock; i += 16) {
    simd::V theta_lo, theta_hi, g_lo, g_hi, m_lo, m_hi;
    simd::load16(p + i, theta_lo, theta_hi);
    simd::load16(gr + i, g_lo, g_hi);
    simd::dequantize16<kNan>(q + i, factor, m_lo, m_hi);
    m_lo = simd::lion8<kCautiousDecay>(theta_lo, g_lo, m_lo, vs);
    m_hi = simd::lion8<kCautiousDecay>(theta_hi, g_hi, m_hi, vs);
    if (kStochastic) {
      simd::store16_bits(p + i, simd::bf16_stochastic_bits(theta_lo, idx_lo, key),
                         simd::bf16_stochastic_bits(theta_hi, idx_hi, key));
      idx_lo = _mm256_add_epi32(idx_lo, simd::splat_i(16u));
      idx_hi = _mm256_add_epi32(idx_hi, simd::splat_i(16u));
    } else {
      simd::store16(p + i, theta_lo, theta_hi);
    }
    _mm256_store_ps(fresh + i, m_lo);
    _mm256_store_ps(fresh + i + 8, m_hi);
    absmax8 = simd::max_magnitude(simd::max_magnitude(absmax8, m_lo), m_hi);
  }
  return simd::max_lane(absmax8);
}
#endif

template <typename P, bool kStochastic, bool kCautiousDecay>
inline void quant_block(P* param, const P* grad, int8_t* codes, float* scale, int64_t numel,
                        const Step& s,
#if LIONOPT_AVX2
                        const simd::VStep& vs,
#endif
                        int64_t block) {
  const int64_t begin = block * kBlock;
  const int64_t n = std::min(kBlock, numel - begin);
  P* p = param + begin;
  const P* gr = grad + begin;
  int8_t* q = codes + begin;

  // Pass 1: dequantise, step, keep the new momentum in a block-sized buffer (the padding of
  // the last block is never touched: its codes stay 0) and take the max of |m| as bits.
  // A non-finite momentum is rare and sends the block to the reduction over finite values
  // below.
  alignas(32) float fresh[kBlock];
  const float old_factor = scale[block] / kLevels;
  int64_t i = 0;
  uint32_t max_bits = 0;
  [[maybe_unused]] bool interleaved = false;  // fresh holds the block in load16 lanes
#if LIONOPT_AVX2
  if constexpr (std::is_same<P, bf16>::value) {
    if (n == kBlock) {
      interleaved = true;
      i = n;
      max_bits = simd::has_nan_code(q, kBlock)
          ? quant_pass_bf16<kStochastic, kCautiousDecay, true>(p, gr, q, fresh, old_factor, s, vs, begin)
          : quant_pass_bf16<kStochastic, kCautiousDecay, false>(p, gr, q, fresh, old_factor, s, vs, begin);
    }
  }
  if (!interleaved) {
    const simd::V factor = simd::splat(old_factor);
    simd::VI absmax8 = _mm256_setzero_si256();
    auto step8 = [&](int64_t j, simd::V m) {
      simd::V theta = simd::load8(p + j);
      m = simd::lion8<kCautiousDecay>(theta, simd::load8(gr + j), m, vs);
      simd::store8<kStochastic>(param, begin + j, theta, s.key);
      _mm256_store_ps(fresh + j, m);
      absmax8 = simd::max_magnitude(absmax8, m);
    };
    if (n == kBlock && !simd::has_nan_code(q, kBlock)) {
      for (; i < n; i += 8) step8(i, simd::dequantize8_finite(q + i, factor));
    } else {
      for (; i + 8 <= n; i += 8) step8(i, simd::dequantize8(q + i, factor));
    }
    max_bits = simd::max_lane(absmax8);
  }
#endif
  for (; i < n; ++i) {
    float theta = load(p[i]);
    fresh[i] = lion_coordinate<kCautiousDecay>(theta, load(gr[i]), dequantize(q[i], old_factor), s);
    store<kStochastic>(param, begin + i, theta, s.key);
    const uint32_t bits = to_bits(fresh[i]) & 0x7FFFFFFFu;
    max_bits = max_bits > bits ? max_bits : bits;
  }
  const bool nonfinite = max_bits >= 0x7F800000u;
  if (nonfinite) {
    // The max over finite values only (in any order of the elements).
    max_bits = 0;
    for (int64_t j = 0; j < n; ++j) {
      uint32_t bits = to_bits(fresh[j]) & 0x7FFFFFFFu;
      bits = bits < 0x7F800000u ? bits : 0u;  // non-finite values do not count
      max_bits = max_bits > bits ? max_bits : bits;
    }
  }
  const float absmax = from_bits(max_bits);
  scale[block] = absmax;
  // Pass 2, encode: s = floor(sqrt(y)), k = min(s + [y >= s*s + s + 0.5], 127), sign after.
  const float factor = absmax / kLevels;
  const float divisor = factor > 0.0f ? factor : 1.0f;
  const float live = factor > 0.0f ? 1.0f : 0.0f;
  i = 0;
#if LIONOPT_AVX2
  const bool safe = !(factor >= 0x1p-126f) || nonfinite;
  if (interleaved) {
    if (factor > 0.0f) {
      i = safe ? simd::quantize_block<true, true>(fresh, q, n, simd::splat(divisor))
               : simd::quantize_block<false, true>(fresh, q, n, simd::splat(divisor));
    } else {  // all codes 0, or -128 (the scalar code below takes fresh in element order)
      for (; i < n; i += 16) {
        for (int64_t j = 0; j < 16; ++j) {
          const float v = fresh[i + (j & 3) + ((j & 4) ? 8 : 0) + ((j & 8) ? 4 : 0)];
          q[i + j] = std::fabs(v) < INFINITY ? 0 : kNanCode;
        }
      }
    }
  } else if (factor > 0.0f) {
    i = safe ? simd::quantize_block<true, false>(fresh, q, n, simd::splat(divisor))
             : simd::quantize_block<false, false>(fresh, q, n, simd::splat(divisor));
  }
#endif
  quantize_scalar(fresh, q, i, n, divisor, live);
}

// Blocks [first, last) of tensor t.
template <typename P, bool kStochastic, bool kCautiousDecay>
void quant_blocks(const Group& g, int64_t t, int64_t first, int64_t last) {
  P* param = static_cast<P*>(g.params[t]);
  const P* grad = static_cast<const P*>(g.grads[t]);
  int8_t* codes = static_cast<int8_t*>(g.moments[t]);
  float* scale = g.scales[t];
  const Step s = g.step(t);
#if LIONOPT_AVX2
  const simd::VStep vs(s);
#endif
  for (int64_t block = first; block < last; ++block) {
    quant_block<P, kStochastic, kCautiousDecay>(param, grad, codes, scale, g.numels[t], s,
#if LIONOPT_AVX2
                                                vs,
#endif
                                                block);
  }
}

// Chunks [first, last) of tensor t.
template <typename P, typename M, bool kStochastic, bool kCautiousDecay>
void plain_chunks(const Group& g, int64_t t, int64_t first, int64_t last) {
  P* param = static_cast<P*>(g.params[t]);
  const P* grad = static_cast<const P*>(g.grads[t]);
  M* moment = static_cast<M*>(g.moments[t]);
  const Step s = g.step(t);
  const int64_t begin = first * kChunk;
  const int64_t end = std::min(last * kChunk, g.numels[t]);
  int64_t i = begin;
#if LIONOPT_AVX2
  const simd::VStep vs(s);
  if constexpr (std::is_same<P, bf16>::value) {
    // Sixteen at a time in load16 lanes (bf16 widens and narrows in one instruction).
    const simd::VI key = simd::splat_i(s.key);
    simd::VI idx_lo = _mm256_add_epi32(simd::splat_i(uint32_t(i)), simd::lanes_vector(simd::kLoLanes));
    simd::VI idx_hi = _mm256_add_epi32(simd::splat_i(uint32_t(i)), simd::lanes_vector(simd::kHiLanes));
    for (; i + 16 <= end; i += 16) {
      simd::V theta_lo, theta_hi, g_lo, g_hi, m_lo, m_hi;
      simd::load16(param + i, theta_lo, theta_hi);
      simd::load16(grad + i, g_lo, g_hi);
      simd::load16(moment + i, m_lo, m_hi);
      m_lo = simd::lion8<kCautiousDecay>(theta_lo, g_lo, m_lo, vs);
      m_hi = simd::lion8<kCautiousDecay>(theta_hi, g_hi, m_hi, vs);
      if (kStochastic) {
        simd::store16_bits(param + i, simd::bf16_stochastic_bits(theta_lo, idx_lo, key),
                           simd::bf16_stochastic_bits(theta_hi, idx_hi, key));
        idx_lo = _mm256_add_epi32(idx_lo, simd::splat_i(16u));
        idx_hi = _mm256_add_epi32(idx_hi, simd::splat_i(16u));
      } else {
        simd::store16(param + i, theta_lo, theta_hi);
      }
      simd::store16(moment + i, m_lo, m_hi);
    }
  }
  for (; i + 8 <= end; i += 8) {
    simd::V theta = simd::load8(param + i);
    const simd::V m =
        simd::lion8<kCautiousDecay>(theta, simd::load8(grad + i), simd::load8(moment + i), vs);
    simd::store8<kStochastic>(param, i, theta, s.key);
    simd::store8<false>(moment, i, m, 0u);
  }
#endif
  for (; i < end; ++i) {
    float theta = load(param[i]);
    float m = lion_coordinate<kCautiousDecay>(theta, load(grad[i]), load(moment[i]), s);
    store<kStochastic>(param, i, theta, s.key);
    store<false>(moment, i, m, 0u);
  }
}

// Runs body(tensor, first, last) over every work item of every tensor, split across threads:
// the items of all tensors, in order, are cut into units of `unit` items that the threads take
// dynamically (a thread that the OS delays takes fewer); a unit calls body once per tensor it
// covers, with that tensor's items [first, last) in the unit.
template <typename Body>
int run_items(const Group& g, int64_t item_size, int64_t unit, int threads, Body body) {
  int64_t* offsets = new int64_t[g.count + 1];
  offsets[0] = 0;
  for (int64_t t = 0; t < g.count; ++t)
    offsets[t + 1] = offsets[t] + (g.numels[t] + item_size - 1) / item_size;
  const int64_t total = offsets[g.count];
  const int64_t units = (total + unit - 1) / unit;
  // Small groups run on the calling thread: waking a team costs more than it saves.
  const bool parallel = threads > 1 && units > 1 && total * item_size >= kParallelMin;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads > 0 ? threads : 1) if (parallel)
  for (int64_t u = 0; u < units; ++u) {
    int64_t item = u * unit;
    const int64_t stop = std::min(total, item + unit);
    for (int64_t t = tensor_of(offsets, g.count, item); item < stop; ++t) {
      const int64_t end = std::min(stop, offsets[t + 1]);  // empty tensors: item == end
      if (end > item) body(t, item - offsets[t], end - offsets[t]);
      item = std::max(item, end);
    }
  }
  delete[] offsets;
  return 0;
}

// Instantiates kernel<kStochastic, kCautiousDecay> for the runtime flags and runs it.
template <template <bool, bool> class Kernel>
int dispatch(const Group& g, int64_t item_size, int64_t unit, int threads) {
  const bool stochastic = g.flags & kRound, cautious = g.flags & kCautiousDecay;
  if (stochastic && cautious) return run_items(g, item_size, unit, threads, Kernel<true, true>{g});
  if (stochastic) return run_items(g, item_size, unit, threads, Kernel<true, false>{g});
  if (cautious) return run_items(g, item_size, unit, threads, Kernel<false, true>{g});
  return run_items(g, item_size, unit, threads, Kernel<false, false>{g});
}

template <typename P>
struct Quant {
  template <bool kStochastic, bool kCautiousDecay>
  struct Kernel {
    const Group& g;
    void operator()(int64_t t, int64_t first, int64_t last) const {
      quant_blocks<P, kStochastic, kCautiousDecay>(g, t, first, last);
    }
  };
};

template <typename P, typename M>
struct Plain {
  template <bool kStochastic, bool kCautiousDecay>
  struct Kernel {
    const Group& g;
    void operator()(int64_t t, int64_t first, int64_t last) const {
      plain_chunks<P, M, kStochastic, kCautiousDecay>(g, t, first, last);
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
  if (param_dtype == kF32) return dispatch<Quant<float>::Kernel>(g, kBlock, kQuantUnit, threads);
  if (param_dtype == kBF16) return dispatch<Quant<bf16>::Kernel>(g, kBlock, kQuantUnit, threads);
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
    return dispatch<Plain<bf16, float>::Kernel>(g, kChunk, kPlainUnit, threads);
  if (param_dtype == kBF16 && moment_dtype == kBF16)
    return dispatch<Plain<bf16, bf16>::Kernel>(g, kChunk, kPlainUnit, threads);
  if (param_dtype == kF32 && moment_dtype == kBF16)
    return dispatch<Plain<float, bf16>::Kernel>(g, kChunk, kPlainUnit, threads);
  return 1;
}

}  // extern "C"
