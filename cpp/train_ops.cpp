// lineflow's native training ops for CPUs (pybind11 module train._native, apart from the run side's engine._native):
// the affine coupling's element-wise tail, forward and backward, one pass each over memory
// (cpp/lineflow/coupling.cpp; its autograd function and its PyTorch reference are train/fused_tail.py).
// Arrays are (B, channels, N) views of the step's NCHW tensors (N = H * W); h is the subnet's output (B, 2 * c2, N),
// s_raw | t, float32 or bf16 (passed as int16 bits). Tasks: one (image, channel) row each, on the module's pool.
#include "checked.h"
#include "lineflow/coupling.h"
#include "lineflow/pool.h"

#include <pybind11/stl.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

using lineflow::pool;
using lineflow::SoftClamp;

namespace {

struct Step {  // one coupling step's shapes and constants, checked
  int64_t b, c, c1, c2, n;
  const int64_t* inv_perm;
  const float *g, *bias;
  std::vector<float> eg;
  SoftClamp sc;
  bool bf16;
};

py::array checked_h(const py::handle& obj, const char* what, bool* bf16) {
  if (!py::isinstance<py::array>(obj)) throw py::type_error(std::string(what) + ": expected a numpy array");
  auto a = py::reinterpret_borrow<py::array>(obj);
  const bool f32 = a.dtype().is(py::dtype::of<float>());
  *bf16 = a.dtype().is(py::dtype::of<int16_t>()) || a.dtype().is(py::dtype::of<uint16_t>());
  if (!f32 && !*bf16) throw py::type_error(std::string(what) + ": expected float32, or bf16 bits as int16");
  if (!(a.flags() & py::array::c_style)) throw py::value_error(std::string(what) + ": array is not C-contiguous");
  if (a.ndim() != 3) throw py::value_error(std::string(what) + ": expected 3 dimensions (B, 2 * c2, N)");
  return a;
}

Step step(const py::array_t<float, py::array::c_style>& x1, const py::array_t<float, py::array::c_style>& x2,
          const py::array& h, bool bf16, const py::handle& g_obj, const py::handle& bias_obj,
          const py::handle& inv_perm_obj, float clamp, float factor, const std::vector<float>& atan_coeffs) {
  Step s;
  s.b = x1.shape(0), s.c1 = x1.shape(1), s.c2 = x2.shape(1), s.c = s.c1 + s.c2, s.n = x1.shape(2), s.bf16 = bf16;
  if (x2.shape(0) != s.b || x2.shape(2) != s.n || s.c1 < 1 || s.c2 < 1)
    throw py::value_error("x1, x2: the halves (B, c1, N), (B, c2, N) of one step's input");
  if (h.shape(0) != s.b || h.shape(1) != 2 * s.c2 || h.shape(2) != s.n)
    throw py::value_error("h: expected shape (B, 2 * c2, N) = (" + std::to_string(s.b) + ", " +
                          std::to_string(2 * s.c2) + ", " + std::to_string(s.n) + ")");
  auto g = checked<float>(g_obj, "g", 1);
  auto bias = checked<float>(bias_obj, "b", 1);
  auto inv_perm = checked<int64_t>(inv_perm_obj, "inv_perm", 1);
  if (g.shape(0) != s.c || bias.shape(0) != s.c || inv_perm.shape(0) != s.c)
    throw py::value_error("g, b, inv_perm: one value per channel (" + std::to_string(s.c) + ")");
  std::vector<char> seen(s.c, 0);
  for (int64_t i = 0; i < s.c; ++i) {
    const int64_t j = inv_perm.data()[i];
    if (j < 0 || j >= s.c || seen[j]) throw py::value_error("inv_perm: not a permutation of the channels");
    seen[j] = 1;
  }
  if (!(clamp > 0.0f) || !std::isfinite(factor)) throw py::value_error("clamp must be > 0, factor finite");
  if (atan_coeffs.size() != 8) throw py::value_error("atan_coeffs: 8 coefficients (kernels.reference.ATAN_COEFFS)");
  s.inv_perm = inv_perm.data(), s.g = g.data(), s.bias = bias.data();
  s.eg.resize(s.c);
  for (int64_t i = 0; i < s.c; ++i) s.eg[i] = std::exp(s.g[i]);
  s.sc.clamp = clamp, s.sc.factor = factor;
  for (int k = 0; k < 8; ++k) s.sc.atan_coeffs[k] = atan_coeffs[k];
  return s;
}

template <typename T>
py::array_t<T, py::array::c_style> shaped(const py::handle& obj, const char* what, std::vector<int64_t> shape,
                                          bool written = true) {
  auto a = checked<T>(obj, what, static_cast<int>(shape.size()));
  if (written && !a.writeable()) throw py::value_error(std::string(what) + ": array is read-only");
  for (size_t i = 0; i < shape.size(); ++i)
    if (a.shape(i) != shape[i]) throw py::value_error(std::string(what) + ": wrong shape");
  return a;
}

// a step's input and output as halves, x = x1 | x2 (B, c1 | c2, N) (the chain of steps never concatenates them):
// row c of x is x1's row c or x2's row c - c1, and so for y, dy and dx
struct Halves {
  int64_t c1, c2, n;
  template <typename T>
  T* row(T* first, T* second, int64_t i, int64_t c) const {
    return c < c1 ? first + (i * c1 + c) * n : second + (i * c2 + c - c1) * n;
  }
};

// y[:, inv_perm[c]] = u[:, c]; s_sum (B, c2): each coupled row's sum of s
void coupling_forward(const py::handle& x1_obj, const py::handle& x2_obj, const py::handle& h_obj, const py::handle& g,
                      const py::handle& bias, const py::handle& inv_perm, float clamp, float factor,
                      const std::vector<float>& atan_coeffs, const py::handle& y1_obj, const py::handle& y2_obj,
                      const py::handle& s_sum_obj) {
  auto x1 = checked<float>(x1_obj, "x1", 3);
  auto x2 = checked<float>(x2_obj, "x2", 3);
  bool bf16;
  py::array h = checked_h(h_obj, "h", &bf16);
  Step s = step(x1, x2, h, bf16, g, bias, inv_perm, clamp, factor, atan_coeffs);
  auto y1 = shaped<float>(y1_obj, "y1", {s.b, s.c1, s.n});
  auto y2 = shaped<float>(y2_obj, "y2", {s.b, s.c2, s.n});
  auto s_sum = shaped<float>(s_sum_obj, "s_sum", {s.b, s.c2});
  const Halves halves{s.c1, s.c2, s.n};
  const float *x1p = x1.data(), *x2p = x2.data();
  const void* hp = h.data();
  float *y1p = y1.mutable_data(), *y2p = y2.mutable_data(), *sp = s_sum.mutable_data();
  py::gil_scoped_release release;
  pool().run(s.b * s.c, [&](int64_t task) {
    const int64_t i = task / s.c, c = task % s.c, n = s.n;
    const float* xr = halves.row(x1p, x2p, i, c);
    float* u = halves.row(y1p, y2p, i, s.inv_perm[c]);
    if (c < s.c1) return lineflow::coupling_identity_row(xr, s.eg[c], s.bias[c], u, n);
    const int64_t k = c - s.c1, sr = (i * 2 * s.c2 + k) * n, tr = sr + s.c2 * n;
    sp[i * s.c2 + k] =
        s.bf16 ? lineflow::coupling_row_bf16(xr, static_cast<const uint16_t*>(hp) + sr,
                                             static_cast<const uint16_t*>(hp) + tr, s.sc, s.eg[c], s.bias[c], u, n)
               : lineflow::coupling_row_f32(xr, static_cast<const float*>(hp) + sr, static_cast<const float*>(hp) + tr,
                                            s.sc, s.eg[c], s.bias[c], u, n);
  });
}

// from dy = dy1 | dy2 (the step's output gradient) and dlogdet (B,): dx = dx1 | dx2 (the direct part; the subnet's
// gradient of x1 is autograd's), dh (h's dtype), sums (2, B, C): per row sum(du * v) and sum(du), v = x1 | y2
void coupling_backward(const py::handle& dy1_obj, const py::handle& dy2_obj, const py::handle& x1_obj,
                       const py::handle& x2_obj, const py::handle& h_obj, const py::handle& g, const py::handle& bias,
                       const py::handle& inv_perm, float clamp, float factor, const std::vector<float>& atan_coeffs,
                       const py::handle& dlogdet_obj, const py::handle& dx1_obj, const py::handle& dx2_obj,
                       const py::handle& dh_obj, const py::handle& sums_obj) {
  auto x1 = checked<float>(x1_obj, "x1", 3);
  auto x2 = checked<float>(x2_obj, "x2", 3);
  bool bf16, dh_bf16;
  py::array h = checked_h(h_obj, "h", &bf16);
  Step s = step(x1, x2, h, bf16, g, bias, inv_perm, clamp, factor, atan_coeffs);
  auto dy1 = shaped<float>(dy1_obj, "dy1", {s.b, s.c1, s.n}, false);
  auto dy2 = shaped<float>(dy2_obj, "dy2", {s.b, s.c2, s.n}, false);
  auto dlogdet = checked<float>(dlogdet_obj, "dlogdet", 1);
  if (dlogdet.shape(0) != s.b) throw py::value_error("dlogdet: one value per image");
  auto dx1 = shaped<float>(dx1_obj, "dx1", {s.b, s.c1, s.n});
  auto dx2 = shaped<float>(dx2_obj, "dx2", {s.b, s.c2, s.n});
  py::array dh = checked_h(dh_obj, "dh", &dh_bf16);
  if (dh_bf16 != bf16 || dh.shape(0) != s.b || dh.shape(1) != 2 * s.c2 || dh.shape(2) != s.n || !dh.writeable())
    throw py::value_error("dh: a writable array of h's shape and dtype");
  auto sums = shaped<float>(sums_obj, "sums", {2, s.b, s.c});
  const Halves halves{s.c1, s.c2, s.n};
  const float *dy1p = dy1.data(), *dy2p = dy2.data(), *x1p = x1.data(), *x2p = x2.data(), *dlp = dlogdet.data();
  const void* hp = h.data();
  void* dhp = dh.mutable_data();
  float *dx1p = dx1.mutable_data(), *dx2p = dx2.mutable_data(), *sm = sums.mutable_data();
  py::gil_scoped_release release;
  pool().run(s.b * s.c, [&](int64_t task) {
    const int64_t i = task / s.c, c = task % s.c, n = s.n;
    const float* du = halves.row(dy1p, dy2p, i, s.inv_perm[c]);
    const float* x = halves.row(x1p, x2p, i, c);
    float* dx = halves.row(dx1p, dx2p, i, c);
    float row_sums[2];
    if (c < s.c1) {
      lineflow::coupling_identity_row_backward(du, x, s.eg[c], dx, n, row_sums);
    } else {
      const int64_t k = c - s.c1, sr = (i * 2 * s.c2 + k) * n, tr = sr + s.c2 * n;
      if (s.bf16) {
        auto* h16 = static_cast<const uint16_t*>(hp);
        auto* dh16 = static_cast<uint16_t*>(dhp);
        lineflow::coupling_row_backward_bf16(du, x, h16 + sr, h16 + tr, s.sc, s.eg[c], dlp[i], dx, dh16 + sr,
                                             dh16 + tr, n, row_sums);
      } else {
        auto* h32 = static_cast<const float*>(hp);
        auto* dh32 = static_cast<float*>(dhp);
        lineflow::coupling_row_backward_f32(du, x, h32 + sr, h32 + tr, s.sc, s.eg[c], dlp[i], dx, dh32 + sr,
                                            dh32 + tr, n, row_sums);
      }
    }
    sm[task] = row_sums[0];
    sm[s.b * s.c + task] = row_sums[1];
  });
}

}  // namespace

