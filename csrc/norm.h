// GroupNorm (+ conditioning add, + swish) of the U-Net, fused (docs/design/math.md): the
// C++ CPU kernels (norm.cpp), which the Triton kernels (kernels/norm.py) mirror.
//
// Per example b and group g of N = (C / G) * HW elements, with v = x + cond[b, c]:
//   mean = sum v / N,  rstd = 1 / sqrt(sum (v - mean)^2 / N + eps)     (two passes, so a large
//   xhat = (v - mean) rstd,  u = w[c] xhat + b[c],  y = silu(u) or u    mean does not cancel)
// and backward, with du = dy silu'(u) (or dy), silu'(u) = s (1 + u (1 - s)), s = sigmoid(u):
//   dw[c] = sum_{b, hw} du xhat,  db[c] = sum_{b, hw} du,
//   dv = rstd (w[c] du - mean_g(w du) - xhat mean_g(w du xhat)),  dx = dv,  dcond[b, c] = sum_hw dv.
// x, y, dy, dx, cond, dcond are in the storage dtype T (float, double or bfloat16), NCHW or
// channels_last; w, b, mean, rstd, dw, db in the compute type (float; double for double).
// Sums over the elements run in double. Examples are independent work items and dw, db are
// summed over them in a fixed order, so results never depend on the thread count.
#pragma once

#include <cstdint>

namespace vdm {

// bfloat16 storage: the high half of a float's bits.
struct bf16 {
  uint16_t bits;
};

template <typename T> struct ComputeType { using type = float; };
template <> struct ComputeType<double> { using type = double; };

template <typename T>
using compute_t = typename ComputeType<T>::type;

// cond and dcond are null without conditioning.
template <typename T>
void group_norm_forward_cpu(const T* x, const T* cond, const compute_t<T>* w, const compute_t<T>* b, T* y,
                            compute_t<T>* mean, compute_t<T>* rstd, int64_t B, int64_t C, int64_t HW,
                            int64_t G, double eps, bool silu, bool channels_last);

template <typename T>
void group_norm_backward_cpu(const T* dy, const T* x, const T* cond, const compute_t<T>* w,
                             const compute_t<T>* b, const compute_t<T>* mean, const compute_t<T>* rstd, T* dx,
                             compute_t<T>* dw, compute_t<T>* db, T* dcond, int64_t B, int64_t C, int64_t HW,
                             int64_t G, bool silu, bool channels_last);

}  // namespace vdm
