// pybind11 module vdm_fast._C. Kernels take raw addresses (tensor.data_ptr()) of contiguous
// tensors and, for CUDA, the stream handle: the module never links against torch, so one build
// serves every torch version. The Python ops (vdm_fast/ops) validate inputs before calling in.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <type_traits>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "loss.h"

namespace py = pybind11;

namespace {

using Addr = std::uintptr_t;

template <typename T>
T* ptr(Addr p) {
  return reinterpret_cast<T*>(p);
}

// Calls f with a null T* for the latents' dtype, "float32" or "float64", so f can name T.
template <typename F>
void with_dtype(const std::string& dtype, F&& f) {
  if (dtype == "float64")
    f(static_cast<double*>(nullptr));
  else if (dtype == "float32")
    f(static_cast<float*>(nullptr));
  else
    throw std::invalid_argument("vdm_fast._C: dtype must be 'float32' or 'float64', got " + dtype);
}

#define VDM_T std::remove_pointer_t<decltype(tag)>

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

  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("recon_forward_cpu", [](Addr x, vdm::XType xt, Addr eps, Addr gamma, Addr out, int64_t B,
                                int64_t D, int vocab, const std::string& dtype) {
    with_dtype(dtype, [&](auto* tag) {
      using T = VDM_T;
      vdm::recon_forward_cpu<T>(ptr<void>(x), xt, ptr<T>(eps), ptr<T>(gamma), ptr<T>(out), B, D, vocab);
    });
  }, nogil);
  m.def("recon_backward_cpu", [](Addr x, vdm::XType xt, Addr eps, Addr gamma, Addr grad,
                                 Addr grad_eps, Addr grad_gamma, int64_t B, int64_t D, int vocab,
                                 const std::string& dtype) {
    with_dtype(dtype, [&](auto* tag) {
      using T = VDM_T;
      vdm::recon_backward_cpu<T>(ptr<void>(x), xt, ptr<T>(eps), ptr<T>(gamma), ptr<T>(grad),
                                 ptr<T>(grad_eps), ptr<T>(grad_gamma), B, D, vocab);
    });
  }, nogil);
  m.def("diffuse_forward_cpu", [](Addr f, Addr eps, Addr gamma, Addr z, int64_t B, int64_t D,
                                  const std::string& dtype) {
    with_dtype(dtype, [&](auto* tag) {
      using T = VDM_T;
      vdm::diffuse_forward_cpu<T>(ptr<T>(f), ptr<T>(eps), ptr<T>(gamma), ptr<T>(z), B, D);
    });
  }, nogil);
  m.def("diffuse_backward_cpu", [](Addr grad, Addr f, Addr eps, Addr gamma, Addr grad_f,
                                   Addr grad_eps, Addr grad_gamma, int64_t B, int64_t D,
                                   const std::string& dtype) {
    with_dtype(dtype, [&](auto* tag) {
      using T = VDM_T;
      vdm::diffuse_backward_cpu<T>(ptr<T>(grad), ptr<T>(f), ptr<T>(eps), ptr<T>(gamma),
                                   ptr<T>(grad_f), ptr<T>(grad_eps), ptr<T>(grad_gamma), B, D);
    });
  }, nogil);
  // y == 0 (a null address) means "no y": the sum of squares of x.
  m.def("sse_forward_cpu", [](Addr x, Addr y, Addr out, int64_t B, int64_t D,
                              const std::string& dtype) {
    with_dtype(dtype, [&](auto* tag) {
      using T = VDM_T;
      vdm::sse_forward_cpu<T>(ptr<T>(x), ptr<T>(y), ptr<T>(out), B, D);
    });
  }, nogil);
  m.def("sse_backward_cpu", [](Addr grad, Addr x, Addr y, Addr grad_x, int64_t B, int64_t D,
                               const std::string& dtype) {
    with_dtype(dtype, [&](auto* tag) {
      using T = VDM_T;
      vdm::sse_backward_cpu<T>(ptr<T>(grad), ptr<T>(x), ptr<T>(y), ptr<T>(grad_x), B, D);
    });
  }, nogil);

#ifdef VDM_FAST_WITH_CUDA
  m.def("recon_forward_cuda", [](Addr x, vdm::XType xt, Addr eps, Addr gamma, Addr out, int64_t B,
                                 int64_t D, int vocab, const std::string& dtype, Addr stream) {
    with_dtype(dtype, [&](auto* tag) {
      using T = VDM_T;
      vdm::recon_forward_cuda<T>(ptr<void>(x), xt, ptr<T>(eps), ptr<T>(gamma), ptr<T>(out), B, D,
                                 vocab, ptr<void>(stream));
    });
  }, nogil);
  m.def("recon_backward_cuda", [](Addr x, vdm::XType xt, Addr eps, Addr gamma, Addr grad,
                                  Addr grad_eps, Addr grad_gamma, int64_t B, int64_t D, int vocab,
                                  const std::string& dtype, Addr stream) {
    with_dtype(dtype, [&](auto* tag) {
      using T = VDM_T;
      vdm::recon_backward_cuda<T>(ptr<void>(x), xt, ptr<T>(eps), ptr<T>(gamma), ptr<T>(grad),
                                  ptr<T>(grad_eps), ptr<T>(grad_gamma), B, D, vocab,
                                  ptr<void>(stream));
    });
  }, nogil);
#endif
}
