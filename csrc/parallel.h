// When a kernel's loop over examples (or chunks) runs on OpenMP's threads.
#pragma once

#include <cstdint>

namespace vdm {

// Work, in elements, below which a kernel's loop runs on the calling thread alone: entering an
// OpenMP parallel region costs microseconds, more than its threads save on a small tensor (the
// grain torch's own CPU kernels use, at::internal::GRAIN_SIZE). Results do not depend on it:
// every kernel's items are independent and reduced in a fixed order.
constexpr int64_t kParallelGrain = 32768;

}  // namespace vdm
