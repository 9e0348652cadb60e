// Exact linear assignment on the GPU: one thread block per problem runs the team algorithm of
// csrc/common/lsa_team.h (Jonker–Volgenant with every row pass split over the block's threads and
// the column minima found by warp shuffles plus one barrier).
//
// Batches of small problems: a block of one warp per problem, the problem's costs and work vectors
// in shared memory. Wide problems: a block of up to 1024 threads per problem (a single large problem
// is one such block: every Dijkstra / row-reduction step is one parallel row pass and one block
// reduction, ~10^5 steps at n = 4096), costs read from global memory (the input itself when no
// conversion is needed), work vectors in shared memory when they fit.
//
// Results are exact (same algorithm and float64 arithmetic as the CPU solvers) with duals.
#include <cuda_runtime.h>

#include <cstdint>

#include "common/lsa_team.h"
#include "cuda/linear_assignment.cuh"

namespace merging_kernels {
namespace lsa {
namespace {

using team::kInvalid;
using team::kNone;
using team::kOk;
using team::lex_less;
using team::merge_top2;

constexpr unsigned kFull = 0xffffffffu;
constexpr int64_t kSmemBudget = 45 * 1024;  // dynamic shared memory used without an opt-in (48 KiB - scratch)

// ------------------------------------------------------------------------------- the block team

template <class T>
struct Scratch {  // double-buffered slots, one per warp
  T val[2][32];
  T pay[2][32];
  T val2[2][32];
  int idx[2][32];
  int idx2[2][32];
};

// A thread block as a team (see lsa_team.h). Every reduction: warp shuffles, one slot per warp in
// shared memory, one __syncthreads, then every thread combines the slots in the same order (so all
// threads hold the same result). Slots alternate between two buffers, so a fast warp cannot overwrite
// a slot that a slow warp still reads: one barrier per reduction suffices.
template <class T>
struct BlockTeam {
  Scratch<T>* s;
  int parity = 0;
  int nwarps, warp, wl;

  __device__ explicit BlockTeam(Scratch<T>* scratch)
      : s(scratch), nwarps(blockDim.x / 32), warp(threadIdx.x / 32), wl(threadIdx.x % 32) {}

  __device__ int lane() const { return threadIdx.x; }
  __device__ int size() const { return blockDim.x; }
  __device__ void sync() { __syncthreads(); }

  __device__ bool any(bool b) { return __syncthreads_or(b) != 0; }

  __device__ int broadcast0(int x) {
    if (threadIdx.x == 0) s->idx[parity][0] = x;
    __syncthreads();
    x = s->idx[parity][0];
    parity ^= 1;
    return x;
  }

  __device__ T min(T x) {
    for (int off = 16; off > 0; off >>= 1) {
      const T o = __shfl_xor_sync(kFull, x, off);
      x = o < x ? o : x;
    }
    if (wl == 0) s->val[parity][warp] = x;
    __syncthreads();
    x = s->val[parity][0];
    for (int w = 1; w < nwarps; ++w) {
      const T o = s->val[parity][w];
      x = o < x ? o : x;
    }
    parity ^= 1;
    return x;
  }

  __device__ void argmin(T& val, int& idx, T& pay) {
    for (int off = 16; off > 0; off >>= 1) {
      const T ov = __shfl_xor_sync(kFull, val, off);
      const int oi = __shfl_xor_sync(kFull, idx, off);
      const T op = __shfl_xor_sync(kFull, pay, off);
      if (lex_less(ov, oi, val, idx)) {
        val = ov;
        idx = oi;
        pay = op;
      }
    }
    if (wl == 0) {
      s->val[parity][warp] = val;
      s->idx[parity][warp] = idx;
      s->pay[parity][warp] = pay;
    }
    __syncthreads();
    val = s->val[parity][0];
    idx = s->idx[parity][0];
    pay = s->pay[parity][0];
    for (int w = 1; w < nwarps; ++w) {
      const T ov = s->val[parity][w];
      const int oi = s->idx[parity][w];
      if (lex_less(ov, oi, val, idx)) {
        val = ov;
        idx = oi;
        pay = s->pay[parity][w];
      }
    }
    parity ^= 1;
  }

