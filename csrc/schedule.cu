// CUDA kernels of the fused monotone noise schedule (math in schedule.h).
//
// Forward: one warp per example, lanes striding over the hidden units, a butterfly shuffle sum.
// Backward, one launch: block (jb, ib) owns hidden units [128 jb, 128 jb + 128) and examples
// [256 ib, 256 ib + 256). Each thread owns one hidden unit and sums its parameter gradients
// over the block's examples; per example, the block's partial sums over its units (for d/dt)
// are shuffled per warp and written out. The last block to finish (an integer atomic counter,
// the only atomic) reduces all partials in a fixed order: deterministic, no float atomics.
#include "schedule.h"

#include <cuda_runtime.h>

#include "cuda_check.h"

namespace vdm {
namespace {

constexpr int kUnits = kScheduleUnitsPerChunk;  // threads per backward block, one unit each
constexpr int kExamples = 256;                  // examples per backward block
constexpr int kWarps = kUnits / 32;

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

template <typename T>
__device__ __forceinline__ T sgn(T v) {
  return static_cast<T>((v > T(0)) - (v < T(0)));
}

template <typename T>
__device__ __forceinline__ T sigm(T x) {
  return T(1) / (T(1) + exp(-x));
}

template <typename T>
__global__ void nnet_forward_kernel(const T* t, const T* w1, const T* b1, const T* w2, const T* b2,
                                    const T* w3, T* gamma, T* dgamma, int64_t B, int64_t n) {
  const int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (i >= B) return;  // whole warps exit together: B is per warp
  const T ti = t[i], u = T(2) * ti - T(1);
  T acc_g = 0, acc_d = 0;
  for (int64_t j = lane; j < n; j += 32) {
    const T a2 = fabs(w2[j]), a3 = fabs(w3[j]);
    const T h = sigm(a2 * u + b2[j]);
    acc_g += a3 * (T(2) * h - T(1));
    acc_d += a3 * a2 * h * (T(1) - h);
  }
  acc_g = warp_sum(acc_g);
  acc_d = warp_sum(acc_d);
  if (lane == 0) {
    const T a1 = fabs(w1[0]);
    gamma[i] = b1[0] + a1 * ti + acc_g / T(n);
    dgamma[i] = a1 + T(4) * acc_d / T(n);
  }
}

// Workspace layout (all T after the counter): counter | part_d [jblocks, B] | part_t [jblocks, B]
// | acc [iblocks, 3, n].
struct Layout {
  int64_t jblocks, iblocks, off_part_d, off_part_t, off_acc, bytes;
};

template <typename T>
Layout layout(int64_t B, int64_t n) {
  Layout l;
  l.jblocks = (n + kUnits - 1) / kUnits;
  l.iblocks = (B + kExamples - 1) / kExamples;
  const int64_t head = 256;  // the counter, padded so the arrays stay aligned
  l.off_part_d = head;
  l.off_part_t = l.off_part_d + l.jblocks * B * sizeof(T);
  l.off_acc = l.off_part_t + l.jblocks * B * sizeof(T);
  l.bytes = l.off_acc + l.iblocks * 3 * n * sizeof(T);
  return l;
}

template <typename T>
__global__ void __launch_bounds__(kUnits)
nnet_backward_kernel(const T* t, const T* w1, const T* w2, const T* b2, const T* w3,
                     const T* grad_gamma, const T* grad_dgamma, T* grad_t, T* grad_w1, T* grad_b1,
                     T* grad_w2, T* grad_b2, T* grad_w3, int64_t B, int64_t n, char* ws, Layout l) {
  unsigned int* counter = reinterpret_cast<unsigned int*>(ws);
  T* part_d = reinterpret_cast<T*>(ws + l.off_part_d);
  T* part_t = reinterpret_cast<T*>(ws + l.off_part_t);
  T* acc = reinterpret_cast<T*>(ws + l.off_acc);
  __shared__ T warp_d[kWarps], warp_t[kWarps];
  __shared__ bool last;

  const int64_t jb = blockIdx.x, ib = blockIdx.y;
  const int64_t j = jb * kUnits + threadIdx.x;
  const bool unit = j < n;
  const T a2 = unit ? fabs(w2[j]) : T(0), a3 = unit ? fabs(w3[j]) : T(0), bj = unit ? b2[j] : T(0);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  T acc_w2 = 0, acc_b2 = 0, acc_w3 = 0;
  const int64_t i_end = min(B, (ib + 1) * kExamples);
  for (int64_t i = ib * kExamples; i < i_end; ++i) {
    const T u = T(2) * t[i] - T(1), gg = grad_gamma[i], gd = grad_dgamma[i];
    T pd = 0, pt = 0;
    if (unit) {
      const T h = sigm(a2 * u + bj);
      const T s = h * (T(1) - h), r = T(1) - T(2) * h;
      pd = a3 * a2 * s;
      pt = a3 * a2 * a2 * s * r;
      acc_w3 += gg * (T(2) * h - T(1)) + T(4) * gd * a2 * s;
      acc_b2 += T(2) * gg * s + T(4) * gd * a2 * s * r;
      acc_w2 += T(2) * gg * s * u + T(4) * gd * s * (T(1) + a2 * r * u);
    }
    pd = warp_sum(pd);
    pt = warp_sum(pt);
    if (lane == 0) {
      warp_d[warp] = pd;
      warp_t[warp] = pt;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      T sd = 0, st = 0;
      for (int w = 0; w < kWarps; ++w) {
        sd += warp_d[w];
        st += warp_t[w];
      }
      part_d[jb * B + i] = sd;
      part_t[jb * B + i] = st;
    }
    __syncthreads();
  }
  if (unit) {
    acc[(ib * 3 + 0) * n + j] = acc_w2;
    acc[(ib * 3 + 1) * n + j] = acc_b2;
    acc[(ib * 3 + 2) * n + j] = acc_w3;
  }

  // Last block out reduces every partial, in a fixed order.
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    const unsigned int done = atomicAdd(counter, 1u);
    last = done == gridDim.x * gridDim.y - 1;
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  // Other blocks' partials are read with __ldcg (L2, not this SM's L1): L1 is not coherent
  // across blocks, so a plain load could see a stale line.

  const T a1 = fabs(w1[0]), inv_n = T(1) / T(n);
  for (int64_t k = threadIdx.x; k < n; k += kUnits) {
    T s_w2 = 0, s_b2 = 0, s_w3 = 0;
    for (int64_t b = 0; b < l.iblocks; ++b) {
      s_w2 += __ldcg(&acc[(b * 3 + 0) * n + k]);
      s_b2 += __ldcg(&acc[(b * 3 + 1) * n + k]);
      s_w3 += __ldcg(&acc[(b * 3 + 2) * n + k]);
    }
    const T a3k = fabs(w3[k]);
    grad_w2[k] = sgn(w2[k]) * a3k * inv_n * s_w2;
    grad_b2[k] = a3k * inv_n * s_b2;
    grad_w3[k] = sgn(w3[k]) * inv_n * s_w3;
  }
  T sum_gg = 0, sum_w1 = 0;
  for (int64_t i = threadIdx.x; i < B; i += kUnits) {
    T sd = 0, st = 0;
    for (int64_t b = 0; b < l.jblocks; ++b) {
      sd += __ldcg(&part_d[b * B + i]);
      st += __ldcg(&part_t[b * B + i]);
    }
    grad_t[i] = grad_gamma[i] * (a1 + T(4) * inv_n * sd) + grad_dgamma[i] * T(8) * inv_n * st;
    sum_gg += grad_gamma[i];
    sum_w1 += grad_gamma[i] * t[i] + grad_dgamma[i];
  }
  sum_gg = warp_sum(sum_gg);
  sum_w1 = warp_sum(sum_w1);
  if (lane == 0) {
    warp_d[warp] = sum_gg;
    warp_t[warp] = sum_w1;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    T s_gg = 0, s_w1 = 0;
    for (int w = 0; w < kWarps; ++w) {
      s_gg += warp_d[w];
      s_w1 += warp_t[w];
    }
    grad_b1[0] = s_gg;
    grad_w1[0] = sgn(w1[0]) * s_w1;
    *counter = 0;  // ready for the next call
  }
}

}  // namespace

template <typename T>
void nnet_forward_cuda(const T* t, const T* w1, const T* b1, const T* w2, const T* b2, const T* w3,
                       T* gamma, T* dgamma, int64_t B, int64_t n, void* stream) {
  if (B == 0) return;
  constexpr int threads = 256;  // 8 examples per block
  const int64_t blocks = (B * 32 + threads - 1) / threads;
  nnet_forward_kernel<T><<<blocks, threads, 0, static_cast<cudaStream_t>(stream)>>>(
      t, w1, b1, w2, b2, w3, gamma, dgamma, B, n);
  check_launch("vdm_fast nnet_forward_cuda");
}

int64_t nnet_backward_cuda_workspace(int64_t B, int64_t n) {
  return layout<double>(B, n).bytes;  // the larger of the two dtypes' layouts
}

template <typename T>
void nnet_backward_cuda(const T* t, const T* w1, const T* b1, const T* w2, const T* b2, const T* w3,
                        const T* grad_gamma, const T* grad_dgamma, T* grad_t, T* grad_w1, T* grad_b1,
                        T* grad_w2, T* grad_b2, T* grad_w3, int64_t B, int64_t n, void* workspace,
                        void* stream) {
  (void)b1;
  if (B == 0) return;
  const Layout l = layout<T>(B, n);
  dim3 grid(static_cast<unsigned>(l.jblocks), static_cast<unsigned>(l.iblocks));
  nnet_backward_kernel<T><<<grid, kUnits, 0, static_cast<cudaStream_t>(stream)>>>(
      t, w1, w2, b2, w3, grad_gamma, grad_dgamma, grad_t, grad_w1, grad_b1, grad_w2, grad_b2,
      grad_w3, B, n, static_cast<char*>(workspace), l);
  check_launch("vdm_fast nnet_backward_cuda");
}

#define VDM_INSTANTIATE(T)                                                                      \
  template void nnet_forward_cuda<T>(const T*, const T*, const T*, const T*, const T*, const T*, \
                                     T*, T*, int64_t, int64_t, void*);                          \
  template void nnet_backward_cuda<T>(const T*, const T*, const T*, const T*, const T*, const T*, \
                                      const T*, const T*, T*, T*, T*, T*, T*, T*, int64_t,       \
                                      int64_t, void*, void*);

VDM_INSTANTIATE(float)
VDM_INSTANTIATE(double)
#undef VDM_INSTANTIATE

}  // namespace vdm
