// lineflow's native pre- and post-processing for CPUs (pybind11 module engine._native).
//
// Both ends of the CPU engine are separable linear filters, so both are written here as banded
// matrices (computed once per size in engine/native.py, where they are checked against PyTorch):
//   preprocess:  uint8/uint16 frame (h, w, C) -> resize (bilinear, antialiased) to the model's (H, W) -> [0, 1]
//                -> (x - mean) / std -> NCHW float32 (B, 3, H, W), into a preallocated buffer;
//   postprocess: per-scale NLL maps q_s (B, h_s, w_s) -> sum_s c_s * Rh_s q_s Rw_s^T (upsample + blur as
//                one band matrix per axis and scale) -> anomaly map and score map (B, H, W) -> top-k mean score;
//   resize:      float32 maps (B, h, w) -> (B, H, W), for the map at the frame's size;
//   debayer, scale_to_16: GenICam cameras' Bayer 8-bit and 10-14-bit mono frames (engine/genicam.py) -> RGB / 16-bit.
// Work is split over (image, row block) tasks on one persistent thread pool; the GIL is released
// while it runs; inputs are read in place (C-contiguous arrays required, never copied).
#include "lineflow/debayer.h"
#include "lineflow/filters.h"
#include "lineflow/pool.h"
#include "checked.h"

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

namespace py = pybind11;
using lineflow::axpy;
using lineflow::axpy_cvt;
using lineflow::gather_taps;
using lineflow::pool;

// ---- argument checks: a Python exception naming the problem, never a read out of bounds -------------
struct Band {  // rows of a banded matrix: out[i] = sum_t taps[i, t] * in[start[i] + t]
  const int32_t* start;
  const float* taps;
  int64_t n_out, width;
  std::vector<float> taps_t;  // (width, n_out), for gather_taps

  Band(const int32_t* s, const float* t, int64_t n, int64_t w) : start(s), taps(t), n_out(n), width(w), taps_t(n * w) {
    for (int64_t i = 0; i < n; ++i)
      for (int64_t k = 0; k < w; ++k) taps_t[k * n + i] = t[i * w + k];
  }
};

static Band band(const py::handle& start_obj, const py::handle& taps_obj, int64_t n_out, int64_t n_in,
                 const char* what) {
  auto start = checked<int32_t>(start_obj, what, 1);
  auto taps = checked<float>(taps_obj, what, 2);
  if (start.shape(0) != n_out || taps.shape(0) != n_out || taps.shape(1) < 1 || taps.shape(1) > n_in)
    throw py::value_error(std::string(what) + ": band of the wrong shape for " + std::to_string(n_in) + " -> " +
                          std::to_string(n_out));
  const int32_t* s = start.data();
  for (int64_t i = 0; i < n_out; ++i)
    if (s[i] < 0 || s[i] + taps.shape(1) > n_in)
      throw py::value_error(std::string(what) + ": band start out of range");
  return Band(s, taps.data(), n_out, taps.shape(1));
}

// ---- preprocess ---------------------------------------------------------------------------------------
struct Frame {
  const void* data;
  bool u16;
  int64_t h, w, c;
  Band rows, cols;
};

template <typename T>
static void preprocess_rows(const Frame& f, int64_t y0, int64_t y1, float* out, int64_t out_h, int64_t out_w,
                            bool bgr, const float* mean, const float* inv_std, std::vector<float>& tmp) {
  const T* src = static_cast<const T*>(f.data);
  const int64_t row_len = f.w * f.c;
  const float unit = 1.0f / (f.u16 ? 65535.0f : 255.0f);
  tmp.resize(row_len + out_w);
  float* inter = tmp.data();       // one resized row, channels interleaved (w*C)
  float* line = inter + row_len;   // one output line of one channel (out_w)
  const int64_t plane = out_h * out_w;
  for (int64_t y = y0; y < y1; ++y) {
    std::fill(inter, inter + row_len, 0.0f);  // vertical pass: contiguous, vectorised
    const float* vt = f.rows.taps + y * f.rows.width;
    for (int64_t t = 0; t < f.rows.width; ++t)
      if (vt[t] != 0.0f) axpy_cvt(inter, src + (f.rows.start[y] + t) * row_len, vt[t] * unit, row_len);
    for (int k = 0; k < 3; ++k) {  // horizontal pass per channel (gray: channel 0 three times), clamp, normalise
      const int64_t ch = f.c == 1 ? 0 : (bgr ? 2 - k : k);
      gather_taps(line, inter + ch, f.cols.start, f.cols.taps_t.data(), f.cols.width, out_w, f.c);
      float* o = out + k * plane + y * out_w;
      const float m = mean[k], s = inv_std[k];
      for (int64_t x = 0; x < out_w; ++x) o[x] = (std::min(1.0f, std::max(0.0f, line[x])) - m) * s;
    }
  }
}

