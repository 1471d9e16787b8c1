// Python binding of decode_layers.h: a DecodeLayers object holds the layers' addresses (the tensors
// stay owned by Python, which keeps them alive as long as the object), and its run() takes a step's
// addresses, the GIL released while it runs; cai_fast.engine.decode_layers checks what applies.
#include "../decode_layers.h"

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

namespace py = pybind11;

namespace cai {

namespace {
const uint16_t* bf16(uint64_t address) { return reinterpret_cast<const uint16_t*>(address); }

DecodeLayer layer_of(const py::tuple& t) {
  if (t.size() != 15) throw py::value_error("DecodeLayers: a layer is a tuple of 15 items");
  auto u = [&](size_t i) { return t[i].cast<uint64_t>(); };
  return DecodeLayer{bf16(u(0)),     t[1].cast<float>(), bf16(u(2)),  bf16(u(3)),
                     bf16(u(4)),     bf16(u(5)),         bf16(u(6)),  t[7].cast<float>(),
                     bf16(u(8)),     bf16(u(9)),         bf16(u(10)), bf16(u(11)),
                     reinterpret_cast<void*>(u(12)), reinterpret_cast<void*>(u(13)), t[14].cast<int64_t>()};
}
}  // namespace

void register_decode_layers(py::module_& m) {
  py::class_<DecodeModel>(m, "DecodeLayers",
                          "A bf16 decoder's layers for decode_layers (csrc/decode_layers.h): addresses only.")
      .def(py::init([](const std::vector<py::tuple>& layers, uint64_t final_norm, double final_eps, int64_t hidden,
                       int64_t inter, int64_t q_heads, int64_t kv_heads, int64_t head_dim, int64_t block_size,
                       int64_t num_slots, double scale) {
             if (hidden <= 0 || inter <= 0 || q_heads <= 0 || kv_heads <= 0 || head_dim <= 0 || block_size <= 0 ||
                 q_heads % kv_heads)
               throw py::value_error("DecodeLayers: sizes must be positive, q_heads a multiple of kv_heads");
             DecodeModel model{{}, bf16(final_norm), static_cast<float>(final_eps), hidden, inter, q_heads,
                               kv_heads, head_dim, block_size, num_slots, static_cast<float>(scale)};
             for (const py::tuple& t : layers) model.layers.push_back(layer_of(t));
             return model;
           }),
           py::arg("layers"), py::arg("final_norm"), py::arg("final_eps"), py::arg("hidden"), py::arg("inter"),
           py::arg("q_heads"), py::arg("kv_heads"), py::arg("head_dim"), py::arg("block_size"), py::arg("num_slots"),
           py::arg("scale"),
           "layers: per layer (input_norm, input_eps, qkv, qkv_bias, o, o_bias, post_norm, post_eps, gate_up,\n"
           "gate_up_bias, down, down_bias, k_pool, v_pool, window): bf16 addresses (projections packed by\n"
           "pack_linear_weight, biases 0: none), eps as floats, window 0: full attention.")
      .def("__len__", [](const DecodeModel& model) { return model.layers.size(); })
      .def("run",
           [](const DecodeModel& model, uint64_t x, int64_t rows, uint64_t tables, int64_t table_stride,
              uint64_t kv_lens, uint64_t cos, uint64_t sin, uint64_t shared, uint64_t out) {
             std::string error;
             {
               py::gil_scoped_release release;
               error = decode_layers(model, reinterpret_cast<uint16_t*>(x), rows, reinterpret_cast<const int64_t*>(tables),
                                     table_stride, reinterpret_cast<const int64_t*>(kv_lens), bf16(cos), bf16(sin),
                                     reinterpret_cast<const int64_t*>(shared), reinterpret_cast<uint16_t*>(out));
             }
             if (!error.empty()) throw py::value_error("decode_layers: " + error);
           },
           py::arg("x"), py::arg("rows"), py::arg("tables"), py::arg("table_stride"), py::arg("kv_lens"),
           py::arg("cos"), py::arg("sin"), py::arg("shared"), py::arg("out"),
           "One decode step: x [rows, hidden] bf16 (the embedded new tokens, overwritten) through every layer\n"
           "into out [rows, hidden] (the final norm's output); tables [rows, table_stride] and kv_lens [rows] int64\n"
           "as paged_decode_attention takes them, cos and sin [rows, head_dim] bf16, shared [layers] int64.");
}

}  // namespace cai
