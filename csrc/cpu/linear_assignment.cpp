// Exact linear assignment on CPU: see linear_assignment.h for the contract.
//
// Layout: row-scan kernels (portable + AVX) -> the dense LAPJV solver -> the sparse
// candidate solver with its dense certificate -> input preparation and the batch driver.
//
// Conventions inside the solvers: the problem is n x m with n <= m (wider problems are transposed
// first), row-major with leading dimension m, minimisation, no NaN and no -inf (checked first),
// +inf forbidden. Duals: v (columns) is stored, u_i = c[i, x_i] - v[x_i] is implied. Invariant of
// every phase: for each assigned row i, x_i minimises c_ij - v_j over j (reduced costs are >= 0 and
// tight on the assignment), and column potentials only decrease. Unassigned columns keep v = 0 in
// rectangular problems, so the duals certify optimality of the rectangular problem as well.
#include "linear_assignment.h"

#include "common/lsa_team.h"
#include "lsa_thread_team.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <numeric>
#include <queue>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define MK_LSA_X86 1
#endif
#ifdef MK_WITH_OPENMP
#include <omp.h>
#endif

namespace merging_kernels {
namespace lsa {
namespace {

template <class T>
constexpr T kInf = std::numeric_limits<T>::infinity();

// The CPU solver and the team algorithm (CUDA kernels) report through one set of status codes.
static_assert(int{kOk} == team::kOk && int{kInfeasible} == team::kInfeasible && int{kInvalid} == team::kInvalid &&
                  int{kOutOfRange} == team::kOutOfRange,
              "csrc/cpu/linear_assignment.h and csrc/common/lsa_team.h must agree on the status codes");

// =============================================================================== row-scan kernels
// Portable versions (the compiler vectorises what it can), and AVX versions (one template for float64
// and float32) chosen at run time. Ties are broken towards the smallest column index in both, so results
// are the same.

// Column minima (and their first rows) updated by one row; the row's minimum over each `chunk`
// columns into cmin (when given); returns false when the row holds an entry that team::unusable
// refuses (NaN, -inf, or beyond the safe magnitude: team::classify tells which).
template <class T>
inline bool colmin_update_generic(const T* c, T* vmin, T* imin, T row, int m, T* cmin, int chunk) {
  int bad = 0;
  for (int s = 0, k = 0; s < m; s += chunk, ++k) {
    const int e = std::min(m, s + chunk);
    T best = kInf<T>;
    for (int j = s; j < e; ++j) {
      const T x = c[j];
      bad |= team::unusable(x);
      const bool lt = x < vmin[j];
      vmin[j] = lt ? x : vmin[j];
      imin[j] = lt ? row : imin[j];
      best = x < best ? x : best;
    }
    if (cmin) cmin[k] = best;
  }
  return bad == 0;
}

// Appends (j, c_j) for the columns j in [s, e) with c_j - v_j <= tau (v may be null: zero), at
// most up to `cap` entries in all; returns the new count.
template <class T>
inline int collect_generic(const T* c, const T* v, int s, int e, T tau, int* cols, T* vals, int cnt, int cap) {
  for (int j = s; j < e && cnt < cap; ++j) {
    const T r = v ? c[j] - v[j] : c[j];
    if (r <= tau) {
      cols[cnt] = j;
      vals[cnt] = c[j];
      ++cnt;
    }
  }
  return cnt;
}

template <class T>
inline T reduced_min_generic(const T* c, const T* v, int m) {
  T best = kInf<T>;
  for (int j = 0; j < m; ++j) {
    const T r = c[j] - v[j];
    best = r < best ? r : best;
  }
  return best;
}

// Smallest and second smallest of c_j - v_j, ordered by (value, index); -1 / inf where absent.
template <class T>
inline void umins_generic(const T* c, const T* v, int m, T& u1, int& j1, T& u2, int& j2) {
  u1 = u2 = kInf<T>;
  j1 = j2 = -1;
  for (int j = 0; j < m; ++j) {
    const T r = c[j] - v[j];
    if (r < u2) {
      if (r < u1) {
        u2 = u1;
        j2 = j1;
        u1 = r;
        j1 = j;
      } else {
        u2 = r;
        j2 = j;
      }
    }
  }
}

// One Dijkstra step: d_j <- min(d_j, c_j - v_j + h) (pred_j <- row where it improves), then the
// smallest d_j and its first index. Scanned columns carry v = -inf and d = +inf, so they are never
// updated nor chosen.
template <class T>
inline T relax_generic(const T* c, const T* v, T* d, T* pred, T h, T row, int m, int* arg) {
  T best = kInf<T>;
  int bj = -1;
  for (int j = 0; j < m; ++j) {
    const T nd = (c[j] - v[j]) + h;
    if (nd < d[j]) {
      d[j] = nd;
      pred[j] = row;
    }
    if (d[j] < best) {
      best = d[j];
      bj = j;
    }
  }
  *arg = bj;
  return best;
}

template <class T>
inline bool all_usable_generic(const T* c, int64_t count) {  // no entry team::unusable refuses
  int bad = 0;
  for (int64_t k = 0; k < count; ++k) bad |= team::unusable(c[k]);
  return bad == 0;
}

#ifdef MK_LSA_X86
// MERGING_KERNELS_CPU_ISA=generic forces the portable scans here too (the tests compare them bit for bit).
bool detect_avx() {
  const char* cap = std::getenv("MERGING_KERNELS_CPU_ISA");
  if (cap != nullptr && std::strcmp(cap, "generic") == 0) return false;
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx");
}
const bool g_has_avx = detect_avx();  // once, at load time (no guard on the hot paths)
inline bool cpu_has_avx() { return g_has_avx; }

#define MK_AVX __attribute__((target("avx")))

// One AVX register of T for the scan templates below: AVX1 operations only (cpu_has_avx is all we ask).
// select(a, b, mask) = mask ? b : a in bitwise operations: GCC lowers _mm256_blendv_* on a comparison
// result to scalar code when AVX2 is absent. swap<W>: lane l <- lane l ^ W.
struct AvxF64 {
  using T = double;
  using V = __m256d;
  static constexpr int kLanes = 4;
  static constexpr int kAllLanes = 0xF;  // movemask of an all-true mask
  MK_AVX static V load(const T* p) { return _mm256_loadu_pd(p); }
  MK_AVX static void store(T* p, V x) { _mm256_storeu_pd(p, x); }
  MK_AVX static V set1(T x) { return _mm256_set1_pd(x); }
  MK_AVX static V iota() { return _mm256_setr_pd(0, 1, 2, 3); }
  MK_AVX static V all_true() { return _mm256_castsi256_pd(_mm256_set1_epi64x(-1)); }
  MK_AVX static V add(V a, V b) { return _mm256_add_pd(a, b); }
  MK_AVX static V sub(V a, V b) { return _mm256_sub_pd(a, b); }
  MK_AVX static V min(V a, V b) { return _mm256_min_pd(a, b); }  // a < b ? a : b
  MK_AVX static V max(V a, V b) { return _mm256_max_pd(a, b); }  // a > b ? a : b
  MK_AVX static V and_(V a, V b) { return _mm256_and_pd(a, b); }
  MK_AVX static V or_(V a, V b) { return _mm256_or_pd(a, b); }
  MK_AVX static V andnot(V a, V b) { return _mm256_andnot_pd(a, b); }  // ~a & b
  MK_AVX static V select(V a, V b, V mask) { return _mm256_or_pd(_mm256_and_pd(mask, b), _mm256_andnot_pd(mask, a)); }
  MK_AVX static V lt(V a, V b) { return _mm256_cmp_pd(a, b, _CMP_LT_OQ); }
  MK_AVX static V le(V a, V b) { return _mm256_cmp_pd(a, b, _CMP_LE_OQ); }
  MK_AVX static V eq(V a, V b) { return _mm256_cmp_pd(a, b, _CMP_EQ_OQ); }
  MK_AVX static V not_le(V a, V b) { return _mm256_cmp_pd(a, b, _CMP_NLE_UQ); }  // true for NaN
  MK_AVX static V neq(V a, V b) { return _mm256_cmp_pd(a, b, _CMP_NEQ_UQ); }     // true for NaN
  MK_AVX static int movemask(V x) { return _mm256_movemask_pd(x); }
  MK_AVX static T lane0(V x) { return _mm256_cvtsd_f64(x); }
  template <int W>
  MK_AVX static V swap(V x) {
    if constexpr (W == 2) return _mm256_permute2f128_pd(x, x, 1);
    else return _mm256_permute_pd(x, 0x5);
  }
};

struct AvxF32 {
  using T = float;
  using V = __m256;
  static constexpr int kLanes = 8;
  static constexpr int kAllLanes = 0xFF;
  MK_AVX static V load(const T* p) { return _mm256_loadu_ps(p); }
  MK_AVX static void store(T* p, V x) { _mm256_storeu_ps(p, x); }
  MK_AVX static V set1(T x) { return _mm256_set1_ps(x); }
  MK_AVX static V iota() { return _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7); }
  MK_AVX static V all_true() { return _mm256_castsi256_ps(_mm256_set1_epi32(-1)); }
  MK_AVX static V add(V a, V b) { return _mm256_add_ps(a, b); }
  MK_AVX static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  MK_AVX static V min(V a, V b) { return _mm256_min_ps(a, b); }
  MK_AVX static V max(V a, V b) { return _mm256_max_ps(a, b); }
  MK_AVX static V and_(V a, V b) { return _mm256_and_ps(a, b); }
  MK_AVX static V or_(V a, V b) { return _mm256_or_ps(a, b); }
  MK_AVX static V andnot(V a, V b) { return _mm256_andnot_ps(a, b); }
  MK_AVX static V select(V a, V b, V mask) { return _mm256_or_ps(_mm256_and_ps(mask, b), _mm256_andnot_ps(mask, a)); }
  MK_AVX static V lt(V a, V b) { return _mm256_cmp_ps(a, b, _CMP_LT_OQ); }
  MK_AVX static V le(V a, V b) { return _mm256_cmp_ps(a, b, _CMP_LE_OQ); }
  MK_AVX static V eq(V a, V b) { return _mm256_cmp_ps(a, b, _CMP_EQ_OQ); }
  MK_AVX static V not_le(V a, V b) { return _mm256_cmp_ps(a, b, _CMP_NLE_UQ); }
  MK_AVX static V neq(V a, V b) { return _mm256_cmp_ps(a, b, _CMP_NEQ_UQ); }
  MK_AVX static int movemask(V x) { return _mm256_movemask_ps(x); }
  MK_AVX static T lane0(V x) { return _mm256_cvtss_f32(x); }
  template <int W>
  MK_AVX static V swap(V x) {
    if constexpr (W == 4) return _mm256_permute2f128_ps(x, x, 1);
    else if constexpr (W == 2) return _mm256_permute_ps(x, 0x4E);
    else return _mm256_permute_ps(x, 0xB1);
  }
};

template <class T>
using Avx = std::conditional_t<std::is_same_v<T, double>, AvxF64, AvxF32>;

// The scans that carry column indices in T lanes (umins, relax) need them exact: float holds every integer
// below 2^24, so float32 problems that wide take the generic scans.
constexpr int kF32LaneIndexLimit = 1 << 24;
template <class T>
inline bool lane_indices_exact(int m) {
  return std::is_same_v<T, double> || m < kF32LaneIndexLimit;
}

// team::unusable per lane: all-true for NaN, -inf and finite |x| > safe magnitude.
template <class A>
MK_AVX inline typename A::V unusable_lanes(typename A::V x) {
  using T = typename A::T;
  const typename A::V magnitude = A::andnot(A::set1(T(-0.0)), x);
  return A::and_(A::not_le(magnitude, A::set1(team::safe_magnitude<T>())), A::neq(x, A::set1(kInf<T>)));
}

// The smallest lane: the scalar loop's value, though a zero may carry another lane's sign.
template <class A>
MK_AVX inline typename A::T lanes_min(typename A::V x) {
  typename A::T lanes[A::kLanes];
  A::store(lanes, x);
  typename A::T best = lanes[0];
  for (int l = 1; l < A::kLanes; ++l) best = std::min(best, lanes[l]);
  return best;
}

template <class A, class T = typename A::T>
MK_AVX bool colmin_update_avx(const T* c, T* vmin, T* imin, T row, int m, T* cmin, int chunk) {
  using V = typename A::V;
  constexpr int L = A::kLanes;
  const V vr = A::set1(row);
  V ok = A::all_true();
  bool tail_ok = true;
  for (int s = 0, k = 0; s < m; s += chunk, ++k) {
    const int e = std::min(m, s + chunk);
    V best = A::set1(kInf<T>);
    int j = s;
    for (; j + L <= e; j += L) {
      const V x = A::load(c + j);
      const V cur = A::load(vmin + j);
      const V lt = A::lt(x, cur);
      ok = A::andnot(unusable_lanes<A>(x), ok);
      A::store(vmin + j, A::select(cur, x, lt));
      A::store(imin + j, A::select(A::load(imin + j), vr, lt));
      best = A::min(x, best);
    }
    T tmin = kInf<T>;
    if (j < e) tail_ok &= colmin_update_generic(c + j, vmin + j, imin + j, row, e - j, &tmin, e - j);
    if (cmin) cmin[k] = std::min(lanes_min<A>(best), tmin);
  }
  return tail_ok && A::movemask(ok) == A::kAllLanes;
}

template <class A, class T = typename A::T>
MK_AVX int collect_avx(const T* c, const T* v, int s, int e, T tau, int* cols, T* vals, int cnt, int cap) {
  using V = typename A::V;
  constexpr int L = A::kLanes;
  const V vt = A::set1(tau);
  int j = s;
  for (; j + L <= e && cnt < cap; j += L) {
    V r = A::load(c + j);
    if (v) r = A::sub(r, A::load(v + j));
    int mask = A::movemask(A::le(r, vt));
    while (mask && cnt < cap) {
      const int l = __builtin_ctz(mask);
      mask &= mask - 1;
      cols[cnt] = j + l;
      vals[cnt] = c[j + l];
      ++cnt;
    }
  }
  return collect_generic(c, v, j, e, tau, cols, vals, cnt, cap);
}

template <class A, class T = typename A::T>
MK_AVX T reduced_min_avx(const T* c, const T* v, int m) {
  using V = typename A::V;
  constexpr int L = A::kLanes;
  V b0 = A::set1(kInf<T>), b1 = b0;
  int j = 0;
  for (; j + 2 * L <= m; j += 2 * L) {
    b0 = A::min(A::sub(A::load(c + j), A::load(v + j)), b0);
    b1 = A::min(A::sub(A::load(c + j + L), A::load(v + j + L)), b1);
  }
  return std::min(lanes_min<A>(A::min(b0, b1)), reduced_min_generic(c + j, v + j, m - j));
}

// Lane-wise merges under the (value, index) order; an empty entry is (+inf, -1) and real entries are
// finite, so empties always sort last.
template <class A, class V = typename A::V>
MK_AVX inline V lex_less(V x, V ix, V y, V iy) {
  return A::or_(A::lt(x, y), A::and_(A::eq(x, y), A::lt(ix, iy)));
}

// (x, ix) <- the smaller of (x, ix) and (y, iy), per lane.
template <class A, class V = typename A::V>
MK_AVX inline void merge_min(V& x, V& ix, V y, V iy) {
  const V keep = lex_less<A>(x, ix, y, iy);
  x = A::select(y, x, keep);
  ix = A::select(iy, ix, keep);
}

// Per lane, (x1 <= x2) <- the two smallest of the sorted pairs (x1, x2) and (y1, y2).
template <class A, class V = typename A::V>
MK_AVX inline void merge_top2(V& x1, V& ix1, V& x2, V& ix2, V y1, V iy1, V y2, V iy2) {
  const V xfirst = lex_less<A>(x1, ix1, y1, iy1);
  const V f = A::select(y1, x1, xfirst), fi = A::select(iy1, ix1, xfirst);
  const V l = A::select(x1, y1, xfirst), li = A::select(ix1, iy1, xfirst);  // the other first
  const V w = A::select(y2, x2, xfirst), wi = A::select(iy2, ix2, xfirst);  // the winner's second
  const V lfirst = lex_less<A>(l, li, w, wi);
  x2 = A::select(w, l, lfirst);
  ix2 = A::select(wi, li, lfirst);
  x1 = f;
  ix1 = fi;
}

// Every lane <- the (value, index)-smallest of all lanes: log2(kLanes) butterfly steps.
template <class A, int W = A::kLanes / 2, class V = typename A::V>
MK_AVX inline void all_lanes_min(V& x, V& ix) {
  merge_min<A>(x, ix, A::template swap<W>(x), A::template swap<W>(ix));
  if constexpr (W > 1) all_lanes_min<A, W / 2>(x, ix);
}

template <class A, int W = A::kLanes / 2, class V = typename A::V>
MK_AVX inline void all_lanes_top2(V& x1, V& ix1, V& x2, V& ix2) {
  merge_top2<A>(x1, ix1, x2, ix2, A::template swap<W>(x1), A::template swap<W>(ix1), A::template swap<W>(x2),
                A::template swap<W>(ix2));
  if constexpr (W > 1) all_lanes_top2<A, W / 2>(x1, ix1, x2, ix2);
}

// Merges scalar top-2 lists: (u1, j1, u2, j2) <- the two smallest of both.
template <class T>
inline void merge_top2_scalar(T& u1, int& j1, T& u2, int& j2, T t1, int q1, T t2, int q2) {
  auto less = [](T a, int ia, T b, int ib) { return ib < 0 || (ia >= 0 && (a < b || (a == b && ia < ib))); };
  if (less(t1, q1, u1, j1)) {
    if (less(u1, j1, t2, q2)) {
      u2 = u1, j2 = j1;
    } else {
      u2 = t2, j2 = q2;
    }
    u1 = t1, j1 = q1;
  } else if (less(t1, q1, u2, j2)) {
    u2 = t1, j2 = q1;
  }
}

// Two independent accumulator sets (columns j.. and j + kLanes..) hide the latency of the chains; column
// indices ride in T lanes (lane_indices_exact). Values: a1 = min(a1, r), a2 = min(a2, max(a1_old, r)) (no
// NaN here); indices follow the comparisons.
template <class A, class T = typename A::T>
MK_AVX void umins_avx(const T* c, const T* v, int m, T& u1, int& j1, T& u2, int& j2) {
  using V = typename A::V;
  constexpr int L = A::kLanes;
  V a1 = A::set1(kInf<T>), a2 = a1, b1 = a1, b2 = a1;
  V i1 = A::set1(T(-1)), i2 = i1, k1 = i1, k2 = i1;
  V ja = A::iota(), jb = A::add(ja, A::set1(T(L)));
  const V step = A::set1(T(2 * L));
  int j = 0;
  for (; j + 2 * L <= m; j += 2 * L) {
    const V r = A::sub(A::load(c + j), A::load(v + j));
    const V s = A::sub(A::load(c + j + L), A::load(v + j + L));
    const V lt1 = A::lt(r, a1), lt2 = A::lt(r, a2);
    const V mt1 = A::lt(s, b1), mt2 = A::lt(s, b2);
    i2 = A::select(i2, A::select(ja, i1, lt1), lt2);
    k2 = A::select(k2, A::select(jb, k1, mt1), mt2);
    i1 = A::select(i1, ja, lt1);
    k1 = A::select(k1, jb, mt1);
    a2 = A::min(a2, A::max(a1, r));
    b2 = A::min(b2, A::max(b1, s));
    a1 = A::min(a1, r);
    b1 = A::min(b1, s);
    ja = A::add(ja, step);
    jb = A::add(jb, step);
  }
  merge_top2<A>(a1, i1, a2, i2, b1, k1, b2, k2);
  all_lanes_top2<A>(a1, i1, a2, i2);
  u1 = A::lane0(a1);
  u2 = A::lane0(a2);
  j1 = static_cast<int>(A::lane0(i1));
  j2 = static_cast<int>(A::lane0(i2));
  if (j < m) {  // the tail's own top two
    T t1, t2;
    int q1, q2;
    umins_generic(c + j, v + j, m - j, t1, q1, t2, q2);
    merge_top2_scalar(u1, j1, u2, j2, t1, q1 < 0 ? -1 : q1 + j, t2, q2 < 0 ? -1 : q2 + j);
  }
}

template <class A, class T = typename A::T>
MK_AVX T relax_avx(const T* c, const T* v, T* d, T* pred, T h, T row, int m, int* arg) {
  using V = typename A::V;
  constexpr int L = A::kLanes;
  const V vh = A::set1(h), vr = A::set1(row), step = A::set1(T(2 * L));
  V m0 = A::set1(kInf<T>), m1 = m0;
  V i0 = A::set1(T(-1)), i1 = i0;
  V j0 = A::iota(), j1 = A::add(j0, A::set1(T(L)));
  int j = 0;
  for (; j + 2 * L <= m; j += 2 * L) {
    const V n0 = A::add(A::sub(A::load(c + j), A::load(v + j)), vh);
    const V n1 = A::add(A::sub(A::load(c + j + L), A::load(v + j + L)), vh);
    V d0 = A::load(d + j), d1 = A::load(d + j + L);
    const V l0 = A::lt(n0, d0), l1 = A::lt(n1, d1);
    d0 = A::min(n0, d0);
    d1 = A::min(n1, d1);
    A::store(d + j, d0);
    A::store(d + j + L, d1);
    A::store(pred + j, A::select(A::load(pred + j), vr, l0));
    A::store(pred + j + L, A::select(A::load(pred + j + L), vr, l1));
    const V b0 = A::lt(d0, m0), b1 = A::lt(d1, m1);
    m0 = A::min(d0, m0);
    m1 = A::min(d1, m1);
    i0 = A::select(i0, j0, b0);
    i1 = A::select(i1, j1, b1);
    j0 = A::add(j0, step);
    j1 = A::add(j1, step);
  }
  merge_min<A>(m0, i0, m1, i1);
  all_lanes_min<A>(m0, i0);
  T best = A::lane0(m0);
  int bj = static_cast<int>(A::lane0(i0));
  if (j < m) {
    int tj;
    const T tail = relax_generic(c + j, v + j, d + j, pred + j, h, row, m - j, &tj);
    if (tj >= 0 && (tail < best || bj < 0)) {  // tail indices are larger: ties stay with bj
      best = tail;
      bj = tj + j;
    }
  }
  *arg = bj;
  return best;
}

template <class A, class T = typename A::T>
MK_AVX bool all_usable_avx(const T* c, int64_t count) {
  typename A::V ok = A::all_true();
  int64_t k = 0;
  for (; k + A::kLanes <= count; k += A::kLanes) ok = A::andnot(unusable_lanes<A>(A::load(c + k)), ok);
  return A::movemask(ok) == A::kAllLanes && all_usable_generic(c + k, count - k);
}
#undef MK_AVX
#endif  // MK_LSA_X86

// Dispatch: the AVX scans where the CPU has them (float32 as float64; lane_indices_exact for the two that
// carry column indices in lanes), else the generic ones.
template <class T>
inline bool colmin_update(const T* c, T* vmin, T* imin, T row, int m, T* cmin, int chunk) {
#ifdef MK_LSA_X86
  if (cpu_has_avx()) return colmin_update_avx<Avx<T>>(c, vmin, imin, row, m, cmin, chunk);
#endif
  return colmin_update_generic(c, vmin, imin, row, m, cmin, chunk);
}
template <class T>
inline int collect(const T* c, const T* v, int s, int e, T tau, int* cols, T* vals, int cnt, int cap) {
#ifdef MK_LSA_X86
  if (cpu_has_avx()) return collect_avx<Avx<T>>(c, v, s, e, tau, cols, vals, cnt, cap);
#endif
  return collect_generic(c, v, s, e, tau, cols, vals, cnt, cap);
}
template <class T>
inline T reduced_min(const T* c, const T* v, int m) {
#ifdef MK_LSA_X86
  if (cpu_has_avx()) return reduced_min_avx<Avx<T>>(c, v, m);
#endif
  return reduced_min_generic(c, v, m);
}
template <class T>
inline void umins(const T* c, const T* v, int m, T& u1, int& j1, T& u2, int& j2) {
#ifdef MK_LSA_X86
  if (cpu_has_avx() && lane_indices_exact<T>(m)) return umins_avx<Avx<T>>(c, v, m, u1, j1, u2, j2);
#endif
  umins_generic(c, v, m, u1, j1, u2, j2);
}
template <class T>
inline T relax(const T* c, const T* v, T* d, T* pred, T h, T row, int m, int* arg) {
#ifdef MK_LSA_X86
  if (cpu_has_avx() && lane_indices_exact<T>(m)) return relax_avx<Avx<T>>(c, v, d, pred, h, row, m, arg);
#endif
  return relax_generic(c, v, d, pred, h, row, m, arg);
}
template <class T>
inline bool all_usable(const T* c, int64_t count) {
#ifdef MK_LSA_X86
  if (cpu_has_avx()) return all_usable_avx<Avx<T>>(c, count);
#endif
  return all_usable_generic(c, count);
}
// =============================================================================== dense LAPJV

template <class T>
struct Work {
  std::vector<T> mat;  // working copy of the costs (converted / negated / transposed) when needed
  std::vector<T> v, d, pred, tmp, dsc, vsc;
  std::vector<int> x, y, freelist, scanned, matches;
};

constexpr int kDenseArrMinM = 1024;  // the dense solver runs augmenting row reduction above this width
constexpr int32_t kColdStart = -2;   // a warm start gave up: solve from scratch
// Dijkstra row scans a warm start may spend, per row of the problem (MuDSC's 1024^2 re-solves from good
// potentials take up to 16; their cold solves 35-115)
constexpr int64_t kWarmScanBudget = 32;

template <class T>
class DenseSolver {
 public:
  DenseSolver(const T* c, int n, int m, Work<T>& w) : c_(c), n_(n), m_(m), w_(w) {}

