// Host entry points of the CUDA linear-assignment solver (csrc/cuda/linear_assignment.cu).
// Plain C++ declarations: callable from the binding without CUDA or torch headers.
#pragma once
#include <cstdint>

namespace merging_kernels {
namespace lsa {

// Device workspace the solve needs, in bytes (0 is possible): converted cost copies for problems that
// must be converted / negated / transposed and do not fit in shared memory, and work vectors of
// problems too wide for shared memory. Depends only on the arguments (no device query).
int64_t cuda_workspace_bytes(int dtype, int64_t batch, int64_t nr, int64_t nc, bool maximize, bool compute_float32);

// Solves `batch` problems of nr x nc costs (device memory, contiguous, float32 if dtype == 0 else
// float64) on `stream` (a cudaStream_t; null = the legacy default stream). Same outputs as
// lsa::solve_batch (rows/cols int64, u/v in the compute dtype or null, status int32 per problem),
// all device pointers, written asynchronously. Returns 0, or a cudaError_t code from the launches.
int cuda_solve_batch(const void* cost, int dtype, int64_t batch, int64_t nr, int64_t nc, bool maximize,
                     bool compute_float32, int64_t* rows, int64_t* cols, void* u, void* v, int32_t* status,
                     void* workspace, int64_t workspace_bytes, void* stream);

const char* cuda_error_string(int err);

}  // namespace lsa
}  // namespace merging_kernels
