// Python binding of rows.h: addresses and sizes as integers (tensor.data_ptr()), the GIL released
// while a kernel runs; cai_fast.engine.rows checks shapes and dtypes first.
#include "../rows.h"

#include <pybind11/pybind11.h>

namespace py = pybind11;

namespace cai {

namespace {
RowDType row_dtype(int dtype) {
  if (dtype != 0 && dtype != 1) throw py::value_error("dtype must be 0 (fp32) or 1 (bf16)");
  return static_cast<RowDType>(dtype);
}
void raise_if(const char* what, const std::string& error) {
  if (!error.empty()) throw py::value_error(std::string(what) + ": " + error);
}
}  // namespace

void register_rows(py::module_& m) {
  m.def("add_rms_norm",
        [](uint64_t x, uint64_t delta, uint64_t weight, uint64_t out, int64_t rows, int64_t width, double eps,
           int dtype, bool portable) {
          const RowDType kind = row_dtype(dtype);
          std::string error;
          {
            py::gil_scoped_release release;
            error = add_rms_norm(reinterpret_cast<void*>(x), reinterpret_cast<const void*>(delta),
                                 reinterpret_cast<const void*>(weight), reinterpret_cast<void*>(out), rows, width,
                                 static_cast<float>(eps), kind, portable);
          }
          raise_if("add_rms_norm", error);
        },
        py::arg("x"), py::arg("delta"), py::arg("weight"), py::arg("out"), py::arg("rows"), py::arg("width"),
        py::arg("eps"), py::arg("dtype"), py::arg("portable") = false,
        "x [rows, width] += delta (0: none), then out = LlamaRMSNorm(x) with weight [width]; dtype 0 fp32, 1 bf16;\n"
        "portable: the plain loops even where the AVX-512 ones could run.");
  m.def("silu_mul",
        [](uint64_t gate_up, uint64_t out, int64_t rows, int64_t width, int dtype, bool portable) {
          const RowDType kind = row_dtype(dtype);
          std::string error;
          {
            py::gil_scoped_release release;
            error = silu_mul(reinterpret_cast<const void*>(gate_up), reinterpret_cast<void*>(out), rows, width, kind,
                             portable);
          }
          raise_if("silu_mul", error);
        },
        py::arg("gate_up"), py::arg("out"), py::arg("rows"), py::arg("width"), py::arg("dtype"),
        py::arg("portable") = false,
        "out [rows, width] = silu(gate_up[:, :width]) * gate_up[:, width:]; dtype 0 fp32, 1 bf16; portable: the\n"
        "plain loops even where the AVX-512 ones could run.");
  m.def("argmax_rows",
        [](uint64_t x, int64_t rows, int64_t width, int dtype, uint64_t out, bool portable) {
          const RowDType kind = row_dtype(dtype);
          std::string error;
          {
            py::gil_scoped_release release;
            error = argmax_rows(reinterpret_cast<const void*>(x), rows, width, kind, reinterpret_cast<int64_t*>(out),
                                portable);
          }
          raise_if("argmax_rows", error);
        },
        py::arg("x"), py::arg("rows"), py::arg("width"), py::arg("dtype"), py::arg("out"), py::arg("portable") = false,
        "out [rows] int64 = torch.argmax(x [rows, width], -1) (first maximum; a NaN counts as the maximum);\n"
        "dtype 0 fp32, 1 bf16; portable: the plain loops even where the AVX-512 ones could run.");
}

}  // namespace cai