static void preprocess(const py::list& frames, const py::list& row_bands, const py::list& col_bands,
                       const py::handle& out_obj, bool bgr, std::vector<float> mean, std::vector<float> std_) {
  auto out = checked<float>(out_obj, "out", 4);
  if (!out.writeable()) throw py::value_error("out: array is read-only");
  const int64_t n = static_cast<int64_t>(frames.size()), out_h = out.shape(2), out_w = out.shape(3);
  if (out.shape(0) != n || out.shape(1) != 3 || out_h == 0 || out_w == 0)
    throw py::value_error("out: expected shape (" + std::to_string(n) + ", 3, H, W) with H, W >= 1 for " +
                          std::to_string(n) + " frames");
  if (static_cast<int64_t>(row_bands.size()) != n || static_cast<int64_t>(col_bands.size()) != n)
    throw py::value_error("one row band and one column band per frame");
  if (mean.size() != 3 || std_.size() != 3) throw py::value_error("mean and std: three values each");
  float inv_std[3];
  for (int k = 0; k < 3; ++k) {
    if (!(std_[k] > 0.0f)) throw py::value_error("std: values must be > 0");
    inv_std[k] = 1.0f / std_[k];
  }
  std::vector<Frame> fs;
  std::vector<py::array> keep;  // the frames stay referenced while the GIL is released
  for (int64_t i = 0; i < n; ++i) {
    const std::string what = "frame " + std::to_string(i);
    py::handle obj = frames[i];
    if (!py::isinstance<py::array>(obj)) throw py::type_error(what + ": expected a numpy array");
    auto a = py::reinterpret_borrow<py::array>(obj);
    bool u16 = a.dtype().is(py::dtype::of<uint16_t>());
    if (!u16 && !a.dtype().is(py::dtype::of<uint8_t>()))
      throw py::type_error(what + ": dtype " + std::string(py::str(a.dtype())) + ", expected uint8 or uint16");
    if (!(a.flags() & py::array::c_style))
      throw py::value_error(what + ": array is not C-contiguous (use np.ascontiguousarray)");
    if (a.ndim() != 2 && a.ndim() != 3) throw py::value_error(what + ": expected HxW or HxWxC");
    const int64_t h = a.shape(0), w = a.shape(1), c = a.ndim() == 3 ? a.shape(2) : 1;
    if (h == 0 || w == 0) throw py::value_error(what + ": empty frame");
    if (c != 1 && c != 3 && c != 4) throw py::value_error(what + ": " + std::to_string(c) + " channels, expected 1, 3 or 4");
    py::tuple rb = row_bands[i], cb = col_bands[i];
    if (rb.size() != 2 || cb.size() != 2) throw py::value_error(what + ": bands are (start, taps) pairs");
    fs.push_back({a.data(), u16, h, w, c, band(rb[0], rb[1], out_h, h, (what + " row band").c_str()),
                  band(cb[0], cb[1], out_w, w, (what + " column band").c_str())});
    keep.push_back(a);
  }
  float* dst = out.mutable_data();
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(out_h, (8 * pool().size() + n - 1) / std::max<int64_t>(n, 1)));
  const int64_t rows_per = (out_h + blocks - 1) / blocks;
  py::gil_scoped_release release;
  pool().run(n * blocks, [&](int64_t task) {
    thread_local std::vector<float> tmp;
    const int64_t i = task / blocks, y0 = (task % blocks) * rows_per, y1 = std::min(out_h, y0 + rows_per);
    if (y0 >= y1) return;
    float* o = dst + i * 3 * out_h * out_w;
    if (fs[i].u16)
      preprocess_rows<uint16_t>(fs[i], y0, y1, o, out_h, out_w, bgr, mean.data(), inv_std, tmp);
    else
      preprocess_rows<uint8_t>(fs[i], y0, y1, o, out_h, out_w, bgr, mean.data(), inv_std, tmp);
  });
}

