// The learned monotone noise schedule of VDM (docs/design/math.md), fused: gamma(t), its
// time derivative, and in one backward pass the gradients of both with respect to t and to every
// parameter, analytically (no autograd graph, no double backward).
//
// With A1 = |w1|, A2_j = |w2_j|, A3_j = |w3_j|, u = 2t - 1, h_j = sigmoid(A2_j u + b2_j) and
// s_j = h_j (1 - h_j):
//   gamma    = b1 + A1 t + (1/n) sum_j A3_j (2 h_j - 1)
//   gamma'   = A1 + (4/n) sum_j A3_j A2_j s_j
// For upstream gradients gg (of gamma) and gd (of gamma'), per example, with r_j = 1 - 2 h_j:
//   d/dt     = gg gamma' + gd (8/n) sum_j A3_j A2_j^2 s_j r_j
//   d/db1    = gg                         d/dw1 = sign(w1) (gg t + gd)
//   d/dw3_j  = sign(w3_j)/n  (gg (2 h_j - 1) + 4 gd A2_j s_j)
//   d/db2_j  = A3_j/n        (2 gg s_j + 4 gd A2_j s_j r_j)
//   d/dw2_j  = sign(w2_j) A3_j/n (2 gg s_j u + 4 gd s_j (1 + A2_j r_j u))
// summed over the batch for the parameters. sign(0) = 0, as torch's abs backward.
#pragma once

#include <cstdint>

namespace vdm {

// Hidden units per work item of the backward: parameter gradients are owned by one work item
// each (a sum over the batch in a fixed order), and d/dt is a sum of per-item partials in a
// fixed order, so results never depend on the thread count.
constexpr int kScheduleUnitsPerChunk = 128;

// t, gamma, dgamma: [B]; w1 [1], b1 [1], w2 [n], b2 [n], w3 [n] (flat).
template <typename T>
void nnet_forward_cpu(const T* t, const T* w1, const T* b1, const T* w2, const T* b2, const T* w3,
                      T* gamma, T* dgamma, int64_t B, int64_t n);

// grad_gamma, grad_dgamma: [B] upstream; outputs grad_t [B], grad_w1 [1], grad_b1 [1],
// grad_w2 [n], grad_b2 [n], grad_w3 [n].
template <typename T>
void nnet_backward_cpu(const T* t, const T* w1, const T* b1, const T* w2, const T* b2, const T* w3,
                       const T* grad_gamma, const T* grad_dgamma, T* grad_t, T* grad_w1, T* grad_b1,
                       T* grad_w2, T* grad_b2, T* grad_w3, int64_t B, int64_t n);

}  // namespace vdm
