// The greedy zip (see zip_matching.h). Same choices, step by step, as the reference
// greedy_zip_torch (a full argmax per step): the first maximum in row-major order,
// found here from each row's first maximum, which is kept up to date instead of
// searched for again.
#include "cpu/zip_matching.h"

#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

namespace merging_kernels {
namespace cpu {
namespace {

template <class T>
constexpr T kNegInf = -std::numeric_limits<T>::infinity();

// The first maximum of row[0, m): its index (0 for a row of -inf, as numpy's argmax).
template <class T>
inline int64_t first_max(const T* row, int64_t m, T& best) {
  int64_t arg = 0;
  best = row[0];
  for (int64_t k = 1; k < m; ++k) {
    if (row[k] > best) {
      best = row[k];
      arg = k;
    }
  }
  return arg;
}

template <class T>
void greedy_zip(T* s, int64_t m, T factor, int64_t* pairs) {
  if (m <= 0 || m % 2 != 0) throw std::invalid_argument("greedy_zip: m must be even and positive, got " +
                                                        std::to_string(m));
  if (s == nullptr || pairs == nullptr) throw std::invalid_argument("greedy_zip: null pointer");
  std::vector<T> rowmax(m), merged(m);
  std::vector<int64_t> rowarg(m), stale;
  stale.reserve(m);
  for (int64_t r = 0; r < m; ++r) rowarg[r] = first_max(s + r * m, m, rowmax[r]);
  const int64_t n = m / 2;
  for (int64_t step = 0; step < n; ++step) {
    int64_t i = 0;  // the first row holding the largest maximum: with its first maximum, row-major first
    for (int64_t r = 1; r < m; ++r)
      if (rowmax[r] > rowmax[i]) i = r;
    const int64_t j = rowarg[i];
    T* si = s + i * m;
    T* sj = s + j * m;
    for (int64_t k = 0; k < m; ++k) {
      const T v = si[k] < sj[k] ? si[k] : sj[k];  // both finite or -inf: no NaN to order
      merged[k] = v == kNegInf<T> ? v : v * factor;  // -inf * 0 would be NaN
    }
    merged[i] = merged[j] = kNegInf<T>;
    for (int64_t k = 0; k < m; ++k) {
      si[k] = merged[k];
      s[k * m + i] = merged[k];
      sj[k] = kNegInf<T>;
      s[k * m + j] = kNegInf<T>;
    }
    pairs[2 * step] = i;
    pairs[2 * step + 1] = j;
    rowmax[j] = kNegInf<T>;
    // rows whose first maximum sat in column i or j changed: search them again (row i too: it is new)
    stale.clear();
    for (int64_t r = 0; r < m; ++r)
      if (r != j && r != i && (rowarg[r] == i || rowarg[r] == j)) stale.push_back(r);
    stale.push_back(i);
    for (int64_t r : stale) rowarg[r] = first_max(s + r * m, m, rowmax[r]);
    // every other row gained column i's new value: it becomes the row's first maximum where it is larger, or
    // equal and left of the one kept (reachable: with negative similarities, min * factor can rise)
    for (int64_t r = 0; r < m; ++r) {
      const T v = merged[r];
      if (v > rowmax[r] || (v == rowmax[r] && rowarg[r] > i && v != kNegInf<T>)) {
        rowmax[r] = v;
        rowarg[r] = i;
      }
    }
  }
}

}  // namespace

void greedy_zip_f32(float* sim, int64_t m, float factor, int64_t* pairs) { greedy_zip(sim, m, factor, pairs); }
void greedy_zip_f64(double* sim, int64_t m, double factor, int64_t* pairs) { greedy_zip(sim, m, factor, pairs); }

}  // namespace cpu
}  // namespace merging_kernels
