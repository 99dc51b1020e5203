// The affine coupling's element-wise tail for training on CPUs (train/fused_tail.py): per channel row of one image,
// forward and backward each in one pass over memory. The subnet's convolutions stay in PyTorch.
//   forward:  s = clamp * factor * atan(s_raw / clamp);  y2 = x2 * exp(s) + t;  u = v * exp(g) + b  (v = x1 | y2)
//   backward: from du (the permutation undone by the caller's indexing) to dx, d(s_raw), dt and the row's sums
//             of du * v and du (the global affine's gradients), with dlogdet added to ds (log|det J| sums s).
// s_raw and t are float32 or bf16 (raw bits, the subnet's output under autocast); everything else float32.
#pragma once

#include <cstdint>

namespace lineflow {

struct SoftClamp {
  float clamp, factor;
  float atan_coeffs[8];  // atan(r) / r on [0, 1] as a polynomial in r^2, highest power first (kernels/reference.py)
};

// u = x * eg + b; returns nothing (a pass-through half)
void coupling_identity_row(const float* x, float eg, float b, float* u, int64_t n);
// u = (x2 * exp(s) + t) * eg + b; returns sum(s)
float coupling_row_f32(const float* x2, const float* s_raw, const float* t, const SoftClamp& sc, float eg, float b,
                       float* u, int64_t n);
float coupling_row_bf16(const float* x2, const uint16_t* s_raw, const uint16_t* t, const SoftClamp& sc, float eg,
                        float b, float* u, int64_t n);
// dx = du * eg; sums[0] = sum(du * x), sums[1] = sum(du)
void coupling_identity_row_backward(const float* du, const float* x, float eg, float* dx, int64_t n, float* sums);
// dx2, d(s_raw), dt from du; sums[0] = sum(du * y2), sums[1] = sum(du)
void coupling_row_backward_f32(const float* du, const float* x2, const float* s_raw, const float* t,
                               const SoftClamp& sc, float eg, float dlogdet, float* dx2, float* ds_raw, float* dt,
                               int64_t n, float* sums);
void coupling_row_backward_bf16(const float* du, const float* x2, const uint16_t* s_raw, const uint16_t* t,
                                const SoftClamp& sc, float eg, float dlogdet, float* dx2, uint16_t* ds_raw,
                                uint16_t* dt, int64_t n, float* sums);

}  // namespace lineflow
