// Exact linear assignment (min-cost perfect matching of the smaller side) on CPU.
//
// A Jonker–Volgenant shortest-augmenting-path solver: column reduction and reduction transfer
// (square problems), augmenting row reduction, then Dijkstra-style augmentation with dense,
// vectorised scans of contiguous cost rows. Large square problems first try a sparse
// candidate-graph solve whose optimality is certified row by row against the dense matrix (and
// fall back to the dense solver when the certificate cannot be completed); the result is exact
// either way. Square problems may start from given column potentials (a warm start: Options::
// col_duals_init) instead of the reductions. Batches run one problem per OpenMP thread. The row scans
// use AVX where the CPU has it; MERGING_KERNELS_CPU_ISA=generic forces the portable ones: the same
// assignments, and duals bit for bit (but for the sign of a zero, where costs hold -0.0). No Python or
// torch here.
#pragma once
#include <cstdint>

namespace merging_kernels {
namespace lsa {

enum Status : int32_t {
  kOk = 0,
  kInfeasible = 1,  // no assignment of finite cost covers the smaller side
  kInvalid = 2,     // NaN, or -inf (+inf when maximizing)
  kOutOfRange = 3,  // a finite |cost| beyond team::safe_magnitude: the caller rescales and retries
};

enum Method : int32_t {
  kAuto = 0,    // sparse-then-certify for large square problems, dense otherwise
  kDense = 1,   // always the dense LAPJV solver
  kSparse = 2,  // sparse-then-certify whenever the problem is square (falls back to dense if needed)
};

struct Options {
  bool maximize = false;
  bool compute_float32 = false;  // compute (and return duals) in float32 instead of float64
  int num_threads = 0;           // 0: OpenMP default
  int32_t method = kAuto;
  // Column potentials to start from (batch x nc, in the compute dtype and the caller's sign convention: the v
  // of an earlier solve of a similar problem), or null. Used for square problems by solve_batch (the team
  // solvers ignore it): any values give an optimal result; ones near the problem's duals shorten the solve.
  // Values that are unusable (not finite; further below the column minima than 4 times the spread of the
  // row and column minima), poor (a quarter of the rows left free by the first reduction) or costly (over
  // 32 row scans per row of searching) fall back to the cold start.
  const void* col_duals_init = nullptr;
};

struct Stats {  // what the last single-problem solve did (for tests and benchmarks)
  int32_t used_sparse = 0;      // the sparse path ran
  int32_t sparse_fallback = 0;  // ... and handed over to dense scans to finish
  int32_t rows_rescanned = 0;   // dense row checks made by the sparse path
  int32_t rounds = 0;           // certification rounds of the sparse path
  int64_t free_after_init = 0;  // rows left free by the reductions (dense path)
  int64_t row_scans = 0;        // Dijkstra row scans (dense path)
  int64_t arr_steps = 0;        // augmenting-row-reduction steps (dense path)
  int32_t warm_started = 0;     // the solve ran from Options::col_duals_init (not given up for a cold start)
};

// Solves `batch` independent problems of nr x nc costs, stored contiguously (row-major, problem
// after problem) as float32 (dtype 0) or float64 (dtype 1). +inf marks a forbidden pair (-inf when
// maximizing). Writes, per problem b with k = min(nr, nc):
//   rows[b*k + t], cols[b*k + t]: the assignment, rows ascending (scipy's convention);
//   u[b*nr + i], v[b*nc + j] (if non-null; float64, or float32 when compute_float32): dual
//     potentials with u_i + v_j <= c_ij (>= when maximizing), equality on the assignment, and, for
//     rectangular problems, the duals of the larger side <= 0 (>= 0 when maximizing) and 0 on its
//     unassigned entries: together a certificate of optimality;
//   status[b]: a Status. Outputs of problems that are not kOk are unspecified.
void solve_batch(const void* cost, int dtype, int64_t batch, int64_t nr, int64_t nc, const Options& options,
                 int64_t* rows, int64_t* cols, void* u, void* v, int32_t* status, Stats* stats = nullptr);

// The CUDA kernels' team algorithm (csrc/common/lsa_team.h) run on the CPU by a team of one
// thread, with the same contract: the tests check that code here, without a GPU.
void solve_batch_team_serial(const void* cost, int dtype, int64_t batch, int64_t nr, int64_t nc,
                             const Options& options, int64_t* rows, int64_t* cols, void* u, void* v, int32_t* status,
                             Stats* stats = nullptr);

// The same run by a team of `lanes` threads per problem (1..1024, else std::invalid_argument), problems
// one after another: the kernels' multi-lane logic checked without a GPU. Bit for bit the results of
// solve_batch_team_serial (every team decision is a (value, index) reduction). Test-only, slow.
void solve_batch_team_threads(const void* cost, int dtype, int64_t batch, int64_t nr, int64_t nc,
                              const Options& options, int lanes, int64_t* rows, int64_t* cols, void* u, void* v,
                              int32_t* status, Stats* stats = nullptr);

}  // namespace lsa
}  // namespace merging_kernels
