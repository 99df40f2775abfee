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

template void recon_forward_cpu<float>(const void*, XType, const float*, const float*, float*,
                                       int64_t, int64_t, int);
template void recon_forward_cpu<double>(const void*, XType, const double*, const double*, double*,
                                        int64_t, int64_t, int);
template void recon_backward_cpu<float>(const void*, XType, const float*, const float*,
                                        const float*, float*, float*, int64_t, int64_t, int);
template void recon_backward_cpu<double>(const void*, XType, const double*, const double*,
                                         const double*, double*, double*, int64_t, int64_t, int);

}  // namespace vdm
