#include "coupling.h"

#include <cmath>

namespace lineflow {

#define LF_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define LF_INLINE static inline __attribute__((always_inline))

// ---- element-wise maths, branch-free so that the loops vectorise ----------------------------------------
LF_INLINE float bits_to_float(uint32_t u) { return __builtin_bit_cast(float, u); }
LF_INLINE uint32_t float_to_bits(float f) { return __builtin_bit_cast(uint32_t, f); }
LF_INLINE float load(const float* p, int64_t i) { return p[i]; }
LF_INLINE float load(const uint16_t* p, int64_t i) { return bits_to_float(static_cast<uint32_t>(p[i]) << 16); }
LF_INLINE void store(float* p, int64_t i, float v) { p[i] = v; }
LF_INLINE void store(uint16_t* p, int64_t i, float v) {  // float -> bf16, round to nearest even (NaN stays NaN)
  const uint32_t u = float_to_bits(v);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  p[i] = static_cast<uint16_t>(v != v ? 0x7FC0u : rounded);
}

// exp on [-87, 88] (Cephes' expf: 2^n * e^r, |r| <= ln2 / 2, degree-6 polynomial; relative error ~1e-7)
LF_INLINE float fast_exp(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);  // (not fmin / fmax: those stay scalar calls)
  const float n = (x * 1.44269504f + 12582912.0f) - 12582912.0f;  // round to nearest (1.5 * 2^23)
  const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return p * bits_to_float(static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23);
}

// clamp * factor * atan(a), a = x / clamp, with the shared polynomial (kernels.reference.poly_atan; `c`: its
// coefficients, copied to the caller's locals so that the loop holds them in registers); the slope in x is
// factor / (1 + a^2)
LF_INLINE float soft_clamp(float a, const float (&c)[8], float scale) {
  const float ax = std::fabs(a);
  const bool big = ax > 1.0f;
  const float r = big ? 1.0f / (big ? ax : 1.0f) : ax;
  const float u = r * r;
  const float p = ((((((c[0] * u + c[1]) * u + c[2]) * u + c[3]) * u + c[4]) * u + c[5]) * u + c[6]) * u + c[7];
  float at = r * p;
  at = big ? 1.57079632679f - at : at;
  return scale * std::copysign(at, a);
}

#define LF_SOFT_CLAMP_LOCALS                                                         \
  const float inv_clamp = 1.0f / sc.clamp, scale = sc.clamp * sc.factor, factor = sc.factor; \
  float c[8];                                                                        \
  for (int k = 0; k < 8; ++k) c[k] = sc.atan_coeffs[k];

// ---- rows -----------------------------------------------------------------------------------------------
template <typename H>
LF_INLINE float coupling_row(const float* __restrict x2, const H* __restrict s_raw, const H* __restrict t,
                             const SoftClamp& sc, float eg, float b, float* __restrict u, int64_t n) {
  float s_sum = 0.0f;
  LF_SOFT_CLAMP_LOCALS
#pragma omp simd reduction(+ : s_sum)
  for (int64_t i = 0; i < n; ++i) {
    const float s = soft_clamp(load(s_raw, i) * inv_clamp, c, scale);
    s_sum += s;
    u[i] = (x2[i] * fast_exp(s) + load(t, i)) * eg + b;
  }
  return s_sum;
}

template <typename H>
LF_INLINE void coupling_row_backward(const float* __restrict du, const float* __restrict x2, const H* __restrict s_raw,
                                     const H* __restrict t, const SoftClamp& sc, float eg, float dlogdet,
                                     float* __restrict dx2, H* __restrict ds_raw, H* __restrict dt, int64_t n,
                                     float* sums) {
  float duv = 0.0f, dus = 0.0f;
  LF_SOFT_CLAMP_LOCALS
#pragma omp simd reduction(+ : duv, dus)
  for (int64_t i = 0; i < n; ++i) {
    const float a = load(s_raw, i) * inv_clamp;
    const float s = soft_clamp(a, c, scale), slope = factor / (1.0f + a * a);
    const float es = fast_exp(s), x = x2[i], g = du[i];
    const float y2 = x * es + load(t, i);
    const float dv = g * eg;  // d loss / d y2
    duv += g * y2;
    dus += g;
    dx2[i] = dv * es;
    store(dt, i, dv);
    store(ds_raw, i, (dv * x * es + dlogdet) * slope);
  }
  sums[0] = duv;
  sums[1] = dus;
}

LF_CLONES void coupling_identity_row(const float* __restrict x, float eg, float b, float* __restrict u, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) u[i] = x[i] * eg + b;
}

LF_CLONES float coupling_row_f32(const float* x2, const float* s_raw, const float* t, const SoftClamp& sc, float eg,
                                 float b, float* u, int64_t n) {
  return coupling_row(x2, s_raw, t, sc, eg, b, u, n);
}

LF_CLONES float coupling_row_bf16(const float* x2, const uint16_t* s_raw, const uint16_t* t, const SoftClamp& sc,
                                  float eg, float b, float* u, int64_t n) {
  return coupling_row(x2, s_raw, t, sc, eg, b, u, n);
}

LF_CLONES void coupling_identity_row_backward(const float* __restrict du, const float* __restrict x, float eg,
                                              float* __restrict dx, int64_t n, float* sums) {
  float dux = 0.0f, dus = 0.0f;
#pragma omp simd reduction(+ : dux, dus)
  for (int64_t i = 0; i < n; ++i) {
    dux += du[i] * x[i];
    dus += du[i];
    dx[i] = du[i] * eg;
  }
  sums[0] = dux;
  sums[1] = dus;
}

LF_CLONES void coupling_row_backward_f32(const float* du, const float* x2, const float* s_raw, const float* t,
                                         const SoftClamp& sc, float eg, float dlogdet, float* dx2, float* ds_raw,
                                         float* dt, int64_t n, float* sums) {
  coupling_row_backward(du, x2, s_raw, t, sc, eg, dlogdet, dx2, ds_raw, dt, n, sums);
}

LF_CLONES void coupling_row_backward_bf16(const float* du, const float* x2, const uint16_t* s_raw, const uint16_t* t,
                                          const SoftClamp& sc, float eg, float dlogdet, float* dx2, uint16_t* ds_raw,
                                          uint16_t* dt, int64_t n, float* sums) {
  coupling_row_backward(du, x2, s_raw, t, sc, eg, dlogdet, dx2, ds_raw, dt, n, sums);
}

}  // namespace lineflow
