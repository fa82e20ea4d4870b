// Distributed Lion's two fused CPU passes over one bucket, multi-threaded with OpenMP.
//
// Pass 1 (dlion_sign_pass) reads g and m once, writes m ← β2·m + (1−β2)·g, and emits
// sign(β1·m + (1−β1)·g) as 2-bit codes (s + 1, four a byte, little-endian) or as int8 signs.
// Pass 2 (dlion_apply_pass) decodes the vote v of each element from a packed buffer (code q of
// `width` bits means q·mul + add; width 8 is a signed int8 v) and applies
// θ ← θ·(1−η·λ) − η·u with u = sign(v) (majority) or v/N (average).
//
// A plain C ABI (no torch headers); lionopt.kernels.cpu.signpack loads it with ctypes. Compile
// with -ffp-contract=off: the roundings are written out to match the torch passes
// (lionopt.distributed.voting) bit for bit: two rounded products and a rounded add for c,
// std::fma where ATen's add-with-alpha fuses. Every tensor starts at a multiple of 8 elements in
// the bucket, so no two tensors (and no two threads) share a byte of codes.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

constexpr int64_t kChunk = 1 << 14;  // elements a work item covers (a multiple of 8)

enum DType : int { kF32 = 0, kF64 = 1 };

struct Item {
  int64_t tensor, start, stop;  // stop: end of the item, the tensor's aligned end at most
};

std::vector<Item> work_items(int64_t count, const int64_t* numels) {
  std::vector<Item> items;
  for (int64_t t = 0; t < count; ++t) {
    const int64_t padded = (numels[t] + 7) / 8 * 8;
    for (int64_t s = 0; s < padded; s += kChunk) items.push_back({t, s, std::min(padded, s + kChunk)});
  }
  return items;
}

template <typename T>
int64_t sign_pass(int64_t count, void* const* grads, void* const* moms, const int64_t* numels,
                  const int64_t* offsets, double beta1, double one_minus_beta1, double beta2,
                  double one_minus_beta2, int width, uint8_t* out, int64_t out_numel,
                  int threads) {
  const T b1 = T(beta1), omb1 = T(one_minus_beta1), b2 = T(beta2), omb2 = T(one_minus_beta2);
  const std::vector<Item> items = work_items(count, numels);
  const int64_t n_items = int64_t(items.size());
  int64_t zeros = 0;
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1) reduction(+ : zeros)
  for (int64_t k = 0; k < n_items; ++k) {
    const Item it = items[k];
    const int64_t numel = numels[it.tensor];
    const T* g = static_cast<const T*>(grads[it.tensor]);
    T* m = static_cast<T*>(moms[it.tensor]);
    const int64_t real_stop = std::min(it.stop, numel);
    int8_t s[kChunk];
    const int64_t n = it.stop - it.start;
    const int64_t real = std::max<int64_t>(0, real_stop - it.start);
    int64_t z = 0;
    if (g != nullptr) {
      for (int64_t i = 0; i < real; ++i) {
        const T mi = m[it.start + i], gi = g[it.start + i];
        const T c = mi * b1 + gi * omb1;
        m[it.start + i] = std::fma(gi, omb2, mi * b2);
        const int8_t si = int8_t((c > T(0)) - (c < T(0)));
        s[i] = si;
        z += si == 0;
      }
    } else {  // a zero gradient: sign(β1·m); the caller decays m once it knows the flags
      for (int64_t i = 0; i < real; ++i) {
        const T c = m[it.start + i] * b1;
        const int8_t si = int8_t((c > T(0)) - (c < T(0)));
        s[i] = si;
        z += si == 0;
      }
    }
    for (int64_t i = real; i < n; ++i) s[i] = 0;  // padding: no vote
    zeros += z;
    const int64_t first = offsets[it.tensor] + it.start;  // a multiple of 8
    if (width == 8) {
      std::memcpy(out + first, s, size_t(n));
    } else {
      uint8_t* dst = out + first / 4;
      for (int64_t j = 0; j < n / 4; ++j) {
        dst[j] = uint8_t((s[4 * j] + 1) | ((s[4 * j + 1] + 1) << 2) | ((s[4 * j + 2] + 1) << 4) |
                         ((s[4 * j + 3] + 1) << 6));
      }
    }
  }
  // The bucket's tail after the last tensor: no vote.
  int64_t end = 0;
  for (int64_t t = 0; t < count; ++t) end = std::max(end, offsets[t] + (numels[t] + 7) / 8 * 8);
  if (width == 8) {
    std::memset(out + end, 0, size_t(out_numel - end));
  } else {
    std::memset(out + end / 4, 0x55, size_t((out_numel - end) / 4));
  }
  return zeros;
}

