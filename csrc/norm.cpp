// C++ CPU kernels of the fused GroupNorm (+ conditioning, + swish); math in norm.h.
#include "norm.h"
#include "parallel.h"
#include "vec_math.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace vdm {
namespace {

// Loads to and stores from the compute type. bfloat16 rounds to nearest even, and a NaN stays
// a (quiet) NaN; it is stored through its 16-bit pattern (GCC does not vectorise stores of the
// struct).
template <typename T> struct IO {
  static inline T load(T v) { return v; }
  static inline void put(T* p, int64_t i, T v) { p[i] = v; }
};
template <> struct IO<bf16> {
  static inline float load(bf16 v) {
    const uint32_t bits = uint32_t(v.bits) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
  }
  static inline void put(bf16* p, int64_t i, float f) {
    uint32_t bits;
    std::memcpy(&bits, &f, sizeof bits);
    const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
    const bool nan = (bits & 0x7fffffffu) > 0x7f800000u;
    reinterpret_cast<uint16_t*>(p)[i] = static_cast<uint16_t>(nan ? ((bits >> 16) | 0x40u) : rounded);
  }
};

template <typename A>
inline A silu_grad(A u) {
  const A s = vsigmoid(u);
  return s * (A(1) + u * (A(1) - s));
}

// The loops over one example's elements. NCHW reads a channel's run of HW values, channels_last
// a position's run of C values; per-channel constants are arrays indexed by the channel. Plain
// loops with no calls through function objects, so that GCC vectorises each (cloned per
// instruction set, VDM_CLONES).

// channels_last: sums[c] = sum_i (x[i, c] + off[c])^p, p = 1 (off unused) or 2.
template <bool SQUARE, typename T>
VDM_CLONES void channel_sums(const T* x, const double* off, int64_t C, int64_t HW, double* sums) {
  for (int64_t c = 0; c < C; ++c) sums[c] = 0;
  for (int64_t i = 0; i < HW; ++i) {
    const T* row = x + i * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const double v = IO<T>::load(row[c]);
      sums[c] += SQUARE ? (v + off[c]) * (v + off[c]) : v;
    }
  }
}

// NCHW: sum_i (x[i] + off)^p over a run of n contiguous elements (a channel, or a whole group).
template <bool SQUARE, typename T>
VDM_CLONES double run_sum(const T* x, double off, int64_t n) {
  double s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) {
    const double v = IO<T>::load(x[i]);
    s += SQUARE ? (v + off) * (v + off) : v;
  }
  return s;
}

// Elements the swish and the bfloat16 rounding run over at a time: a run of at least this many
// (whole channel runs in NCHW, whole pixel rows in channels_last), so that a small image's short
// runs (HW = 16 pixels, or 4) do not pay a vector loop's set-up for every channel.
constexpr int64_t kRun = 256;

// u = x scale + shift for the runs [r0, r1) of len contiguous elements each, into buf in their
// order: per channel along a run (channels_last), or one channel a run (NCHW).
template <bool CL, typename T, typename A>
inline void affine_runs(const T* x, const A* scale, const A* shift, int64_t len, int64_t r0, int64_t r1, A* buf) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* in = x + r * len;
    A* out = buf + (r - r0) * len;
    if constexpr (CL) {
#pragma omp simd
      for (int64_t c = 0; c < len; ++c) out[c] = IO<T>::load(in[c]) * scale[c] + shift[c];
    } else {
      const A sc = scale[r], sh = shift[r];
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) out[i] = IO<T>::load(in[i]) * sc + sh;
    }
  }
}

// y = silu(x scale[c] + shift[c]) (or without the swish), a block of runs at a time through a
// buffer of the compute type: the affine map per run, then the swish and the store over the whole
// block (GCC vectorises each as its own loop). buf holds max(kRun, HW) (NCHW) or max(kRun, C)
// (channels_last) elements.
template <bool CL, bool SILU, typename T, typename A>
VDM_CLONES void normalise(const T* x, const A* scale, const A* shift, T* y, int64_t C, int64_t HW, A* buf) {
  const int64_t runs = CL ? HW : C, len = CL ? C : HW;  // runs of len contiguous elements
  const int64_t per_block = len >= kRun ? 1 : kRun / len;
  for (int64_t r0 = 0; r0 < runs; r0 += per_block) {
    const int64_t r1 = r0 + per_block < runs ? r0 + per_block : runs;
    affine_runs<CL>(x, scale, shift, len, r0, r1, buf);
    const int64_t n = (r1 - r0) * len;
    if constexpr (SILU) {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) buf[i] = buf[i] * vsigmoid(buf[i]);
    }
    T* dst = y + r0 * len;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) IO<T>::put(dst, i, buf[i]);
  }
}