  int32_t solve() {
    Work<T>& w = w_;
    w.v.assign(m_, T(0));
    w.x.assign(n_, -1);
    w.y.assign(m_, -1);
    w.d.resize(m_);
    w.pred.resize(m_);
    w.freelist.clear();
    if (n_ == 0) return kOk;
    if (n_ == m_) {
      const int32_t st = column_reduction();
      if (st != kOk) return st;
    } else {
      for (int i = 0; i < n_; ++i) w.freelist.push_back(i);
    }
    // Augmenting row reduction pays off only on large problems: below that, every one of its steps
    // (a full row scan) costs about what a Dijkstra step costs, and it takes several per row.
    int32_t st = augmenting_row_reduction(m_ > kDenseArrMinM ? 2 : 0);
    if (st != kOk) return st;
    free_after_init = static_cast<int64_t>(w.freelist.size());
    return augment_all();
  }

  // From given column potentials (square problems, checked by warm_potentials): every row free, one
  // pass of augmenting row reduction, then augmentation. Any potentials keep the invariant (no row is
  // assigned yet, and each row's implied u_i = min_j c_ij - v_j is feasible); ones near the optimum
  // leave few rows free and short paths. kColdStart (nothing decided) when a quarter of the rows are
  // still free after the reduction: poor potentials, where the cold start's reductions do better.
  int32_t solve_from(const T* v0) {
    Work<T>& w = w_;
    w.v.assign(v0, v0 + m_);
    w.x.assign(n_, -1);
    w.y.assign(m_, -1);
    w.d.resize(m_);
    w.pred.resize(m_);
    w.freelist.resize(n_);
    std::iota(w.freelist.begin(), w.freelist.end(), 0);
    // immediate retries of displaced rows capped at 2n steps (not the cold start's 8n): from poor potentials
    // the chains run long, and the searches that follow finish the job for less
    const int32_t st = augmenting_row_reduction(1, 2 * static_cast<int64_t>(n_) + 64);
    if (st != kOk) return st;
    free_after_init = static_cast<int64_t>(w.freelist.size());
    if (free_after_init * 4 > n_) return kColdStart;
    scan_budget = kWarmScanBudget * static_cast<int64_t>(n_);
    return augment_all();
  }

