// CPU kernels of the task-vector op family (task arithmetic, TIES, DARE):
// the radix-select histogram pass and the fused apply pass. Semantics: see
// merging_kernels/ops/task_vectors.py (merge_task_vectors_torch and
// magnitude_histogram_torch are the reference) and task_vectors.h.
//
// Structure:
//  * the kernels (task_vectors_kernels.h) are compiled up to three times in this
//    file: portable (SSE2 on x86-64, whatever the target has elsewhere) and, on
//    x86 with GCC, under `#pragma GCC target` for AVX2+F16C and for AVX-512; the
//    widest variant the CPU runs is picked once at run time
//    (MERGING_KERNELS_CPU_ISA=generic or =avx2 caps it). FMA is never enabled and
//    contraction is off, so every product and sum rounds like the torch
//    reference (d = expert - base is exactly one float32 subtraction, or 0 where
//    the two are equal: see task_delta).
//  * the drivers below split the concatenation of all T tensors into one
//    contiguous range per OpenMP thread (static schedule); a range is walked
//    as pieces (a tensor's part of it), each processed in blocks of kBlock.
//  * GCC or Clang is required (vector extensions).

// The kernels select with conditional expressions (x = keep ? a : b). Under the
// default -ftrapping-math GCC may not evaluate both arms of such a selection
// (an arm's float operation might raise a flag), leaving a branch that blocks
// vectorization. Nothing here reads floating-point exception flags, and values
// are unchanged (no reassociation, signed zeros and NaNs kept), so this file
// opts out for every function it defines; it also keeps a * b + c from being
// contracted into an FMA where the target has one.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math", "fp-contract=off")
#pragma GCC diagnostic ignored "-Wpsabi"
#elif defined(__clang__)
#pragma clang fp contract(off)
#endif

#include "task_vectors.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#ifdef MK_WITH_OPENMP
#include <omp.h>
#endif
#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "common/philox.h"

#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__))
#define MK_TV_MULTIVERSION 1
#include <immintrin.h>
#else
#define MK_TV_MULTIVERSION 0
#endif

#if defined(__GNUC__)
#define MK_TV_INLINE inline __attribute__((always_inline))
#else
#define MK_TV_INLINE inline
#endif

