#include "filters.h"

namespace lineflow {

#define LF_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))

LF_CLONES void axpy(float* __restrict y, const float* __restrict x, float a, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

LF_CLONES void axpy_u8(float* __restrict y, const uint8_t* __restrict x, float a, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * static_cast<float>(x[i]);
}

LF_CLONES void axpy_u16(float* __restrict y, const uint16_t* __restrict x, float a, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * static_cast<float>(x[i]);
}

LF_CLONES void gather_taps(float* __restrict out, const float* __restrict src, const int32_t* __restrict start,
                           const float* __restrict taps_t, int64_t width, int64_t n, int64_t stride) {
  for (int64_t x = 0; x < n; ++x) out[x] = 0.0f;
  for (int64_t t = 0; t < width; ++t) {
    const float* tt = taps_t + t * n;
#pragma omp simd
    for (int64_t x = 0; x < n; ++x) out[x] += tt[x] * src[(start[x] + t) * stride];
  }
}

}  // namespace lineflow