  // Continue from x, y, v and the free list already in the workspace (a state that satisfies the
  // invariant: the sparse path hands over this way).
  int32_t resume() {
    w_.d.resize(m_);
    w_.pred.resize(m_);
    free_after_init = static_cast<int64_t>(w_.freelist.size());
    return augment_all();
  }

  int32_t augment_all() {
    std::vector<int> todo;
    todo.swap(w_.freelist);
    for (int f : todo) {
      const int32_t st = augment(f);
      if (st != kOk) return st;
      if (scan_budget >= 0 && row_scans > scan_budget) return kColdStart;
    }
    return kOk;
  }

  // Row scans after which augment_all gives up (kColdStart), or -1: a warm start's searches are bounded so
  // that potentials that pass the checks but lead to long paths cost at most about that many scans more
  // than the cold solve.
  int64_t scan_budget = -1;

 private:
  const T* row(int i) const { return c_ + static_cast<size_t>(i) * static_cast<size_t>(m_); }

  // Column reduction (v_j = min_i c_ij, each column offered to its minimising row) and reduction
  // transfer (a row that got exactly one column passes its second-best slack to that column).
  int32_t column_reduction() {
    Work<T>& w = w_;
    T* v = w.v.data();
    w.tmp.assign(m_, T(-1));
    std::fill(w.v.begin(), w.v.end(), kInf<T>);
    bool valid = true;
    for (int i = 0; i < n_; ++i) valid &= colmin_update(row(i), v, w.tmp.data(), static_cast<T>(i), m_, (T*)nullptr, m_);
    if (!valid) return team::classify(c_, static_cast<int64_t>(n_) * m_);
    for (int j = 0; j < m_; ++j)
      if (!(v[j] < kInf<T>)) return kInfeasible;  // a column with no allowed row
    w.matches.assign(n_, 0);
    for (int j = m_ - 1; j >= 0; --j) {
      const int i = static_cast<int>(w.tmp[j]);
      if (w.matches[i]++ == 0) {
        w.x[i] = j;
        w.y[j] = i;
      } else if (v[j] < v[w.x[i]]) {
        const int j1 = w.x[i];
        w.x[i] = j;
        w.y[j] = i;
        w.y[j1] = -1;
      } else {
        w.y[j] = -1;
      }
    }
    for (int i = 0; i < n_; ++i)
      if (w.matches[i] == 0) w.freelist.push_back(i);
    if (w.freelist.empty()) return kOk;  // already optimal: the transfer would only prepare later phases
    for (int i = 0; i < n_; ++i) {
      if (w.matches[i] == 1) {
        const int j1 = w.x[i];
        const T save = v[j1];
        v[j1] = -kInf<T>;  // excluded from the minimum
        const T mn = reduced_min(row(i), v, m_);
        v[j1] = save;
        if (mn < kInf<T>) v[j1] = save - mn;
      }
    }
    return kOk;
  }

