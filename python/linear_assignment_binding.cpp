// Bindings of the linear-assignment solvers: raw pointers (addresses of contiguous torch tensors
// prepared by merging_kernels/ops/linear_assignment.py) in, results written in place; and one entry
// that takes a numpy array and returns numpy arrays, for scipy-style calls on small problems, where
// allocating torch outputs would cost more than the solve.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <vector>

#include "bindings.h"
#include "cpu/linear_assignment.h"
#ifdef MK_WITH_CUDA
#include "cuda/linear_assignment.cuh"
#endif

namespace py = pybind11;

namespace merging_kernels {

namespace {

lsa::Options make_options(bool maximize, bool compute_float32, int num_threads, int method) {
  lsa::Options opt;
  opt.maximize = maximize;
  opt.compute_float32 = compute_float32;
  opt.num_threads = num_threads;
  opt.method = method;
  return opt;
}

py::dict stats_dict(const lsa::Stats& stats) {
  py::dict info;
  info["used_sparse"] = stats.used_sparse;
  info["sparse_fallback"] = stats.sparse_fallback;
  info["rows_rescanned"] = stats.rows_rescanned;
  info["rounds"] = stats.rounds;
  info["free_after_init"] = stats.free_after_init;
  info["row_scans"] = stats.row_scans;
  info["arr_steps"] = stats.arr_steps;
  info["warm_started"] = stats.warm_started;
  return info;
}

}  // namespace

void register_linear_assignment(py::module_& m) {
  using Solver = void (*)(const void*, int, int64_t, int64_t, int64_t, const lsa::Options&, int64_t*, int64_t*, void*,
                         void*, int32_t*, lsa::Stats*);
  auto bind_cpu = [&m](const char* name, Solver solver, const char* doc) {
    m.def(
        name,
        [solver](std::uintptr_t cost, int dtype, int64_t batch, int64_t nr, int64_t nc, bool maximize,
                 bool compute_float32, int num_threads, int method, std::uintptr_t rows, std::uintptr_t cols,
                 std::uintptr_t u, std::uintptr_t v, std::uintptr_t status, std::uintptr_t col_duals_init) {
          lsa::Options opt = make_options(maximize, compute_float32, num_threads, method);
          opt.col_duals_init = reinterpret_cast<const void*>(col_duals_init);
          lsa::Stats stats;
          {
            py::gil_scoped_release release;
            solver(reinterpret_cast<const void*>(cost), dtype, batch, nr, nc, opt, reinterpret_cast<int64_t*>(rows),
                   reinterpret_cast<int64_t*>(cols), reinterpret_cast<void*>(u), reinterpret_cast<void*>(v),
                   reinterpret_cast<int32_t*>(status), &stats);
          }
          return stats_dict(stats);
        },
        doc, py::arg("cost"), py::arg("dtype"), py::arg("batch"), py::arg("nr"), py::arg("nc"), py::arg("maximize"),
        py::arg("compute_float32"), py::arg("num_threads"), py::arg("method"), py::arg("rows"), py::arg("cols"),
        py::arg("u"), py::arg("v"), py::arg("status"), py::arg("col_duals_init") = 0);
  };
  bind_cpu("lsa_solve_cpu", &lsa::solve_batch,
           "Solve `batch` nr x nc assignment problems (dtype 0=float32, 1=float64) from contiguous memory; "
           "writes rows/cols (int64, batch x min(nr,nc)), optional duals u/v (float64, or float32 when "
           "compute_float32) and status (int32: 0 ok, 1 infeasible, 2 NaN/-inf). Returns stats of a single solve.");
  bind_cpu("lsa_solve_team_serial", &lsa::solve_batch_team_serial,
           "Same contract as lsa_solve_cpu, computed by the CUDA kernels' team algorithm run by one CPU thread "
           "(a check of that code without a GPU; not fast).");
  m.def(
      "lsa_solve_cpu_array",
      [](const py::array& cost, bool maximize, bool compute_float32, bool want_duals) {
        // 2-D: one problem, 1-D outputs (saves the caller a view and four index operations per call)
        const bool single = cost.ndim() == 2;
        if (!single && cost.ndim() != 3) throw std::invalid_argument("cost must be a 2-D or 3-D array");
        if (!(cost.flags() & py::array::c_style)) throw std::invalid_argument("cost must be C-contiguous");
        // numpy's equivalence test (py::isinstance of array_t), not dtype identity: an unpickled or
        // metadata-carrying float64 is equal to float64 but another object; byte order counts
        int dtype;
        if (py::isinstance<py::array_t<double>>(cost)) {
          dtype = 1;
        } else if (py::isinstance<py::array_t<float>>(cost)) {
          dtype = 0;
        } else {
          throw std::invalid_argument("cost must be float32 or float64 in native byte order");
        }
        const int64_t batch = single ? 1 : cost.shape(0), nr = cost.shape(single ? 0 : 1),
                      nc = cost.shape(single ? 1 : 2), k = std::min(nr, nc);
        auto shape = [&](int64_t last) {
          return single ? std::vector<py::ssize_t>{last} : std::vector<py::ssize_t>{batch, last};
        };
        py::array_t<int64_t> rows(shape(k)), cols(shape(k));
        py::array_t<int32_t> status(batch);
        py::object u = py::none(), v = py::none();
        void *u_ptr = nullptr, *v_ptr = nullptr;
        if (want_duals) {
          const py::dtype dual = compute_float32 ? py::dtype::of<float>() : py::dtype::of<double>();
          py::array ua(dual, shape(nr)), va(dual, shape(nc));
          u_ptr = ua.mutable_data();
          v_ptr = va.mutable_data();
          u = ua;
          v = va;
        }
        const lsa::Options opt = make_options(maximize, compute_float32, 0, lsa::kAuto);
        {
          py::gil_scoped_release release;  // `cost` stays referenced by the caller's frame
          lsa::solve_batch(cost.data(), dtype, batch, nr, nc, opt, rows.mutable_data(), cols.mutable_data(), u_ptr,
                           v_ptr, status.mutable_data(), nullptr);
        }
        const int32_t* codes = status.data();
        const bool all_ok = std::all_of(codes, codes + batch, [](int32_t code) { return code == lsa::kOk; });
        return py::make_tuple(rows, cols, u, v, all_ok);
      },
      "lsa_solve_cpu on a C-contiguous float32/float64 numpy array (batch, nr, nc), or (nr, nc) for one problem "
      "(then 1-D outputs): returns numpy (rows, cols, u, v) (u and v None unless want_duals) and whether every "
      "problem's status is ok "
      "(the caller re-solves through lsa_solve_cpu otherwise). ValueError for other arrays.",
      py::arg("cost"), py::arg("maximize"), py::arg("compute_float32"), py::arg("want_duals"));
  m.def(
      "lsa_solve_team_threads",
      [](std::uintptr_t cost, int dtype, int64_t batch, int64_t nr, int64_t nc, bool maximize, bool compute_float32,
         int num_threads, int method, std::uintptr_t rows, std::uintptr_t cols, std::uintptr_t u, std::uintptr_t v,
         std::uintptr_t status, int lanes) {
        const lsa::Options opt = make_options(maximize, compute_float32, num_threads, method);
        lsa::Stats stats;
        {
          py::gil_scoped_release release;
          lsa::solve_batch_team_threads(reinterpret_cast<const void*>(cost), dtype, batch, nr, nc, opt, lanes,
                                        reinterpret_cast<int64_t*>(rows), reinterpret_cast<int64_t*>(cols),
                                        reinterpret_cast<void*>(u), reinterpret_cast<void*>(v),
                                        reinterpret_cast<int32_t*>(status), &stats);
        }
        return stats_dict(stats);
      },
      "Same contract as lsa_solve_team_serial, the team algorithm run by a team of `lanes` CPU threads per "
      "problem (1..1024; ValueError otherwise): the CUDA kernels' multi-lane logic checked without a GPU, bit "
      "for bit equal to lsa_solve_team_serial. Problems run one after another; num_threads is ignored. Slow.",
      py::arg("cost"), py::arg("dtype"), py::arg("batch"), py::arg("nr"), py::arg("nc"), py::arg("maximize"),
      py::arg("compute_float32"), py::arg("num_threads"), py::arg("method"), py::arg("rows"), py::arg("cols"),
      py::arg("u"), py::arg("v"), py::arg("status"), py::arg("lanes"));
#ifdef MK_WITH_CUDA
  m.def(
      "lsa_solve_cuda",
      [](std::uintptr_t cost, int dtype, int64_t batch, int64_t nr, int64_t nc, bool maximize, bool compute_float32,
         std::uintptr_t rows, std::uintptr_t cols, std::uintptr_t u, std::uintptr_t v, std::uintptr_t status,
         std::uintptr_t workspace, int64_t workspace_bytes, std::uintptr_t stream) {
        int err;
        {
          py::gil_scoped_release release;
          err = lsa::cuda_solve_batch(reinterpret_cast<const void*>(cost), dtype, batch, nr, nc, maximize,
                                      compute_float32, reinterpret_cast<int64_t*>(rows),
                                      reinterpret_cast<int64_t*>(cols), reinterpret_cast<void*>(u),
                                      reinterpret_cast<void*>(v), reinterpret_cast<int32_t*>(status),
                                      reinterpret_cast<void*>(workspace), workspace_bytes,
                                      reinterpret_cast<void*>(stream));
        }
        if (err != 0) throw std::runtime_error(lsa::cuda_error_string(err));
      },
      "Solve `batch` nr x nc problems on the GPU (device pointers; stream as an integer handle); "
      "same outputs as lsa_solve_cpu. workspace: device memory of lsa_cuda_workspace_bytes(...) bytes.",
      py::arg("cost"), py::arg("dtype"), py::arg("batch"), py::arg("nr"), py::arg("nc"), py::arg("maximize"),
      py::arg("compute_float32"), py::arg("rows"), py::arg("cols"), py::arg("u"), py::arg("v"), py::arg("status"),
      py::arg("workspace"), py::arg("workspace_bytes"), py::arg("stream"));
  m.def("lsa_cuda_workspace_bytes", &lsa::cuda_workspace_bytes, py::arg("dtype"), py::arg("batch"), py::arg("nr"),
        py::arg("nc"), py::arg("maximize"), py::arg("compute_float32"));
#endif
}

}  // namespace merging_kernels
