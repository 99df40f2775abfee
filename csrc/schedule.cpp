// C++ CPU kernels of the fused monotone noise schedule (math in schedule.h).
#include "schedule.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace vdm {
namespace {

template <typename T>
T sign(T v) {
  return static_cast<T>((v > 0) - (v < 0));
}

template <typename T>
inline T sigmoid(T x) {
  return T(1) / (T(1) + std::exp(-x));
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
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < B; ++i) {
    const T u = T(2) * t[i] - T(1);
    T acc_g = 0, acc_d = 0;
#pragma omp simd reduction(+ : acc_g, acc_d)
    for (int64_t j = 0; j < n; ++j) {
      const T h = sigmoid(a2[j] * u + b2[j]);
      acc_g += a3[j] * (T(2) * h - T(1));
      acc_d += a23[j] * h * (T(1) - h);
    }
    gamma[i] = b1[0] + a1 * t[i] + acc_g * inv_n;
    dgamma[i] = a1 + T(4) * acc_d * inv_n;
  }
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

#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t c = 0; c < n_chunks; ++c) {
    const int64_t j0 = c * kScheduleUnitsPerChunk;
    const int64_t m = std::min<int64_t>(kScheduleUnitsPerChunk, n - j0);
    T a2[kScheduleUnitsPerChunk], a3[kScheduleUnitsPerChunk], bb[kScheduleUnitsPerChunk];
    // Sums over the batch in double: at B = 65536 a float sum would lose ~4 digits.
    double acc_w2[kScheduleUnitsPerChunk] = {}, acc_b2[kScheduleUnitsPerChunk] = {},
           acc_w3[kScheduleUnitsPerChunk] = {};
    for (int64_t k = 0; k < m; ++k) {
      a2[k] = std::abs(w2[j0 + k]);
      a3[k] = std::abs(w3[j0 + k]);
      bb[k] = b2[j0 + k];
    }
    for (int64_t i = 0; i < B; ++i) {
      const T u = T(2) * t[i] - T(1), gg = grad_gamma[i], gd = grad_dgamma[i];
      T pd = 0, pt = 0;
#pragma omp simd reduction(+ : pd, pt)
      for (int64_t k = 0; k < m; ++k) {
        const T h = sigmoid(a2[k] * u + bb[k]);
        const T s = h * (T(1) - h), r = T(1) - T(2) * h;
        pd += a3[k] * a2[k] * s;
        pt += a3[k] * a2[k] * a2[k] * s * r;
        acc_w3[k] += gg * (T(2) * h - T(1)) + T(4) * gd * a2[k] * s;
        acc_b2[k] += T(2) * gg * s + T(4) * gd * a2[k] * s * r;
        acc_w2[k] += T(2) * gg * s * u + T(4) * gd * s * (T(1) + a2[k] * r * u);
      }
      part_d[c * B + i] = pd;
      part_t[c * B + i] = pt;
    }
    for (int64_t k = 0; k < m; ++k) {
      const int64_t j = j0 + k;
      grad_w3[j] = sign(w3[j]) * inv_n * static_cast<T>(acc_w3[k]);
      grad_b2[j] = a3[k] * inv_n * static_cast<T>(acc_b2[k]);
      grad_w2[j] = sign(w2[j]) * a3[k] * inv_n * static_cast<T>(acc_w2[k]);
    }
  }

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
