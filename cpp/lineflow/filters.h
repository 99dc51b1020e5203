// The inner loops of the native module: contiguous multiply-adds and tap gathers, vectorised by the
// compiler, with AVX-512 / AVX2 / baseline clones picked at load time (one build runs on any x86-64).
#pragma once

#include <cstdint>

namespace lineflow {

// y[i] += a * x[i]
void axpy(float* y, const float* x, float a, int64_t n);
// y[i] += a * float(x[i]), for uint8 and uint16 frames
void axpy_u8(float* y, const uint8_t* x, float a, int64_t n);
void axpy_u16(float* y, const uint16_t* x, float a, int64_t n);
inline void axpy_cvt(float* y, const uint8_t* x, float a, int64_t n) { axpy_u8(y, x, a, n); }
inline void axpy_cvt(float* y, const uint16_t* x, float a, int64_t n) { axpy_u16(y, x, a, n); }
// out[x] = sum_t taps_t[t, x] * src[(start[x] + t) * stride] for x in [0, n): the taps transposed to
// (width, n), so the x loop is contiguous in everything but src, which the vector clones gather
void gather_taps(float* out, const float* src, const int32_t* start, const float* taps_t, int64_t width, int64_t n,
                 int64_t stride = 1);

}  // namespace lineflow
