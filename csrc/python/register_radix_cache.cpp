// Python binding of radix_cache.h: argument conversion and names only, no algorithm.
#include "../radix_cache.h"

#include "py_ints.h"

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

namespace py = pybind11;

namespace cai {

void register_radix_cache(py::module_& m) {
  py::class_<MatchResult>(m, "MatchResult", "Result of RadixCache.match_prefix.")
      .def_readonly("length", &MatchResult::length, "matched tokens, a multiple of block_size")
      .def_readonly("blocks", &MatchResult::blocks, "block ids covering the matched tokens")
      .def_readonly("node", &MatchResult::node, "handle of the node where the match ends (lock it)")
      .def("__repr__", [](const MatchResult& r) {
        return "MatchResult(length=" + std::to_string(r.length) + ", blocks=<" + std::to_string(r.blocks.size()) +
               " ids>, node=" + std::to_string(r.node) + ")";
      });
  py::class_<RadixCache, std::shared_ptr<RadixCache>>(m, "RadixCache",
      "Radix tree over token ids whose nodes own KV blocks of a BlockPool (whole blocks only).")
      .def(py::init<std::shared_ptr<BlockPool>>(), py::arg("pool"))
      .def("match_prefix", [](RadixCache& c, py::handle tokens) {
             return c.match_prefix(ints_from<int32_t>(tokens, "match_prefix: tokens"));
           }, py::arg("tokens"))
      .def("insert", [](RadixCache& c, py::handle tokens, py::handle blocks) {
             return c.insert(ints_from<int32_t>(tokens, "insert: tokens"),
                             ints_from<int64_t>(blocks, "insert: blocks"));
           }, py::arg("tokens"), py::arg("blocks"))
      .def("evict", &RadixCache::evict, py::arg("num_tokens"))
      .def("lock", &RadixCache::lock, py::arg("node"))
      .def("unlock", &RadixCache::unlock, py::arg("node"))
      .def("check_integrity", &RadixCache::check_integrity)
      .def("_debug_set_lock_ref", &RadixCache::debug_set_lock_ref, py::arg("node"), py::arg("value"))
      .def_property_readonly("evictable_size", &RadixCache::evictable_size)
      .def_property_readonly("protected_size", &RadixCache::protected_size)
      .def_property_readonly("total_size", &RadixCache::total_size)
      .def_property_readonly("block_size", &RadixCache::block_size)
      .def_property_readonly("pool", &RadixCache::pool);
}

}  // namespace cai
