// CPU (C++/OpenMP) kernels of the task-vector op family: the radix-select
// histogram pass and the fused apply pass of merging_kernels/ops/task_vectors.py.
//
// Tensors arrive as raw pointers to contiguous CPU memory; the caller (the
// pybind11 binding) keeps them alive. Both entry points validate their sizes
// and throw std::invalid_argument before touching memory.
#pragma once

#include <cstdint>
#include <vector>

namespace merging_kernels {
namespace cpu {

// dtype codes shared with the Python wrappers (_DTYPE_CODES).
enum DTypeCode : int64_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// T tensors: a base and K experts each (experts laid out [t * K + k]), one dtype
// per tensor (the experts share the base's), an RNG key and a trim segment.
struct TaskTensors {
  std::vector<const void*> bases;    // T
  std::vector<const void*> experts;  // T * K
  std::vector<int64_t> numels;       // T
  std::vector<int64_t> dtypes;       // T, DTypeCode
  std::vector<uint32_t> tensor_keys; // T
  std::vector<int64_t> segment_ids;  // T, in [0, S)
  int64_t num_tasks = 0;             // K
};

// DARE: an entry is dropped iff (philox word0 >> 8) < threshold; kept entries are
// multiplied by scale. threshold 0: no DARE (the RNG is skipped).
struct Dare {
  uint32_t threshold = 0;
  float scale = 1.0f;
  uint64_t seed = 0;
};

// Adds into counts (S * K * 2^bits int64, row (s * K + k)) the digit
// (key >> shift) & (2^bits - 1) of every entry whose key >> (shift + bits)
// equals prefix[s * K + k] >> (shift + bits), where key is the float32 bit
// pattern of |d| and d = expert - base (float32; 0 where the two are equal, infinities
// included) after DARE.
void task_vectors_histogram(const TaskTensors& tensors, int64_t num_segments, int shift, int bits,
                            const int64_t* prefix, int64_t* counts, const Dare& dare);

// out[t] = base[t] + scale * m, m the plain (task arithmetic) or sign-elected
// (TIES) combination of the kept task vectors, converted to out_dtypes[t].
// weights: T * K float32; thresholds: S * K float32 (S > every segment id) or
// nullptr (no trim).
// counts (T x 2 int64, row-major) gets added, per tensor: [0] the number of
// (element, task) pairs whose expert - base (float32, before DARE; 0 where the two
// are equal) is NaN or infinite; [1] the number of output entries that are NaN or
// infinite in the output dtype where the base entry, rounded to that dtype, is finite, or
// is ±inf while the output is NaN or the other infinity.
void task_vectors_apply(const TaskTensors& tensors, const std::vector<void*>& outs,
                        const std::vector<int64_t>& out_dtypes, const float* weights, float scale,
                        const float* thresholds, bool elect_sign, bool normalize,
                        const Dare& dare, int64_t* counts);

// Which instruction-set variant the kernels run ("avx2" or "generic"); the
// environment variable MERGING_KERNELS_CPU_ISA=generic forces the portable one.
const char* task_vectors_isa();

}  // namespace cpu
}  // namespace merging_kernels
