// C++ CPU kernels of the fused monotone noise schedule (math in schedule.h).
#include "schedule.h"
#include "parallel.h"
#include "vec_math.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace vdm {
namespace {

template <typename T>
T sign(T v) {
  return static_cast<T>((v > 0) - (v < 0));
}

// The hidden-unit loops: vectorised (vec_math.h) and cloned per instruction set (VDM_CLONES).

template <typename T>
VDM_CLONES void forward_row(T t, const T* a2, const T* a3, const T* a23, const T* b2, int64_t n,
                            T* acc_g, T* acc_d) {
  const T u = T(2) * t - T(1);
  T g = 0, d = 0;
#pragma omp simd reduction(+ : g, d)
  for (int64_t j = 0; j < n; ++j) {
    const T h = vsigmoid(a2[j] * u + b2[j]);
    g += a3[j] * (T(2) * h - T(1));
    d += a23[j] * h * (T(1) - h);
  }
  *acc_g = g;
  *acc_d = d;
}

// One example's contribution to a chunk of hidden units: accumulates the parameter-gradient
// sums and returns this chunk's partial sums for gamma' and d gamma'/dt. The formulas are
// schedule.h's, regrouped so the per-unit (a23 = A3 A2, a223 = A3 A2^2) and per-example
// (2 gg, 4 gd, 2 gg u) factors are computed once, outside the loop.
template <typename T>
VDM_CLONES void backward_row(T t, T gg, T gd, const T* a2, const T* a23, const T* a223, const T* b2,
                             int64_t m, T* acc_w2, T* acc_b2, T* acc_w3, T* part_d, T* part_t) {
  const T u = T(2) * t - T(1), gg2 = T(2) * gg, gd4 = T(4) * gd, gg2u = gg2 * u;
  T pd = 0, pt = 0;
#pragma omp simd reduction(+ : pd, pt)
  for (int64_t k = 0; k < m; ++k) {
    const T h = vsigmoid(a2[k] * u + b2[k]);
    const T s = h - h * h, r = T(1) - T(2) * h;
    const T c = gd4 * a2[k];  // 4 gd A2
    pd += a23[k] * s;
    pt += a223[k] * s * r;
    acc_w3[k] += (gg2 * h - gg) + c * s;
    acc_b2[k] += (gg2 + c * r) * s;
    acc_w2[k] += (gg2u + gd4 + c * r * u) * s;
  }
  *part_d = pd;
  *part_t = pt;
}

}  // namespace

template <typename T>
void nnet_forward_cpu(const T* t, const T* w1, const T* b1, const T* w2, const T* b2, const T* w3,
                      T* gamma, T* dgamma, int64_t B, int64_t n) {
  std::vector<T> a2(n), a3(n), a23(n);
  for (int64_t j = 0; j < n; ++j) {
    a2[j] = std::abs(w2[j]);
    a3[j] = std::abs(w3[j]);
    a23[j] = a2[j] * a3[j];
  }
  const T a1 = std::abs(w1[0]), inv_n = T(1) / T(n);
  parallel_for(B, B * n, [&](int64_t i) {
    T acc_g, acc_d;
    forward_row(t[i], a2.data(), a3.data(), a23.data(), b2, n, &acc_g, &acc_d);
    gamma[i] = b1[0] + a1 * t[i] + acc_g * inv_n;
    dgamma[i] = a1 + T(4) * acc_d * inv_n;
  });
}

