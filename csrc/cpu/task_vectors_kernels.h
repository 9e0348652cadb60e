// Kernels of the task-vector op family, one instruction-set variant.
//
// No include guard on purpose: task_vectors.cpp includes this file once per
// variant, inside namespace merging_kernels::cpu and under `#pragma GCC target`,
// with MK_TV_ISA naming the variant's namespace, MK_TV_VECTOR_BYTES the width of
// its register tiles (32: SSE2 pairs or AVX2; 64: AVX-512), MK_TV_F16C and
// MK_TV_AVX512 saying which intrinsics it may use. It relies on the shared
// definitions of task_vectors.cpp (Half, BF16, ApplyParams, ApplyJob, HistParams,
// HistJob, Scratch, the scalar conversions, kBlock, kMaxLanes).
//
// Work is done in blocks of kBlock elements of one tensor. The apply pass
// combines register tiles of kLanes elements straight from the inputs (each
// element of base and experts read once, the output written once; DARE first
// puts the block's task vectors in per-thread scratch). The histogram pass
// computes the block's bin indices with vector code, then counts them.
// Selections are masks or conditional expressions, never branches.

#ifndef MK_TV_ISA
#error "define MK_TV_ISA before including task_vectors_kernels.h"
#endif

namespace MK_TV_ISA {

// GCC/Clang vector extensions: a register tile of kLanes floats and its lane masks.
typedef float vf __attribute__((vector_size(MK_TV_VECTOR_BYTES)));
typedef int32_t vi __attribute__((vector_size(MK_TV_VECTOR_BYTES)));
constexpr int kLanes = MK_TV_VECTOR_BYTES / 4;
static_assert(kLanes <= kMaxLanes, "tile scratch too small");

// ------------------------------------------------------------------ conversions

MK_TV_INLINE const float* load_block(const float* src, float* /*tmp*/, int /*n*/) { return src; }

MK_TV_INLINE const float* load_block(const BF16* src, float* __restrict tmp, int n) {
  const uint16_t* __restrict s = reinterpret_cast<const uint16_t*>(src);
  for (int j = 0; j < n; ++j) tmp[j] = bf16_to_float(s[j]);
  return tmp;
}

MK_TV_INLINE const float* load_block(const Half* src, float* __restrict tmp, int n) {
  const uint16_t* __restrict s = reinterpret_cast<const uint16_t*>(src);
  int j = 0;
#if MK_TV_F16C
  for (; j + 8 <= n; j += 8)
    _mm256_storeu_ps(tmp + j, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + j))));
#endif
  for (; j < n; ++j) tmp[j] = half_to_float(s[j]);
  return tmp;
}

// ------------------------------------------------------------------ shared steps

// Software prefetch of the elements [e, e + kBlock) of one stream (clipped at end):
// the kernels with a compute phase between their loads (TIES, DARE, histograms)
// would otherwise leave the memory bus idle while they compute.
template <class T>
MK_TV_INLINE void prefetch_block(const T* data, int64_t e, int64_t end, bool write = false) {
  if (e >= end) return;
  const char* p = reinterpret_cast<const char*>(data + e);
  const int64_t bytes = std::min<int64_t>(kBlock, end - e) * static_cast<int64_t>(sizeof(T));
  if (write) {
    for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(p + i, 1, 3);
  } else {
    for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(p + i, 0, 3);
  }
}

// d[j] = task_delta(x[j], b[j]); returns how many d are NaN or infinite.
MK_TV_INLINE uint32_t delta_block(const float* __restrict x, const float* __restrict b, float* __restrict d, int n) {
  uint32_t nonfinite = 0;
  for (int j = 0; j < n; ++j) {
    const float dj = task_delta(x[j], b[j]);
    nonfinite += static_cast<uint32_t>(!(std::fabs(dj) <= kFloatMax));
    d[j] = dj;
  }
  return nonfinite;
}