namespace merging_kernels {
namespace cpu {
namespace {

constexpr int kBlock = 512;  // elements per block: K + 5 float rows of it stay in L1
constexpr uint32_t kDummyBins = 16;  // histogram bins taking the entries that miss the prefix
constexpr int kPrefetchBlocks = 2;  // software prefetch distance, in blocks
constexpr size_t kListSlack = 16;  // uint32 slots past a block's match list (8-lane stores)
constexpr float kFloatMax = std::numeric_limits<float>::max();

// The task vector of one entry, d = x - b, with d = 0 where the expert kept the base's value: an entry that
// is the same infinity in both (a -inf attention mask) is unchanged, not inf - inf = NaN. Finite x == b gives
// +0 either way, and a NaN is never equal, so it stays NaN (and is counted).
MK_TV_INLINE float task_delta(float x, float b) { return x == b ? 0.0f : x - b; }

// Storage tags of the 16-bit formats (memory holds uint16_t bit patterns).
struct Half {
  uint16_t bits;
};
struct BF16 {
  uint16_t bits;
};

// ------------------------------------------------------------------ scalar conversions
// Branch-free (selects only) so that loops over them vectorize.

MK_TV_INLINE float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

MK_TV_INLINE uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

MK_TV_INLINE float bf16_to_float(uint16_t h) { return bits_float(static_cast<uint32_t>(h) << 16); }

// Round to nearest even; NaN -> 0x7FC0 (as c10::BFloat16 does).
MK_TV_INLINE uint16_t float_to_bf16(float f) {
  const uint32_t u = float_bits(f);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>(f != f ? 0x7FC0u : rounded);
}

// Exact IEEE half -> float (subnormals, inf, NaN).
MK_TV_INLINE float half_to_float(uint16_t h) {
  const uint32_t em = static_cast<uint32_t>(h & 0x7FFFu) << 13;  // exponent and mantissa, float position
  const uint32_t exp = em & 0x0F800000u;
  const uint32_t normal = em + (112u << 23);        // rebias 15 -> 127
  const uint32_t inf_nan = em + (224u << 23);       // exponent 31 -> 255
  const uint32_t subnormal =                        // m * 2^-24, exactly, without denormal arithmetic
      float_bits(bits_float(em + (113u << 23)) - bits_float(113u << 23));
  const uint32_t mag = exp == 0x0F800000u ? inf_nan : (exp == 0 ? subnormal : normal);
  return bits_float(mag | (static_cast<uint32_t>(h & 0x8000u) << 16));
}

// float -> IEEE half, round to nearest even (subnormals, overflow to inf, NaN -> quiet NaN).
MK_TV_INLINE uint16_t float_to_half(float f) {
  const uint32_t u = float_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7FFFFFFFu;
  const uint32_t big = a > 0x7F800000u ? 0x7E00u : 0x7C00u;  // |f| >= 65536: inf, or NaN
  // |f| < 2^-14: adding 0.5 leaves the half subnormal's units (2^-24) in the low mantissa bits,
  // rounded to nearest even by the float addition itself.
  const uint32_t subnormal = float_bits(bits_float(a) + 0.5f) - float_bits(0.5f);
  const uint32_t normal = (a - (112u << 23) + 0xFFFu + ((a >> 13) & 1u)) >> 13;
  const uint32_t h = a >= (143u << 23) ? big : (a < (113u << 23) ? subnormal : normal);
  return static_cast<uint16_t>(h | sign);
}

// ------------------------------------------------------------------ kernel interfaces

struct ApplyParams {
  int num_tasks;
  float scale;
  bool normalize;
  Dare dare;
};

struct ApplyJob {  // elements [begin, end) of one tensor
  const void* base;
  const void* const* experts;  // K
  void* out;
  int64_t begin, end;
  const float* weights;     // K (the tensor's row)
  const float* thresholds;  // K (the segment's row) or nullptr
  uint32_t tensor_key;
};

struct HistParams {
  int num_tasks;
  int shift;
  uint32_t num_bins;   // 2^bits
  uint32_t stride;     // num_bins + kDummyBins: one row of a private histogram
  uint32_t copies;     // private histogram copies (a power of 2)
  uint32_t high_mask;  // bits above shift + bits
  Dare dare;
};

struct HistJob {
  const void* base;
  const void* const* experts;  // K
  int64_t begin, end;
  const uint32_t* prefix;  // K, already masked with high_mask
  uint32_t tensor_key;
};

struct Scratch {  // per thread
  float* b;
  float* x;
  float* acc;
  float* d;           // K * kBlock
  float* tile;        // (K + 2) * kMaxLanes: the zero-padded last tile of a block
  const void** rows;  // 2 * K row pointers
  uint32_t* idx;      // K * kBlock
};

constexpr int kMaxLanes = 16;  // the widest register tile of any variant (AVX-512)

// For each 8-bit lane mask, the indices of its set lanes packed to the front
// (one byte each): the permutation that compacts a vector's selected lanes.
struct CompactLanes {
  uint64_t lanes[256];
  constexpr CompactLanes() : lanes() {
    for (int m = 0; m < 256; ++m) {
      uint64_t packed = 0;
      int out = 0;
      for (int l = 0; l < 8; ++l)
        if (m & (1 << l)) packed |= static_cast<uint64_t>(l) << (8 * out++);
      lanes[m] = packed;
    }
  }
};
constexpr CompactLanes kCompactLanes{};

// per piece of a tensor: non-finite task vectors, outputs not finite in their dtype where the base is not that value
struct ApplyCounts {
  int64_t nonfinite = 0, overflow = 0;
};
using ApplyFn = ApplyCounts (*)(const ApplyParams&, const ApplyJob&, const Scratch&);
using HistFn = void (*)(const HistParams&, const HistJob&, const Scratch&, uint32_t*, int64_t*, bool);

}  // namespace

// ------------------------------------------------------------------ the variants

#define MK_TV_ISA generic
#define MK_TV_F16C 0
#define MK_TV_AVX512 0
#define MK_TV_VECTOR_BYTES 32
#include "task_vectors_kernels.h"
#undef MK_TV_VECTOR_BYTES
#undef MK_TV_AVX512
#undef MK_TV_F16C
#undef MK_TV_ISA

#if MK_TV_MULTIVERSION
#pragma GCC push_options
#pragma GCC target("avx2,f16c,popcnt")
#define MK_TV_ISA avx2
#define MK_TV_F16C 1
#define MK_TV_AVX512 0
#define MK_TV_VECTOR_BYTES 32
#include "task_vectors_kernels.h"
#undef MK_TV_VECTOR_BYTES
#undef MK_TV_AVX512
#undef MK_TV_F16C
#undef MK_TV_ISA
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,avx2,f16c,popcnt")
#define MK_TV_ISA avx512
#define MK_TV_F16C 1
#define MK_TV_AVX512 1
#define MK_TV_VECTOR_BYTES 64
#include "task_vectors_kernels.h"
#undef MK_TV_VECTOR_BYTES
#undef MK_TV_AVX512
#undef MK_TV_F16C
#undef MK_TV_ISA
#pragma GCC pop_options
#endif

namespace {

enum class Isa { kGeneric, kAvx2, kAvx512 };

// The widest variant this CPU runs; MERGING_KERNELS_CPU_ISA=generic|avx2 caps it.
Isa isa() {
  static const Isa chosen = [] {
#if MK_TV_MULTIVERSION
    const char* env = std::getenv("MERGING_KERNELS_CPU_ISA");
    const std::string cap = env != nullptr ? env : "";
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c") &&
                      __builtin_cpu_supports("popcnt");
    const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
                        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
    if (cap == "generic" || !avx2) return Isa::kGeneric;
    if (cap == "avx2" || !avx512) return Isa::kAvx2;
    return Isa::kAvx512;
#else
    return Isa::kGeneric;
#endif
  }();
  return chosen;
}

ApplyFn select_apply(int64_t in_dtype, int64_t out_dtype, bool elect_sign, bool trim) {
#if MK_TV_MULTIVERSION
  if (isa() == Isa::kAvx512) return avx512::apply_kernel(in_dtype, out_dtype, elect_sign, trim);
  if (isa() == Isa::kAvx2) return avx2::apply_kernel(in_dtype, out_dtype, elect_sign, trim);
#endif
  return generic::apply_kernel(in_dtype, out_dtype, elect_sign, trim);
}

HistFn select_hist(int64_t in_dtype) {
#if MK_TV_MULTIVERSION
  if (isa() == Isa::kAvx512) return avx512::hist_kernel(in_dtype);
  if (isa() == Isa::kAvx2) return avx2::hist_kernel(in_dtype);
#endif
  return generic::hist_kernel(in_dtype);
}

// ------------------------------------------------------------------ validation and planning

[[noreturn]] void fail(const std::string& message) { throw std::invalid_argument(message); }

// Checks the tensor lists; returns the offsets of each tensor in the concatenation (T + 1).
std::vector<int64_t> check_tensors(const TaskTensors& t, const char* fn) {
  const size_t T = t.bases.size();
  const std::string where = std::string(fn) + ": ";
  if (t.num_tasks < 0) fail(where + "num_tasks must be >= 0");
  if (t.numels.size() != T) fail(where + "numels has " + std::to_string(t.numels.size()) + " entries for " +
                                 std::to_string(T) + " base tensors");
  if (t.dtypes.size() != T) fail(where + "dtypes has " + std::to_string(t.dtypes.size()) + " entries for " +
                                 std::to_string(T) + " base tensors");
  if (t.tensor_keys.size() != T) fail(where + "tensor_keys has " + std::to_string(t.tensor_keys.size()) +
                                      " entries for " + std::to_string(T) + " base tensors");
  if (t.segment_ids.size() != T) fail(where + "segment_ids has " + std::to_string(t.segment_ids.size()) +
                                      " entries for " + std::to_string(T) + " base tensors");
  if (t.experts.size() != T * static_cast<size_t>(t.num_tasks))
    fail(where + "expert_ptrs has " + std::to_string(t.experts.size()) + " entries, expected T*K = " +
         std::to_string(T) + "*" + std::to_string(t.num_tasks));
  std::vector<int64_t> offsets(T + 1, 0);
  for (size_t i = 0; i < T; ++i) {
    const int64_t n = t.numels[i];
    if (n < 0) fail(where + "numels[" + std::to_string(i) + "] is negative");
    if (t.dtypes[i] != kFloat32 && t.dtypes[i] != kFloat16 && t.dtypes[i] != kBFloat16)
      fail(where + "dtypes[" + std::to_string(i) + "] = " + std::to_string(t.dtypes[i]) +
           " is not a dtype code (0 float32, 1 float16, 2 bfloat16)");
    if (t.segment_ids[i] < 0) fail(where + "segment_ids[" + std::to_string(i) + "] is negative");
    if (n > 0) {
      if (t.bases[i] == nullptr) fail(where + "base pointer " + std::to_string(i) + " is null");
      for (int64_t k = 0; k < t.num_tasks; ++k)
        if (t.experts[i * t.num_tasks + k] == nullptr)
          fail(where + "expert pointer " + std::to_string(i * t.num_tasks + k) + " is null");
    }
    offsets[i + 1] = offsets[i] + n;
  }
  return offsets;
}

int num_threads_for(int64_t total, int64_t num_tasks) {
#ifdef MK_WITH_OPENMP
  // below ~64K element-task pairs a parallel region costs more than it saves
  if (total * (num_tasks + 1) < (int64_t{1} << 16)) return 1;
  return std::max(1, omp_get_max_threads());
#else
  (void)total;
  (void)num_tasks;
  return 1;
#endif
}

// Calls f(t, begin, end) for the pieces of tensors covering [lo, hi) of the concatenation.
template <class F>
void for_each_piece(const std::vector<int64_t>& offsets, int64_t lo, int64_t hi, F&& f) {
  if (lo >= hi) return;
  size_t t = static_cast<size_t>(std::upper_bound(offsets.begin(), offsets.end(), lo) - offsets.begin()) - 1;
  int64_t pos = lo;
  while (pos < hi) {
    while (offsets[t + 1] <= pos) ++t;  // skips empty tensors
    const int64_t end = std::min(hi, offsets[t + 1]);
    f(t, pos - offsets[t], end - offsets[t]);
    pos = end;
  }
}

// The range of thread p of np over [0, total): contiguous, split at multiples of 64 elements.
void thread_range(int64_t total, int p, int np, int64_t& lo, int64_t& hi) {
  auto cut = [&](int q) -> int64_t {
    if (q <= 0) return 0;
    if (q >= np) return total;
    const int64_t c = static_cast<int64_t>((static_cast<__int128>(total) * q) / np);
    return c & ~int64_t{63};
  };
  lo = cut(p);
  hi = cut(p + 1);
}

// Per-thread scratch, allocated before the parallel region (nothing in it may throw).
struct ThreadScratch {
  std::vector<float> floats;
  std::vector<uint32_t> ints;
  std::vector<const void*> rows;
  Scratch view{};