template <typename T>
void nnet_backward_cpu(const T* t, const T* w1, const T* b1, const T* w2, const T* b2, const T* w3,
                       const T* grad_gamma, const T* grad_dgamma, T* grad_t, T* grad_w1, T* grad_b1,
                       T* grad_w2, T* grad_b2, T* grad_w3, int64_t B, int64_t n) {
  (void)b1;
  const int64_t n_chunks = (n + kScheduleUnitsPerChunk - 1) / kScheduleUnitsPerChunk;
  // Per chunk and example: sum_j A3 A2 s (for gamma') and sum_j A3 A2^2 s r (for d gamma'/dt).
  std::vector<T> part_d(n_chunks * B), part_t(n_chunks * B);
  const T a1 = std::abs(w1[0]), inv_n = T(1) / T(n);

  parallel_for_dynamic(n_chunks, B * n, [&](int64_t c) {
    const int64_t j0 = c * kScheduleUnitsPerChunk;
    const int64_t m = std::min<int64_t>(kScheduleUnitsPerChunk, n - j0);
    T a2[kScheduleUnitsPerChunk], a3[kScheduleUnitsPerChunk], a23[kScheduleUnitsPerChunk],
        a223[kScheduleUnitsPerChunk], bb[kScheduleUnitsPerChunk];
    // Sums over the batch: in T over blocks of kBlock examples (vectorised), and those block
    // sums in double (at B = 65536 a plain float sum would lose ~4 digits).
    constexpr int64_t kBlock = 256;
    T blk_w2[kScheduleUnitsPerChunk], blk_b2[kScheduleUnitsPerChunk], blk_w3[kScheduleUnitsPerChunk];
    double acc_w2[kScheduleUnitsPerChunk] = {}, acc_b2[kScheduleUnitsPerChunk] = {},
           acc_w3[kScheduleUnitsPerChunk] = {};
    for (int64_t k = 0; k < m; ++k) {
      a2[k] = std::abs(w2[j0 + k]);
      a3[k] = std::abs(w3[j0 + k]);
      a23[k] = a3[k] * a2[k];
      a223[k] = a23[k] * a2[k];
      bb[k] = b2[j0 + k];
    }
    for (int64_t i0 = 0; i0 < B; i0 += kBlock) {
      std::fill(blk_w2, blk_w2 + m, T(0));
      std::fill(blk_b2, blk_b2 + m, T(0));
      std::fill(blk_w3, blk_w3 + m, T(0));
      for (int64_t i = i0; i < std::min(B, i0 + kBlock); ++i)
        backward_row(t[i], grad_gamma[i], grad_dgamma[i], a2, a23, a223, bb, m, blk_w2, blk_b2, blk_w3,
                     &part_d[c * B + i], &part_t[c * B + i]);
      for (int64_t k = 0; k < m; ++k) {
        acc_w2[k] += blk_w2[k];
        acc_b2[k] += blk_b2[k];
        acc_w3[k] += blk_w3[k];
      }
    }
    for (int64_t k = 0; k < m; ++k) {
      const int64_t j = j0 + k;
      grad_w3[j] = sign(w3[j]) * inv_n * static_cast<T>(acc_w3[k]);
      grad_b2[j] = a3[k] * inv_n * static_cast<T>(acc_b2[k]);
      grad_w2[j] = sign(w2[j]) * a3[k] * inv_n * static_cast<T>(acc_w2[k]);
    }
  });

  double sum_gg = 0, sum_w1 = 0;
  for (int64_t i = 0; i < B; ++i) {
    T pd = 0, pt = 0;
    for (int64_t c = 0; c < n_chunks; ++c) {
      pd += part_d[c * B + i];
      pt += part_t[c * B + i];
    }
    const T dgamma = a1 + T(4) * inv_n * pd;
    grad_t[i] = grad_gamma[i] * dgamma + grad_dgamma[i] * T(8) * inv_n * pt;
    sum_gg += grad_gamma[i];
    sum_w1 += grad_gamma[i] * t[i] + grad_dgamma[i];
  }
  grad_b1[0] = static_cast<T>(sum_gg);
  grad_w1[0] = sign(w1[0]) * static_cast<T>(sum_w1);
}

#define VDM_INSTANTIATE(T)                                                                     \
  template void nnet_forward_cpu<T>(const T*, const T*, const T*, const T*, const T*, const T*, \
                                    T*, T*, int64_t, int64_t);                                 \
  template void nnet_backward_cpu<T>(const T*, const T*, const T*, const T*, const T*, const T*, \
                                     const T*, const T*, T*, T*, T*, T*, T*, T*, int64_t, int64_t);

VDM_INSTANTIATE(float)
VDM_INSTANTIATE(double)
#undef VDM_INSTANTIATE

}  // namespace vdm
