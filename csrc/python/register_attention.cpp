// Python binding of paged_attention.h: addresses and sizes as integers (tensor.data_ptr()), the
// GIL released while the kernel runs; cai_fast.engine.attention checks shapes and dtypes first.
#include "../paged_attention.h"

#include <pybind11/pybind11.h>

#include <stdexcept>

namespace py = pybind11;

namespace cai {

void register_attention(py::module_& m) {
  m.def("paged_decode_attention",
        [](uint64_t q, uint64_t out, uint64_t k, uint64_t v, uint64_t tables, int64_t table_stride, uint64_t kv_lens,
           int64_t batch, int64_t q_heads, int64_t kv_heads, int64_t head_dim, int64_t block_size, int64_t window,
           int64_t shared, double scale, int dtype, int64_t num_slots, bool portable, uint64_t q_new, uint64_t k_new,
           uint64_t v_new, int64_t q_stride, int64_t kv_stride, uint64_t cos, uint64_t sin) {
          if (dtype != 0 && dtype != 1) throw py::value_error("paged_decode_attention: dtype must be 0 (fp32) or 1 (bf16)");
          PagedDecode a{reinterpret_cast<const void*>(q), reinterpret_cast<void*>(out),
                        reinterpret_cast<void*>(k), reinterpret_cast<void*>(v),
                        reinterpret_cast<const int64_t*>(tables), table_stride,
                        reinterpret_cast<const int64_t*>(kv_lens), batch, q_heads, kv_heads, head_dim, block_size,
                        window, shared, static_cast<float>(scale), static_cast<AttnDType>(dtype), num_slots};
          NewTokens fresh{reinterpret_cast<const void*>(q_new), reinterpret_cast<const void*>(k_new),
                          reinterpret_cast<const void*>(v_new), q_stride, kv_stride,
                          reinterpret_cast<const void*>(cos), reinterpret_cast<const void*>(sin)};
          std::string error;
          {
            py::gil_scoped_release release;
            error = paged_decode_attention(a, k_new ? &fresh : nullptr, portable);
          }
          if (!error.empty()) throw py::value_error("paged_decode_attention: " + error);
        },
        py::arg("q"), py::arg("out"), py::arg("k"), py::arg("v"), py::arg("tables"), py::arg("table_stride"),
        py::arg("kv_lens"), py::arg("batch"), py::arg("q_heads"), py::arg("kv_heads"), py::arg("head_dim"),
        py::arg("block_size"), py::arg("window"), py::arg("shared"), py::arg("scale"), py::arg("dtype"), py::arg("num_slots"), py::arg("portable") = false,
        py::arg("q_new") = 0, py::arg("k_new") = 0, py::arg("v_new") = 0, py::arg("q_stride") = 0,
        py::arg("kv_stride") = 0, py::arg("cos") = 0, py::arg("sin") = 0,
        "Decode attention of q [batch, q_heads, head_dim] over a layer's paged K/V [slots, kv_heads, head_dim]\n"
        "through int64 block tables [batch, table_stride] and context lengths [batch], into out (q's shape).\n"
        "dtype: 0 fp32, 1 bf16 (q, out, k, v alike); window 0: full attention; shared: leading keys in the\n"
        "same blocks of every table, scored once for every request (0 with a window); portable: the plain loops even\n"
        "where the AVX-512 ones could run. With k_new: the new tokens (q_new, k_new, v_new, rows q_stride /\n"
        "kv_stride elements apart) before the rotary embedding, with cos and sin [batch, head_dim]: the kernel\n"
        "rotates q and k as transformers does, stores k and v at each request's last position and attends\n"
        "with the rotated q (q is then unused). CPU addresses only.");
}

}  // namespace cai