// du = dy silu'(u) (or dy), u = x scale + shift, for the runs [r0, r1) into buf, in their order:
// the affine map a run at a time, the swish's derivative over the whole block (one long loop).
template <bool CL, bool SILU, typename T, typename A>
inline void block_du(const T* x, const T* dy, const A* scale, const A* shift, int64_t len, int64_t r0, int64_t r1,
                     A* buf) {
  if constexpr (SILU) affine_runs<CL>(x, scale, shift, len, r0, r1, buf);
  const T* d = dy + r0 * len;
  const int64_t n = (r1 - r0) * len;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) buf[i] = SILU ? IO<T>::load(d[i]) * silu_grad(buf[i]) : IO<T>::load(d[i]);
}

// s1[c] = sum_i du, s2[c] = sum_i du xhat, with xhat = x xa + xb; du a block of runs at a time
// (block_du; buf as normalise's).
template <bool CL, bool SILU, typename T, typename A>
VDM_CLONES void grad_sums(const T* x, const T* dy, const A* scale, const A* shift, const A* xa, const A* xb,
                          int64_t C, int64_t HW, double* s1, double* s2, A* buf) {
  const int64_t runs = CL ? HW : C, len = CL ? C : HW;
  const int64_t per_block = len >= kRun ? 1 : kRun / len;
  if constexpr (CL)
    for (int64_t c = 0; c < C; ++c) s1[c] = s2[c] = 0;
  for (int64_t r0 = 0; r0 < runs; r0 += per_block) {
    const int64_t r1 = r0 + per_block < runs ? r0 + per_block : runs;
    block_du<CL, SILU>(x, dy, scale, shift, len, r0, r1, buf);
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * len;
      const A* du = buf + (r - r0) * len;
      if constexpr (CL) {
#pragma omp simd
        for (int64_t c = 0; c < len; ++c) {
          s1[c] += double(du[c]);
          s2[c] += double(du[c] * (IO<T>::load(xr[c]) * xa[c] + xb[c]));
        }
      } else {
        const A a = xa[r], b = xb[r];
        double t1 = 0, t2 = 0;
#pragma omp simd reduction(+ : t1, t2)
        for (int64_t i = 0; i < len; ++i) {
          t1 += double(du[i]);
          t2 += double(du[i] * (IO<T>::load(xr[i]) * a + b));
        }
        s1[r] = t1;
        s2[r] = t2;
      }
    }
  }
}

// dx = du k1[c] + k0[c] + xhat kx[c]; sums[c] = sum_i dx (before rounding to T); du as in grad_sums.
template <bool CL, bool SILU, typename T, typename A>
VDM_CLONES void input_grad(const T* x, const T* dy, const A* scale, const A* shift, const A* xa, const A* xb,
                           const A* k1, const A* k0, const A* kx, T* dx, int64_t C, int64_t HW, double* sums, A* buf) {
  const int64_t runs = CL ? HW : C, len = CL ? C : HW;
  const int64_t per_block = len >= kRun ? 1 : kRun / len;
  if constexpr (CL)
    for (int64_t c = 0; c < C; ++c) sums[c] = 0;
  for (int64_t r0 = 0; r0 < runs; r0 += per_block) {
    const int64_t r1 = r0 + per_block < runs ? r0 + per_block : runs;
    block_du<CL, SILU>(x, dy, scale, shift, len, r0, r1, buf);
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * len;
      T* dxr = dx + r * len;
      const A* du = buf + (r - r0) * len;
      if constexpr (CL) {
#pragma omp simd
        for (int64_t c = 0; c < len; ++c) {
          const A g = du[c] * k1[c] + k0[c] + (IO<T>::load(xr[c]) * xa[c] + xb[c]) * kx[c];
          IO<T>::put(dxr, c, g);
          sums[c] += double(g);
        }
      } else {
        const A a = xa[r], b = xb[r], q1 = k1[r], q0 = k0[r], qx = kx[r];
        double t = 0;
#pragma omp simd reduction(+ : t)
        for (int64_t i = 0; i < len; ++i) {
          const A g = du[i] * q1 + q0 + (IO<T>::load(xr[i]) * a + b) * qx;
          IO<T>::put(dxr, i, g);
          t += double(g);
        }
        sums[r] = t;
      }
    }
  }
}

