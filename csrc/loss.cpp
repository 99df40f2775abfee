// C++ CPU kernels of the VDM reconstruction loss (math in loss.h).
// OpenMP over examples; each example's sum runs in a fixed order in double, so the result is
// deterministic whatever the thread count and more accurate than a float accumulator.
#include "loss.h"

#include <type_traits>

namespace vdm {

template <typename T>
void recon_forward_cpu(const void* x, XType xt, const T* eps, const T* gamma, T* out,
                       int64_t B, int64_t D, int vocab) {
  with_x_type(xt, [&](auto* tag) {
    using X = std::remove_pointer_t<decltype(tag)>;
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      const T g = gamma[b];
      const T prec = std::exp(-g), scale = std::exp(T(0.5) * g);
      double acc = 0;
      for (int64_t d = 0; d < D; ++d) {
        const int64_t i = b * D + d;
        const int xi = load_x<X>(x, i);
        const T z = grid_value<T>(xi, vocab) + scale * eps[i];
        acc += recon_elem<T>(xi, z, prec, vocab, false).loss;
      }
      out[b] = static_cast<T>(acc);
    }
  });
}

template <typename T>
void recon_backward_cpu(const void* x, XType xt, const T* eps, const T* gamma, const T* grad_out,
                        T* grad_eps, T* grad_gamma, int64_t B, int64_t D, int vocab) {
  with_x_type(xt, [&](auto* tag) {
    using X = std::remove_pointer_t<decltype(tag)>;
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      const T g = gamma[b], go = grad_out[b];
      const T prec = std::exp(-g), scale = std::exp(T(0.5) * g);
      double acc = 0;
      for (int64_t d = 0; d < D; ++d) {
        const int64_t i = b * D + d;
        const int xi = load_x<X>(x, i);
        const T z = grid_value<T>(xi, vocab) + scale * eps[i];
        const ReconElem<T> r = recon_elem<T>(xi, z, prec, vocab, true);
        grad_eps[i] = go * r.dz * scale;
        // z = f + exp(g/2) eps and prec = exp(-g): dz/dg = z's noise term / 2, dprec/dg = -prec.
        acc += T(0.5) * scale * eps[i] * r.dz - prec * r.dprec;
      }
      grad_gamma[b] = go * static_cast<T>(acc);
    }
  });
}

namespace {

template <typename T>
inline void alpha_sigma(T g, T* alpha, T* sigma) {
  // sigmoid(+-g) written to stay finite for any |g|.
  const T e = std::exp(-std::abs(g));
  const T big = T(1) / (T(1) + e), small = e / (T(1) + e);
  *alpha = std::sqrt(g >= 0 ? small : big);
  *sigma = std::sqrt(g >= 0 ? big : small);
}

}  // namespace

template <typename T>
void diffuse_forward_cpu(const T* f, const T* eps, const T* gamma, T* z, int64_t B, int64_t D) {
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < B; ++b) {
    T alpha, sigma;
    alpha_sigma(gamma[b], &alpha, &sigma);
    const T* fb = f + b * D;
    const T* eb = eps + b * D;
    T* zb = z + b * D;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) zb[d] = alpha * fb[d] + sigma * eb[d];
  }
}

template <typename T>
void diffuse_backward_cpu(const T* grad, const T* f, const T* eps, const T* gamma, T* grad_f,
                          T* grad_eps, T* grad_gamma, int64_t B, int64_t D) {
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < B; ++b) {
    T alpha, sigma;
    alpha_sigma(gamma[b], &alpha, &sigma);
    const int64_t o = b * D;
    double acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t d = 0; d < D; ++d) {
      const T go = grad[o + d];
      grad_f[o + d] = go * alpha;
      grad_eps[o + d] = go * sigma;
      acc += go * (alpha * eps[o + d] - sigma * f[o + d]);
    }
    grad_gamma[b] = T(0.5) * alpha * sigma * static_cast<T>(acc);
  }
}

template <typename T>
void sse_forward_cpu(const T* x, const T* y, const T* a, const T* w, const T* c, T* out, int64_t B,
                     int64_t D) {
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < B; ++b) {
    const int64_t o = b * D;
    const T ab = a ? a[b] : T(1), cb = c ? c[b] : T(1);
    const T* yb = y ? y + o : nullptr;
    const T* wb = w ? w + o : nullptr;
    double acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t d = 0; d < D; ++d) {
      const T r = x[o + d] - (yb ? ab * yb[d] : T(0)) - (wb ? cb * wb[d] : T(0));
      acc += r * r;
    }
    out[b] = static_cast<T>(acc);
  }
}

template <typename T>
void sse_backward_cpu(const T* grad, const T* x, const T* y, const T* a, const T* w, const T* c,
                      T* grad_x, T* grad_a, T* grad_c, int64_t B, int64_t D) {
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < B; ++b) {
    const int64_t o = b * D;
    const T ab = a ? a[b] : T(1), cb = c ? c[b] : T(1), g2 = T(2) * grad[b];
    const T* yb = y ? y + o : nullptr;
    const T* wb = w ? w + o : nullptr;
    double acc_a = 0, acc_c = 0;
#pragma omp simd reduction(+ : acc_a, acc_c)
    for (int64_t d = 0; d < D; ++d) {
      const T yd = yb ? yb[d] : T(0), wd = wb ? wb[d] : T(0);
      const T gx = g2 * (x[o + d] - ab * yd - cb * wd);
      grad_x[o + d] = gx;
      acc_a += gx * yd;
      acc_c += gx * wd;
    }
    if (grad_a) grad_a[b] = -static_cast<T>(acc_a);
    if (grad_c) grad_c[b] = -static_cast<T>(acc_c);
  }
}

#define VDM_INSTANTIATE(T)                                                                      \
  template void recon_forward_cpu<T>(const void*, XType, const T*, const T*, T*, int64_t,       \
                                     int64_t, int);                                             \
  template void recon_backward_cpu<T>(const void*, XType, const T*, const T*, const T*, T*, T*, \
                                      int64_t, int64_t, int);                                   \
  template void diffuse_forward_cpu<T>(const T*, const T*, const T*, T*, int64_t, int64_t);     \
  template void diffuse_backward_cpu<T>(const T*, const T*, const T*, const T*, T*, T*, T*,     \
                                        int64_t, int64_t);                                      \
  template void sse_forward_cpu<T>(const T*, const T*, const T*, const T*, const T*, T*, int64_t, \
                                    int64_t);                                                   \
  template void sse_backward_cpu<T>(const T*, const T*, const T*, const T*, const T*, const T*,   \
                                     T*, T*, T*, int64_t, int64_t);

VDM_INSTANTIATE(float)
VDM_INSTANTIATE(double)
#undef VDM_INSTANTIATE

}  // namespace vdm