// ---- postprocess ----------------------------------------------------------------------------------------
struct Scale {
  const float* q;
  int64_t h, w;
  Band rows, cols;  // rows: H outputs over h (vertical, Rh); cols: w sources, each spread over W columns (Rw^T)
  float w_map, w_img;
};

static py::array_t<float> postprocess(const py::list& qmaps, const py::list& bands, std::vector<float> map_w,
                                      std::vector<float> img_w, const py::handle& map_obj,
                                      const py::handle& score_map_obj, int64_t top_k) {
  auto out_map = checked<float>(map_obj, "map", 3);
  const int64_t b = out_map.shape(0), out_h = out_map.shape(1), out_w = out_map.shape(2);
  if (b == 0 || out_h == 0 || out_w == 0) throw py::value_error("map: expected (B, H, W) with B, H, W >= 1");
  if (!out_map.writeable()) throw py::value_error("map: array is read-only");
  const bool two = !score_map_obj.is_none();
  py::array_t<float, py::array::c_style> out_score;
  if (two) {
    out_score = checked<float>(score_map_obj, "score_map", 3);
    if (out_score.shape(0) != b || out_score.shape(1) != out_h || out_score.shape(2) != out_w || !out_score.writeable())
      throw py::value_error("score_map: expected a writable array shaped like map");
  }
  const size_t ns = qmaps.size();
  if (ns == 0 || bands.size() != ns || map_w.size() != ns || img_w.size() != ns)
    throw py::value_error("one q map, one (row band, column band) and one weight of each kind per scale");
  if (top_k < 1 || top_k > out_h * out_w)
    throw py::value_error("top_k " + std::to_string(top_k) + " is outside [1, H*W] = [1, " +
                          std::to_string(out_h * out_w) + "]");
  std::vector<Scale> scales;
  std::vector<py::array> keep;
  for (size_t s = 0; s < ns; ++s) {
    const std::string what = "scale " + std::to_string(s);
    auto q = checked<float>(qmaps[s], (what + " q map").c_str(), 3);
    const int64_t h = q.shape(1), w = q.shape(2);
    if (q.shape(0) != b || h == 0 || w == 0)
      throw py::value_error(what + ": q map must be (B, h, w) with B = " + std::to_string(b) + " and h, w >= 1");
    py::tuple bt = bands[s];
    if (bt.size() != 4) throw py::value_error(what + ": bands are (row start, row taps, col start, col taps)");
    scales.push_back({q.data(), h, w, band(bt[0], bt[1], out_h, h, (what + " row band").c_str()),
                      band(bt[2], bt[3], w, out_w, (what + " column band").c_str()), map_w[s], img_w[s]});
    keep.push_back(q);
  }
  float* m = out_map.mutable_data();
  float* sm = two ? out_score.mutable_data() : nullptr;
  py::array_t<float> scores(b);
  float* sc = scores.mutable_data();
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(out_h, (8 * pool().size() + b - 1) / b));
  const int64_t rows_per = (out_h + blocks - 1) / blocks;
  // each task keeps the top_k of its own rows; the image's top_k is among the union of those
  std::vector<float> cand(b * blocks * top_k, std::numeric_limits<float>::lowest());
  {
    py::gil_scoped_release release;
    pool().run(b * blocks, [&](int64_t task) {
      thread_local std::vector<float> tmp, sel;
      const int64_t i = task / blocks, y0 = (task % blocks) * rows_per, y1 = std::min(out_h, y0 + rows_per);
      if (y0 >= y1) return;
      for (int64_t y = y0; y < y1; ++y) {
        float* mrow = m + (i * out_h + y) * out_w;
        float* srow = two ? sm + (i * out_h + y) * out_w : nullptr;
        std::fill(mrow, mrow + out_w, 0.0f);
        if (two) std::fill(srow, srow + out_w, 0.0f);
        for (const Scale& s : scales) {
          tmp.assign(s.w, 0.0f);  // row y of Rh q: w values
          const float* vt = s.rows.taps + y * s.rows.width;
          const float* q = s.q + i * s.h * s.w;
          for (int64_t t = 0; t < s.rows.width; ++t)
            if (vt[t] != 0.0f) axpy(tmp.data(), q + (s.rows.start[y] + t) * s.w, vt[t], s.w);
          for (int64_t j = 0; j < s.w; ++j) {  // (Rh q Rw^T)[y, :] = sum_j tmp[j] * Rw[:, j], each a band
            const float* ct = s.cols.taps + j * s.cols.width;
            const int64_t x0 = s.cols.start[j];
            if (s.w_map != 0.0f) axpy(mrow + x0, ct, s.w_map * tmp[j], s.cols.width);
            if (two && s.w_img != 0.0f) axpy(srow + x0, ct, s.w_img * tmp[j], s.cols.width);
          }
        }
      }
      const float* src = (two ? sm : m) + (i * out_h + y0) * out_w;
      const int64_t n = (y1 - y0) * out_w, k = std::min(n, top_k);
      sel.assign(src, src + n);
      if (k < n) std::nth_element(sel.begin(), sel.begin() + (k - 1), sel.end(), std::greater<float>());
      std::copy(sel.begin(), sel.begin() + k, cand.begin() + task * top_k);
    });
    pool().run(b, [&](int64_t i) {  // image score: mean of the top_k pixels of the score map
      auto first = cand.begin() + i * blocks * top_k, last = first + blocks * top_k;
      std::nth_element(first, first + (top_k - 1), last, std::greater<float>());
      double acc = 0.0;
      for (auto it = first; it != first + top_k; ++it) acc += *it;
      sc[i] = static_cast<float>(acc / top_k);
    });
  }
  return scores;
}

