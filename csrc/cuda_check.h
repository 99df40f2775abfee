// The CUDA kernels' launch check, shared by the .cu files.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace vdm {

// Turns a failed launch (bad configuration, no kernel image for the card) into a C++ exception,
// which pybind11 raises in Python as RuntimeError naming the entry point.
inline void check_launch(const char* what) {
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

}  // namespace vdm