PYBIND11_MODULE(_native, m) {
  m.doc() = "lineflow's native training ops (see cpp/train_ops.cpp)";
  m.def("coupling_forward", &coupling_forward, py::arg("x1"), py::arg("x2"), py::arg("h"), py::arg("g"), py::arg("b"),
        py::arg("inv_perm"), py::arg("clamp"), py::arg("factor"), py::arg("atan_coeffs"), py::arg("y1"),
        py::arg("y2"), py::arg("s_sum"),
        "a coupling step's tail on halves (B, c1 | c2, N): y1 | y2 = ((x1 | x2 * exp(soft_clamp(s_raw)) + t) * "
        "exp(g) + b)[:, perm]; s_sum (B, c2) the rows' sums of s");
  m.def("coupling_backward", &coupling_backward, py::arg("dy1"), py::arg("dy2"), py::arg("x1"), py::arg("x2"),
        py::arg("h"), py::arg("g"), py::arg("b"), py::arg("inv_perm"), py::arg("clamp"), py::arg("factor"),
        py::arg("atan_coeffs"), py::arg("dlogdet"), py::arg("dx1"), py::arg("dx2"), py::arg("dh"), py::arg("sums"),
        "coupling_forward's gradients: dx1 | dx2 (direct part), dh, and per row sum(du * v), sum(du) into sums "
        "(2, B, C)");
  m.def("threads", [] { return pool().size(); }, "threads in the pool (the caller included)");
  m.def("set_threads", [](int n) {
    if (n < 1) throw py::value_error("threads must be >= 1");
    if (n != pool().size()) pool().resize(n);
  });
}