  // Jonker–Volgenant augmenting row reduction: each free row takes its best column, lowering that
  // column's potential by its slack to the second best; a displaced row is retried at once when the
  // potential dropped (else at the next pass). Bounded: displacements per pass are capped.
  int32_t augmenting_row_reduction(int passes, int64_t cap = -1) {
    Work<T>& w = w_;
    T* v = w.v.data();
    int* x = w.x.data();
    int* y = w.y.data();
    std::vector<int>& fl = w.freelist;
    if (cap < 0) cap = 8 * static_cast<int64_t>(n_) + 64;
    for (int pass = 0; pass < passes && !fl.empty(); ++pass) {
      const int prev = static_cast<int>(fl.size());
      int k = 0, nfree = 0;
      int64_t steps = 0;
      while (k < prev) {
        const int i = fl[k++];
        ++steps;
        ++arr_steps;
        T u1, u2;
        int j1, j2;
        umins(row(i), v, m_, u1, j1, u2, j2);
        if (!(u1 < kInf<T>)) return kInfeasible;  // a row with no allowed column
        int i0 = y[j1];
        const bool lowers = u1 < u2 && u2 < kInf<T>;
        if (lowers) {
          v[j1] = v[j1] - (u2 - u1);
        } else if (i0 >= 0 && j2 >= 0) {
          j1 = j2;
          i0 = y[j2];
        }
        if (i0 >= 0) x[i0] = -1;
        x[i] = j1;
        y[j1] = i;
        if (i0 >= 0) {
          if (lowers && steps < cap)
            fl[--k] = i0;
          else
            fl[nfree++] = i0;
        }
      }
      fl.resize(nfree);
    }
    return kOk;
  }

  // Shortest augmenting path from free row f (Dijkstra on reduced costs, one column at a time).
  int32_t augment(int f) {
    Work<T>& w = w_;
    if (static_cast<int>(w.scanned.size()) < m_) {
      w.scanned.resize(m_);
      w.dsc.resize(m_);
      w.vsc.resize(m_);
    }
    T* const v = w.v.data();
    T* const d = w.d.data();
    T* const pred = w.pred.data();
    int* const x = w.x.data();
    int* const y = w.y.data();
    int* const scanned = w.scanned.data();
    T* const dsc = w.dsc.data();
    T* const vsc = w.vsc.data();
    const int m = m_;
    std::fill(d, d + m, kInf<T>);
    int nsc = 0, j = -1;
    T mu = relax(row(f), v, d, pred, T(0), static_cast<T>(f), m, &j);
    while (true) {
      if (!(mu < kInf<T>)) {  // no augmenting path of finite cost: infeasible
        for (int k = 0; k < nsc; ++k) v[scanned[k]] = vsc[k];
        return kInfeasible;
      }
      const int i = y[j];
      if (i < 0) break;
      const T vj = v[j];
      const T h = mu - (row(i)[j] - vj);
      scanned[nsc] = j;
      vsc[nsc] = vj;
      dsc[nsc] = mu;
      ++nsc;
      v[j] = -kInf<T>;
      d[j] = kInf<T>;
      mu = relax(row(i), v, d, pred, h, static_cast<T>(i), m, &j);
    }
    row_scans += nsc;
    for (int k = 0; k < nsc; ++k) v[scanned[k]] = vsc[k] + (dsc[k] - mu);
    while (true) {
      const int i = static_cast<int>(pred[j]);
      y[j] = i;
      const int jn = x[i];
      x[i] = j;
      if (i == f) break;
      j = jn;
    }
    return kOk;
  }

  const T* c_;
  int n_, m_;
  Work<T>& w_;

 public:
  int64_t free_after_init = 0, row_scans = 0, arr_steps = 0;
};

// =============================================================================== sparse + certificate
//
// For large square problems most of the dense solver's time goes into full row scans (augmenting
// row reduction and Dijkstra) although the optimum uses only entries of small reduced cost. The
// sparse path keeps JV's phases but runs the row-by-row ones on candidate lists:
//  1. one pass over the matrix: column minima (and validity); column reduction; reduction transfer
//     with the dense rows (as the dense solver does). Every row is now dual feasible against its
//     dense row, with u_i = c[i, x_i] - v[x_i] (0 for rows that got several columns).
//  2. a row gets a candidate list the first time a later phase needs it: its entries of smallest
//     reduced cost c_ij - v_j under the potentials of that moment, with a bound lo_i such that
//     every entry left out has reduced cost > lo_i. Column potentials only decrease, so the bound
//     stays valid for the whole run.
//  3. augmenting row reduction and Dijkstra (with a heap) on the candidate lists.
//  4. certificate: a row never touched in 2-3 is still dual feasible against its dense row (its
//     potentials did not change, the others only decreased). A touched row is certified when
//     u_i <= lo_i (+ rounding); a row that fails is rescanned against its dense row with the
//     current potentials (new candidates and bound), and freed and re-augmented when its dense
//     minimum beats its assignment. Repeat until every row is certified: then u, v are feasible for
//     every dense entry and tight on the assignment, so the assignment is optimal.
// The candidate graph may lack an augmenting path, or too many rows may fail: then the caller runs
// the dense solver from scratch. Either way the answer is exact.

constexpr int32_t kSwitch = -1;  // continue with the dense solver from the sparse state

template <class T>
struct SparseWork {
  std::vector<T> v, xval, lo, cmin, tmpv, vals, dist, predc, heapk, imin;
  std::vector<int> x, y, start, len, cols, matches, pred, touched, freelist, heapj, visited;
  std::vector<char> done;
  std::vector<uint8_t> level;  // a row's candidate target is kTarget << level (grown when searches fail)
};

template <class T>
class SparseSolver {
 public:
  static constexpr int kTarget = 16;  // candidates guaranteed per row (at least)

