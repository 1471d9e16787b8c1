// Python binding of linear.h: addresses and sizes as integers (tensor.data_ptr()), the GIL released
// while the kernel runs; cai_fast.engine.linear checks shapes and dtypes first.
#include "../linear.h"

#include <pybind11/pybind11.h>

namespace py = pybind11;

namespace cai {

namespace {
void raise_if(const char* what, const std::string& error) {
  if (!error.empty()) throw py::value_error(std::string(what) + ": " + error);
}
}  // namespace

void register_linear(py::module_& m) {
  m.def("has_amx_bf16", &has_amx_bf16, "Whether this CPU and OS let the process use AMX-BF16 tiles.");
  m.def("pack_linear_weight",
        [](uint64_t w, int64_t n, int64_t k, uint64_t packed) {
          std::string error;
          {
            py::gil_scoped_release release;
            error = pack_linear_weight(reinterpret_cast<const uint16_t*>(w), n, k, reinterpret_cast<uint16_t*>(packed));
          }
          raise_if("pack_linear_weight", error);
        },
        py::arg("w"), py::arg("n"), py::arg("k"), py::arg("packed"),
        "packed [n * k] bf16 = w [n, k] bf16 in the AMX tiles' layout (n, k multiples of 32).");
  m.def("amx_linear",
        [](uint64_t x, int64_t m, int64_t k, uint64_t packed, int64_t n, uint64_t bias, uint64_t y) {
          std::string error;
          {
            py::gil_scoped_release release;
            error = amx_linear(reinterpret_cast<const uint16_t*>(x), m, k, reinterpret_cast<const uint16_t*>(packed),
                               n, reinterpret_cast<const uint16_t*>(bias), reinterpret_cast<uint16_t*>(y));
          }
          raise_if("amx_linear", error);
        },
        py::arg("x"), py::arg("m"), py::arg("k"), py::arg("packed"), py::arg("n"), py::arg("bias"), py::arg("y"),
        "y [m, n] bf16 = x [m, k] bf16 @ w^T + bias [n] (0: none), w packed by pack_linear_weight.");
}

}  // namespace cai
