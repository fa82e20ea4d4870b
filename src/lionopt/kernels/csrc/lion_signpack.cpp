// Distributed Lion's two fused CPU passes over one bucket, multi-threaded with OpenMP.
//
// Pass 1 (dlion_sign_pass) reads g and m once, writes m ← β2·m + (1−β2)·g, and emits
// sign(β1·m + (1−β1)·g) as 2-bit codes (s + 1, four a byte, little-endian) or as int8 signs.
// Pass 2 (dlion_apply_pass) decodes the vote v of each element from a packed buffer (code q of
// `width` bits means q·mul + add; width 8 is a signed int8 v) and applies
// θ ← θ·(1−η·λ) − η·u with u = sign(v) (majority) or v/N (average).
//
// A plain C ABI (no torch headers); lionopt.kernels.signpack_cpu loads it with ctypes. Compile
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

}  // namespace

extern "C" {

int dlion_abi_version() { return 1; }

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
