// pybind11 module vdm_fast._C. Kernels take raw addresses (tensor.data_ptr()) of contiguous
// tensors and, for CUDA, the stream handle: the module never links against torch, so one build
// serves every torch version. The Python ops (vdm_fast/ops) validate inputs before calling in.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "loss.h"

namespace py = pybind11;

namespace {

template <typename T>
T* ptr(std::uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

// The latents' dtype: "float32" or "float64".
bool is_double(const std::string& dtype) {
  if (dtype == "float64") return true;
  if (dtype == "float32") return false;
  throw std::invalid_argument("vdm_fast._C: dtype must be 'float32' or 'float64', got " + dtype);
}

py::dict build_info() {
  py::dict info;
#ifdef VDM_FAST_WITH_CUDA
  info["cuda"] = true;
  info["cuda_version"] = VDM_FAST_CUDA_VERSION;
  info["cuda_archs"] = VDM_FAST_CUDA_ARCHS;
#else
  info["cuda"] = false;
  info["cuda_version"] = py::none();
  info["cuda_archs"] = py::none();
#endif
#ifdef _OPENMP
  info["openmp"] = true;
  info["openmp_max_threads"] = omp_get_max_threads();
#else
  info["openmp"] = false;
  info["openmp_max_threads"] = 1;
#endif
  info["compiler"] = __VERSION__;
  info["cplusplus"] = static_cast<long>(__cplusplus);
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "vdm_fast compiled kernels (C++ CPU, and CUDA where built)";
  m.def("build_info", &build_info, "What this module was built with.");

  py::enum_<vdm::XType>(m, "XType")
      .value("uint8", vdm::XType::kUInt8)
      .value("int32", vdm::XType::kInt32)
      .value("int64", vdm::XType::kInt64)
      .value("float32", vdm::XType::kFloat32)
      .value("float64", vdm::XType::kFloat64);

  m.def(
      "recon_forward_cpu",
      [](std::uintptr_t x, vdm::XType xt, std::uintptr_t eps, std::uintptr_t gamma,
         std::uintptr_t out, int64_t B, int64_t D, int vocab, const std::string& dtype) {
        if (is_double(dtype))
          vdm::recon_forward_cpu<double>(ptr<void>(x), xt, ptr<double>(eps), ptr<double>(gamma),
                                         ptr<double>(out), B, D, vocab);
        else
          vdm::recon_forward_cpu<float>(ptr<void>(x), xt, ptr<float>(eps), ptr<float>(gamma),
                                        ptr<float>(out), B, D, vocab);
      },
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "recon_backward_cpu",
      [](std::uintptr_t x, vdm::XType xt, std::uintptr_t eps, std::uintptr_t gamma,
         std::uintptr_t grad_out, std::uintptr_t grad_eps, std::uintptr_t grad_gamma, int64_t B,
         int64_t D, int vocab, const std::string& dtype) {
        if (is_double(dtype))
          vdm::recon_backward_cpu<double>(ptr<void>(x), xt, ptr<double>(eps), ptr<double>(gamma),
                                          ptr<double>(grad_out), ptr<double>(grad_eps),
                                          ptr<double>(grad_gamma), B, D, vocab);
        else
          vdm::recon_backward_cpu<float>(ptr<void>(x), xt, ptr<float>(eps), ptr<float>(gamma),
                                         ptr<float>(grad_out), ptr<float>(grad_eps),
                                         ptr<float>(grad_gamma), B, D, vocab);
      },
      py::call_guard<py::gil_scoped_release>());

#ifdef VDM_FAST_WITH_CUDA
  m.def(
      "recon_forward_cuda",
      [](std::uintptr_t x, vdm::XType xt, std::uintptr_t eps, std::uintptr_t gamma,
         std::uintptr_t out, int64_t B, int64_t D, int vocab, const std::string& dtype,
         std::uintptr_t stream) {
        if (is_double(dtype))
          vdm::recon_forward_cuda<double>(ptr<void>(x), xt, ptr<double>(eps), ptr<double>(gamma),
                                          ptr<double>(out), B, D, vocab, ptr<void>(stream));
        else
          vdm::recon_forward_cuda<float>(ptr<void>(x), xt, ptr<float>(eps), ptr<float>(gamma),
                                         ptr<float>(out), B, D, vocab, ptr<void>(stream));
      },
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "recon_backward_cuda",
      [](std::uintptr_t x, vdm::XType xt, std::uintptr_t eps, std::uintptr_t gamma,
         std::uintptr_t grad_out, std::uintptr_t grad_eps, std::uintptr_t grad_gamma, int64_t B,
         int64_t D, int vocab, const std::string& dtype, std::uintptr_t stream) {
        if (is_double(dtype))
          vdm::recon_backward_cuda<double>(ptr<void>(x), xt, ptr<double>(eps), ptr<double>(gamma),
                                           ptr<double>(grad_out), ptr<double>(grad_eps),
                                           ptr<double>(grad_gamma), B, D, vocab,
                                           ptr<void>(stream));
        else
          vdm::recon_backward_cuda<float>(ptr<void>(x), xt, ptr<float>(eps), ptr<float>(gamma),
                                          ptr<float>(grad_out), ptr<float>(grad_eps),
                                          ptr<float>(grad_gamma), B, D, vocab, ptr<void>(stream));
      },
      py::call_guard<py::gil_scoped_release>());
#endif
}
