// Python binding of block_pool.h: argument conversion and names only, no algorithm.
#include "../block_pool.h"

#include "py_ints.h"

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

namespace py = pybind11;

namespace cai {

void register_block_pool(py::module_& m) {
  py::class_<BlockPool, std::shared_ptr<BlockPool>>(m, "BlockPool",
      "A fixed pool of KV block ids [0, num_blocks); alloc pops the free stack, free pushes.")
      .def(py::init<int64_t, int64_t>(), py::arg("num_blocks"), py::arg("block_size"))
      .def("alloc", &BlockPool::alloc, py::arg("n"), "Take n free block ids (RuntimeError if fewer are free).")
      .def("free", [](BlockPool& p, py::handle ids) { p.free(ints_from<int64_t>(ids, "free: ids")); }, py::arg("ids"),
           "Return blocks from alloc to the pool (ValueError on double free, out of range, cached).")
      .def_property_readonly("num_free", &BlockPool::num_free)
      .def_property_readonly("num_blocks", &BlockPool::num_blocks)
      .def_property_readonly("block_size", &BlockPool::block_size)
      .def("__repr__", [](const BlockPool& p) {
        return "BlockPool(num_blocks=" + std::to_string(p.num_blocks()) + ", block_size=" +
               std::to_string(p.block_size()) + ", num_free=" + std::to_string(p.num_free()) + ")";
      });
}

}  // namespace cai
