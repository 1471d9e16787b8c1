// Fast conversion of a Python sequence of ints (list or tuple fast path; any sequence else) to a
// std::vector of T, with a clear error naming the argument and the bad element. pybind11's
// generic list caster costs ~20 ns per element, which dominated match_prefix on long prompts.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

namespace cai {

template <typename T>
T int_at(PyObject* item, const std::string& what, size_t i) {
  long long v = PyLong_AsLongLong(item);
  if (v == -1 && PyErr_Occurred()) {
    PyErr_Clear();
    throw std::invalid_argument(what + "[" + std::to_string(i) + "] is not an int that fits in 64 bits");
  }
  if (v < std::numeric_limits<T>::min() || v > std::numeric_limits<T>::max()) {
    throw std::invalid_argument(what + "[" + std::to_string(i) + "]=" + std::to_string(v) + " does not fit in " +
                                std::to_string(8 * sizeof(T)) + "-bit ints");
  }
  return static_cast<T>(v);
}

template <typename T>
std::vector<T> ints_from(pybind11::handle obj, const std::string& what) {
  if (!PySequence_Check(obj.ptr())) throw std::invalid_argument(what + " must be a sequence of ints");
  pybind11::object seq = pybind11::reinterpret_steal<pybind11::object>(PySequence_Fast(obj.ptr(), "not a sequence"));
  if (!seq) throw pybind11::error_already_set();
  Py_ssize_t n = PySequence_Fast_GET_SIZE(seq.ptr());
  PyObject** items = PySequence_Fast_ITEMS(seq.ptr());
  std::vector<T> out(static_cast<size_t>(n));
  for (Py_ssize_t i = 0; i < n; ++i) out[i] = int_at<T>(items[i], what, static_cast<size_t>(i));
  return out;
}

}  // namespace cai