  SparseSolver(const T* c, int n, SparseWork<T>& w) : c_(c), n_(n), w_(w) {}

  int32_t solve(Stats* stats) {
    int32_t st = initial_pass();
    if (st != kOk) return st;
    column_reduction();
    st = row_reduction(2);
    if (st != kOk) return st;
    return finish(stats);
  }

  // From given column potentials (checked by warm_potentials) instead of the column reduction: one dense
  // pass gives each row its best column under them where that column is still free (such a row is dual
  // feasible against its dense row, as the column reduction's are, and needs no candidates); the other
  // rows go through one pass of row reduction on their candidate lists, then as solve(). kColdStart when
  // a quarter of the rows are still free after it (poor potentials).
  int32_t solve_from(const T* v0, Stats* stats) {
    SparseWork<T>& w = w_;
    int32_t st = initial_pass();  // validity, feasibility and the workspace (its column minima go unused)
    if (st != kOk) return st;
    std::copy(v0, v0 + n_, w.v.begin());
    w.freelist.clear();
    for (int i = 0; i < n_; ++i) {
      T u1, u2;
      int j1, j2;
      umins(row(i), w.v.data(), n_, u1, j1, u2, j2);
      if (!(u1 < kInf<T>)) return kInfeasible;  // a row with no allowed column
      if (w.y[j1] < 0) {
        w.x[i] = j1;
        w.y[j1] = i;
        w.xval[i] = row(i)[j1];
      } else {
        w.freelist.push_back(i);
      }
    }
    st = row_reduction(1);
    if (st != kOk) return st;
    if (static_cast<int64_t>(w_.freelist.size()) * 4 > n_) return kColdStart;
    return finish(stats);
  }

  // After the reductions: augmentation on the candidate lists and certification rounds (or kSwitch).
  int32_t finish(Stats* stats) {
    int32_t st;
    // Many rows still free: the augmentations will be many and short, where dense scans beat a heap.
    if (static_cast<int64_t>(w_.freelist.size()) * 32 > n_) return kSwitch;
    st = augment_free();
    if (st != kOk) return st;
    const int max_rounds = 4;
    int64_t rescans = 0;
    for (int round = 0;; ++round) {
      if (stats) stats->rounds = round;
      std::vector<int> failing;
      for (int i = 0; i < n_; ++i)
        if (w_.len[i] >= 0 && !certified(i)) failing.push_back(i);
      if (failing.empty()) break;
      rescans += static_cast<int64_t>(failing.size());
      if (stats) stats->rows_rescanned = static_cast<int32_t>(rescans);
      if (round >= max_rounds || rescans > n_) return kSwitch;
      for (int i : failing) {
        const T u = w_.xval[i] - w_.v[w_.x[i]];
        const T rmin = select(i);
        if (rmin < u - tol(i)) {  // the dense row beats the assignment: free the row
          w_.y[w_.x[i]] = -1;
          w_.x[i] = -1;
          w_.freelist.push_back(i);
        }
      }
      st = row_reduction(1);
      if (st != kOk) return st;
      st = augment_free();
      if (st != kOk) return st;
    }
    if (stats) {
      stats->row_scans = selections_;
    }
    return kOk;
  }

  const std::vector<int>& x() const { return w_.x; }
  const std::vector<T>& v() const { return w_.v; }

  // Hands the current state to the dense solver: potentials and assignment, with every assigned
  // row dual feasible against its dense row (rows that cannot be certified that way are freed).
  void to_dense(Work<T>& d) {
    const int n = n_;
    d.v = w_.v;
    d.x = w_.x;
    d.y = w_.y;
    d.freelist.clear();
    for (int i = 0; i < n; ++i) {
      if (d.x[i] >= 0 && w_.len[i] >= 0 && !certified(i)) {
        const T u = w_.xval[i] - w_.v[w_.x[i]];
        if (reduced_min(row(i), w_.v.data(), n) < u - tol(i)) {
          d.y[d.x[i]] = -1;
          d.x[i] = -1;
        }
      }
      if (d.x[i] < 0) d.freelist.push_back(i);
    }
  }

 private:
  const T* row(int i) const { return c_ + static_cast<size_t>(i) * static_cast<size_t>(n_); }

  // Row i is dual feasible against its dense row: its candidates' reduced costs are >= u_i (the
  // invariant of every phase, checked again here) and so is the bound of the entries left out.
  bool certified(int i) const {
    const T u = w_.xval[i] - w_.v[w_.x[i]];
    const T t = tol(i);
    if (u > w_.lo[i] + t) return false;
    const int* cols = w_.cols.data() + w_.start[i];
    const T* vals = w_.vals.data() + w_.start[i];
    const T* v = w_.v.data();
    for (int e = 0; e < w_.len[i]; ++e)
      if (vals[e] - v[cols[e]] < u - t) return false;
    return true;
  }

  T tol(int i) const {
    const int j = w_.x[i];
    return T(64) * std::numeric_limits<T>::epsilon() * (std::abs(w_.xval[i]) + std::abs(w_.v[j]));
  }

  // Row i's candidate target: kTarget << level_i; a row whose target reaches n / 4 takes every
  // allowed entry ("complete": its bound is +inf).
  int target(int i) const { return kTarget << w_.level[i]; }
  bool complete(int i) const { return 4 * target(i) >= n_; }

  // (Re)selects row i's candidates from its dense row under the current potentials. With K the
  // row's target, the row is cut into about 2K chunks of a multiple of 8 columns and tau = the K-th
  // smallest chunk minimum of r_j = c_ij - v_j, so at least K entries have r <= tau; every one of
  // them is collected (up to 4K, from a row-dependent column so that ties spread over columns);
  // lo_i = tau, or the row minimum when ties overflowed. The row's assigned column stays a
  // candidate. Returns the row's smallest reduced cost.
  T select(int i) {
    SparseWork<T>& w = w_;
    const int n = n_;
    const T* c = row(i);
    const T* v = w.v.data();
    const int K = target(i);
    const int cap = complete(i) ? n : 4 * K;
    const size_t at = w.cols.size();
    w.cols.resize(at + cap + 2);
    w.vals.resize(at + cap + 2);
    int* cols = w.cols.data() + at;
    T* vals = w.vals.data() + at;
    int cnt;
    T rowmin;
    if (complete(i)) {
      cnt = collect(c, v, 0, n, std::numeric_limits<T>::max(), cols, vals, 0, n);
      rowmin = reduced_min(c, v, n);
      w.lo[i] = kInf<T>;
    } else {
      int chunk = (n + 2 * K - 1) / (2 * K);
      chunk = std::max(8, (chunk + 7) & ~7);
      const int nchunks = (n + chunk - 1) / chunk;
      T* cm = w.cmin.data();
      for (int s = 0, k = 0; s < n; s += chunk, ++k) cm[k] = reduced_min(c + s, v + s, std::min(chunk, n - s));
      T* tmp = w.tmpv.data();
      std::copy(cm, cm + nchunks, tmp);
      const int k = std::min(K, nchunks) - 1;
      std::nth_element(tmp, tmp + k, tmp + nchunks);
      const T tau = tmp[k];
      rowmin = *std::min_element(tmp, tmp + k + 1);
      const T lim = tau < kInf<T> ? tau : std::numeric_limits<T>::max();  // never collect +inf
      const int offset = static_cast<int>((static_cast<int64_t>(i) * 61) % n);
      cnt = collect(c, v, offset, n, lim, cols, vals, 0, cap + 1);
      cnt = collect(c, v, 0, offset, lim, cols, vals, cnt, cap + 1);
      if (cnt > cap) {  // ties: the entries left out may be as small as the row minimum
        cnt = cap;
        w.lo[i] = rowmin;
      } else {
        w.lo[i] = tau;  // everything left out has r > tau (+inf when tau is +inf)
      }
    }
    const int xi = w.x[i];
    if (xi >= 0) {
      bool has_x = false;
      for (int e = 0; e < cnt; ++e) has_x |= cols[e] == xi;
      if (!has_x) {
        cols[cnt] = xi;
        vals[cnt] = c[xi];
        ++cnt;
      }
    }
    w.cols.resize(at + cnt);
    w.vals.resize(at + cnt);
    w.start[i] = static_cast<int>(at);
    w.len[i] = cnt;
    ++selections_;
    return rowmin;
  }

  void ensure(int i) {
    if (w_.len[i] < 0) select(i);
  }