template <typename T>
void apply_pass(int64_t count, void* const* params, const int64_t* numels, const int64_t* offsets,
                const double* lrs, const double* weight_decays, const uint8_t* codes, int width,
                int mul, int add, int average, int ranks, int threads) {
  const std::vector<Item> items = work_items(count, numels);
  const int64_t n_items = int64_t(items.size());
  const int mask = (1 << (width == 8 ? 0 : width)) - 1;
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
  for (int64_t k = 0; k < n_items; ++k) {
    const Item it = items[k];
    T* p = static_cast<T*>(params[it.tensor]);
    const int64_t stop = std::min(it.stop, numels[it.tensor]);
    const int64_t base = offsets[it.tensor];
    const double lr = lrs[it.tensor], wd = weight_decays[it.tensor];
    const T decay = T(1.0 - lr * wd), neg_lr = T(-lr), n = T(ranks);
    for (int64_t i = it.start; i < stop; ++i) {
      const int64_t e = base + i;
      int v;
      if (width == 8) {
        v = int(int8_t(codes[e]));
      } else {
        const int64_t bit = e * width;
        v = int((codes[bit >> 3] >> (bit & 7)) & mask) * mul + add;
      }
      const T u = average ? T(v) / n : T((v > 0) - (v < 0));
      T theta = p[i];
      if (wd != 0.0) theta = theta * decay;
      p[i] = std::fma(u, neg_lr, theta);
    }
  }
}

// 2-bit sign codes -> 1-bit codes (s > 0), for buckets where no rank has a zero.
void repack_2to1(const uint8_t* in, uint8_t* out, int64_t out_bytes, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t j = 0; j < out_bytes; ++j) {
    const uint8_t a = in[2 * j], b = in[2 * j + 1];
    uint8_t byte = 0;
    for (int k = 0; k < 4; ++k) byte |= uint8_t((((a >> (2 * k)) & 3) == 2) << k);
    for (int k = 0; k < 4; ++k) byte |= uint8_t((((b >> (2 * k)) & 3) == 2) << (k + 4));
    out[j] = byte;
  }
}

// S = Σ_r s_r for `elements` elements from `ranks` rows of packed sign codes (width 1 or 2);
// stored as int8 (sign(S) when `sign_only`).
void count_votes(const uint8_t* rows, int ranks, int64_t elements, int width, int sign_only,
                 int8_t* out, int threads) {
  const int64_t row_bytes = elements * width / 8;
  const int64_t chunk = 4096;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t start = 0; start < elements; start += chunk) {
    const int64_t stop = std::min(elements, start + chunk);
    int32_t acc[4096];
    for (int64_t i = start; i < stop; ++i) acc[i - start] = 0;
    for (int r = 0; r < ranks; ++r) {
      const uint8_t* row = rows + r * row_bytes;
      for (int64_t i = start; i < stop; ++i) {
        const int64_t bit = i * width;
        acc[i - start] += (row[bit >> 3] >> (bit & 7)) & ((1 << width) - 1);
      }
    }
    for (int64_t i = start; i < stop; ++i) {
      // width 1: S = 2·ones − N; width 2: S = Σ codes − N
      const int32_t total = (width == 1 ? 2 * acc[i - start] : acc[i - start]) - ranks;
      out[i] = int8_t(sign_only ? (total > 0) - (total < 0) : total);
    }
  }
}

// Packed codes q = (v − add) / mul of width bits (v = sign(S) for the majority vote).
void encode_result(const int8_t* counts, int64_t elements, int majority, int width, int mul,
                   int add, uint8_t* out, int threads) {
  const int per_byte = 8 / width;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t j = 0; j < elements / per_byte; ++j) {
    uint8_t byte = 0;
    for (int k = 0; k < per_byte; ++k) {
      const int s = counts[j * per_byte + k];
      const int v = majority ? (s > 0) - (s < 0) : s;
      byte |= uint8_t(((v - add) / mul) << (k * width));
    }
    out[j] = byte;
  }
}

}  // namespace

extern "C" {

int dlion_abi_version() { return 2; }

void dlion_repack_2to1(const uint8_t* in, uint8_t* out, int64_t out_bytes, int threads) {
  repack_2to1(in, out, out_bytes, threads);
}

void dlion_count_votes(const uint8_t* rows, int ranks, int64_t elements, int width,
                       int sign_only, int8_t* out, int threads) {
  count_votes(rows, ranks, elements, width, sign_only, out, threads);
}

void dlion_encode_result(const int8_t* counts, int64_t elements, int majority, int width,
                         int mul, int add, uint8_t* out, int threads) {
  encode_result(counts, elements, majority, width, mul, add, out, threads);
}

int64_t dlion_sign_pass(int dtype, int64_t count, void* const* grads, void* const* moms,
                        const int64_t* numels, const int64_t* offsets, double beta1,
                        double one_minus_beta1, double beta2, double one_minus_beta2, int width,
                        uint8_t* out, int64_t out_numel, int threads) {
  if (dtype == kF32)
    return sign_pass<float>(count, grads, moms, numels, offsets, beta1, one_minus_beta1, beta2,
                            one_minus_beta2, width, out, out_numel, threads);
  if (dtype == kF64)
    return sign_pass<double>(count, grads, moms, numels, offsets, beta1, one_minus_beta1, beta2,
                             one_minus_beta2, width, out, out_numel, threads);
  return -1;
}

int dlion_apply_pass(int dtype, int64_t count, void* const* params, const int64_t* numels,
                     const int64_t* offsets, const double* lrs, const double* weight_decays,
                     const uint8_t* codes, int width, int mul, int add, int average, int ranks,
                     int threads) {
  if (dtype == kF32) {
    apply_pass<float>(count, params, numels, offsets, lrs, weight_decays, codes, width, mul, add,
                      average, ranks, threads);
    return 0;
  }
  if (dtype == kF64) {
    apply_pass<double>(count, params, numels, offsets, lrs, weight_decays, codes, width, mul,
                       add, average, ranks, threads);
    return 0;
  }
  return -1;
}

}  // extern "C"
