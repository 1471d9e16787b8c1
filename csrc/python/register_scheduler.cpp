// Python binding of scheduler.h: argument conversion and names only, no algorithm.
#include "../scheduler.h"

#include "py_ints.h"

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

namespace py = pybind11;

namespace cai {

void register_scheduler(py::module_& m) {
  py::class_<ScheduledRequest>(m, "ScheduledRequest", "One admitted request of a schedule() batch.")
      .def_readonly("request_id", &ScheduledRequest::request_id)
      .def_readonly("cached_len", &ScheduledRequest::cached_len)
      .def_readonly("block_table", &ScheduledRequest::block_table)
      .def_readonly("tokens_to_compute", &ScheduledRequest::tokens_to_compute)
      .def("__repr__", [](const ScheduledRequest& r) {
        return "ScheduledRequest(request_id=" + std::to_string(r.request_id) + ", cached_len=" + std::to_string(r.cached_len) +
               ", blocks=" + std::to_string(r.block_table.size()) + ", to_compute=" + std::to_string(r.tokens_to_compute.size()) + ")";
      });
  py::class_<FailedRequest>(m, "FailedRequest", "A request that can never fit in the pool.")
      .def_readonly("request_id", &FailedRequest::request_id)
      .def_readonly("reason", &FailedRequest::reason)
      .def("__repr__", [](const FailedRequest& r) {
        return "FailedRequest(request_id=" + std::to_string(r.request_id) + ", reason='" + r.reason + "')";
      });
  py::class_<ScheduleOutput>(m, "ScheduleOutput", "What schedule() admitted and what it failed.")
      .def_readonly("scheduled", &ScheduleOutput::scheduled)
      .def_readonly("failed", &ScheduleOutput::failed);
  py::class_<BatchScheduler>(m, "BatchScheduler", "Prefix-aware batch scheduler over a RadixCache.")
      .def(py::init<std::shared_ptr<RadixCache>, const std::string&, int64_t, int64_t, int64_t>(),
           py::arg("cache"), py::arg("policy"), py::arg("token_budget"), py::arg("dedup_min_tokens") = 32,
           py::arg("lpm_max_queue") = 128)
      .def("add", [](BatchScheduler& s, int64_t id, py::handle tokens, int64_t max_new_tokens,
                     std::optional<int64_t> logits_from) {
             s.add(id, ints_from<int32_t>(tokens, "add: tokens"), max_new_tokens, logits_from);
           }, py::arg("request_id"), py::arg("tokens"), py::arg("max_new_tokens") = 0,
           py::arg("logits_from") = py::none())
      .def("schedule", &BatchScheduler::schedule, py::arg("max_requests") = py::none())
      .def("cache_computed", [](BatchScheduler& s, int64_t id, py::handle tokens) {
             return s.cache_computed(id, ints_from<int32_t>(tokens, "cache_computed: tokens"));
           }, py::arg("request_id"), py::arg("tokens"))
      .def("finish", [](BatchScheduler& s, int64_t id, py::handle tokens) {
             s.finish(id, ints_from<int32_t>(tokens, "finish: tokens"));
           }, py::arg("request_id"), py::arg("tokens"))
      .def("abort", &BatchScheduler::abort, py::arg("request_id"))
      .def_property_readonly("num_waiting", &BatchScheduler::num_waiting)
      .def_property_readonly("num_running", &BatchScheduler::num_running)
      .def_property_readonly("cache", &BatchScheduler::cache);
}

}  // namespace cai
