// The extension merging_kernels._C: build facts plus one register_* call per op family.
#include <pybind11/pybind11.h>
#ifdef MK_WITH_OPENMP
#include <omp.h>
#endif

#include "bindings.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "merging_kernels native kernels (C++/OpenMP on CPU, CUDA where compiled)";
  m.def("build_info", []() {
    py::dict info;
#ifdef MK_WITH_CUDA
    info["cuda"] = true;
#else
    info["cuda"] = false;
#endif
#ifdef MK_WITH_OPENMP
    info["openmp"] = true;
    info["max_threads"] = omp_get_max_threads();
#else
    info["openmp"] = false;
    info["max_threads"] = 1;
#endif
    return info;
  });
  merging_kernels::register_task_vectors(m);
  merging_kernels::register_linear_assignment(m);
  merging_kernels::register_zip_matching(m);
}
