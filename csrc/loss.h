// Reconstruction loss of VDM (docs/design/math.md): the per-element math of the C++ CPU
// kernels (loss.cpp), which the Triton kernels (kernels/loss.py) mirror.
//
// For an element with data value x, rescaled latent z = f + exp(gamma/2) eps and precision
// prec = exp(-gamma), the decoder's logits over the vocabulary grid c_v = (2v + 1)/V - 1 are
// l_v = -0.5 prec (z - c_v)^2 and the loss is logsumexp_v(l_v) - l_x. The logits are a Gaussian
// bump over a uniform grid, so we sum only the window of grid points that can change the sum at
// the working precision (see recon_half_width), never materialising the vocabulary axis.
#pragma once

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <type_traits>

namespace vdm {

// A grid point whose logit lies this far (in nats) below the largest one contributes less than
// exp(-margin) relative to it; with at most 2^16 such points the sum stays exact to rounding:
// 256 * e^-25 = 3.6e-9 below float's 6e-8, and 65536 * e^-50 = 1.3e-17 below double's 1.1e-16.
template <typename T> struct LogMargin;
template <> struct LogMargin<float> { static constexpr float value = 25.f; };
template <> struct LogMargin<double> { static constexpr double value = 50.; };

// v* = the grid point nearest to latent z, clamped to the vocabulary: it has the largest logit.
template <typename T>
inline int recon_center(T z, int vocab) {
  const T vf = std::round(((z + T(1)) * T(vocab) - T(1)) * T(0.5));
  // !(vf >= 0) also catches NaN: the NaN then flows through the arithmetic, not the indexing.
  return !(vf >= T(0)) ? 0 : (vf > T(vocab - 1) ? vocab - 1 : static_cast<int>(vf));
}

// The window's half-width m (the same for every element of an example: it depends on prec
// only). A point m steps away from v* lies at least (m - 1/2) steps from z, so its logit is at
// least 0.5 prec step^2 m (m - 1) below l_{v*}; the window keeps every m with that gap < margin,
// and m (m - 1) >= r^2 holds for m = ceil(r) + 1.
// Bounded by the vocabulary whatever prec is: a NaN prec (a NaN gamma) gives the whole
// vocabulary, so nothing is ever sized from an unbounded or undefined value.
template <typename T>
inline int recon_half_width(T prec, int vocab) {
  const T step = T(2) / T(vocab);
  const T r = std::sqrt(T(2) * LogMargin<T>::value / prec) / step;
  return !(r < T(vocab)) ? vocab : static_cast<int>(std::ceil(r)) + 1;  // !(<): NaN too
}

template <typename T>
inline T grid_value(int v, int vocab) {
  return T(2 * v + 1) / T(vocab) - T(1);
}

// u_x = (x - v*) step, NaN for an invalid x (load_x's -1).
template <typename T>
inline T x_offset(int x, int vstar, T step) {
  return x < 0 ? T(NAN) : T(x - vstar) * step;
}

// The math of one element, which loss.cpp evaluates in SIMD blocks and kernels/loss.py per
// chunk. Everything is measured from the window's centre c* = c_{v*}: w = z - c*, u_v = c_v - c*
// = (v - v*) step (exact). Then l_v - l_{v*} = prec u_v (w - u_v / 2), and with E over p(v | z)
// and the window's points |v - v*| <= recon_half_width:
//   loss  = log sum_v exp(l_v - l_{v*}) + 0.5 prec u_x (u_x - 2 w)
//   dz    = prec (E[u] - u_x)
//   dprec = w (E[u] - u_x) + 0.5 (u_x^2 - E[u^2])
// No term subtracts two large numbers, so float32 keeps its precision at every gamma (the plain
// "z - c" form loses it both at low noise, where p is one-hot, and at high noise, where |z| >> 1).

// Element dtypes accepted for x (the images); the latents are float or double.
enum class XType : int { kUInt8 = 0, kInt32 = 1, kInt64 = 2, kFloat32 = 3, kFloat64 = 4 };

// The data value of element i, or -1 when it is not an integer in [0, vocab): x_offset turns
// -1 into a NaN u_x, so the example's loss and gradients are NaN (its z, from grid value -1,
// stays finite and needs no special case). The ops check the
// values in eager mode; this is what stands where they cannot (torch.compile, CUDA graphs),
// so an out-of-range or fractional image can never yield a plausible wrong number.
template <typename X>
inline int load_x(const void* x, int64_t i, int vocab) {
  const X v = static_cast<const X*>(x)[i];
  if constexpr (std::is_floating_point<X>::value) {
    // Written so that NaN fails: every comparison with NaN is false.
    const bool ok = v >= X(0) && v < X(vocab) && v == std::floor(v);
    return ok ? static_cast<int>(v) : -1;
  } else {
    const int64_t w = static_cast<int64_t>(v);  // widened first: uint8(256) would be 0
    return (w >= 0 && w < vocab) ? static_cast<int>(w) : -1;
  }
}

// Calls f with a null X* for the element type of x, so f can name X.
template <typename F>
void with_x_type(XType xt, F&& f) {
  switch (xt) {
    case XType::kUInt8: f(static_cast<uint8_t*>(nullptr)); break;
    case XType::kInt32: f(static_cast<int32_t*>(nullptr)); break;
    case XType::kInt64: f(static_cast<int64_t*>(nullptr)); break;
    case XType::kFloat32: f(static_cast<float*>(nullptr)); break;
    case XType::kFloat64: f(static_cast<double*>(nullptr)); break;
    default: throw std::invalid_argument("vdm_fast: unsupported dtype code for x");
  }
}

// Entry points. Pointers are raw host addresses of contiguous tensors:
// x [B, D], eps [B, D], gamma [B], out / grad_gamma / grad_out [B], grad_eps [B, D].
template <typename T>
void recon_forward_cpu(const void* x, XType xt, const T* eps, const T* gamma, T* out,
                       int64_t B, int64_t D, int vocab);
template <typename T>
void recon_backward_cpu(const void* x, XType xt, const T* eps, const T* gamma, const T* grad_out,
                        T* grad_eps, T* grad_gamma, int64_t B, int64_t D, int vocab);

// The forward process z = alpha f + sigma eps (alpha^2 = sigmoid(-gamma), sigma^2 =
// sigmoid(gamma)) and its backward; grad_gamma[b] = 0.5 alpha sigma sum(go (alpha eps - sigma f)).
template <typename T>
void diffuse_forward_cpu(const T* f, const T* eps, const T* gamma, T* z, int64_t B, int64_t D);
template <typename T>
void diffuse_backward_cpu(const T* grad, const T* f, const T* eps, const T* gamma, T* grad_f,
                          T* grad_eps, T* grad_gamma, int64_t B, int64_t D);

// Per-example sum of squared errors sum_d r^2 with r = x - a_b y - c_b w: the residual of a
// prediction x against a target that is a per-example combination of y and w (e.g. the v
// target alpha eps - sigma f). y, w may be null (term absent); a, c ([B]) null mean 1.
// Backward: grad_x = 2 go r; grad_a[b] = -sum_d grad_x y; grad_c[b] = -sum_d grad_x w (each
// written only where its pointer is not null).
template <typename T>
void sse_forward_cpu(const T* x, const T* y, const T* a, const T* w, const T* c, T* out, int64_t B,
                     int64_t D);
template <typename T>
void sse_backward_cpu(const T* grad, const T* x, const T* y, const T* a, const T* w, const T* c,
                      T* grad_x, T* grad_a, T* grad_c, int64_t B, int64_t D);

}  // namespace vdm
