// pybind11 binding of the task-vector CPU kernels (csrc/cpu/task_vectors.cpp).
//
// Tensors cross as raw addresses (ints) of contiguous CPU tensors, so _C needs no
// torch headers; the Python wrappers in merging_kernels/ops/task_vectors.py
// ("native (C++/OpenMP)") validate the tensors and keep them alive. Size
// mismatches raise ValueError (std::invalid_argument). The GIL is released while
// the kernels run.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "bindings.h"
#include "common/philox.h"
#include "cpu/task_vectors.h"

namespace py = pybind11;

namespace merging_kernels {
namespace {

template <class T>
T* as_pointer(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

cpu::TaskTensors make_tensors(const std::vector<uintptr_t>& base_ptrs, const std::vector<uintptr_t>& expert_ptrs,
                              const std::vector<int64_t>& numels, const std::vector<int64_t>& dtypes,
                              const std::vector<int64_t>& tensor_keys, const std::vector<int64_t>& segment_ids,
                              int64_t num_tasks) {
  cpu::TaskTensors t;
  t.bases.reserve(base_ptrs.size());
  for (uintptr_t p : base_ptrs) t.bases.push_back(as_pointer<const void>(p));
  t.experts.reserve(expert_ptrs.size());
  for (uintptr_t p : expert_ptrs) t.experts.push_back(as_pointer<const void>(p));
  t.numels = numels;
  t.dtypes = dtypes;
  t.tensor_keys.reserve(tensor_keys.size());
  for (size_t i = 0; i < tensor_keys.size(); ++i) {
    const int64_t key = tensor_keys[i];
    if (key < 0 || key > int64_t{0xFFFFFFFF})
      throw std::invalid_argument("tensor_keys[" + std::to_string(i) + "] = " + std::to_string(key) +
                                  " is not a uint32");
    t.tensor_keys.push_back(static_cast<uint32_t>(key));
  }
  t.segment_ids = segment_ids;
  t.num_tasks = num_tasks;
  return t;
}

cpu::Dare make_dare(int64_t drop_threshold, double drop_scale, uint64_t seed) {
  if (drop_threshold < 0 || drop_threshold > int64_t{0xFFFFFFFF})
    throw std::invalid_argument("drop_threshold = " + std::to_string(drop_threshold) + " is not a uint32");
  cpu::Dare dare;
  dare.threshold = static_cast<uint32_t>(drop_threshold);
  dare.scale = static_cast<float>(drop_scale);
  dare.seed = seed;
  return dare;
}

}  // namespace

void register_task_vectors(py::module_& m) {
  m.def(
      "task_vectors_histogram",
      [](const std::vector<uintptr_t>& base_ptrs, const std::vector<uintptr_t>& expert_ptrs,
         const std::vector<int64_t>& numels, const std::vector<int64_t>& dtypes,
         const std::vector<int64_t>& tensor_keys, const std::vector<int64_t>& segment_ids, int64_t num_segments,
         int64_t num_tasks, int shift, int bits, uintptr_t prefix_ptr, uintptr_t counts_ptr, int64_t drop_threshold,
         double drop_scale, uint64_t seed) {
        const cpu::TaskTensors tensors =
            make_tensors(base_ptrs, expert_ptrs, numels, dtypes, tensor_keys, segment_ids, num_tasks);
        const cpu::Dare dare = make_dare(drop_threshold, drop_scale, seed);
        py::gil_scoped_release release;
        cpu::task_vectors_histogram(tensors, num_segments, shift, bits, as_pointer<const int64_t>(prefix_ptr),
                                    as_pointer<int64_t>(counts_ptr), dare);
      },
      py::arg("base_ptrs"), py::arg("expert_ptrs"), py::arg("numels"), py::arg("dtypes"), py::arg("tensor_keys"),
      py::arg("segment_ids"), py::arg("num_segments"), py::arg("num_tasks"), py::arg("shift"), py::arg("bits"),
      py::arg("prefix_ptr"), py::arg("counts_ptr"), py::arg("drop_threshold"), py::arg("drop_scale"),
      py::arg("seed"),
      "Radix-select histogram pass: adds into counts (int64, S*K*2^bits) the digit (key >> shift) & (2^bits-1) "
      "of |expert - base| (float32 bits, after DARE) wherever key >> (shift+bits) matches prefix[s*K+k].");

  m.def(
      "task_vectors_apply",
      [](const std::vector<uintptr_t>& base_ptrs, const std::vector<uintptr_t>& expert_ptrs,
         const std::vector<uintptr_t>& out_ptrs, const std::vector<int64_t>& numels,
         const std::vector<int64_t>& in_dtypes, const std::vector<int64_t>& out_dtypes,
         const std::vector<int64_t>& tensor_keys, const std::vector<int64_t>& segment_ids, int64_t num_tasks,
         uintptr_t weights_ptr, double scale, uintptr_t thresholds_ptr, bool elect_sign, bool normalize,
         int64_t drop_threshold, double drop_scale, uint64_t seed, uintptr_t counts_ptr) {
        const cpu::TaskTensors tensors =
            make_tensors(base_ptrs, expert_ptrs, numels, in_dtypes, tensor_keys, segment_ids, num_tasks);
        const cpu::Dare dare = make_dare(drop_threshold, drop_scale, seed);
        std::vector<void*> outs;
        outs.reserve(out_ptrs.size());
        for (uintptr_t p : out_ptrs) outs.push_back(as_pointer<void>(p));
        py::gil_scoped_release release;
        cpu::task_vectors_apply(tensors, outs, out_dtypes, as_pointer<const float>(weights_ptr),
                                static_cast<float>(scale), as_pointer<const float>(thresholds_ptr), elect_sign,
                                normalize, dare, as_pointer<int64_t>(counts_ptr));
      },
      py::arg("base_ptrs"), py::arg("expert_ptrs"), py::arg("out_ptrs"), py::arg("numels"), py::arg("in_dtypes"),
      py::arg("out_dtypes"), py::arg("tensor_keys"), py::arg("segment_ids"), py::arg("num_tasks"),
      py::arg("weights_ptr"), py::arg("scale"), py::arg("thresholds_ptr"), py::arg("elect_sign"),
      py::arg("normalize"), py::arg("drop_threshold"), py::arg("drop_scale"), py::arg("seed"),
      py::arg("counts_ptr"),
      "Fused apply pass: out = base + scale * combine(kept task vectors), written in the out dtype; adds per "
      "tensor t into counts (int64, T x 2) the number of non-finite expert - base [2t] and of outputs not finite "
      "in the out dtype where the base is not that value there [2t+1] (see cpu/task_vectors.h). thresholds_ptr 0: "
      "no trim.");

  m.def(
      "philox4x32_10",
      [](uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
        uint32_t out[4];
        philox::philox4x32_10(c0, c1, c2, c3, k0, k1, out);
        return py::make_tuple(out[0], out[1], out[2], out[3]);
      },
      py::arg("c0"), py::arg("c1"), py::arg("c2"), py::arg("c3"), py::arg("k0"), py::arg("k1"),
      "Philox4x32-10 of csrc/common/philox.h (for tests): the four output words.");

  m.def("task_vectors_isa", &cpu::task_vectors_isa,
        "Instruction-set variant of the CPU task-vector kernels ('avx2' or 'generic'; "
        "MERGING_KERNELS_CPU_ISA=generic forces the portable one).");
}

}  // namespace merging_kernels
