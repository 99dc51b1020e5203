// Camera pixel formats the native module unpacks (engine/genicam.py): Bayer 8-bit mosaics demosaiced to RGB,
// and 10/12/14-bit mono samples scaled to 16 bits by their bit depth.
#pragma once

#include <cstdint>

namespace lineflow {

// Bilinear demosaic of rows [y0, y1) of an 8-bit Bayer mosaic (h, w), h, w >= 2, into RGB (h, w, 3).
// (r_row, r_col): the red sample's place in the top-left 2x2 cell, as the GenICam pixel format names it:
// BayerRG8 (0, 0), BayerGR8 (0, 1), BayerGB8 (1, 0), BayerBG8 (1, 1). Borders mirror (reflect-101), which keeps
// every mirrored sample's colour.
void debayer_rows(const uint8_t* raw, int64_t h, int64_t w, int r_row, int r_col, uint8_t* rgb, int64_t y0,
                  int64_t y1);

// out[i] = round(min(in[i], 2^bits - 1) * 65535 / (2^bits - 1)): a sample of `bits` bits (in the low bits of a
// 16-bit word) on the 16-bit scale, so value / 65535 equals value / (2^bits - 1) to within 0.5 / 65535.
void scale_to_16(const uint16_t* in, uint16_t* out, int64_t n, int bits);

}  // namespace lineflow
