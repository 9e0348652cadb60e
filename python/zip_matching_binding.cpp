// pybind11 binding of the greedy-zip CPU kernel (csrc/cpu/zip_matching.cpp).
//
// The similarity crosses as the raw address of a contiguous CPU tensor that the
// kernel overwrites; merging_kernels/ops/zip_matching.py validates it, passes its
// own copy and keeps it alive. The GIL is released while the kernel runs.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "bindings.h"
#include "cpu/zip_matching.h"

namespace py = pybind11;

namespace merging_kernels {

void register_zip_matching(py::module_& m) {
  m.def(
      "greedy_zip",
      [](uintptr_t sim_ptr, int64_t m, bool is_double, double factor, uintptr_t pairs_ptr) {
        py::gil_scoped_release release;
        int64_t* pairs = reinterpret_cast<int64_t*>(pairs_ptr);
        if (is_double)
          cpu::greedy_zip_f64(reinterpret_cast<double*>(sim_ptr), m, factor, pairs);
        else
          cpu::greedy_zip_f32(reinterpret_cast<float*>(sim_ptr), m, static_cast<float>(factor), pairs);
      },
      py::arg("sim_ptr"), py::arg("m"), py::arg("is_double"), py::arg("factor"), py::arg("pairs_ptr"),
      "Greedy zip of m units on the (m, m) similarity at sim_ptr (float32, or float64 with is_double; "
      "overwritten; -inf diagonal, finite elsewhere): writes the n = m/2 merged pairs (i absorbs j) to "
      "pairs_ptr (int64, n x 2).");
}

}  // namespace merging_kernels