  // Column minima (one pass over the matrix, which also checks every entry).
  int32_t initial_pass() {
    SparseWork<T>& w = w_;
    const int n = n_;
    selections_ = 0;  // (a cold solve after a warm start that gave up starts its budget afresh)
    w.v.assign(n, kInf<T>);
    w.imin.assign(n, T(-1));
    bool valid = true;
    for (int i = 0; i < n; ++i)
      valid &= colmin_update(row(i), w.v.data(), w.imin.data(), static_cast<T>(i), n, (T*)nullptr, n);
    if (!valid) return team::classify(c_, static_cast<int64_t>(n) * n);
    for (int j = 0; j < n; ++j)
      if (!(w.v[j] < kInf<T>)) return kInfeasible;  // a column with no allowed row
    w.cmin.assign(n / 8 + 2, T(0));
    w.tmpv.assign(n / 8 + 2, T(0));
    w.level.assign(n, 0);
    w.start.assign(n, 0);
    w.len.assign(n, -1);
    w.lo.assign(n, kInf<T>);
    w.cols.clear();
    w.vals.clear();
    w.cols.reserve(static_cast<size_t>(n) * 24);
    w.vals.reserve(static_cast<size_t>(n) * 24);
    w.x.assign(n, -1);
    w.y.assign(n, -1);
    w.xval.assign(n, T(0));
    return kOk;
  }

  // Jonker–Volgenant column reduction (columns offered to their minimising rows) and reduction
  // transfer against the dense rows.
  void column_reduction() {
    SparseWork<T>& w = w_;
    const int n = n_;
    T* v = w.v.data();
    w.matches.assign(n, 0);
    for (int j = n - 1; j >= 0; --j) {
      const int i = static_cast<int>(w.imin[j]);
      if (w.matches[i]++ == 0) {
        w.x[i] = j;
        w.y[j] = i;
      } else if (v[j] < v[w.x[i]]) {
        const int j1 = w.x[i];
        w.x[i] = j;
        w.y[j] = i;
        w.y[j1] = -1;
      } else {
        w.y[j] = -1;
      }
    }
    w.freelist.clear();
    for (int i = 0; i < n; ++i)
      if (w.matches[i] == 0) w.freelist.push_back(i);
    // With every row assigned the assignment is already optimal (all reduced costs >= 0, tight on
    // the assignment): the transfer, which only prepares the later phases, is skipped.
    const bool transfer = !w.freelist.empty();
    for (int i = 0; i < n; ++i) {
      if (w.matches[i] == 0) continue;
      const int j1 = w.x[i];
      w.xval[i] = v[j1];  // c[i, j1] is the column minimum
      if (w.matches[i] != 1 || !transfer) continue;
      const T save = v[j1];
      v[j1] = -kInf<T>;  // excluded from the minimum
      const T mn = reduced_min(row(i), v, n);
      v[j1] = save;
      if (mn < kInf<T>) v[j1] = save - mn;
    }
  }

  int32_t row_reduction(int passes) {
    SparseWork<T>& w = w_;
    T* v = w.v.data();
    int* x = w.x.data();
    int* y = w.y.data();
    std::vector<int>& fl = w.freelist;
    const int64_t cap = 8 * static_cast<int64_t>(n_) + 64;
    for (int pass = 0; pass < passes && !fl.empty(); ++pass) {
      const int prev = static_cast<int>(fl.size());
      int k = 0, nfree = 0;
      int64_t steps = 0;
      while (k < prev) {
        const int i = fl[k++];
        ++steps;
        ensure(i);
        const int* cols = w.cols.data() + w.start[i];
        const T* vals = w.vals.data() + w.start[i];
        T u1 = kInf<T>, u2 = kInf<T>, c1 = T(0), c2 = T(0);
        int j1 = -1, j2 = -1;
        for (int e = 0; e < w.len[i]; ++e) {
          const int j = cols[e];
          const T r = vals[e] - v[j];
          if (r < u2 || (r == u2 && j < j2)) {
            if (r < u1 || (r == u1 && j < j1)) {
              u2 = u1, j2 = j1, c2 = c1;
              u1 = r, j1 = j, c1 = vals[e];
            } else {
              u2 = r, j2 = j, c2 = vals[e];
            }
          }
        }
        if (j1 < 0) return kInfeasible;  // no finite entry in this row
        const T u2c = std::min(u2, w.lo[i]);
        int i0 = y[j1];
        const bool lowers = u1 < u2c && u2c < kInf<T>;
        if (lowers) {
          v[j1] -= (u2c - u1);
        } else if (i0 >= 0 && j2 >= 0) {
          j1 = j2;
          c1 = c2;
          i0 = y[j2];
        }
        if (i0 >= 0) x[i0] = -1;
        x[i] = j1;
        y[j1] = i;
        w.xval[i] = c1;
        if (i0 >= 0) {
          if (lowers && steps < cap)
            fl[--k] = i0;
          else
            fl[nfree++] = i0;
        }
      }
      fl.resize(nfree);
    }
    return kOk;
  }

  // Binary heap of (distance, column), smallest first, ties to the smaller column.
  bool less(size_t a, size_t b) const {
    return w_.heapk[a] < w_.heapk[b] || (w_.heapk[a] == w_.heapk[b] && w_.heapj[a] < w_.heapj[b]);
  }
  void heap_push(T key, int j) {
    w_.heapk.push_back(key);
    w_.heapj.push_back(j);
    size_t at = w_.heapk.size() - 1;
    while (at > 0) {
      const size_t up = (at - 1) / 2;
      if (!less(at, up)) break;
      std::swap(w_.heapk[at], w_.heapk[up]);
      std::swap(w_.heapj[at], w_.heapj[up]);
      at = up;
    }
  }
  void heap_pop() {
    const size_t last = w_.heapk.size() - 1;
    w_.heapk[0] = w_.heapk[last];
    w_.heapj[0] = w_.heapj[last];
    w_.heapk.pop_back();
    w_.heapj.pop_back();
    const size_t size = w_.heapk.size();
    size_t at = 0;
    while (true) {
      size_t best = at;
      const size_t l = 2 * at + 1, r = l + 1;
      if (l < size && less(l, best)) best = l;
      if (r < size && less(r, best)) best = r;
      if (best == at) break;
      std::swap(w_.heapk[at], w_.heapk[best]);
      std::swap(w_.heapj[at], w_.heapj[best]);
      at = best;
    }
  }

  // Shortest augmenting paths (Dijkstra with a heap on the candidate lists) for the free rows.
  int32_t augment_free() {
    SparseWork<T>& w = w_;
    const int n = n_;
    if (static_cast<int>(w.dist.size()) != n) {
      w.dist.assign(n, kInf<T>);
      w.done.assign(n, 0);
      w.pred.assign(n, -1);
      w.predc.assign(n, T(0));
    }
    std::vector<int> todo;
    T* v = w.v.data();
    while (!w.freelist.empty()) {
    todo.clear();
    todo.swap(w.freelist);
    for (int f : todo) {
      if (w.x[f] >= 0) continue;  // (cannot happen: rows are freed once)
      int sink = -1;
      T mu = T(0);
      while (true) {
        reset_search();
        relax_row(f, T(0), T(0));
        while (!w.heapk.empty()) {
          const T dj = w.heapk[0];
          const int j = w.heapj[0];
          heap_pop();
          if (w.done[j] || dj > w.dist[j]) continue;
          w.done[j] = 1;
          if (w.y[j] < 0) {
            sink = j;
            mu = dj;
            break;
          }
          const int i = w.y[j];
          relax_row(i, dj, w.xval[i] - v[j]);
        }
        if (sink >= 0) break;
        // No augmenting path within the candidate lists: grow the lists of every row the search
        // reached and search again. When all of them are complete, no path exists at all.
        w.visited.assign(1, f);
        for (int j : w.touched)
          if (w.done[j]) w.visited.push_back(w.y[j]);
        bool grew = false;
        for (int i : w.visited) {
          if (complete(i)) continue;
          ++w.level[i];
          const T rmin = select(i);
          grew = true;
          if (i != f && rmin < (w.xval[i] - v[w.x[i]]) - tol(i)) {  // the wider row beats its assignment
            w.y[w.x[i]] = -1;
            w.x[i] = -1;
            w.freelist.push_back(i);
          }
        }
        reset_search();
        if (!grew) return kInfeasible;
        if (selections_ > 2 * static_cast<int64_t>(n) + 64) return kSwitch;  // too much growing
      }
      for (int j : w.touched)
        if (w.done[j] && w.dist[j] < mu) v[j] += w.dist[j] - mu;
      int j = sink;
      while (true) {
        const int i = w.pred[j];
        w.y[j] = i;
        const int jn = w.x[i];
        w.x[i] = j;
        w.xval[i] = w.predc[j];
        if (i == f) break;
        j = jn;
      }
    }
    }
    reset_search();
    return kOk;
  }

  void relax_row(int i, T di, T ui) {
    ensure(i);
    SparseWork<T>& w = w_;
    const int* cols = w.cols.data() + w.start[i];
    const T* vals = w.vals.data() + w.start[i];
    const T* v = w.v.data();
    for (int e = 0; e < w.len[i]; ++e) {
      const int k = cols[e];
      if (w.done[k]) continue;
      const T nd = di + ((vals[e] - v[k]) - ui);
      if (nd < w.dist[k]) {
        if (w.dist[k] == kInf<T>) w.touched.push_back(k);
        w.dist[k] = nd;
        w.pred[k] = i;
        w.predc[k] = vals[e];
        heap_push(nd, k);
      }
    }
  }

