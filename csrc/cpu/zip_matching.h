// CPU kernel of the zip-matching op family: the ZipIt-style greedy zip of
// merging_kernels/ops/zip_matching.py, sequential by nature (each merge changes the
// similarities the next one picks from).
//
// The similarity matrix arrives as a raw pointer to contiguous CPU memory that the
// kernel works on in place (the caller passes its own copy). Sizes are validated
// before memory is touched (std::invalid_argument).
#pragma once

#include <cstdint>

namespace merging_kernels {
namespace cpu {

// Greedy zip of m = 2n units on the (m, m) row-major similarity `sim` (float or
// double; overwritten): n times, merge the first maximum (i, j) in row-major order
// (i absorbs j), then unit i's similarity to every other unit k becomes
// min(sim[i][k], sim[j][k]) * factor (-inf stays -inf) and unit j leaves. The
// diagonal must be -inf and every other entry finite (the caller checks).
// Writes the pairs to pairs (n x 2 int64: i, j). Keeps each row's first maximum up
// to date, O(m^2) in all.
void greedy_zip_f32(float* sim, int64_t m, float factor, int64_t* pairs);
void greedy_zip_f64(double* sim, int64_t m, double factor, int64_t* pairs);

}  // namespace cpu
}  // namespace merging_kernels