  void allocate(int num_tasks, size_t extra_ints) {
    const size_t K = static_cast<size_t>(std::max(num_tasks, 1));
    floats.assign((3 + K) * kBlock + (K + 2) * kMaxLanes, 0.0f);
    ints.assign(K * kBlock + extra_ints, 0u);
    rows.assign(2 * K, nullptr);
    float* f = floats.data();
    view.b = f;
    view.x = f + kBlock;
    view.acc = f + 2 * kBlock;
    view.d = f + 3 * kBlock;
    view.tile = f + (3 + K) * kBlock;
    view.rows = rows.data();
    view.idx = ints.data();
  }
};

// Outputs are usually fresh allocations whose pages the kernel faults in (and
// zeroes) on our first write: 4 KiB at a time that costs more than the merge
// itself. Where transparent huge pages are in "madvise" mode, asking for them on
// the 2 MiB-aligned interior of each large output cuts the faults 512-fold. A
// hint only: already-populated memory and failures are left as they are.
// MERGING_KERNELS_NO_HUGEPAGES=1 turns it off.
void advise_huge_pages(const std::vector<void*>& outs, const std::vector<int64_t>& numels,
                       const std::vector<int64_t>& out_dtypes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  static const bool enabled = [] {
    const char* env = std::getenv("MERGING_KERNELS_NO_HUGEPAGES");
    return env == nullptr || std::string(env).empty() || std::string(env) == "0";
  }();
  if (!enabled) return;
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  for (size_t i = 0; i < outs.size(); ++i) {
    const uintptr_t bytes = static_cast<uintptr_t>(numels[i]) * (out_dtypes[i] == kFloat32 ? 4u : 2u);
    if (outs[i] == nullptr || bytes < 2 * kHuge) continue;
    const uintptr_t start = reinterpret_cast<uintptr_t>(outs[i]);
    const uintptr_t lo = (start + kHuge - 1) & ~(kHuge - 1);
    const uintptr_t hi = (start + bytes) & ~(kHuge - 1);
    if (hi > lo) (void)madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
  }
#else
  (void)outs;
  (void)numels;
  (void)out_dtypes;
#endif
}

// Faults in (writable) the whole pages of out[begin, end) bytes with one system
// call when they look fresh: a fresh output's pages otherwise fault one by one on
// our first write, each a trap that costs microseconds under virtualization. Pages
// already present cost a page-table walk each, so the first and last pages are
// asked first (mincore) and a range that has both is left alone. Content is never
// changed; a hint only, errors are ignored (MADV_POPULATE_WRITE needs Linux 5.14).
// MERGING_KERNELS_NO_PREFAULT=1 turns it off. Each thread populates what it writes.
void populate_output(void* out, int64_t begin_byte, int64_t end_byte) {
#if defined(__linux__)
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif
  static const bool enabled = [] {
    const char* env = std::getenv("MERGING_KERNELS_NO_PREFAULT");
    return env == nullptr || std::string(env).empty() || std::string(env) == "0";
  }();
  constexpr uintptr_t kPage = 4096;
  if (!enabled || end_byte - begin_byte < static_cast<int64_t>(64 * kPage)) return;  // 256 KiB
  const uintptr_t start = reinterpret_cast<uintptr_t>(out);
  const uintptr_t lo = (start + static_cast<uintptr_t>(begin_byte) + kPage - 1) & ~(kPage - 1);
  const uintptr_t hi = (start + static_cast<uintptr_t>(end_byte)) & ~(kPage - 1);
  if (hi <= lo) return;
  const uintptr_t samples[2] = {lo, hi - kPage};  // a fresh mapping, or a heap grown under it
  bool fresh = false;
  for (uintptr_t page : samples) {
    unsigned char resident = 1;
    if (mincore(reinterpret_cast<void*>(page), kPage, &resident) != 0) return;  // not plain memory: leave it
    fresh |= (resident & 1u) == 0;
  }
  if (fresh) (void)madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_POPULATE_WRITE);
#else
  (void)out;
  (void)begin_byte;
  (void)end_byte;
#endif
}

Dare clamp_dare(const Dare& dare) {
  Dare d = dare;
  const uint32_t limit = uint32_t{1} << philox::kUniformBits;  // >= this: every entry dropped
  d.threshold = std::min(d.threshold, limit);
  return d;
}

// Runs work(thread, num_threads) on nt OpenMP threads (inline when nt is 1 or OpenMP is absent).
template <typename Work>
void run_on_threads(int nt, const Work& work) {
#ifdef MK_WITH_OPENMP
  if (nt > 1) {
#pragma omp parallel num_threads(nt)
    work(omp_get_thread_num(), omp_get_num_threads());
    return;
  }
#endif
  (void)nt;
  work(0, 1);
}

}  // namespace

// ------------------------------------------------------------------ histogram

void task_vectors_histogram(const TaskTensors& tensors, int64_t num_segments, int shift, int bits,
                            const int64_t* prefix, int64_t* counts, const Dare& dare) {
  const std::vector<int64_t> offsets = check_tensors(tensors, "task_vectors_histogram");
  if (bits < 1 || bits > 16) fail("task_vectors_histogram: bits must be in [1, 16], got " + std::to_string(bits));
  if (shift < 0 || shift + bits > 32)
    fail("task_vectors_histogram: need 0 <= shift and shift + bits <= 32, got shift " + std::to_string(shift) +
         ", bits " + std::to_string(bits));
  if (num_segments < 0) fail("task_vectors_histogram: num_segments must be >= 0");
  const size_t T = tensors.bases.size();
  for (size_t i = 0; i < T; ++i)
    if (tensors.segment_ids[i] >= num_segments)
      fail("task_vectors_histogram: segment_ids[" + std::to_string(i) + "] = " +
           std::to_string(tensors.segment_ids[i]) + " is not below num_segments = " + std::to_string(num_segments));
  const int K = static_cast<int>(tensors.num_tasks);
  const int64_t total = offsets[T];
  if (total == 0 || K == 0) return;
  if (prefix == nullptr || counts == nullptr) fail("task_vectors_histogram: null prefix or counts pointer");

  HistParams params{};
  params.num_tasks = K;
  params.shift = shift;
  params.num_bins = uint32_t{1} << bits;
  params.stride = params.num_bins + kDummyBins;
  // >= 8 increments between two on one counter (at most 8 copies: compact_matches)
  params.copies = K >= 4 ? 2u : (K >= 2 ? 4u : 8u);
  params.high_mask = shift + bits >= 32 ? 0u : (~uint32_t{0} << (shift + bits));
  params.dare = clamp_dare(dare);
  const uint32_t NB = params.num_bins;
  std::vector<uint32_t> masked_prefix(static_cast<size_t>(num_segments) * K);
  for (size_t i = 0; i < masked_prefix.size(); ++i)
    masked_prefix[i] = static_cast<uint32_t>(prefix[i]) & params.high_mask;
  std::vector<HistFn> kernels(T);
  for (size_t i = 0; i < T; ++i) kernels[i] = select_hist(tensors.dtypes[i]);

  const int nt = num_threads_for(total, K);
  const size_t local_size = static_cast<size_t>(params.copies) * K * params.stride;
  std::vector<ThreadScratch> scratch(nt);
  for (auto& s : scratch) s.allocate(K, kListSlack + local_size);

  auto work = [&](int p, int np) {
    ThreadScratch& ts = scratch[p];
    uint32_t* local = ts.ints.data() + static_cast<size_t>(K) * kBlock + kListSlack;
    int64_t local_segment = -1;  // the segment `local` counts for (-1: empty)
    int64_t local_entries = 0;   // elements counted since the last flush (bounds the uint32 bins)
    auto flush = [&]() {
      if (local_segment < 0) return;
      int64_t* rows = counts + local_segment * K * static_cast<int64_t>(NB);
      for (int k = 0; k < K; ++k) {
        int64_t* g = rows + static_cast<int64_t>(k) * NB;
        for (uint32_t bin = 0; bin < NB; ++bin) {
          uint64_t c = 0;
          for (uint32_t copy = 0; copy < params.copies; ++copy)
            c += local[(static_cast<size_t>(copy) * K + k) * params.stride + bin];
          if (c != 0) {
#ifdef MK_WITH_OPENMP
#pragma omp atomic
#endif
            g[bin] += static_cast<int64_t>(c);
          }
        }
      }
      std::fill(local, local + local_size, 0u);
      local_segment = -1;
      local_entries = 0;
    };
    int64_t lo, hi;
    thread_range(total, p, np, lo, hi);
    for_each_piece(offsets, lo, hi, [&](size_t t, int64_t begin, int64_t end) {
      const int64_t seg = tensors.segment_ids[t];
      HistJob job{};
      job.base = tensors.bases[t];
      job.experts = tensors.experts.data() + t * K;
      job.prefix = masked_prefix.data() + seg * K;
      job.tensor_key = tensors.tensor_keys[t];
      // pieces of at most 2^30 elements keep every private bin below 2^31
      const int64_t step = int64_t{1} << 30;
      for (int64_t b0 = begin; b0 < end; b0 += step) {
        job.begin = b0;
        job.end = std::min(end, b0 + step);
        const int64_t len = job.end - job.begin;
        if (seg != local_segment) {
          if (len * 8 <= static_cast<int64_t>(NB)) {  // tiny: straight into the shared counts
            kernels[t](params, job, ts.view, local, counts + seg * K * static_cast<int64_t>(NB), true);
            continue;
          }
          flush();
          local_segment = seg;
        } else if (local_entries + len > (int64_t{1} << 31)) {
          flush();
          local_segment = seg;
        }
        kernels[t](params, job, ts.view, local, nullptr, false);
        local_entries += len;
      }
    });
    flush();
  };

  run_on_threads(nt, work);
}

// ------------------------------------------------------------------ apply

void task_vectors_apply(const TaskTensors& tensors, const std::vector<void*>& outs,
                        const std::vector<int64_t>& out_dtypes, const float* weights, float scale,
                        const float* thresholds, bool elect_sign, bool normalize, const Dare& dare,
                        int64_t* counts) {
  const std::vector<int64_t> offsets = check_tensors(tensors, "task_vectors_apply");
  const size_t T = tensors.bases.size();
  if (outs.size() != T)
    fail("task_vectors_apply: out_ptrs has " + std::to_string(outs.size()) + " entries for " + std::to_string(T) +
         " base tensors");
  if (out_dtypes.size() != T)
    fail("task_vectors_apply: out_dtypes has " + std::to_string(out_dtypes.size()) + " entries for " +
         std::to_string(T) + " base tensors");
  for (size_t i = 0; i < T; ++i) {
    if (out_dtypes[i] != kFloat32 && out_dtypes[i] != kFloat16 && out_dtypes[i] != kBFloat16)
      fail("task_vectors_apply: out_dtypes[" + std::to_string(i) + "] = " + std::to_string(out_dtypes[i]) +
           " is not a dtype code (0 float32, 1 float16, 2 bfloat16)");
    if (tensors.numels[i] > 0 && outs[i] == nullptr)
      fail("task_vectors_apply: out pointer " + std::to_string(i) + " is null");
  }
  const int K = static_cast<int>(tensors.num_tasks);
  const int64_t total = offsets[T];
  if (total == 0) return;
  if (K > 0 && weights == nullptr) fail("task_vectors_apply: null weights pointer");
  if (counts == nullptr) fail("task_vectors_apply: null counts pointer");

  ApplyParams params{};
  params.num_tasks = K;
  params.scale = scale;
  params.normalize = normalize;
  params.dare = clamp_dare(dare);
  const bool trim = thresholds != nullptr;
  std::vector<ApplyFn> kernels(T);
  for (size_t i = 0; i < T; ++i) kernels[i] = select_apply(tensors.dtypes[i], out_dtypes[i], elect_sign, trim);

  const int nt = num_threads_for(total, K);
  std::vector<ThreadScratch> scratch(nt);
  for (auto& s : scratch) s.allocate(K, 0);
  advise_huge_pages(outs, tensors.numels, out_dtypes);

  auto work = [&](int p, int np) {
    ThreadScratch& ts = scratch[p];
    int64_t lo, hi;
    thread_range(total, p, np, lo, hi);
    for_each_piece(offsets, lo, hi, [&](size_t t, int64_t begin, int64_t end) {
      ApplyJob job{};
      job.base = tensors.bases[t];
      job.experts = tensors.experts.data() + t * K;
      job.out = outs[t];
      job.begin = begin;
      job.end = end;
      const int64_t out_size = out_dtypes[t] == kFloat32 ? 4 : 2;
      populate_output(outs[t], begin * out_size, end * out_size);
      job.weights = weights + t * K;
      job.thresholds = trim ? thresholds + tensors.segment_ids[t] * K : nullptr;
      job.tensor_key = tensors.tensor_keys[t];
      const ApplyCounts bad = kernels[t](params, job, ts.view);
      if (bad.nonfinite != 0) {
#ifdef MK_WITH_OPENMP
#pragma omp atomic
#endif
        counts[2 * t] += bad.nonfinite;
      }
      if (bad.overflow != 0) {
#ifdef MK_WITH_OPENMP
#pragma omp atomic
#endif
        counts[2 * t + 1] += bad.overflow;
      }
    });
  };

  run_on_threads(nt, work);
}

const char* task_vectors_isa() {
  switch (isa()) {
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    default:
      return "generic";
  }
}

}  // namespace cpu
}  // namespace merging_kernels
