// Arguments from Python checked before any pointer is taken: a Python exception naming the argument and the
// problem, never a read out of bounds.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <string>

namespace py = pybind11;

template <typename T>
inline py::array_t<T, py::array::c_style> checked(const py::handle& obj, const char* what, int ndim = -1) {
  if (!py::isinstance<py::array>(obj)) throw py::type_error(std::string(what) + ": expected a numpy array");
  auto a = py::reinterpret_borrow<py::array>(obj);
  if (!a.dtype().is(py::dtype::of<T>()))
    throw py::type_error(std::string(what) + ": dtype " + std::string(py::str(a.dtype())) + ", expected " +
                         std::string(py::str(py::dtype::of<T>())));
  if (!(a.flags() & py::array::c_style))
    throw py::value_error(std::string(what) + ": array is not C-contiguous (use np.ascontiguousarray)");
  if (ndim >= 0 && a.ndim() != ndim)
    throw py::value_error(std::string(what) + ": expected " + std::to_string(ndim) + " dimensions, got " +
                          std::to_string(a.ndim()));
  return py::reinterpret_borrow<py::array_t<T, py::array::c_style>>(a);
}

