// C++ CPU kernels of the VDM loss terms (math in loss.h).
// OpenMP over examples, SIMD across elements; each example's sum runs in a fixed order in
// double, so the result is deterministic whatever the thread count and more accurate than a
// float accumulator.
#include "loss.h"

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "parallel.h"
#include "vec_math.h"

namespace vdm {

namespace {

constexpr int kReconBlock = 64;  // elements per SIMD block
// s0 lies in [1, vocab] (the v* term is exactly 1): a product of 32 stays below 2^512 for
// vocab <= 2^16, far inside double's range, so one log serves 32 elements.
constexpr int kLogGroup = 32;
// Work per element of the reconstruction kernels, in units of a simple elementwise op: the
// window's grid points (for parallel.h's grain).
constexpr int64_t kReconWork = 16;

// The per-example half of the window's recurrence (see recon_block): kmax = how many grid
// steps the window reaches on each side, and decay[k] = exp(-2 C k) for k < kmax, with
// C = prec step^2 / 2.
struct ReconWindow {
  int kmax;
  std::vector<double> decay;
  ReconWindow(double prec, int vocab) {
    const double step = 2.0 / vocab, C = 0.5 * prec * step * step;
    kmax = std::min(recon_half_width(prec, vocab), vocab - 1);
    decay.resize(kmax);
    for (int k = 0; k < kmax; ++k) decay[k] = std::exp(-2.0 * C * k);
  }
};

// One block of n elements of one example: each element's v*, w = z - c_{v*}, u_x, and the
// window sums s0 = sum e_v, s1 = sum e_v u_v, s2 = sum e_v u_v^2 with e_v = exp(l_v - l_{v*})
// (the math of one element in loss.h).
//
// The window's exps come from a recurrence, not one exp per grid point: with A = prec step w
// and C = prec step^2 / 2, l_{v*+k} - l_{v*} = k A - k^2 C, so consecutive terms differ by
//   e_{k+1} / e_k = exp(A - C) exp(-2 C k),   e_{-k-1} / e_{-k} = exp(-A - C) exp(-2 C k).
// Two exps per element (vec_math.h, in double, across SIMD lanes) and the example's decay
// table then give the whole window by multiplication: at gamma_0 = -10 and 8-bit data, 2
// exps instead of 19. v* is the grid point nearest z, so |w| <= step / 2 and every e_k <= 1:
// the products shrink towards 0 and never overflow. At a clamped edge (z outside [-1, 1]) the
// direction that could grow points off the vocabulary and is masked out by a select, which
// also drops an inf or NaN there. The relative error of e_k grows like k ulps, 3e-14 at most
// for 8-bit data.
template <typename T, typename X, bool kGrad>
VDM_CLONES void recon_block(const void* x, const T* eps, int64_t i0, int n, double prec, double scale,
                            const ReconWindow& window, int vocab, T* __restrict__ w, T* __restrict__ ux,
                            double* __restrict__ s0, double* __restrict__ s1, double* __restrict__ s2) {
  const T step = T(2) / T(vocab);
  const double dstep = step, dprec = prec, C = 0.5 * dprec * dstep * dstep;
  const T tscale = static_cast<T>(scale);  // exp(gamma / 2): in T's range wherever z is
  int vstar[kReconBlock];
  double up[kReconBlock], down[kReconBlock], e_up[kReconBlock], e_down[kReconBlock];
  for (int j = 0; j < n; ++j) {
    const int xi = load_x<X>(x, i0 + j, vocab);
    const T z = grid_value<T>(xi, vocab) + tscale * eps[i0 + j];
    vstar[j] = recon_center(z, vocab);
    w[j] = z - grid_value<T>(vstar[j], vocab);
    ux[j] = x_offset<T>(xi, vstar[j], step);
  }
#pragma omp simd
  for (int j = 0; j < n; ++j) {
    const double A = dprec * dstep * w[j];  // a NaN z makes A NaN, and with it every sum
    up[j] = VecExp<double>::exp(A - C);
    down[j] = VecExp<double>::exp(-A - C);
    e_up[j] = e_down[j] = 1.0;
    s0[j] = 1.0 + 0.0 * A;  // the k = 0 term, v = v*; NaN-propagating
    s1[j] = s2[j] = 0.0;
  }
  for (int k = 1; k <= window.kmax; ++k) {
    const double decay = window.decay[k - 1], u = k * dstep;
#pragma omp simd
    for (int j = 0; j < n; ++j) {
      e_up[j] *= up[j] * decay;
      e_down[j] *= down[j] * decay;
      const double ep = vstar[j] + k < vocab ? e_up[j] : 0.0;
      const double em = vstar[j] - k >= 0 ? e_down[j] : 0.0;
      s0[j] += ep + em;
      if (kGrad) {
        s1[j] += u * (ep - em);
        s2[j] += u * u * (ep + em);
      }
    }
  }
}

}  // namespace

template <typename T>
void recon_forward_cpu(const void* x, XType xt, const T* eps, const T* gamma, T* out,
                       int64_t B, int64_t D, int vocab) {
  with_x_type(xt, [&](auto* tag) {
    using X = std::remove_pointer_t<decltype(tag)>;
    parallel_for(B, B * D * kReconWork, [&](int64_t b) {
      // The per-example constants in double: exp(-gamma) overflows float below gamma = -88,
      // where the decoder is exact and the loss is 0, not inf * 0.
      const double g = gamma[b];
      const double prec = std::exp(-g), scale = std::exp(0.5 * g);
      const ReconWindow window(prec, vocab);
      T w[kReconBlock], ux[kReconBlock];
      double s0[kReconBlock], s1[kReconBlock], s2[kReconBlock];
      double acc = 0;  // per example, in a fixed order: deterministic for any thread count
      for (int64_t d0 = 0; d0 < D; d0 += kReconBlock) {
        const int n = static_cast<int>(std::min<int64_t>(kReconBlock, D - d0));
        recon_block<T, X, false>(x, eps, b * D + d0, n, prec, scale, window, vocab, w, ux, s0, s1, s2);
        // loss = log s0 + 0.5 prec u_x (u_x - 2 w); the logs of kLogGroup elements as one.
        for (int j0 = 0; j0 < n; j0 += kLogGroup) {
          double prod = 1;
          for (int j = j0; j < std::min(n, j0 + kLogGroup); ++j) prod *= s0[j];
          acc += std::log(prod);
        }
        for (int j = 0; j < n; ++j) acc += 0.5 * prec * double(ux[j]) * (double(ux[j]) - 2.0 * double(w[j]));
      }
      out[b] = static_cast<T>(acc);
    });
  });
}

template <typename T>
void recon_backward_cpu(const void* x, XType xt, const T* eps, const T* gamma, const T* grad_out,
                        T* grad_eps, T* grad_gamma, int64_t B, int64_t D, int vocab) {
  with_x_type(xt, [&](auto* tag) {
    using X = std::remove_pointer_t<decltype(tag)>;
    parallel_for(B, B * D * kReconWork, [&](int64_t b) {
      const double g = gamma[b], go = grad_out[b];  // in double, as in the forward
      const double prec = std::exp(-g), scale = std::exp(0.5 * g);
      const ReconWindow window(prec, vocab);
      T w[kReconBlock], ux[kReconBlock];
      double s0[kReconBlock], s1[kReconBlock], s2[kReconBlock];
      double acc = 0;
      for (int64_t d0 = 0; d0 < D; d0 += kReconBlock) {
        const int n = static_cast<int>(std::min<int64_t>(kReconBlock, D - d0));
        const int64_t i0 = b * D + d0;
        recon_block<T, X, true>(x, eps, i0, n, prec, scale, window, vocab, w, ux, s0, s1, s2);
        for (int j = 0; j < n; ++j) {
          // dz = prec (E[u] - u_x), dprec = w (E[u] - u_x) + (u_x^2 - E[u^2]) / 2 (loss.h).
          const double du = s1[j] / s0[j] - double(ux[j]);
          const double dz = prec * du;
          const double dprec = double(w[j]) * du + 0.5 * (double(ux[j]) * double(ux[j]) - s2[j] / s0[j]);
          grad_eps[i0 + j] = static_cast<T>(go * dz * scale);
          // z = f + exp(g/2) eps and prec = exp(-g): dz/dg = z's noise term / 2, dprec/dg = -prec.
          acc += 0.5 * scale * double(eps[i0 + j]) * dz - prec * dprec;
        }
      }
      grad_gamma[b] = static_cast<T>(go * acc);
    });
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
  parallel_for(B, B * D, [&](int64_t b) {
    T alpha, sigma;
    alpha_sigma(gamma[b], &alpha, &sigma);
    const T* fb = f + b * D;
    const T* eb = eps + b * D;
    T* zb = z + b * D;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) zb[d] = alpha * fb[d] + sigma * eb[d];
  });
}

template <typename T>
void diffuse_backward_cpu(const T* grad, const T* f, const T* eps, const T* gamma, T* grad_f,
                          T* grad_eps, T* grad_gamma, int64_t B, int64_t D) {
  parallel_for(B, B * D, [&](int64_t b) {
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
  });
}

template <typename T>
void sse_forward_cpu(const T* x, const T* y, const T* a, const T* w, const T* c, T* out, int64_t B,
                     int64_t D) {
  parallel_for(B, B * D, [&](int64_t b) {
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
  });
}

template <typename T>
void sse_backward_cpu(const T* grad, const T* x, const T* y, const T* a, const T* w, const T* c,
                      T* grad_x, T* grad_a, T* grad_c, int64_t B, int64_t D) {
  parallel_for(B, B * D, [&](int64_t b) {
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
  });
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
