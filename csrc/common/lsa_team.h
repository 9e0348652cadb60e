// The linear-assignment solver as run by a *team* of threads on one problem: the algorithm of the
// CUDA kernels (csrc/cuda/linear_assignment.cu, team = one thread block, or one warp for small
// problems), written once against a small Team interface so that the same code also runs on the
// CPU with a team of one thread (SerialTeam below; bound as _C.lsa_solve_team_serial so the tests
// exercise this exact code without a GPU) or of several threads (ThreadTeam in
// csrc/cpu/lsa_thread_team.h, _C.lsa_solve_team_threads: the multi-lane logic without a GPU).
//
// Team interface (every call is made by all threads of the team, in the same order):
//   int lane(), size()                      this thread's index in the team, the team size
//   void sync()                             barrier; memory written before it is visible after it
//   T min(T)                                the team's minimum (ends with the barrier's guarantees)
//   bool any(bool)                          whether any thread passed true (same)
//   int broadcast0(int)                     lane 0's value (same)
//   void argmin(T& val, int& idx, T& pay)   the (val, idx)-smallest entry of the team with its payload
//   void top2(T& a1, int& i1, T& a2, int& i2)  the two (value, index)-smallest entries of the team
// Empty entries are (+inf, kNone); real entries are finite.
//
// The algorithm is Jonker–Volgenant's, as in the dense CPU solver: column reduction with
// reduction transfer (square problems), augmenting row reduction (wide problems only), then one
// Dijkstra search per free row, one column at a time. Every pass over a row is split over the team
// (column j belongs to lane j % size, which alone touches d[j], pred[j] and, during a search,
// v[j]); the decisions between passes are taken identically by all lanes from reduced values, and
// the few sequential updates (assignment, free list, path flips) are made by lane 0 between
// barriers. Potentials: v stored, u_i = c[i, x_i] - v[x_i]. The problem is n x m with n <= m,
// minimisation, no NaN / -inf, +inf forbidden.
#pragma once

#include <stdint.h>

#include <climits>
#include <limits>

#if defined(__CUDACC__)
#define MK_LSA_HD __host__ __device__ __forceinline__
#else
#define MK_LSA_HD inline
#endif