  __device__ void top2(T& a1, int& i1, T& a2, int& i2) {
    for (int off = 16; off > 0; off >>= 1) {
      const T b1 = __shfl_xor_sync(kFull, a1, off);
      const int j1 = __shfl_xor_sync(kFull, i1, off);
      const T b2 = __shfl_xor_sync(kFull, a2, off);
      const int j2 = __shfl_xor_sync(kFull, i2, off);
      merge_top2(a1, i1, a2, i2, b1, j1, b2, j2);
    }
    if (wl == 0) {
      s->val[parity][warp] = a1;
      s->idx[parity][warp] = i1;
      s->val2[parity][warp] = a2;
      s->idx2[parity][warp] = i2;
    }
    __syncthreads();
    a1 = s->val[parity][0];
    i1 = s->idx[parity][0];
    a2 = s->val2[parity][0];
    i2 = s->idx2[parity][0];
    for (int w = 1; w < nwarps; ++w)
      merge_top2(a1, i1, a2, i2, s->val[parity][w], s->idx[parity][w], s->val2[parity][w], s->idx2[parity][w]);
    parity ^= 1;
  }
};

// ------------------------------------------------------------------------------- plan and kernels

struct Plan {
  int n, m, threads;
  bool transpose, copy, smem_matrix, vec_in_smem;
  int64_t mat_bytes, vec_bytes, dyn_smem, ws_mat_stride, ws_vec_stride;
};

int64_t up(int64_t b, int64_t a) { return (b + a - 1) / a * a; }

template <class T>
Plan make_plan(int dtype, int64_t nr, int64_t nc, bool maximize) {
  Plan p;
  p.transpose = nr > nc;
  p.n = static_cast<int>(p.transpose ? nc : nr);
  p.m = static_cast<int>(p.transpose ? nr : nc);
  p.copy = (dtype == 1) != (sizeof(T) == 8) || maximize || p.transpose;
  p.mat_bytes = up(static_cast<int64_t>(p.n) * p.m * static_cast<int64_t>(sizeof(T)), 16);
  p.vec_bytes = team::work_bytes<T>(p.n, p.m);
  p.smem_matrix = p.mat_bytes + p.vec_bytes <= kSmemBudget;
  p.vec_in_smem = p.smem_matrix || p.vec_bytes <= kSmemBudget;
  p.dyn_smem = p.smem_matrix ? p.mat_bytes + p.vec_bytes : (p.vec_in_smem ? p.vec_bytes : 0);
  p.ws_mat_stride = (!p.smem_matrix && p.copy) ? up(p.mat_bytes, 256) : 0;
  p.ws_vec_stride = p.vec_in_smem ? 0 : up(p.vec_bytes, 256);
  int t = 32;  // a warp for small problems; about 4 columns per thread for wider ones
  if (p.m > 64)
    while (t < 1024 && 4 * t < p.m) t *= 2;
  p.threads = t < 64 && p.m > 64 ? 64 : t;
  return p;
}

struct Args {
  const void* cost;
  int dtype;
  int64_t nr, nc;
  bool maximize;
  int64_t* rows;
  int64_t* cols;
  void* u;
  void* v;
  int32_t* status;
  unsigned char* ws_mat;
  unsigned char* ws_vec;
  Plan plan;
};

// Entry (i, j) of problem b in the solver's orientation (n x m, n <= m), converted and signed.
template <class T>
__device__ __forceinline__ T load_entry(const Args& a, int64_t b, int i, int j) {
  const int64_t base = b * a.nr * a.nc;
  const int64_t at = a.plan.transpose ? base + static_cast<int64_t>(j) * a.nc + i : base + static_cast<int64_t>(i) * a.nc + j;
  const T x = a.dtype == 1 ? static_cast<T>(static_cast<const double*>(a.cost)[at])
                           : static_cast<T>(static_cast<const float*>(a.cost)[at]);
  return a.maximize ? -x : x;
}

// Problems whose costs stay in global memory: check every entry (NaN, or -inf after the sign change,
// marks the problem invalid; a finite entry beyond team::safe_magnitude, out of range) and write the
// converted copy where one is needed.
template <class T>
__global__ void prepare_kernel(Args a, int64_t batch) {
  const int64_t per = static_cast<int64_t>(a.plan.n) * a.plan.m;
  const int64_t total = batch * per;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = e / per, r = e % per;
    const int i = static_cast<int>(r / a.plan.m), j = static_cast<int>(r % a.plan.m);
    const T x = load_entry<T>(a, b, i, j);
    // Benign race: a problem with both kinds of entry may end up either code; the host rescales an
    // out-of-range batch and solves again, and that solve reports the invalid entries.
    if (team::unusable(x)) a.status[b] = x > -team::infinity<T>() ? team::kOutOfRange : kInvalid;
    if (a.plan.copy) reinterpret_cast<T*>(a.ws_mat + b * a.plan.ws_mat_stride)[r] = x;
  }
}

template <class T>
__global__ void __launch_bounds__(1024) solve_kernel(Args a) {
  extern __shared__ __align__(16) unsigned char dyn[];
  __shared__ Scratch<T> scratch;
  const int64_t b = blockIdx.x;
  const Plan& pl = a.plan;
  const int n = pl.n, m = pl.m;
  const T* C;
  unsigned char* vecs;
  if (pl.smem_matrix) {
    T* sm = reinterpret_cast<T*>(dyn);
    bool invalid = false, out_of_range = false;
    const int count = n * m;  // fits: the matrix fits in shared memory (32-bit / and % are far cheaper)
    for (int e = threadIdx.x; e < count; e += blockDim.x) {
      const T x = load_entry<T>(a, b, e / m, e % m);
      invalid |= !(x > -team::infinity<T>());
      out_of_range |= team::unusable(x);
      sm[e] = x;
    }
    if (__syncthreads_or(out_of_range)) {  // out_of_range covers the invalid entries too
      // a block-uniform branch (every thread got the same answer): all reach this second barrier, and the
      // common path pays for one only
      const bool any_invalid = __syncthreads_or(invalid);
      if (threadIdx.x == 0) a.status[b] = any_invalid ? kInvalid : team::kOutOfRange;
      return;
    }
    C = sm;
    vecs = dyn + pl.mat_bytes;
  } else {
    if (a.status[b] != kOk) return;  // invalid entries, found by prepare_kernel
    C = pl.copy ? reinterpret_cast<const T*>(a.ws_mat + b * pl.ws_mat_stride)
                : static_cast<const T*>(a.cost) + b * static_cast<int64_t>(n) * m;
    vecs = pl.vec_in_smem ? dyn : a.ws_vec + b * pl.ws_vec_stride;
  }
  team::Problem<T> p;
  p.c = C;
  p.n = n;
  p.m = m;
  team::carve(p, vecs);
  p.arr_passes = team::arr_passes_for(m);
  p.counters = nullptr;
  BlockTeam<T> tm(&scratch);
  const int32_t st = team::solve(tm, p);
  if (st != kOk) {
    if (threadIdx.x == 0) a.status[b] = st;
    return;
  }
  if (threadIdx.x == 0) a.status[b] = kOk;

  // outputs in the caller's orientation and sign (k = n pairs)
  const T sign = a.maximize ? T(-1) : T(1);
  int64_t* rows = a.rows + b * n;
  int64_t* cols = a.cols + b * n;
  T* u_out = a.u ? static_cast<T*>(a.u) + b * a.nr : nullptr;
  T* v_out = a.v ? static_cast<T*>(a.v) + b * a.nc : nullptr;
  const int L = threadIdx.x, S = blockDim.x;
  if (!pl.transpose) {
    for (int i = L; i < n; i += S) {
      const int j = p.x[i];
      rows[i] = i;
      cols[i] = j;
      if (u_out) u_out[i] = sign * (C[static_cast<int64_t>(i) * m + j] - p.v[j]);
    }
    if (v_out)
      for (int j = L; j < m; j += S) v_out[j] = sign * p.v[j];
  } else {
    // solved rows are the caller's columns: list the caller's rows in ascending order
    int* col_of = p.pred;  // m entries, free now
    for (int r = L; r < m; r += S) col_of[r] = -1;
    __syncthreads();
    for (int j = L; j < n; j += S) col_of[p.x[j]] = j;
    __syncthreads();
    if (L == 0) {
      int t = 0;
      for (int r = 0; r < m; ++r)
        if (col_of[r] >= 0) {
          rows[t] = r;
          cols[t] = col_of[r];
          ++t;
        }
    }
    if (u_out)
      for (int r = L; r < m; r += S) u_out[r] = sign * p.v[r];
    if (v_out)
      for (int j = L; j < n; j += S) v_out[j] = sign * (C[static_cast<int64_t>(j) * m + p.x[j]] - p.v[p.x[j]]);
  }
}

template <class T>
int launch(const void* cost, int dtype, int64_t batch, int64_t nr, int64_t nc, bool maximize, int64_t* rows,
           int64_t* cols, void* u, void* v, int32_t* status, void* workspace, int64_t workspace_bytes,
           cudaStream_t stream) {
  Args a;
  a.cost = cost;
  a.dtype = dtype;
  a.nr = nr;
  a.nc = nc;
  a.maximize = maximize;
  a.rows = rows;
  a.cols = cols;
  a.u = u;
  a.v = v;
  a.status = status;
  a.plan = make_plan<T>(dtype, nr, nc, maximize);
  const Plan& pl = a.plan;
  if (batch == 0) return 0;
  cudaError_t err = cudaMemsetAsync(status, 0, sizeof(int32_t) * batch, stream);  // ok, as the CPU solvers say
  if (err != cudaSuccess) return static_cast<int>(err);
  if (pl.n == 0) return 0;  // empty problems: nothing to assign
  if (workspace_bytes < batch * (pl.ws_mat_stride + pl.ws_vec_stride)) return static_cast<int>(cudaErrorInvalidValue);
  a.ws_mat = static_cast<unsigned char*>(workspace);
  a.ws_vec = a.ws_mat + batch * pl.ws_mat_stride;
  if (!pl.smem_matrix) {
    const int64_t total = batch * pl.n * static_cast<int64_t>(pl.m);
    const int64_t blocks = (total + 255) / 256;
    prepare_kernel<T><<<static_cast<unsigned>(blocks < 65536 ? blocks : 65536), 256, 0, stream>>>(a, batch);
    err = cudaGetLastError();
    if (err != cudaSuccess) return static_cast<int>(err);
  }
  for (int64_t first = 0; first < batch; first += 2147483647LL) {  // grid.x limit
    const int64_t count = batch - first < 2147483647LL ? batch - first : 2147483647LL;
    Args part = a;
    part.cost = static_cast<const char*>(cost) + first * nr * nc * (dtype == 1 ? 8 : 4);
    part.rows = rows + first * pl.n;
    part.cols = cols + first * pl.n;
    part.u = u ? static_cast<void*>(static_cast<T*>(u) + first * nr) : nullptr;
    part.v = v ? static_cast<void*>(static_cast<T*>(v) + first * nc) : nullptr;
    part.status = status + first;
    part.ws_mat = a.ws_mat + first * pl.ws_mat_stride;
    part.ws_vec = a.ws_vec + first * pl.ws_vec_stride;
    solve_kernel<T><<<static_cast<unsigned>(count), pl.threads, static_cast<size_t>(pl.dyn_smem), stream>>>(part);
    err = cudaGetLastError();
    if (err != cudaSuccess) return static_cast<int>(err);
  }
  return 0;
}

}  // namespace

int64_t cuda_workspace_bytes(int dtype, int64_t batch, int64_t nr, int64_t nc, bool maximize, bool compute_float32) {
  if (batch == 0 || nr == 0 || nc == 0) return 0;
  const Plan pl = compute_float32 ? make_plan<float>(dtype, nr, nc, maximize) : make_plan<double>(dtype, nr, nc, maximize);
  return batch * (pl.ws_mat_stride + pl.ws_vec_stride);
}

int cuda_solve_batch(const void* cost, int dtype, int64_t batch, int64_t nr, int64_t nc, bool maximize,
                     bool compute_float32, int64_t* rows, int64_t* cols, void* u, void* v, int32_t* status,
                     void* workspace, int64_t workspace_bytes, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (compute_float32)
    return launch<float>(cost, dtype, batch, nr, nc, maximize, rows, cols, u, v, status, workspace, workspace_bytes, s);
  return launch<double>(cost, dtype, batch, nr, nc, maximize, rows, cols, u, v, status, workspace, workspace_bytes, s);
}

const char* cuda_error_string(int err) { return cudaGetErrorString(static_cast<cudaError_t>(err)); }

}  // namespace lsa
}  // namespace merging_kernels
