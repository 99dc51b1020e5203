// Bayer demosaicing and mono bit-depth scaling for GenICam cameras (see debayer.h).
#include "lineflow/debayer.h"

#include <vector>

namespace lineflow {

namespace {

// One output row. A "C" site holds this row's colour (red on a red row, blue on a blue row), the other sites green;
// l and r are the columns left and right of x (mirrored at the borders).
inline void c_site(const uint8_t* up, const uint8_t* mid, const uint8_t* down, int64_t x, int64_t l, int64_t r,
                   uint8_t* px, int ci, int oi) {
  px[ci] = mid[x];
  px[1] = static_cast<uint8_t>((up[x] + down[x] + mid[l] + mid[r] + 2) >> 2);
  px[oi] = static_cast<uint8_t>((up[l] + up[r] + down[l] + down[r] + 2) >> 2);
}

inline void g_site(const uint8_t* up, const uint8_t* mid, const uint8_t* down, int64_t x, int64_t l, int64_t r,
                   uint8_t* px, int ci, int oi) {
  px[ci] = static_cast<uint8_t>((mid[l] + mid[r] + 1) >> 1);
  px[1] = mid[x];
  px[oi] = static_cast<uint8_t>((up[x] + down[x] + 1) >> 1);
}

}  // namespace

void debayer_rows(const uint8_t* raw, int64_t h, int64_t w, int r_row, int r_col, uint8_t* rgb, int64_t y0,
                  int64_t y1) {
  for (int64_t y = y0; y < y1; ++y) {
    const uint8_t* mid = raw + y * w;
    const uint8_t* up = raw + (y == 0 ? 1 : y - 1) * w;  // reflect-101: row -1 is row 1, row h is row h - 2
    const uint8_t* down = raw + (y == h - 1 ? h - 2 : y + 1) * w;
    const bool red_row = (y & 1) == r_row;  // this row holds red and green samples (else blue and green)
    const int64_t c_col = red_row ? r_col : 1 - r_col;  // column parity of this row's red (or blue) samples
    const int ci = red_row ? 0 : 2, oi = 2 - ci;  // where this row's colour and the other go in an RGB pixel
    uint8_t* out = rgb + y * w * 3;
    auto any_site = [&](int64_t x) {
      const int64_t l = x == 0 ? 1 : x - 1, r = x == w - 1 ? w - 2 : x + 1;
      ((x & 1) == c_col ? c_site : g_site)(up, mid, down, x, l, r, out + 3 * x, ci, oi);
    };
    any_site(0);
    int64_t x = 1;
    if ((x & 1) != c_col && x < w - 1) g_site(up, mid, down, x, x - 1, x + 1, out + 3 * x, ci, oi), ++x;
    for (; x + 1 < w - 1; x += 2) {  // the interior in (C, G) pairs: no border or parity test
      c_site(up, mid, down, x, x - 1, x + 1, out + 3 * x, ci, oi);
      g_site(up, mid, down, x + 1, x, x + 2, out + 3 * x + 3, ci, oi);
    }
    for (; x < w; ++x) any_site(x);
  }
}

void scale_to_16(const uint16_t* in, uint16_t* out, int64_t n, int bits) {
  const uint32_t top = (1u << bits) - 1u;
  std::vector<uint16_t> table(top + 1);  // exact rounding once per value, then a look-up per sample
  for (uint32_t v = 0; v <= top; ++v) table[v] = static_cast<uint16_t>((v * 65535u + top / 2) / top);
  for (int64_t i = 0; i < n; ++i) out[i] = table[in[i] < top ? in[i] : top];
}

}  // namespace lineflow