// DARE on the task vectors of elements e0 .. e0 + n - 1 of one tensor, task `task`.
MK_TV_INLINE void dare_block(float* __restrict d, int n, int64_t e0, uint32_t tensor_key, uint32_t task,
                             const Dare& dare) {
  const uint64_t first = static_cast<uint64_t>(e0);
  const uint32_t lo = static_cast<uint32_t>(first), hi = static_cast<uint32_t>(first >> 32);
  const uint32_t k0 = static_cast<uint32_t>(dare.seed), k1 = static_cast<uint32_t>(dare.seed >> 32);
  // threshold <= 2^24 (clamped by the driver), so the comparison is exact in int32.
  const int32_t threshold = static_cast<int32_t>(dare.threshold);
  const float scale = dare.scale;
  int j = 0;
#if MK_TV_AVX512
  // AVX-512 by hand: 16 counters per vector (as the AVX2 version below, twice as wide).
  {
    const __m512i m0 = _mm512_set1_epi32(static_cast<int>(philox::kM0));
    const __m512i m1 = _mm512_set1_epi32(static_cast<int>(philox::kM1));
    const __m512i vlo = _mm512_set1_epi32(static_cast<int>(lo));
    const __m512i vhi = _mm512_set1_epi32(static_cast<int>(hi));
    const __m512i one = _mm512_set1_epi32(1);
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i vkey = _mm512_set1_epi32(static_cast<int>(tensor_key));
    const __m512i vtask = _mm512_set1_epi32(static_cast<int>(task));
    const __m512i vthreshold = _mm512_set1_epi32(threshold);
    const __m512 vscale = _mm512_set1_ps(scale);
    __m512i rk0[philox::kRounds], rk1[philox::kRounds];
    for (int r = 0; r < philox::kRounds; ++r) {
      rk0[r] = _mm512_set1_epi32(static_cast<int>(k0 + static_cast<uint32_t>(r) * philox::kW0));
      rk1[r] = _mm512_set1_epi32(static_cast<int>(k1 + static_cast<uint32_t>(r) * philox::kW1));
    }
    const __mmask16 odd = 0xAAAA;
    for (; j + 16 <= n; j += 16) {
      __m512i c0 = _mm512_add_epi32(vlo, _mm512_add_epi32(_mm512_set1_epi32(j), lane));
      const __mmask16 wrapped = _mm512_cmplt_epu32_mask(c0, vlo);
      __m512i c1 = _mm512_mask_add_epi32(vhi, wrapped, vhi, one);
      __m512i c2 = vkey, c3 = vtask;
      for (int r = 0; r < philox::kRounds; ++r) {
        const __m512i e0p = _mm512_mul_epu32(c0, m0);
        const __m512i o0p = _mm512_mul_epu32(_mm512_srli_epi64(c0, 32), m0);
        const __m512i e1p = _mm512_mul_epu32(c2, m1);
        const __m512i o1p = _mm512_mul_epu32(_mm512_srli_epi64(c2, 32), m1);
        const __m512i hi0 = _mm512_mask_blend_epi32(odd, _mm512_srli_epi64(e0p, 32), o0p);
        const __m512i lo0 = _mm512_mask_blend_epi32(odd, e0p, _mm512_slli_epi64(o0p, 32));
        const __m512i hi1 = _mm512_mask_blend_epi32(odd, _mm512_srli_epi64(e1p, 32), o1p);
        const __m512i lo1 = _mm512_mask_blend_epi32(odd, e1p, _mm512_slli_epi64(o1p, 32));
        c0 = _mm512_ternarylogic_epi32(hi1, c1, rk0[r], 0x96);  // three-way xor
        c1 = lo1;
        c2 = _mm512_ternarylogic_epi32(hi0, c3, rk1[r], 0x96);
        c3 = lo0;
      }
      const __m512i uniform = _mm512_srli_epi32(c0, 32 - philox::kUniformBits);
      const __mmask16 kept = _mm512_cmpge_epi32_mask(uniform, vthreshold);
      _mm512_storeu_ps(d + j, _mm512_maskz_mul_ps(kept, _mm512_loadu_ps(d + j), vscale));
    }
  }
#endif
#if MK_TV_F16C
  // AVX2 by hand: 8 counters per vector; each 32x32->64 product is two vpmuludq
  // (even and odd lanes) recombined with blends (the auto-vectorized loop shuffles far more).
  {
    const __m256i m0 = _mm256_set1_epi32(static_cast<int>(philox::kM0));
    const __m256i m1 = _mm256_set1_epi32(static_cast<int>(philox::kM1));
    const __m256i vlo = _mm256_set1_epi32(static_cast<int>(lo));
    const __m256i vhi = _mm256_set1_epi32(static_cast<int>(hi));
    const __m256i sign = _mm256_set1_epi32(INT32_MIN);
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i vkey = _mm256_set1_epi32(static_cast<int>(tensor_key));
    const __m256i vtask = _mm256_set1_epi32(static_cast<int>(task));
    const __m256i vthreshold = _mm256_set1_epi32(threshold);
    const __m256 vscale = _mm256_set1_ps(scale);
    __m256i rk0[philox::kRounds], rk1[philox::kRounds];
    for (int r = 0; r < philox::kRounds; ++r) {
      rk0[r] = _mm256_set1_epi32(static_cast<int>(k0 + static_cast<uint32_t>(r) * philox::kW0));
      rk1[r] = _mm256_set1_epi32(static_cast<int>(k1 + static_cast<uint32_t>(r) * philox::kW1));
    }
    for (; j + 8 <= n; j += 8) {
      __m256i c0 = _mm256_add_epi32(vlo, _mm256_add_epi32(_mm256_set1_epi32(j), lane));
      // carry into the high word where the low word wrapped (unsigned c0 < lo)
      const __m256i wrapped = _mm256_cmpgt_epi32(_mm256_xor_si256(vlo, sign), _mm256_xor_si256(c0, sign));
      __m256i c1 = _mm256_sub_epi32(vhi, wrapped);
      __m256i c2 = vkey, c3 = vtask;
      for (int r = 0; r < philox::kRounds; ++r) {
        const __m256i e0p = _mm256_mul_epu32(c0, m0);
        const __m256i o0p = _mm256_mul_epu32(_mm256_srli_epi64(c0, 32), m0);
        const __m256i e1p = _mm256_mul_epu32(c2, m1);
        const __m256i o1p = _mm256_mul_epu32(_mm256_srli_epi64(c2, 32), m1);
        const __m256i hi0 = _mm256_blend_epi32(_mm256_srli_epi64(e0p, 32), o0p, 0xAA);
        const __m256i lo0 = _mm256_blend_epi32(e0p, _mm256_slli_epi64(o0p, 32), 0xAA);
        const __m256i hi1 = _mm256_blend_epi32(_mm256_srli_epi64(e1p, 32), o1p, 0xAA);
        const __m256i lo1 = _mm256_blend_epi32(e1p, _mm256_slli_epi64(o1p, 32), 0xAA);
        c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), rk0[r]);
        c1 = lo1;
        c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), rk1[r]);
        c3 = lo0;
      }
      const __m256i uniform = _mm256_srli_epi32(c0, 32 - philox::kUniformBits);
      const __m256 dropped = _mm256_castsi256_ps(_mm256_cmpgt_epi32(vthreshold, uniform));
      const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(d + j), vscale);
      _mm256_storeu_ps(d + j, _mm256_andnot_ps(dropped, v));
    }
  }