  void reset_search() {
    for (int j : w_.touched) {
      w_.dist[j] = kInf<T>;
      w_.done[j] = 0;
    }
    w_.touched.clear();
    w_.heapk.clear();
    w_.heapj.clear();
  }

  const T* c_;
  int n_;
  SparseWork<T>& w_;
  int64_t selections_ = 0;
};

// =============================================================================== input preparation

// dst (n x m, n <= m) from src (nr x nc): converted to T, negated when maximising, transposed when
// nr > nc. Returns kOk, or the status of the entries team::unusable refuses after the sign change.
template <class Tin, class T>
int32_t prepare_copy(const Tin* src, int64_t nr, int64_t nc, bool transpose, bool negate, T* dst) {
  int bad = 0;
  const T sign = negate ? T(-1) : T(1);
  if (!transpose) {
    const int64_t count = nr * nc;
    for (int64_t k = 0; k < count; ++k) {
      const T x = sign * static_cast<T>(src[k]);
      bad |= team::unusable(x);
      dst[k] = x;
    }
  } else {
    constexpr int64_t B = 32;  // blocked transpose
    for (int64_t i0 = 0; i0 < nr; i0 += B)
      for (int64_t j0 = 0; j0 < nc; j0 += B) {
        const int64_t i1 = std::min(nr, i0 + B), j1 = std::min(nc, j0 + B);
        for (int64_t i = i0; i < i1; ++i)
          for (int64_t j = j0; j < j1; ++j) {
            const T x = sign * static_cast<T>(src[i * nc + j]);
            bad |= team::unusable(x);
            dst[j * nr + i] = x;
          }
      }
  }
  // a NaN that became a float32 NaN is caught above; float64 values too large for float32 become
  // +-inf, which is what the float32 computation can represent (linear_sum_assignment refuses them).
  return bad == 0 ? kOk : team::classify(dst, nr * nc);
}

// Results of the n x m solve (x: row -> column, v) in the caller's orientation and sign.
template <class T>
void write_outputs(const T* c, int n, int m, bool transpose, bool maximize, const int* x, const T* v, int64_t* rows,
                   int64_t* cols, T* u_out, T* v_out, std::vector<int>& scratch) {
  const T sign = maximize ? T(-1) : T(1);
  if (!transpose) {
    for (int i = 0; i < n; ++i) {
      rows[i] = i;
      cols[i] = x[i];
    }
    if (u_out)
      for (int i = 0; i < n; ++i) u_out[i] = sign * (c[static_cast<size_t>(i) * m + x[i]] - v[x[i]]);
    if (v_out)
      for (int j = 0; j < m; ++j) v_out[j] = sign * v[j];
  } else {
    // solved rows are the caller's columns; list the caller's rows in ascending order
    std::vector<int>& col_of = scratch;
    col_of.assign(m, -1);
    for (int j = 0; j < n; ++j) col_of[x[j]] = j;
    int t = 0;
    for (int i = 0; i < m; ++i)
      if (col_of[i] >= 0) {
        rows[t] = i;
        cols[t] = col_of[i];
        ++t;
      }
    if (u_out)
      for (int i = 0; i < m; ++i) u_out[i] = sign * v[i];
    if (v_out)
      for (int j = 0; j < n; ++j) v_out[j] = sign * (c[static_cast<size_t>(j) * m + x[j]] - v[x[j]]);
  }
}

// The caller's column potentials (maximize: negated) for a warm start of the n x n costs c, in v0: kOk;
// kColdStart where they are unusable: not finite, or too far from the costs' own scale. In one pass over
// the matrix (which also checks every entry: else the status of the first one no solve takes) it takes the
// column and row minima: v0 is shifted to lie at or below the column minima (the cold start's potentials),
// touching them somewhere, and refused when some v0_j lies further below than 4 times the spread of the
// column minima plus that of the row minima. Optimal duals lie within 0.6 times that spread (measured on
// uniform, correlated, rank-1, forbidden-pair, mixed-sign and MuDSC costs); potentials far beyond it, while
// still exact in their dtype, would carry rounding far above the costs' own and give wrong answers.
template <class T>
int32_t warm_potentials(const T* c, int n, const T* v_init, bool maximize, std::vector<T>& v0) {
  std::vector<T> colmin(n, kInf<T>), first(n), rowmin(n);
  bool valid = true;
  for (int i = 0; i < n; ++i)
    valid &= colmin_update(c + static_cast<size_t>(i) * n, colmin.data(), first.data(), static_cast<T>(i), n,
                           rowmin.data() + i, n);
  if (!valid) return team::classify(c, static_cast<int64_t>(n) * n);
  T clo = kInf<T>, chi = -kInf<T>, rlo = kInf<T>, rhi = -kInf<T>, shift = -kInf<T>;
  for (int j = 0; j < n; ++j) {
    if (!(colmin[j] < kInf<T>) || !(rowmin[j] < kInf<T>)) return kColdStart;  // (the cold solve reports it)
    clo = std::min(clo, colmin[j]);
    chi = std::max(chi, colmin[j]);
    rlo = std::min(rlo, rowmin[j]);
    rhi = std::max(rhi, rowmin[j]);
    const T x = maximize ? -v_init[j] : v_init[j];
    if (!std::isfinite(x)) return kColdStart;
    shift = std::max(shift, x - colmin[j]);
  }
  const T allowed = T(4) * ((chi - clo) + (rhi - rlo));
  v0.resize(n);
  for (int j = 0; j < n; ++j) {
    v0[j] = ((maximize ? -v_init[j] : v_init[j]) - shift);
    if (!(colmin[j] - v0[j] <= allowed)) return kColdStart;
  }
  return kOk;
}

constexpr int kSparseMinN = 768;  // kAuto: square problems from this size take the sparse path
// kAuto with a warm start: the sparse path from this size (measured on MuDSC's 1024^2 re-solves, where the
// dense start's one reduction pass leaves no row free and beats the candidate lists' selections 2x, and on
// 2048^2 correlation and uniform re-solves, where the sparse start is 1.2-2.5x the dense one)
constexpr int kWarmSparseMinN = 1536;

// The sparse path of a square problem, cold or from potentials v0 (a warm start), finished with dense scans
// where it hands over: x and v point at the result (in w or sw). kColdStart: the warm start gave up (its
// first pass left too many rows free, or its searches ran over budget); nothing is decided.
template <class T>
int32_t solve_sparse(const T* c, int n, const T* v0, Work<T>& w, SparseWork<T>& sw, Stats* stats, const int*& x,
                     const T*& v) {
  SparseSolver<T> solver(c, n, sw);
  const int32_t st = v0 != nullptr ? solver.solve_from(v0, stats) : solver.solve(stats);
  if (st == kColdStart || st == kInvalid || st == kInfeasible || st == kOutOfRange) return st;
  if (stats) {
    stats->used_sparse = 1;
    stats->warm_started = v0 != nullptr;
  }
  if (st == kOk) {
    x = solver.x().data();
    v = solver.v().data();
    return kOk;
  }
  // kSwitch: finish with dense scans from where the sparse path stopped
  if (stats) stats->sparse_fallback = 1;
  solver.to_dense(w);
  DenseSolver<T> dense(c, n, n, w);
  if (v0 != nullptr) dense.scan_budget = kWarmScanBudget * static_cast<int64_t>(n);
  const int32_t dst = dense.resume();
  if (dst == kColdStart) return kColdStart;
  if (stats) {
    stats->free_after_init = dense.free_after_init;
    stats->row_scans += dense.row_scans;
  }
  if (dst != kOk) return dst;
  x = w.x.data();
  v = w.v.data();
  return kOk;
}

template <class T>
int32_t solve_one(const void* cost, int dtype, int64_t nr, int64_t nc, const Options& opt, int64_t* rows,
                  int64_t* cols, T* u_out, T* v_out, Work<T>& w, SparseWork<T>& sw, Stats* stats,
                  const T* v_init) {
  const bool transpose = nr > nc;
  const int n = static_cast<int>(transpose ? nc : nr);
  const int m = static_cast<int>(transpose ? nr : nc);
  const bool same_type = (dtype == 1) == std::is_same_v<T, double>;
  if (stats) *stats = Stats{};
  if (n == 0) return kOk;
  const T* c;
  bool checked = false;  // validity already established (copies check as they go)
  if (same_type && !transpose && !opt.maximize) {
    c = static_cast<const T*>(cost);
  } else {
    w.mat.resize(static_cast<size_t>(nr) * static_cast<size_t>(nc));
    const int32_t st = dtype == 1 ? prepare_copy(static_cast<const double*>(cost), nr, nc, transpose, opt.maximize,
                                                 w.mat.data())
                                  : prepare_copy(static_cast<const float*>(cost), nr, nc, transpose, opt.maximize,
                                                 w.mat.data());
    if (st != kOk) return st;
    c = w.mat.data();
    checked = true;
  }

  // x (row -> column of the n x m problem), v, and u_i = c[i, x_i] - v[x_i]
  const int* x = nullptr;
  const T* v = nullptr;
  const bool sparse = n == m && (opt.method == kSparse || (opt.method == kAuto && n >= kSparseMinN));
  // square: no transpose, the caller's columns are the solver's
  const T* v0 = nullptr;
  if (v_init != nullptr && n == m) {
    const int32_t st = warm_potentials(c, n, v_init, opt.maximize, w.tmp);
    if (st != kOk && st != kColdStart) return st;
    if (st == kOk) v0 = w.tmp.data();
    checked = true;
  }
  const bool warm_sparse = opt.method == kSparse || (opt.method == kAuto && n >= kWarmSparseMinN);
  if (v0 != nullptr && !warm_sparse) {
    DenseSolver<T> solver(c, n, m, w);
    const int32_t st = solver.solve_from(v0);
    if (stats) {
      stats->free_after_init = solver.free_after_init;
      stats->row_scans = solver.row_scans;
      stats->arr_steps = solver.arr_steps;
    }
    if (st != kColdStart) {
      if (st != kOk) return st;
      if (stats) stats->warm_started = 1;
      write_outputs(c, n, m, transpose, opt.maximize, w.x.data(), w.v.data(), rows, cols, u_out, v_out, w.matches);
      return kOk;
    }
    if (stats) *stats = Stats{};  // what follows is a cold solve
  }
  bool solved = false;
  if (sparse) {
    int32_t st = kColdStart;
    if (v0 != nullptr && warm_sparse) {
      st = solve_sparse(c, n, v0, w, sw, stats, x, v);
      if (stats && st == kColdStart) *stats = Stats{};  // what follows is a cold solve
    }
    if (st == kColdStart) st = solve_sparse(c, n, static_cast<const T*>(nullptr), w, sw, stats, x, v);
    if (st != kOk) return st;
    solved = true;
    checked = true;  // the sparse path's first pass checked every entry
  }
  if (!solved) {
    if (!checked && n != m && !all_usable(c, static_cast<int64_t>(n) * m))  // square: checked below
      return team::classify(c, static_cast<int64_t>(n) * m);
    DenseSolver<T> solver(c, n, m, w);
    const int32_t st = solver.solve();
    if (stats) {
      stats->warm_started = 0;
      stats->free_after_init = solver.free_after_init;
      stats->row_scans = solver.row_scans;
      stats->arr_steps = solver.arr_steps;
    }
    if (st != kOk) return st;
    x = w.x.data();
    v = w.v.data();
  }

  write_outputs(c, n, m, transpose, opt.maximize, x, v, rows, cols, u_out, v_out, w.matches);
  return kOk;
}

// The CUDA kernels' team algorithm (csrc/common/lsa_team.h) run by a team of one thread (lanes == 0)
// or of `lanes` threads: lets the tests check that code on machines without a GPU.
template <class T>
int32_t solve_one_team(const void* cost, int dtype, int64_t nr, int64_t nc, const Options& opt, int64_t* rows,
                       int64_t* cols, T* u_out, T* v_out, Work<T>& w, Stats* stats, int lanes) {
  const bool transpose = nr > nc;
  const int n = static_cast<int>(transpose ? nc : nr);
  const int m = static_cast<int>(transpose ? nr : nc);
  if (stats) *stats = Stats{};
  if (n == 0) return kOk;
  w.mat.resize(static_cast<size_t>(nr) * static_cast<size_t>(nc));
  const int32_t prep = dtype == 1 ? prepare_copy(static_cast<const double*>(cost), nr, nc, transpose, opt.maximize,
                                                 w.mat.data())
                                  : prepare_copy(static_cast<const float*>(cost), nr, nc, transpose, opt.maximize,
                                                 w.mat.data());
  if (prep != kOk) return prep;
  team::Problem<T> p;
  p.c = w.mat.data();
  p.n = n;
  p.m = m;
  std::vector<unsigned char> buf(static_cast<size_t>(team::work_bytes<T>(n, m)) + 16);
  team::carve(p, buf.data());
  p.arr_passes = team::arr_passes_for(m);
  long long counters[2] = {0, 0};
  p.counters = counters;
  team::SerialTeam serial;
  const int32_t st = lanes == 0 ? team::solve(serial, p) : team::solve_with_threads(p, lanes);
  if (stats) {
    stats->arr_steps = counters[0];
    stats->row_scans = counters[1];
  }
  if (st != kOk) return st;
  write_outputs(p.c, n, m, transpose, opt.maximize, p.x, p.v, rows, cols, u_out, v_out, w.matches);
  return kOk;
}

// Which solver solve_batch_t runs: the CPU one, or the kernels' team algorithm (team_lanes below).
enum class Engine { kCpu, kTeam };

template <class T>
void solve_batch_t(const void* cost, int dtype, int64_t batch, int64_t nr, int64_t nc, const Options& opt,
                   int64_t* rows, int64_t* cols, T* u, T* v, int32_t* status, Stats* stats, Engine engine,
                   int team_lanes = 0) {
  const int64_t k = std::min(nr, nc);
  const size_t esize = dtype == 1 ? sizeof(double) : sizeof(float);
  const size_t pstride = static_cast<size_t>(nr) * static_cast<size_t>(nc) * esize;
  auto one = [&](int64_t b, Work<T>& w, SparseWork<T>& sw) {
    if (engine == Engine::kTeam) {
      status[b] = solve_one_team<T>(static_cast<const char*>(cost) + b * pstride, dtype, nr, nc, opt, rows + b * k,
                                    cols + b * k, u ? u + b * nr : nullptr, v ? v + b * nc : nullptr, w,
                                    batch == 1 ? stats : nullptr, team_lanes);
      return;
    }
    status[b] = solve_one<T>(static_cast<const char*>(cost) + b * pstride, dtype, nr, nc, opt, rows + b * k,
                             cols + b * k, u ? u + b * nr : nullptr, v ? v + b * nc : nullptr, w, sw,
                             batch == 1 ? stats : nullptr,
                             opt.col_duals_init ? static_cast<const T*>(opt.col_duals_init) + b * nc : nullptr);
  };
#ifdef MK_WITH_OPENMP
  const int threads = opt.num_threads > 0 ? opt.num_threads : omp_get_max_threads();
  if (batch > 1 && threads > 1) {
#pragma omp parallel num_threads(static_cast<int>(std::min<int64_t>(threads, batch)))
    {
      Work<T> w;
      SparseWork<T> sw;
#pragma omp for schedule(dynamic, 1)
      for (int64_t b = 0; b < batch; ++b) one(b, w, sw);
    }
    return;
  }
#endif
  Work<T> w;
  SparseWork<T> sw;
  for (int64_t b = 0; b < batch; ++b) one(b, w, sw);
}

}  // namespace

void solve_batch(const void* cost, int dtype, int64_t batch, int64_t nr, int64_t nc, const Options& options,
                 int64_t* rows, int64_t* cols, void* u, void* v, int32_t* status, Stats* stats) {
  if (options.compute_float32)
    solve_batch_t<float>(cost, dtype, batch, nr, nc, options, rows, cols, static_cast<float*>(u),
                         static_cast<float*>(v), status, stats, Engine::kCpu);
  else
    solve_batch_t<double>(cost, dtype, batch, nr, nc, options, rows, cols, static_cast<double*>(u),
                          static_cast<double*>(v), status, stats, Engine::kCpu);
}

void solve_batch_team_serial(const void* cost, int dtype, int64_t batch, int64_t nr, int64_t nc,
                             const Options& options, int64_t* rows, int64_t* cols, void* u, void* v, int32_t* status,
                             Stats* stats) {
  if (options.compute_float32)
    solve_batch_t<float>(cost, dtype, batch, nr, nc, options, rows, cols, static_cast<float*>(u),
                         static_cast<float*>(v), status, stats, Engine::kTeam);
  else
    solve_batch_t<double>(cost, dtype, batch, nr, nc, options, rows, cols, static_cast<double*>(u),
                          static_cast<double*>(v), status, stats, Engine::kTeam);
}

void solve_batch_team_threads(const void* cost, int dtype, int64_t batch, int64_t nr, int64_t nc,
                              const Options& options, int lanes, int64_t* rows, int64_t* cols, void* u, void* v,
                              int32_t* status, Stats* stats) {
  team::check_lanes(lanes);
  Options one_at_a_time = options;  // each problem already has a team of threads
  one_at_a_time.num_threads = 1;
  if (options.compute_float32)
    solve_batch_t<float>(cost, dtype, batch, nr, nc, one_at_a_time, rows, cols, static_cast<float*>(u),
                         static_cast<float*>(v), status, stats, Engine::kTeam, lanes);
  else
    solve_batch_t<double>(cost, dtype, batch, nr, nc, one_at_a_time, rows, cols, static_cast<double*>(u),
                          static_cast<double*>(v), status, stats, Engine::kTeam, lanes);
}

}  // namespace lsa
}  // namespace merging_kernels
