// pybind11 module vdm_fast._C: the C++ CPU kernels. They take raw addresses (tensor.data_ptr())
// of contiguous tensors: the module never links against torch, so one build serves every torch
// version. The Python ops (vdm_fast/ops) validate inputs before calling in.
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "loss.h"
#include "norm.h"
#include "schedule.h"

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

// The GroupNorm's storage dtypes: also "bfloat16" (its weights and statistics are float32).
template <typename F>
void with_norm_dtype(const std::string& dtype, F&& f) {
  if (dtype == "bfloat16")
    f(static_cast<vdm::bf16*>(nullptr));
  else
    with_dtype(dtype, f);
}

template <typename T>
const T* optional(Addr p) {
  return p ? reinterpret_cast<const T*>(p) : nullptr;
}

py::dict build_info() {
  py::dict info;
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
  m.doc() = "vdm_fast compiled CPU kernels (C++/OpenMP)";
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
  // A null address (0) for y, a, w or c means that term or coefficient is absent (see loss.h).
  m.def("sse_forward_cpu", [](Addr x, Addr y, Addr a, Addr w, Addr c, Addr out, int64_t B,
                              int64_t D, const std::string& dtype) {
    with_dtype(dtype, [&](auto* tag) {
      using T = VDM_T;
      vdm::sse_forward_cpu<T>(ptr<T>(x), ptr<T>(y), ptr<T>(a), ptr<T>(w), ptr<T>(c), ptr<T>(out), B, D);
    });
  }, nogil);
  m.def("sse_backward_cpu", [](Addr grad, Addr x, Addr y, Addr a, Addr w, Addr c, Addr grad_x,
                               Addr grad_a, Addr grad_c, int64_t B, int64_t D,
                               const std::string& dtype) {
    with_dtype(dtype, [&](auto* tag) {
      using T = VDM_T;
      vdm::sse_backward_cpu<T>(ptr<T>(grad), ptr<T>(x), ptr<T>(y), ptr<T>(a), ptr<T>(w), ptr<T>(c),
                               ptr<T>(grad_x), ptr<T>(grad_a), ptr<T>(grad_c), B, D);
    });
  }, nogil);
  // Returns (min t, max t), NaN if any t is: the op's range check, read in the same call
  // instead of a reduction and two host reads of its own.
  m.def("nnet_forward_cpu", [](Addr t, Addr w1, Addr b1, Addr w2, Addr b2, Addr w3, Addr gamma,
                               Addr dgamma, int64_t B, int64_t n, const std::string& dtype) {
    std::pair<double, double> range;
    with_dtype(dtype, [&](auto* tag) {
      using T = VDM_T;
      const T* times = ptr<T>(t);
      double lo = INFINITY, hi = -INFINITY;
      bool nan = false;
      for (int64_t i = 0; i < B; ++i) {
        const double v = times[i];
        nan |= std::isnan(v);
        lo = v < lo ? v : lo;
        hi = v > hi ? v : hi;
      }
      range = nan ? std::make_pair(double(NAN), double(NAN)) : std::make_pair(lo, hi);
      vdm::nnet_forward_cpu<T>(times, ptr<T>(w1), ptr<T>(b1), ptr<T>(w2), ptr<T>(b2), ptr<T>(w3),
                               ptr<T>(gamma), ptr<T>(dgamma), B, n);
    });
    return range;
  }, nogil);
  m.def("nnet_backward_cpu", [](Addr t, Addr w1, Addr b1, Addr w2, Addr b2, Addr w3, Addr gg,
                                Addr gd, Addr gt, Addr gw1, Addr gb1, Addr gw2, Addr gb2, Addr gw3,
                                int64_t B, int64_t n, const std::string& dtype) {
    with_dtype(dtype, [&](auto* tag) {
      using T = VDM_T;
      vdm::nnet_backward_cpu<T>(ptr<T>(t), ptr<T>(w1), ptr<T>(b1), ptr<T>(w2), ptr<T>(b2), ptr<T>(w3),
                                ptr<T>(gg), ptr<T>(gd), ptr<T>(gt), ptr<T>(gw1), ptr<T>(gb1),
                                ptr<T>(gw2), ptr<T>(gb2), ptr<T>(gw3), B, n);
    });
  }, nogil);
  // cond (and dcond) 0 without conditioning; w, b, mean, rstd, dw, db in float32 (float64 for
  // float64 x).
  m.def("group_norm_forward_cpu", [](Addr x, Addr cond, Addr w, Addr b, Addr y, Addr mean, Addr rstd,
                                     int64_t B, int64_t C, int64_t HW, int64_t G, double eps, bool silu,
                                     bool channels_last, const std::string& dtype) {
    with_norm_dtype(dtype, [&](auto* tag) {
      using T = VDM_T;
      using A = vdm::compute_t<T>;
      vdm::group_norm_forward_cpu<T>(ptr<T>(x), optional<T>(cond), ptr<A>(w), ptr<A>(b), ptr<T>(y), ptr<A>(mean),
                                     ptr<A>(rstd), B, C, HW, G, eps, silu, channels_last);
    });
  }, nogil);
  m.def("group_norm_backward_cpu", [](Addr dy, Addr x, Addr cond, Addr w, Addr b, Addr mean, Addr rstd,
                                      Addr dx, Addr dw, Addr db, Addr dcond, int64_t B, int64_t C,
                                      int64_t HW, int64_t G, bool silu, bool channels_last,
                                      const std::string& dtype) {
    with_norm_dtype(dtype, [&](auto* tag) {
      using T = VDM_T;
      using A = vdm::compute_t<T>;
      vdm::group_norm_backward_cpu<T>(ptr<T>(dy), ptr<T>(x), optional<T>(cond), ptr<A>(w), ptr<A>(b),
                                      ptr<A>(mean), ptr<A>(rstd), ptr<T>(dx), ptr<A>(dw), ptr<A>(db),
                                      dcond ? ptr<T>(dcond) : nullptr, B, C, HW, G, silu, channels_last);
    });
  }, nogil);
}