#endif
  for (; j < n; ++j) {
    const uint32_t c0 = lo + static_cast<uint32_t>(j);
    const uint32_t c1 = hi + static_cast<uint32_t>(c0 < lo);
    const uint32_t word = philox::philox4x32_10_word0(c0, c1, tensor_key, task, k0, k1);
    const bool dropped = static_cast<int32_t>(word >> (32 - philox::kUniformBits)) < threshold;
    d[j] = dropped ? 0.0f : d[j] * scale;
  }
}

// ------------------------------------------------------------------ apply
//
// The combine runs on register tiles of kLanes elements (GCC/Clang vector
// extensions: AVX2 registers in the avx2 variant, pairs of SSE registers in the
// generic one): for each tile the K task vectors are read once and the
// accumulators (sum, or sign vote / numerator / denominator) stay in registers;
// the tile's result is written once. Masks are all-ones/all-zeros lanes, and a
// product masked to 0 is exactly the reference's torch.where(keep, w * d, 0).

typedef uint32_t vu __attribute__((vector_size(MK_TV_VECTOR_BYTES)));
typedef uint16_t vh __attribute__((vector_size(MK_TV_VECTOR_BYTES / 2)));  // kLanes 16-bit values

MK_TV_INLINE vf vload(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

MK_TV_INLINE void vstore(float* p, vf v) { std::memcpy(p, &v, sizeof v); }

MK_TV_INLINE vf splat(float x) { return x - vf{}; }  // x - (+0) is exactly x, -0 included: a broadcast

MK_TV_INLINE vf vabs(vf v) { return (vf)((vi)v & 0x7FFFFFFF); }

MK_TV_INLINE vf vmask(vf v, vi keep) { return (vf)((vi)v & keep); }  // v where keep, else +0

MK_TV_INLINE vu vselect(vi m, vu a, vu b) { return (a & (vu)m) | (b & ~(vu)m); }

MK_TV_INLINE vf vtask_delta(vf x, vf b) { return x != b ? x - b : vf{}; }  // task_delta, lane-wise

// ---- a tile of kLanes elements of any storage type, as floats, and back

MK_TV_INLINE vf vload_in(const float* p) { return vload(p); }

MK_TV_INLINE vf vload_in(const BF16* p) {
  vh h;
  std::memcpy(&h, p, sizeof h);
  return (vf)(__builtin_convertvector(h, vu) << 16);
}

MK_TV_INLINE vf vload_in(const Half* p) {
#if MK_TV_AVX512
  return (vf)_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#elif MK_TV_F16C
  return (vf)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
  vh hv;
  std::memcpy(&hv, p, sizeof hv);  // as half_to_float, lane-wise
  const vu h = __builtin_convertvector(hv, vu);
  const vu em = (h & 0x7FFFu) << 13;
  const vu exp = em & 0x0F800000u;
  const vu normal = em + (112u << 23);
  const vu inf_nan = em + (224u << 23);
  const vu subnormal = (vu)((vf)(em + (113u << 23)) - splat(bits_float(113u << 23)));
  const vu mag = vselect(exp == 0x0F800000u, inf_nan, vselect(exp == 0u, subnormal, normal));
  return (vf)(mag | ((h & 0x8000u) << 16));
#endif
}

MK_TV_INLINE void vstore_out(float* p, vf v) { vstore(p, v); }

MK_TV_INLINE void vstore_out(BF16* p, vf v) {  // as float_to_bf16, lane-wise
  const vu u = (vu)v;
  const vu rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const vh h = __builtin_convertvector(vselect(v != v, 0x7FC0u - vu{}, rounded), vh);
  std::memcpy(p, &h, sizeof h);
}

MK_TV_INLINE void vstore_out(Half* p, vf v) {
#if MK_TV_AVX512
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                      _mm512_cvtps_ph((__m512)v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#elif MK_TV_F16C
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm256_cvtps_ph((__m256)v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#else
  const vu u = (vu)v;  // as float_to_half, lane-wise
  const vu sign = (u >> 16) & 0x8000u;
  const vu a = u & 0x7FFFFFFFu;
  const vu big = vselect(a > 0x7F800000u, 0x7E00u - vu{}, 0x7C00u - vu{});
  const vu subnormal = (vu)((vf)a + splat(0.5f)) - float_bits(0.5f);
  const vu normal = (a - (112u << 23) + 0xFFFu + ((a >> 13) & 1u)) >> 13;
  const vu h = vselect(a >= (143u << 23), big, vselect(a < (113u << 23), subnormal, normal)) | sign;
  const vh narrow = __builtin_convertvector(h, vh);
  std::memcpy(p, &narrow, sizeof narrow);
#endif
}

MK_TV_INLINE float to_float(float x) { return x; }
MK_TV_INLINE float to_float(BF16 x) { return bf16_to_float(x.bits); }
MK_TV_INLINE float to_float(Half x) { return half_to_float(x.bits); }
MK_TV_INLINE void store_float(float v, float* o) { *o = v; }
MK_TV_INLINE void store_float(float v, BF16* o) { o->bits = float_to_bf16(v); }
MK_TV_INLINE void store_float(float v, Half* o) { o->bits = float_to_half(v); }

// The smallest float magnitude that rounds to inf in OutT (round to nearest even): an output lane
// with |v| >= it is stored as inf, and |v| < it is false for NaN too, so one comparison finds both.
MK_TV_INLINE float inf_threshold(const float*) { return std::numeric_limits<float>::infinity(); }
MK_TV_INLINE float inf_threshold(const Half*) { return 65520.0f; }  // halfway from 65504 up to 2^16
MK_TV_INLINE float inf_threshold(const BF16*) { return bits_float(0x7F7F8000u); }  // halfway from bf16's max

// What a block's apply pass saw: non-finite task vectors, and output entries that are not finite
// in the output type and are not the base entry as that type holds it (the combination overflowed,
// or went beyond a 16-bit output's range); as in combine_tile, lanes count with negative numbers.
struct BlockCounts {
  uint32_t nonfinite = 0, overflow = 0;
};

// Lane mask of the outputs v (floats, before conversion) to count, for bases b: v is NaN or ±inf in
// the output type (|v| >= limit, or NaN), unless b is out of that range too with v's sign and v is
// not NaN: the same infinity as the base there (a -1e9 mask a float16 output makes -inf). A NaN base
// gives a NaN v: counted (its task vectors are NaN too, reported first). See _output_overflow in
// merging_kernels/ops/task_vectors.py.
MK_TV_INLINE vi overflow_lanes(vf v, vf b, vf limit) {
  const vi other = ((vi)v ^ (vi)b) | (v != v);  // negative: v has the other sign, or is NaN
  return ~(vabs(v) < limit) & ((vabs(b) < limit) | (other < 0));
}

// One tile: returns m (the combined task vector) for the lanes at rows[k] + off
// (RowT elements). FROM_D: the rows hold the task vectors d (after DARE);
// otherwise they hold the experts and d = task_delta(x, b) is formed here, and every lane
// of `nonfinite` counts the non-finite d it saw (d - d is 0 for finite d, NaN
// otherwise), as negative numbers (a true lane mask is -1).
template <bool ELECT, bool TRIM, bool FROM_D, class RowT>
MK_TV_INLINE vf combine_tile(vf b, const void* const* rows, int off, int K, const float* weights,
                             const float* thresholds, bool normalize, vi& nonfinite) {
  const vf zero = splat(0.0f);
  vf acc = zero;  // plain: the sum; ELECT: the sign vote
  for (int k = 0; k < K; ++k) {
    const vf x = vload_in(static_cast<const RowT*>(rows[k]) + off);
    const vf d = FROM_D ? x : vtask_delta(x, b);
    if (!FROM_D) nonfinite += (d - d) != zero;
    const vf wd = splat(weights[k]) * d;
    // Entries with d = 0 add (+-)0 to a sum that starts at +0, which changes
    // nothing (not even a zero's sign), so only the trim needs a mask here;
    // |d| >= t is false for NaN, as the reference's keep mask is.
    if (TRIM)
      acc += vmask(wd, vabs(d) >= splat(thresholds[k]));
    else
      acc += wd;
  }
  if (!ELECT) return acc;
  const vi positive = acc >= zero;
  vf num = zero, den = zero;
  for (int k = 0; k < K; ++k) {
    const vf x = vload_in(static_cast<const RowT*>(rows[k]) + off);  // L1: read a moment ago
    const vf d = FROM_D ? x : vtask_delta(x, b);
    vi agree = (d != zero) & ((d > zero) == positive);
    if (TRIM) agree &= vabs(d) >= splat(thresholds[k]);
    const vf w = splat(weights[k]);
    num += vmask(w * d, agree);
    den += vmask(w, agree);
  }
  if (!normalize) return num;
  const vi nonzero = den != zero;
  const vf safe = (vf)vselect(nonzero, (vu)den, (vu)splat(1.0f));
  return vmask(num / safe, nonzero);
}

// dst[j] = b[j] + scale * m[j] for the n (<= kBlock) elements of a block, read and
// written in their storage types (BaseT, RowT, OutT); returns the number of
// non-finite task vectors (always 0 with FROM_D, where the caller counts) and of
// overflowing outputs (see BlockCounts). Each tile is read completely before it is
// written: dst may be the base (an in-place merge).
template <bool ELECT, bool TRIM, bool FROM_D, class BaseT, class RowT, class OutT>
MK_TV_INLINE BlockCounts combine_block(const BaseT* b, const void* const* rows, int n, int K, const float* weights,
                                       const float* thresholds, bool normalize, float scale, OutT* dst,
                                       const Scratch& s) {
  vi nonfinite = (vi)splat(0.0f), overflow = nonfinite;
  const vf vscale = splat(scale);
  const vf limit = splat(inf_threshold(static_cast<const OutT*>(nullptr)));
  int j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    const vf bj = vload_in(b + j);
    const vf m = combine_tile<ELECT, TRIM, FROM_D, RowT>(bj, rows, j, K, weights, thresholds, normalize, nonfinite);
    const vf v = bj + vscale * m;
    overflow += overflow_lanes(v, bj, limit);  // in registers
    vstore_out(dst + j, v);
  }
  if (j < n) {  // the last partial tile, through zero-padded float copies (d = 0 there: finite, never kept)
    const int rem = n - j;
    float* tile = s.tile;  // (K + 2) * kLanes floats
    const void** tile_rows = s.rows;
    std::fill(tile, tile + static_cast<size_t>(K + 2) * kLanes, 0.0f);
    for (int i = 0; i < rem; ++i) tile[i] = to_float(b[j + i]);
    for (int k = 0; k < K; ++k) {
      float* row = tile + static_cast<size_t>(k + 2) * kLanes;
      const RowT* src = static_cast<const RowT*>(rows[k]) + j;
      for (int i = 0; i < rem; ++i) row[i] = to_float(src[i]);
      tile_rows[k] = row;
    }
    const vf bj = vload(tile);
    const vf m =
        combine_tile<ELECT, TRIM, FROM_D, float>(bj, tile_rows, 0, K, weights, thresholds, normalize, nonfinite);
    const vf v = bj + vscale * m;
    overflow += overflow_lanes(v, bj, limit);  // padding lanes: b = v = 0, never counted
    vstore(tile + kLanes, v);
    for (int i = 0; i < rem; ++i) store_float(tile[kLanes + i], dst + j + i);
  }
  BlockCounts counts;
  for (int l = 0; l < kLanes; ++l) {
    counts.nonfinite -= static_cast<uint32_t>(nonfinite[l]);
    counts.overflow -= static_cast<uint32_t>(overflow[l]);
  }
  return counts;
}

template <class InT, class OutT, bool ELECT, bool TRIM>
ApplyCounts apply_piece(const ApplyParams& p, const ApplyJob& job, const Scratch& s) {
  const InT* base = static_cast<const InT*>(job.base);
  OutT* out = static_cast<OutT*>(job.out);
  const int K = p.num_tasks;
  const bool dare = p.dare.threshold != 0;
  const void** rows = s.rows + K;  // K row pointers per block (s.rows[0, K) are the tail tile's)
  ApplyCounts counts;
  for (int64_t e0 = job.begin; e0 < job.end; e0 += kBlock) {
    const int n = static_cast<int>(std::min<int64_t>(kBlock, job.end - e0));
    if (ELECT || dare) {
      const int64_t ahead = e0 + kPrefetchBlocks * kBlock;
      prefetch_block(base, ahead, job.end);
      for (int k = 0; k < K; ++k) prefetch_block(static_cast<const InT*>(job.experts[k]), ahead, job.end);
      prefetch_block(out, ahead, job.end, true);
    }
    if (dare) {
      // the task vectors of the block, DARE applied, in s.d (non-finite counted before DARE)
      const float* b = load_block(base + e0, s.b, n);
      for (int k = 0; k < K; ++k) {
        float* d = s.d + static_cast<int64_t>(k) * kBlock;
        const float* x = load_block(static_cast<const InT*>(job.experts[k]) + e0, s.x, n);
        counts.nonfinite += delta_block(x, b, d, n);
        dare_block(d, n, e0, job.tensor_key, static_cast<uint32_t>(k), p.dare);
        rows[k] = d;
      }
      counts.overflow += combine_block<ELECT, TRIM, true, float, float>(b, rows, n, K, job.weights, job.thresholds,
                                                                        p.normalize, p.scale, out + e0, s)
                             .overflow;
    } else {
      for (int k = 0; k < K; ++k) rows[k] = static_cast<const InT*>(job.experts[k]) + e0;
      const BlockCounts block = combine_block<ELECT, TRIM, false, InT, InT>(
          base + e0, rows, n, K, job.weights, job.thresholds, p.normalize, p.scale, out + e0, s);
      counts.nonfinite += block.nonfinite;
      counts.overflow += block.overflow;
    }
  }
  return counts;
}

template <class InT, class OutT>
ApplyFn apply_kernel_for(bool elect_sign, bool trim) {
  if (elect_sign) return trim ? &apply_piece<InT, OutT, true, true> : &apply_piece<InT, OutT, true, false>;
  return trim ? &apply_piece<InT, OutT, false, true> : &apply_piece<InT, OutT, false, false>;
}

template <class InT>
ApplyFn apply_kernel_in(int64_t out_dtype, bool elect_sign, bool trim) {
  switch (out_dtype) {
    case kFloat16:
      return apply_kernel_for<InT, Half>(elect_sign, trim);
    case kBFloat16:
      return apply_kernel_for<InT, BF16>(elect_sign, trim);
    default:
      return apply_kernel_for<InT, float>(elect_sign, trim);
  }
}

inline ApplyFn apply_kernel(int64_t in_dtype, int64_t out_dtype, bool elect_sign, bool trim) {
  switch (in_dtype) {
    case kFloat16:
      return apply_kernel_in<Half>(out_dtype, elect_sign, trim);
    case kBFloat16:
      return apply_kernel_in<BF16>(out_dtype, elect_sign, trim);
    default:
      return apply_kernel_in<float>(out_dtype, elect_sign, trim);
  }
}

// ------------------------------------------------------------------ histogram

// Counts the digits of one piece of one tensor into the thread's private
// histogram `local`: p.copies copies of K rows of p.stride uint32 bins (bin
// num_bins + i, i < kDummyBins, are dummies), the copy chosen by the element's
// index. Bin indices are computed for the whole block first (vectorized); an
// entry whose high bits miss the prefix goes to a dummy bin, so the counting
// loop has no branch, and the copies and dummies keep consecutive increments
// off the same counter (a store-to-load chain otherwise). With `direct`, the
// counts go straight to the shared int64 counts (atomics) instead: for pieces
// too small to pay for flushing a private histogram.
// ++local[idx[k * kBlock + j]] for every j < n and k < K, element-major so that
// consecutive increments hit different tasks' rows; unrolled for small K.
template <int KK>
MK_TV_INLINE void count_rows_fixed(uint32_t* __restrict local, const uint32_t* __restrict idx, int n) {
  for (int j = 0; j < n; ++j)
    for (int k = 0; k < KK; ++k) ++local[idx[k * kBlock + j]];
}

MK_TV_INLINE void count_rows(uint32_t* __restrict local, const uint32_t* __restrict idx, int n, int K) {
  switch (K) {
    case 1:
      return count_rows_fixed<1>(local, idx, n);
    case 2:
      return count_rows_fixed<2>(local, idx, n);
    case 3:
      return count_rows_fixed<3>(local, idx, n);
    case 4:
      return count_rows_fixed<4>(local, idx, n);
    default:
      for (int j = 0; j < n; ++j)
        for (int k = 0; k < K; ++k) ++local[idx[static_cast<int64_t>(k) * kBlock + j]];
  }
}

#if MK_TV_F16C
// Appends to list[count...] the private-histogram index of every entry of one task
// row whose key matches the prefix (AVX2 compaction through kCompactLanes); returns
// the new count. list needs 8 slots of slack past the last entry.
MK_TV_INLINE uint32_t compact_matches(const float* __restrict x, const float* __restrict b, bool subtract, int n,
                                      uint32_t mask, uint32_t want, int shift, uint32_t digit_mask, uint32_t row,
                                      uint32_t copy_mask, uint32_t copy_stride, uint32_t* __restrict list,
                                      uint32_t count) {
  const __m256i vabs_mask = _mm256_set1_epi32(0x7FFFFFFF);
  const __m256i vmask = _mm256_set1_epi32(static_cast<int>(mask));
  const __m256i vwant = _mm256_set1_epi32(static_cast<int>(want));
  const __m256i vdigit = _mm256_set1_epi32(static_cast<int>(digit_mask));
  const __m128i vshift = _mm_cvtsi32_si128(shift);
  // j is a multiple of 8 and copies <= 8, so lane l always lands in copy l & copy_mask
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i offset = _mm256_add_epi32(
      _mm256_mullo_epi32(_mm256_and_si256(lane, _mm256_set1_epi32(static_cast<int>(copy_mask))),
                         _mm256_set1_epi32(static_cast<int>(copy_stride))),
      _mm256_set1_epi32(static_cast<int>(row)));
  int j = 0;
  for (; j + 8 <= n; j += 8) {
    __m256 d = _mm256_loadu_ps(x + j);
    if (subtract) {  // task_delta: 0 where x == b
      const __m256 bj = _mm256_loadu_ps(b + j);
      d = _mm256_andnot_ps(_mm256_cmp_ps(d, bj, _CMP_EQ_OQ), _mm256_sub_ps(d, bj));
    }
    const __m256i key = _mm256_and_si256(_mm256_castps_si256(d), vabs_mask);
    const __m256i match = _mm256_cmpeq_epi32(_mm256_and_si256(key, vmask), vwant);
    const unsigned bits = static_cast<unsigned>(_mm256_movemask_ps(_mm256_castsi256_ps(match)));
    const __m256i value = _mm256_add_epi32(_mm256_and_si256(_mm256_srl_epi32(key, vshift), vdigit), offset);
    const __m256i perm = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(&kCompactLanes.lanes[bits])));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(list + count), _mm256_permutevar8x32_epi32(value, perm));
    count += static_cast<uint32_t>(__builtin_popcount(bits));
  }
  for (; j < n; ++j) {
    const float dj = subtract ? task_delta(x[j], b[j]) : x[j];
    const uint32_t key = float_bits(dj) & 0x7FFFFFFFu;
    list[count] = (static_cast<uint32_t>(j) & copy_mask) * copy_stride + row + ((key >> shift) & digit_mask);
    count += static_cast<uint32_t>((key & mask) == want);
  }
  return count;
}
#endif