// ---- resize of float maps (the anomaly map back to the frame's size) -----------------------------------
static void resize(const py::handle& src_obj, const py::tuple& rows_band, const py::tuple& cols_band,
                   const py::handle& out_obj) {
  auto src = checked<float>(src_obj, "src", 3);
  auto out = checked<float>(out_obj, "out", 3);
  if (!out.writeable()) throw py::value_error("out: array is read-only");
  const int64_t b = src.shape(0), h = src.shape(1), w = src.shape(2), oh = out.shape(1), ow = out.shape(2);
  if (out.shape(0) != b || h == 0 || w == 0) throw py::value_error("src and out: same batch, non-empty");
  if (rows_band.size() != 2 || cols_band.size() != 2) throw py::value_error("bands are (start, taps) pairs");
  Band rb = band(rows_band[0], rows_band[1], oh, h, "row band");
  Band cb = band(cols_band[0], cols_band[1], ow, w, "column band");
  const float* s = src.data();
  float* o = out.mutable_data();
  py::gil_scoped_release release;
  // horizontal first when the map grows (its rows are resized once, then every output row is a
  // vectorised sum of a few of them); vertical first when it shrinks
  // cost model: a gathered multiply-add (horizontal) counts 4 contiguous ones (vertical, vectorised)
  if (4 * h * ow * cb.width + oh * ow * rb.width < oh * w * rb.width + 4 * oh * ow * cb.width) {
    thread_local std::vector<float> wide_buf;  // the calling thread's; grows, never shrinks (no page faults per call)
    if (wide_buf.size() < static_cast<size_t>(h * ow)) wide_buf.resize(h * ow);
    float* wide = wide_buf.data();
    for (int64_t i = 0; i < b; ++i) {  // one image at a time: its widened rows stay in cache
      const float* si = s + i * h * w;
      float* oi = o + i * oh * ow;
      pool().run(h, [&](int64_t r) {
        gather_taps(wide + r * ow, si + r * w, cb.start, cb.taps_t.data(), cb.width, ow);
      });
      pool().run(oh, [&](int64_t y) {
        float* orow = oi + y * ow;
        const float* vt = rb.taps + y * rb.width;
        const float* r0 = wide + rb.start[y] * ow;
        for (int64_t x = 0; x < ow; ++x) orow[x] = vt[0] * r0[x];  // first tap assigns: no zero-fill pass
        for (int64_t t = 1; t < rb.width; ++t)
          if (vt[t] != 0.0f) axpy(orow, wide + (rb.start[y] + t) * ow, vt[t], ow);
      });
    }
    return;
  }
  pool().run(b * oh, [&](int64_t task) {
    thread_local std::vector<float> tmp;
    const int64_t i = task / oh, y = task % oh;
    tmp.assign(w, 0.0f);
    const float* vt = rb.taps + y * rb.width;
    for (int64_t t = 0; t < rb.width; ++t)
      if (vt[t] != 0.0f) axpy(tmp.data(), s + (i * h + rb.start[y] + t) * w, vt[t], w);
    gather_taps(o + task * ow, tmp.data(), cb.start, cb.taps_t.data(), cb.width, ow);
  });
}

