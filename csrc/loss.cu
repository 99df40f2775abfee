// CUDA kernels of the VDM reconstruction loss (math in loss.h).
// One block per example: its threads stride over the example's elements and the per-example
// sum is a fixed-shape shared-memory tree, so the result is deterministic (no float atomics).
#include "loss.h"

#include <cuda_runtime.h>

#include "cuda_check.h"

namespace vdm {
namespace {

constexpr int kThreads = 256;

// Deterministic block sum; every thread gets the total.
template <typename T>
__device__ T block_sum(T v) {
  __shared__ T buf[kThreads];
  buf[threadIdx.x] = v;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) buf[threadIdx.x] += buf[threadIdx.x + s];
    __syncthreads();
  }
  T total = buf[0];
  __syncthreads();
  return total;
}

template <typename T, typename X>
__global__ void __launch_bounds__(kThreads)
recon_forward_kernel(const void* x, const T* eps, const T* gamma, T* out, int64_t D, int vocab) {
  const int64_t b = blockIdx.x;
  const T g = gamma[b];
  const T prec = exp(-g), scale = exp(T(0.5) * g);
  T acc = 0;
  for (int64_t d = threadIdx.x; d < D; d += kThreads) {
    const int64_t i = b * D + d;
    const int xi = load_x<X>(x, i, vocab);
    const T z = grid_value<T>(xi, vocab) + scale * eps[i];
    acc += recon_elem<T>(xi, z, prec, vocab, false).loss;
  }
  acc = block_sum(acc);
  if (threadIdx.x == 0) out[b] = acc;
}

template <typename T, typename X>
__global__ void __launch_bounds__(kThreads)
recon_backward_kernel(const void* x, const T* eps, const T* gamma, const T* grad_out,
                      T* grad_eps, T* grad_gamma, int64_t D, int vocab) {
  const int64_t b = blockIdx.x;
  const T g = gamma[b], go = grad_out[b];
  const T prec = exp(-g), scale = exp(T(0.5) * g);
  T acc = 0;
  for (int64_t d = threadIdx.x; d < D; d += kThreads) {
    const int64_t i = b * D + d;
    const int xi = load_x<X>(x, i, vocab);
    const T e = eps[i];
    const T z = grid_value<T>(xi, vocab) + scale * e;
    const ReconElem<T> r = recon_elem<T>(xi, z, prec, vocab, true);
    grad_eps[i] = go * r.dz * scale;
    acc += T(0.5) * scale * e * r.dz - prec * r.dprec;
  }
  acc = block_sum(acc);
  if (threadIdx.x == 0) grad_gamma[b] = go * acc;
}

}  // namespace

template <typename T>
void recon_forward_cuda(const void* x, XType xt, const T* eps, const T* gamma, T* out,
                        int64_t B, int64_t D, int vocab, void* stream) {
  if (B == 0) return;
  with_x_type(xt, [&](auto* tag) {
    using X = std::remove_pointer_t<decltype(tag)>;
    recon_forward_kernel<T, X><<<B, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
        x, eps, gamma, out, D, vocab);
  });
  check_launch("vdm_fast recon_forward_cuda");
}

template <typename T>
void recon_backward_cuda(const void* x, XType xt, const T* eps, const T* gamma, const T* grad_out,
                         T* grad_eps, T* grad_gamma, int64_t B, int64_t D, int vocab, void* stream) {
  if (B == 0) return;
  with_x_type(xt, [&](auto* tag) {
    using X = std::remove_pointer_t<decltype(tag)>;
    recon_backward_kernel<T, X><<<B, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
        x, eps, gamma, grad_out, grad_eps, grad_gamma, D, vocab);
  });
  check_launch("vdm_fast recon_backward_cuda");
}

template void recon_forward_cuda<float>(const void*, XType, const float*, const float*, float*,
                                        int64_t, int64_t, int, void*);
template void recon_forward_cuda<double>(const void*, XType, const double*, const double*,
                                         double*, int64_t, int64_t, int, void*);
template void recon_backward_cuda<float>(const void*, XType, const float*, const float*,
                                         const float*, float*, float*, int64_t, int64_t, int,
                                         void*);
template void recon_backward_cuda<double>(const void*, XType, const double*, const double*,
                                          const double*, double*, double*, int64_t, int64_t, int,
                                          void*);

}  // namespace vdm
