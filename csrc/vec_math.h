// exp and sigmoid written so that GCC vectorises the loops that call them (glibc's expf is a
// scalar call unless the whole build uses -ffast-math, which would also break NaN checks; the
// build's -fno-trapping-math is what lets the clamps below be if-converted).
// Cody-Waite range reduction x = k ln2 + r, |r| <= ln2/2 (k rounded to nearest), then a Taylor polynomial for e^r:
// degree 6 for float (error < 2e-7 relative), degree 12 for double (< 2e-16), and 2^k built
// from its exponent bits. Inputs are clamped to the finite range, so the result never
// overflows to inf or NaN for finite x.
#pragma once

#include <cstdint>
#include <cstring>

// Loops that call these functions are cloned for AVX-512 (x86-64-v4: with AVX512BW, without
// which GCC keeps bfloat16's 16-bit loads and stores scalar) and AVX2 (x86-64-v3) with a
// run-time pick, so one build is fast on current x86 CPUs and still runs on any.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define VDM_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define VDM_CLONES
#endif

namespace vdm {

template <typename T> struct VecExp;

template <> struct VecExp<float> {
  static inline float exp(float x) {
    // Two plain selects: GCC vectorises these (std::min/max or a nested ?: it does not).
    x = x < 88.0f ? x : 88.0f;
    x = x > -87.0f ? x : -87.0f;
    // Round to nearest by adding and subtracting 1.5 * 2^23 (no floor: SSE2 has no vector one).
    const float k = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    const float r = (x - k * 0.693145751953125f) - k * 1.428606765330187e-06f;
    float p = 1.0f / 720;
    p = p * r + 1.0f / 120;
    p = p * r + 1.0f / 24;
    p = p * r + 1.0f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, sizeof scale);
    return p * scale;
  }
};

template <> struct VecExp<double> {
  static inline double exp(double x) {
    x = x < 709.0 ? x : 709.0;
    x = x > -708.0 ? x : -708.0;
    const double k = (x * 1.4426950408889634074 + 6755399441055744.0) - 6755399441055744.0;
    const double r = (x - k * 6.93147180369123816490e-01) - k * 1.90821492927058770002e-10;
    double p = 1.0 / 479001600;  // 1/12!
    p = p * r + 1.0 / 39916800;
    p = p * r + 1.0 / 3628800;
    p = p * r + 1.0 / 362880;
    p = p * r + 1.0 / 40320;
    p = p * r + 1.0 / 5040;
    p = p * r + 1.0 / 720;
    p = p * r + 1.0 / 120;
    p = p * r + 1.0 / 24;
    p = p * r + 1.0 / 6;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    // 2^k from its exponent bits without a double -> int64 conversion (no vector form below
    // AVX-512DQ, so it would keep the loop scalar): adding 2^52 puts k + 1023 in the low
    // mantissa bits, and the shift moves it into the exponent field.
    const double biased = k + (1023.0 + 4503599627370496.0);
    int64_t bits;
    std::memcpy(&bits, &biased, sizeof bits);
    bits <<= 52;
    double scale;
    std::memcpy(&scale, &bits, sizeof scale);
    return p * scale;
  }
};

template <typename T>
inline T vsigmoid(T x) {
  return T(1) / (T(1) + VecExp<T>::exp(-x));
}

}  // namespace vdm
