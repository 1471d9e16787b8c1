// cai_fast._cuda: the CUDA kernels of kv_cache.h bound to Python (integers only: device
// addresses from tensor.data_ptr(), sizes, strides in bytes, the stream's cuda_stream).
#include "kv_cache.h"

#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

namespace py = pybind11;

namespace {

void raise_if(const std::string& what, const std::string& error) {
  if (!error.empty()) throw std::runtime_error(what + ": CUDA error: " + error);
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "cai_fast CUDA kernels of the paged KV pool (device addresses and sizes as integers)";
  m.def("store_kv", [](uint64_t k_src, uint64_t v_src, int64_t src_stride, uint64_t k_dst, uint64_t v_dst,
                       int64_t dst_stride, uint64_t slots, int64_t n, int64_t row_bytes, uint64_t stream) {
          raise_if("store_kv", cai::store_kv(k_src, v_src, src_stride, k_dst, v_dst, dst_stride, slots, n,
                                             row_bytes, stream));
        }, py::arg("k_src"), py::arg("v_src"), py::arg("src_stride"), py::arg("k_dst"), py::arg("v_dst"),
        py::arg("dst_stride"), py::arg("slots"), py::arg("n"), py::arg("row_bytes"), py::arg("stream"),
        "dst[slots[i]] = src[i] for K and V rows of row_bytes bytes (strides in bytes).");
  m.def("zero_blocks", [](uint64_t bases, int64_t num_tensors, uint64_t blocks, int64_t n, int64_t block_bytes,
                          uint64_t stream) {
          raise_if("zero_blocks", cai::zero_blocks(bases, num_tensors, blocks, n, block_bytes, stream));
        }, py::arg("bases"), py::arg("num_tensors"), py::arg("blocks"), py::arg("n"), py::arg("block_bytes"),
        py::arg("stream"), "Zero block_bytes at base + id * block_bytes for every base and block id.");
}