template <class InT>
void hist_piece(const HistParams& p, const HistJob& job, const Scratch& s, uint32_t* __restrict local,
                int64_t* global, bool direct) {
  const InT* base = static_cast<const InT*>(job.base);
  const int K = p.num_tasks;
  const bool dare = p.dare.threshold != 0;
  const uint32_t mask = p.high_mask, num_bins = p.num_bins, digit_mask = num_bins - 1u, stride = p.stride;
  const uint32_t copy_mask = p.copies - 1u, copy_stride = static_cast<uint32_t>(K) * stride;
  const int shift = p.shift;
  // below the first level most entries miss the prefix: worth compacting (AVX2 only)
  const bool sparse = !direct && (mask & 0x7FFFFFFFu) != 0;
  (void)sparse;
  for (int64_t e0 = job.begin; e0 < job.end; e0 += kBlock) {
    const int n = static_cast<int>(std::min<int64_t>(kBlock, job.end - e0));
    {
      const int64_t ahead = e0 + kPrefetchBlocks * kBlock;
      prefetch_block(base, ahead, job.end);
      for (int k = 0; k < K; ++k) prefetch_block(static_cast<const InT*>(job.experts[k]), ahead, job.end);
    }
    const float* __restrict b = load_block(base + e0, s.b, n);
#if MK_TV_F16C
    if (sparse) {
      // only the entries that match the prefix are counted: listed first (compacted),
      // then counted; misses cost no increment at all
      uint32_t count = 0;
      for (int k = 0; k < K; ++k) {
        const float* x = load_block(static_cast<const InT*>(job.experts[k]) + e0, s.x, n);
        if (dare) {
          delta_block(x, b, s.d, n);
          dare_block(s.d, n, e0, job.tensor_key, static_cast<uint32_t>(k), p.dare);
          x = s.d;
        }
        count = compact_matches(x, b, !dare, n, mask, job.prefix[k], shift, digit_mask,
                                static_cast<uint32_t>(k) * stride, copy_mask, copy_stride, s.idx, count);
      }
      for (uint32_t i = 0; i < count; ++i) ++local[s.idx[i]];
      continue;
    }
#endif
    for (int k = 0; k < K; ++k) {
      const float* __restrict x = load_block(static_cast<const InT*>(job.experts[k]) + e0, s.x, n);
      uint32_t* __restrict idx = s.idx + static_cast<int64_t>(k) * kBlock;
      const uint32_t want = job.prefix[k];
      const uint32_t row = static_cast<uint32_t>(k) * stride;
      const float* __restrict d = x;
      if (dare) {
        float* __restrict dd = s.d;
        delta_block(x, b, dd, n);
        dare_block(dd, n, e0, job.tensor_key, static_cast<uint32_t>(k), p.dare);
        d = dd;
      }
      for (int j = 0; j < n; ++j) {
        const float dj = dare ? d[j] : task_delta(x[j], b[j]);
        const uint32_t key = float_bits(std::fabs(dj));
        const uint32_t uj = static_cast<uint32_t>(j);
        const uint32_t bin = ((key & mask) == want) ? ((key >> shift) & digit_mask) : num_bins + (uj & (kDummyBins - 1u));
        idx[j] = (uj & copy_mask) * copy_stride + row + bin;
      }
    }
    if (direct) {
      for (int k = 0; k < K; ++k) {
        const uint32_t* idx = s.idx + static_cast<int64_t>(k) * kBlock;
        int64_t* g = global + static_cast<int64_t>(k) * num_bins;
        for (int j = 0; j < n; ++j) {
          const uint32_t bin = idx[j] % stride;
          if (bin < num_bins) {
#ifdef MK_WITH_OPENMP
#pragma omp atomic
#endif
            g[bin] += 1;
          }
        }
      }
    } else {
      count_rows(local, s.idx, n, K);
    }
  }
}

inline HistFn hist_kernel(int64_t in_dtype) {
  switch (in_dtype) {
    case kFloat16:
      return &hist_piece<Half>;
    case kBFloat16:
      return &hist_piece<BF16>;
    default:
      return &hist_piece<float>;
  }
}

}  // namespace MK_TV_ISA