template <bool CL, typename T>
void forward_example(const T* x, const T* cond, const compute_t<T>* w, const compute_t<T>* b, T* y,
                     compute_t<T>* mean, compute_t<T>* rstd, int64_t C, int64_t HW, int64_t G, double eps,
                     bool silu) {
  using A = compute_t<T>;
  const int64_t cpg = C / G;
  const double inv_n = 1.0 / (double(cpg) * double(HW));  // a multiply per group, not a division
  std::vector<double> sums(C), offset(C);
  std::vector<A> scale(C), shift(C);
  auto cond_of = [&](int64_t c) { return cond ? double(IO<T>::load(cond[c])) : 0.0; };
  // Per group: the mean over x + cond (first pass), then the centred sum of squares (second).
  // NCHW holds a group's channels as one run: its sums are one loop over the run (per channel
  // only for the centred squares under conditioning, whose offset differs by channel).
  if constexpr (CL) channel_sums<false>(x, offset.data(), C, HW, sums.data());
  for (int64_t g = 0; g < G; ++g) {
    double s = 0;
    if constexpr (CL) {
      for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) s += sums[c];
    } else {
      s = run_sum<false>(x + g * cpg * HW, 0.0, cpg * HW);
    }
    for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) s += double(HW) * cond_of(c);
    const double m = s * inv_n;
    for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) offset[c] = cond_of(c) - m;
    mean[g] = A(m);
  }
  if constexpr (CL) channel_sums<true>(x, offset.data(), C, HW, sums.data());
  for (int64_t g = 0; g < G; ++g) {
    double s = 0;
    if constexpr (CL) {
      for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) s += sums[c];
    } else if (cond) {
      for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) s += run_sum<true>(x + c * HW, offset[c], HW);
    } else {
      s = run_sum<true>(x + g * cpg * HW, offset[g * cpg], cpg * HW);
    }
    const double r = 1.0 / std::sqrt(s * inv_n + eps);
    rstd[g] = A(r);
    for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) {
      scale[c] = A(r * double(w[c]));
      shift[c] = A(double(b[c]) + offset[c] * r * double(w[c]));
    }
  }
  std::vector<A> buf(std::max<int64_t>(kRun, CL ? C : HW));
  if (silu)
    normalise<CL, true>(x, scale.data(), shift.data(), y, C, HW, buf.data());
  else
    normalise<CL, false>(x, scale.data(), shift.data(), y, C, HW, buf.data());
}

template <bool CL, typename T>
void backward_example(const T* dy, const T* x, const T* cond, const compute_t<T>* w, const compute_t<T>* b,
                      const compute_t<T>* mean, const compute_t<T>* rstd, T* dx, double* dw, double* db,
                      T* dcond, int64_t C, int64_t HW, int64_t G, bool silu) {
  using A = compute_t<T>;
  const int64_t cpg = C / G;
  const double n = double(cpg) * double(HW);
  std::vector<A> scale(C), shift(C), xa(C), xb(C), k1(C), k0(C), kx(C);
  for (int64_t c = 0; c < C; ++c) {
    const int64_t g = c / cpg;
    const double r = rstd[g], o = (cond ? double(IO<T>::load(cond[c])) : 0.0) - double(mean[g]);
    xa[c] = A(r);  // xhat = x xa + xb
    xb[c] = A(o * r);
    scale[c] = A(r * double(w[c]));  // u = x scale + shift
    shift[c] = A(double(b[c]) + o * r * double(w[c]));
  }
  std::vector<A> buf(std::max<int64_t>(kRun, CL ? C : HW));
  if (silu)
    grad_sums<CL, true>(x, dy, scale.data(), shift.data(), xa.data(), xb.data(), C, HW, db, dw, buf.data());
  else
    grad_sums<CL, false>(x, dy, scale.data(), shift.data(), xa.data(), xb.data(), C, HW, db, dw, buf.data());
  for (int64_t g = 0; g < G; ++g) {
    double a = 0, bb = 0;
    for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) {
      a += double(w[c]) * db[c];
      bb += double(w[c]) * dw[c];
    }
    const double r = rstd[g];
    const A ka = A(-r * a / n), kb = A(-r * bb / n);  // once per group: two divisions, not two per channel
    for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) {
      k1[c] = A(r * double(w[c]));  // dx = du k1 + k0 + xhat kx
      k0[c] = ka;
      kx[c] = kb;
    }
  }
  std::vector<double> sums(C);  // sum_hw dv: the conditioning's gradient
  if (silu)
    input_grad<CL, true>(x, dy, scale.data(), shift.data(), xa.data(), xb.data(), k1.data(), k0.data(), kx.data(),
                         dx, C, HW, sums.data(), buf.data());
  else
    input_grad<CL, false>(x, dy, scale.data(), shift.data(), xa.data(), xb.data(), k1.data(), k0.data(), kx.data(),
                          dx, C, HW, sums.data(), buf.data());
  if (dcond)
    for (int64_t c = 0; c < C; ++c) IO<T>::put(dcond, c, A(sums[c]));
}

}  // namespace

