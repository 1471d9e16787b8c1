// cai_fast._core: the compiled half of cai_fast, bound to Python here and only here (the algorithms
// in csrc/*.cpp include no pybind11). Integers (and tensor addresses) in, integers out; no libtorch. One register_*.cpp a concern.
#include <pybind11/pybind11.h>

namespace py = pybind11;

namespace cai {
void register_attention(py::module_& m);
void register_block_pool(py::module_& m);
void register_decode_layers(py::module_& m);
void register_linear(py::module_& m);
void register_radix_cache(py::module_& m);
void register_rows(py::module_& m);
void register_scheduler(py::module_& m);
}  // namespace cai

#define STRINGIFY(x) #x
#define MACRO_STRINGIFY(x) STRINGIFY(x)

PYBIND11_MODULE(_core, m) {
    m.doc() = "cai_fast compiled core: prefix cache, batch scheduler, CPU decode attention, row kernels, the AMX linear and the decode step's layer loop (integers and addresses only)";
#ifdef VERSION_INFO
    m.attr("__version__") = MACRO_STRINGIFY(VERSION_INFO);
#else
    m.attr("__version__") = "dev";
#endif
    cai::register_attention(m);
    cai::register_block_pool(m);
    cai::register_decode_layers(m);
    cai::register_linear(m);
    cai::register_radix_cache(m);
    cai::register_rows(m);
    cai::register_scheduler(m);
}
