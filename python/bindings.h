// Each op family binds its kernels in its own file and is registered from module.cpp.
#pragma once
#include <pybind11/pybind11.h>

namespace merging_kernels {
void register_task_vectors(pybind11::module_& m);
void register_linear_assignment(pybind11::module_& m);
void register_zip_matching(pybind11::module_& m);
}  // namespace merging_kernels