// ---- camera pixel formats (engine/genicam.py; cpp/lineflow/debayer.cpp) --------------------------------
static py::array_t<uint8_t> debayer(const py::handle& raw_obj, int r_row, int r_col) {
  auto raw = checked<uint8_t>(raw_obj, "raw", 2);
  const int64_t h = raw.shape(0), w = raw.shape(1);
  if (h < 2 || w < 2) throw py::value_error("raw: a Bayer mosaic needs at least 2x2 pixels");
  if ((r_row != 0 && r_row != 1) || (r_col != 0 && r_col != 1))
    throw py::value_error("r_row, r_col: the red sample's row and column in the 2x2 cell, 0 or 1");
  py::array_t<uint8_t> rgb({h, w, static_cast<int64_t>(3)});
  const uint8_t* src = raw.data();
  uint8_t* dst = rgb.mutable_data();
  const int64_t blocks = std::min<int64_t>(h, 4 * pool().size()), rows_per = (h + blocks - 1) / blocks;
  {
    py::gil_scoped_release release;
    pool().run(blocks, [&](int64_t t) {
      lineflow::debayer_rows(src, h, w, r_row, r_col, dst, t * rows_per, std::min(h, (t + 1) * rows_per));
    });
  }
  return rgb;
}

static py::array_t<uint16_t> scale_to_16(const py::handle& raw_obj, int bits) {
  auto raw = checked<uint16_t>(raw_obj, "raw");
  if (bits < 1 || bits > 16) throw py::value_error("bits: 1 to 16");
  std::vector<py::ssize_t> shape(raw.shape(), raw.shape() + raw.ndim());
  py::array_t<uint16_t> out(shape);
  const uint16_t* src = raw.data();
  uint16_t* dst = out.mutable_data();
  const int64_t n = raw.size(), tasks = std::max<int64_t>(1, std::min<int64_t>(4 * pool().size(), n >> 16));
  const int64_t chunk = (n + tasks - 1) / tasks;  // each task builds its look-up table once (at most 16K values)
  {
    py::gil_scoped_release release;
    pool().run(tasks, [&](int64_t t) {
      if (t * chunk < n) lineflow::scale_to_16(src + t * chunk, dst + t * chunk, std::min(chunk, n - t * chunk), bits);
    });
  }
  return out;
}

PYBIND11_MODULE(_native, m) {
  m.doc() = "lineflow's native pre- and post-processing (see cpp/native.cpp)";
  m.def("preprocess", &preprocess, py::arg("frames"), py::arg("row_bands"), py::arg("col_bands"), py::arg("out"),
        py::arg("bgr") = false, py::arg("mean") = std::vector<float>{0, 0, 0},
        py::arg("std") = std::vector<float>{1, 1, 1},
        "uint8/uint16 frames (h, w[, C]) -> resized, normalised (B, 3, H, W) float32 written into out");
  m.def("postprocess", &postprocess, py::arg("qmaps"), py::arg("bands"), py::arg("map_weights"),
        py::arg("image_weights"), py::arg("map"), py::arg("score_map") = py::none(), py::arg("top_k") = 1,
        "per-scale NLL maps (B, h_s, w_s) -> fused anomaly map (and score map) (B, H, W) written in place; "
        "returns the image scores");
  m.def("resize", &resize, py::arg("src"), py::arg("rows"), py::arg("cols"), py::arg("out"),
        "float32 maps (B, h, w) -> (B, H, W) through two band matrices");
  m.def("debayer", &debayer, py::arg("raw"), py::arg("r_row"), py::arg("r_col"),
        "8-bit Bayer mosaic (H, W) -> RGB (H, W, 3) uint8, bilinear; (r_row, r_col): the red sample in the top-left "
        "2x2 cell, as GenICam names the format (BayerRG8 (0, 0), BayerGR8 (0, 1), BayerGB8 (1, 0), BayerBG8 (1, 1))");
  m.def("scale_to_16", &scale_to_16, py::arg("raw"), py::arg("bits"),
        "uint16 samples of `bits` bits -> uint16 on the 16-bit scale: round(min(v, 2^bits - 1) * 65535 / (2^bits - 1))");
  m.def("threads", [] { return pool().size(); }, "threads in the pool (the caller included)");
  m.def("set_threads", [](int n) {
    if (n < 1) throw py::value_error("threads must be >= 1");
    pool().resize(n);
  });
}
