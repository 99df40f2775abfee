// When a kernel's loop over examples (or chunks) runs on OpenMP's threads.
#pragma once

#include <cstdint>

namespace vdm {

// Work, in elements, below which a kernel's loop runs on the calling thread alone: an OpenMP
// parallel region (even one whose if clause is false still builds a team) costs more than its
// threads save on a small tensor (the grain torch's own CPU kernels use,
// at::internal::GRAIN_SIZE). Results do not depend on it: every kernel's items are independent
// and reduced in a fixed order.
constexpr int64_t kParallelGrain = 32768;

// body(i) for i in [0, n): on OpenMP's threads (static schedule) when work >= kParallelGrain,
// else a plain loop on the calling thread, with no OpenMP call at all.
template <typename F>
inline void parallel_for(int64_t n, int64_t work, const F& body) {
  if (work >= kParallelGrain) {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; ++i) body(i);
  } else {
    for (int64_t i = 0; i < n; ++i) body(i);
  }
}

// The same with a dynamic schedule, one item at a time: for items of uneven cost.
template <typename F>
inline void parallel_for_dynamic(int64_t n, int64_t work, const F& body) {
  if (work >= kParallelGrain) {
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t i = 0; i < n; ++i) body(i);
  } else {
    for (int64_t i = 0; i < n; ++i) body(i);
  }
}

}  // namespace vdm