template <typename T>
void group_norm_forward_cpu(const T* x, const T* cond, const compute_t<T>* w, const compute_t<T>* b, T* y,
                            compute_t<T>* mean, compute_t<T>* rstd, int64_t B, int64_t C, int64_t HW,
                            int64_t G, double eps, bool silu, bool channels_last) {
  const int64_t D = C * HW;
  parallel_for(B, B * D, [&](int64_t e) {
    const T* ce = cond ? cond + e * C : nullptr;
    if (channels_last)
      forward_example<true>(x + e * D, ce, w, b, y + e * D, mean + e * G, rstd + e * G, C, HW, G, eps, silu);
    else
      forward_example<false>(x + e * D, ce, w, b, y + e * D, mean + e * G, rstd + e * G, C, HW, G, eps, silu);
  });
}

template <typename T>
void group_norm_backward_cpu(const T* dy, const T* x, const T* cond, const compute_t<T>* w,
                             const compute_t<T>* b, const compute_t<T>* mean, const compute_t<T>* rstd, T* dx,
                             compute_t<T>* dw, compute_t<T>* db, T* dcond, int64_t B, int64_t C, int64_t HW,
                             int64_t G, bool silu, bool channels_last) {
  const int64_t D = C * HW;
  std::vector<double> pw(B * C), pb(B * C);  // per-example partials of dw, db
  parallel_for(B, B * D, [&](int64_t e) {
    const T* ce = cond ? cond + e * C : nullptr;
    T* dce = dcond ? dcond + e * C : nullptr;
    if (channels_last)
      backward_example<true>(dy + e * D, x + e * D, ce, w, b, mean + e * G, rstd + e * G, dx + e * D,
                             pw.data() + e * C, pb.data() + e * C, dce, C, HW, G, silu);
    else
      backward_example<false>(dy + e * D, x + e * D, ce, w, b, mean + e * G, rstd + e * G, dx + e * D,
                              pw.data() + e * C, pb.data() + e * C, dce, C, HW, G, silu);
  });
  for (int64_t c = 0; c < C; ++c) {
    double sw = 0, sb = 0;
    for (int64_t e = 0; e < B; ++e) {
      sw += pw[e * C + c];
      sb += pb[e * C + c];
    }
    dw[c] = compute_t<T>(sw);
    db[c] = compute_t<T>(sb);
  }
}

#define VDM_NORM_INSTANTIATE(T)                                                                              \
  template void group_norm_forward_cpu<T>(const T*, const T*, const compute_t<T>*, const compute_t<T>*, T*,   \
                                          compute_t<T>*, compute_t<T>*, int64_t, int64_t, int64_t, int64_t,   \
                                          double, bool, bool);                                               \
  template void group_norm_backward_cpu<T>(const T*, const T*, const T*, const compute_t<T>*,                 \
                                           const compute_t<T>*, const compute_t<T>*, const compute_t<T>*, T*, \
                                           compute_t<T>*, compute_t<T>*, T*, int64_t, int64_t, int64_t,       \
                                           int64_t, bool, bool);
VDM_NORM_INSTANTIATE(float)
VDM_NORM_INSTANTIATE(double)
VDM_NORM_INSTANTIATE(bf16)

}  // namespace vdm