namespace merging_kernels {
namespace lsa {
namespace team {

constexpr int kNone = INT_MAX;  // index of an empty entry
enum : int32_t { kOk = 0, kInfeasible = 1, kInvalid = 2, kOutOfRange = 3 };

template <class T>
MK_LSA_HD T infinity() {
  return std::numeric_limits<T>::infinity();
}

// The largest finite |cost| a solve takes: reduced costs and path lengths are sums of a few
// differences of costs and potentials, so magnitudes near the type's maximum overflow into +inf
// (read as forbidden pairs: wrong answers or false "infeasible"). Beyond it a problem is reported
// kOutOfRange, and the caller rescales it by a power of two (exact) and solves again.
template <class T>
MK_LSA_HD T safe_magnitude() {
  if constexpr (sizeof(T) == sizeof(double)) {
    return 0x1p1000;
  } else {
    return 0x1p100f;
  }
}

// An entry no solve may take as it is: NaN, -inf (kInvalid), or finite beyond safe_magnitude
// (kOutOfRange). +inf, a forbidden pair, is usable. One test on the hot scans; classify() says which.
template <class T>
MK_LSA_HD bool unusable(T x) {
  return !(x <= safe_magnitude<T>() && x >= -safe_magnitude<T>()) && x != infinity<T>();
}

// The status of costs of which some entry is unusable: kInvalid when any is NaN or -inf.
template <class T>
inline int32_t classify(const T* c, int64_t count) {
  for (int64_t k = 0; k < count; ++k)
    if (!(c[k] > -infinity<T>())) return kInvalid;
  return kOutOfRange;
}

template <class T>
MK_LSA_HD bool lex_less(T a, int ia, T b, int ib) {
  return a < b || (a == b && ia < ib);
}

// Merges the (value, index)-two-smallest (b1, j1) <= (b2, j2) into (a1, i1) <= (a2, i2): the combine
// step of every team's top2 (entries are distinct or empty).
template <class T>
MK_LSA_HD void merge_top2(T& a1, int& i1, T& a2, int& i2, T b1, int j1, T b2, int j2) {
  if (lex_less(b1, j1, a1, i1)) {
    if (lex_less(a1, i1, b2, j2)) {
      a2 = a1;
      i2 = i1;
    } else {
      a2 = b2;
      i2 = j2;
    }
    a1 = b1;
    i1 = j1;
  } else if (lex_less(b1, j1, a2, i2)) {
    a2 = b1;
    i2 = j1;
  }
}

// The per-problem memory: the cost matrix (n x m, row-major) and the work vectors.
template <class T>
struct Problem {
  const T* c;
  int n, m;
  T *v, *d, *vsaved, *dsc;            // m each
  int *pred, *y, *scol;               // m each
  int *x, *freelist, *matches;        // n each
  int arr_passes;                     // augmenting row reduction passes (0 for small problems)
  long long* counters;                // optional (serial runs): [0] row-reduction steps, [1] search steps
};

// Augmenting row reduction passes for a team: each step of it costs a team reduction, like a search
// step, so it pays only on wide problems (counted on uniform costs: one pass gives the fewest team
// steps from m = 2048 on, none below).
MK_LSA_HD int arr_passes_for(int m) { return m > 1024 ? 1 : 0; }

// Bytes of the work vectors of one problem (16-byte aligned pieces), and their carving.
template <class T>
MK_LSA_HD long long work_bytes(int n, int m) {
  auto up = [](long long b) { return (b + 15) & ~15LL; };
  return 4 * up(static_cast<long long>(m) * sizeof(T)) + 3 * up(static_cast<long long>(m) * 4) +
         3 * up(static_cast<long long>(n) * 4);
}

template <class T>
MK_LSA_HD void carve(Problem<T>& p, unsigned char* base) {
  auto up = [](long long b) { return (b + 15) & ~15LL; };
  const long long mt = up(static_cast<long long>(p.m) * sizeof(T)), mi = up(static_cast<long long>(p.m) * 4),
                  ni = up(static_cast<long long>(p.n) * 4);
  p.v = reinterpret_cast<T*>(base);
  p.d = reinterpret_cast<T*>(base + mt);
  p.vsaved = reinterpret_cast<T*>(base + 2 * mt);
  p.dsc = reinterpret_cast<T*>(base + 3 * mt);
  unsigned char* b = base + 4 * mt;
  p.pred = reinterpret_cast<int*>(b);
  p.y = reinterpret_cast<int*>(b + mi);
  p.scol = reinterpret_cast<int*>(b + 2 * mi);
  b += 3 * mi;
  p.x = reinterpret_cast<int*>(b);
  p.freelist = reinterpret_cast<int*>(b + ni);
  p.matches = reinterpret_cast<int*>(b + 2 * ni);
}

// A team of one thread: the reference execution of the team algorithm on the CPU.
struct SerialTeam {
  int lane() const { return 0; }
  int size() const { return 1; }
  void sync() {}
  template <class T>
  T min(T x) {
    return x;
  }
  bool any(bool b) { return b; }
  int broadcast0(int x) { return x; }
  template <class T>
  void argmin(T&, int&, T&) {}
  template <class T>
  void top2(T&, int&, T&, int&) {}
};

template <class Team, class T>
MK_LSA_HD int32_t solve(Team& tm, const Problem<T>& p) {
  const int n = p.n, m = p.m, L = tm.lane(), S = tm.size();
  const T INF = infinity<T>();
  const T* C = p.c;
  T* v = p.v;
  T* d = p.d;
  int* pred = p.pred;
  int* x = p.x;
  int* y = p.y;
  int* freelist = p.freelist;
  int* matches = p.matches;
  auto row = [&](int i) { return C + static_cast<long long>(i) * m; };

  for (int j = L; j < m; j += S) {
    y[j] = -1;
    d[j] = INF;
  }
  for (int i = L; i < n; i += S) {
    x[i] = -1;
    matches[i] = 0;
  }
  tm.sync();

  int nfree;  // the same in every lane
  if (n == m) {
    // column reduction: v_j = min_i c_ij (first minimising row in pred[j])
    bool empty_column = false;
    for (int j = L; j < m; j += S) {
      T best = INF;
      int bi = 0;
      for (int i = 0; i < n; ++i) {
        const T c = row(i)[j];
        if (c < best) {
          best = c;
          bi = i;
        }
      }
      v[j] = best;
      pred[j] = bi;
      empty_column |= !(best < INF);
    }
    if (tm.any(empty_column)) return kInfeasible;
    int nf = 0;
    if (L == 0) {  // Jonker's rule: each column offered to its minimising row, last columns first
      for (int j = m - 1; j >= 0; --j) {
        const int i = pred[j];
        if (matches[i]++ == 0) {
          x[i] = j;
          y[j] = i;
        } else if (v[j] < v[x[i]]) {
          const int j1 = x[i];
          x[i] = j;
          y[j] = i;
          y[j1] = -1;
        } else {
          y[j] = -1;
        }
      }
      for (int i = 0; i < n; ++i)
        if (matches[i] == 0) freelist[nf++] = i;
    }
    nfree = tm.broadcast0(nf);
    // reduction transfer (only useful when rows are left to augment): a row that got exactly one
    // column passes its second-best slack to it; the column's owner lane applies it.
    if (nfree > 0) {
      for (int i = 0; i < n; ++i) {
        if (matches[i] != 1) continue;
        const int j1 = x[i];
        T mn = INF;
        for (int j = L; j < m; j += S) {
          const T r = row(i)[j] - v[j];
          if (j != j1 && r < mn) mn = r;
        }
        mn = tm.min(mn);
        if (mn < INF && j1 % S == L) v[j1] = v[j1] - mn;
      }
    }
  } else {
    for (int j = L; j < m; j += S) v[j] = T(0);
    for (int i = L; i < n; i += S) freelist[i] = i;
    nfree = n;
    tm.sync();
  }

  // augmenting row reduction (bounded, as on the CPU)
  const long long cap = 8LL * n + 64;
  for (int pass = 0; pass < p.arr_passes && nfree > 0; ++pass) {
    int k = 0, nf = 0;
    const int prev = nfree;
    long long steps = 0;
    while (k < prev) {
      const int i = freelist[k++];
      ++steps;
      if (p.counters && L == 0) ++p.counters[0];
      T a1 = INF, a2 = INF;
      int i1 = kNone, i2 = kNone;
      for (int j = L; j < m; j += S) {
        const T r = row(i)[j] - v[j];
        if (r < INF && lex_less(r, j, a2, i2)) {
          if (lex_less(r, j, a1, i1)) {
            a2 = a1, i2 = i1;
            a1 = r, i1 = j;
          } else {
            a2 = r, i2 = j;
          }
        }
      }
      tm.top2(a1, i1, a2, i2);
      if (!(a1 < INF)) return kInfeasible;  // a row with no allowed column
      int j1 = i1;
      int i0 = y[j1];
      const bool lowers = a1 < a2 && a2 < INF;
      if (lowers) {
        if (j1 % S == L) v[j1] = v[j1] - (a2 - a1);
      } else if (i0 >= 0 && i2 != kNone) {
        j1 = i2;
        i0 = y[i2];
      }
      tm.sync();  // every lane has read y before lane 0 changes it
      if (L == 0) {
        if (i0 >= 0) x[i0] = -1;
        x[i] = j1;
        y[j1] = i;
      }
      if (i0 >= 0) {
        if (lowers && steps < cap) {
          --k;
          if (L == 0) freelist[k] = i0;
        } else {
          if (L == 0) freelist[nf] = i0;
          ++nf;
        }
      }
      tm.sync();
    }
    nfree = nf;
  }

  // shortest augmenting paths, one free row at a time
  for (int q = 0; q < nfree; ++q) {
    const int f = freelist[q];
    int nsc = 0, i = f, jmin = kNone;
    T h = T(0), mu = T(0);
    while (true) {
      T best = INF, bv = T(0);
      int bj = kNone;
      for (int j = L; j < m; j += S) {
        const T nd = (row(i)[j] - v[j]) + h;  // scanned columns carry v = -inf: nd = +inf
        T dj = d[j];
        if (nd < dj) {
          dj = nd;
          d[j] = nd;
          pred[j] = i;
        }
        if (dj < INF && lex_less(dj, j, best, bj)) {
          best = dj;
          bj = j;
          bv = v[j];
        }
      }
      tm.argmin(best, bj, bv);
      if (p.counters && L == 0) ++p.counters[1];
      if (!(best < INF)) {  // no augmenting path of finite cost: infeasible
        tm.sync();
        for (int k = L; k < nsc; k += S) v[p.scol[k]] = p.vsaved[k];
        return kInfeasible;
      }
      mu = best;
      jmin = bj;
      const int iy = y[jmin];
      if (iy < 0) break;
      h = mu - (row(iy)[jmin] - bv);
      if (jmin % S == L) {  // the owner takes the column out of the search
        p.scol[nsc] = jmin;
        p.vsaved[nsc] = bv;
        p.dsc[nsc] = mu;
        v[jmin] = -INF;
        d[jmin] = INF;
      }
      ++nsc;
      i = iy;
    }
    tm.sync();  // the scanned lists and pred are complete
    for (int k = L; k < nsc; k += S) v[p.scol[k]] = p.vsaved[k] + (p.dsc[k] - mu);
    for (int j = L; j < m; j += S) d[j] = INF;
    if (L == 0) {
      int j = jmin;
      while (true) {
        const int r = pred[j];
        y[j] = r;
        const int jn = x[r];
        x[r] = j;
        if (r == f) break;
        j = jn;
      }
    }
    tm.sync();
  }
  return kOk;
}

}  // namespace team
}  // namespace lsa
}  // namespace merging_kernels
