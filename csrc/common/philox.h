// Philox4x32-10 counter-based random numbers (Salmon et al., SC'11), header-only,
// usable from host C++ and from CUDA device code.
//
// Bit-identical to merging_kernels/ops/philox.py (the torch reference) and the
// Triton kernel. DARE draws one word per (element, tensor, task):
//
//     key     = (seed & 0xFFFFFFFF, seed >> 32)
//     counter = (element & 0xFFFFFFFF, element >> 32, tensor_key, task)
//     word    = philox4x32_10(counter, key)[0]
//     dropped = (word >> 8) < drop_threshold          (drop_threshold = round(p * 2^24))
//
// Known answers (Random123's kat_vectors for philox4x32_10, word 0):
//     counter 0, key 0                          -> 0x6627e8d5
//     counter all 0xffffffff, key all 0xffffffff -> 0x408f276d
//     counter (0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344),
//     key (0xa4093822, 0x299f31d0)              -> 0xd16cfe09
#pragma once

#include <stdint.h>

// MK_HOST_DEVICE marks functions callable from host and device code when a CUDA
// (or HIP) compiler is compiling; plain inline otherwise.
#ifndef MK_HOST_DEVICE
#if defined(__CUDACC__) || defined(__HIPCC__)
#define MK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MK_HOST_DEVICE inline
#endif
#endif

namespace merging_kernels {
namespace philox {

constexpr uint32_t kM0 = 0xD2511F53u;
constexpr uint32_t kM1 = 0xCD9E8D57u;
constexpr uint32_t kW0 = 0x9E3779B9u;
constexpr uint32_t kW1 = 0xBB67AE85u;
constexpr int kRounds = 10;
constexpr int kUniformBits = 24;  // the top 24 bits of word 0 are the uniform number

// High and low 32 bits of the 64-bit product a * b.
MK_HOST_DEVICE void mulhilo32(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
#if defined(__CUDA_ARCH__)
  lo = a * b;
  hi = __umulhi(a, b);
#else
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  lo = static_cast<uint32_t>(p);
  hi = static_cast<uint32_t>(p >> 32);
#endif
}

// One Philox round followed by the key bump (Salmon et al., SC'11).
MK_HOST_DEVICE void philox_round(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3, uint32_t& k0,
                                 uint32_t& k1) {
  uint32_t hi0, lo0, hi1, lo1;
  mulhilo32(kM0, c0, hi0, lo0);
  mulhilo32(kM1, c2, hi1, lo1);
  const uint32_t n0 = hi1 ^ c1 ^ k0;
  const uint32_t n2 = hi0 ^ c3 ^ k1;
  c0 = n0;
  c1 = lo1;
  c2 = n2;
  c3 = lo0;
  k0 += kW0;
  k1 += kW1;
}

// All four output words; counter (c0..c3) and key (k0, k1) are taken by value.
MK_HOST_DEVICE void philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1,
                                  uint32_t out[4]) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int r = 0; r < kRounds; ++r) {
    philox_round(c0, c1, c2, c3, k0, k1);
  }
  out[0] = c0;
  out[1] = c1;
  out[2] = c2;
  out[3] = c3;
}

// Word 0 only (what DARE uses); written so that loops over elements vectorize.
MK_HOST_DEVICE uint32_t philox4x32_10_word0(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                                            uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int r = 0; r < kRounds; ++r) {
    philox_round(c0, c1, c2, c3, k0, k1);
  }
  return c0;
}

// The DARE word of one (element, tensor, task) under a 64-bit seed.
MK_HOST_DEVICE uint32_t dare_word(uint64_t element, uint32_t tensor_key, uint32_t task, uint64_t seed) {
  return philox4x32_10_word0(static_cast<uint32_t>(element), static_cast<uint32_t>(element >> 32), tensor_key, task,
                             static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// Whether DARE drops the entry whose word is `word` (drop_threshold = round(p * 2^24); 0: never).
MK_HOST_DEVICE bool dare_dropped(uint32_t word, uint32_t drop_threshold) {
  return (word >> (32 - kUniformBits)) < drop_threshold;
}

}  // namespace philox
}  // namespace merging_kernels
