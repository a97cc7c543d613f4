// Counter-based random numbers: a pure function of (seed, coordinates), so any element can be
// regenerated in any order by any thread. Used by attention dropout, whose backward recomputes
// the keep mask instead of storing Tq x Tk bits.
#pragma once

#include <cstdint>

namespace attn {

// SplitMix64's finaliser: a bijective avalanche mix of 64 bits.
constexpr uint64_t mix64(uint64_t x) {
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ULL;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebULL;
  x ^= x >> 31;
  return x;
}

// Uniform in [0, 1) with 24 bits, from (seed, b, h, i, j). Each coordinate goes through a full
// mixing round so that neighbouring positions are independent.
constexpr double counter_uniform(uint64_t seed, uint64_t b, uint64_t h, uint64_t i, uint64_t j) {
  uint64_t x = mix64(seed + 0x9e3779b97f4a7c15ULL);
  x = mix64(x ^ b);
  x = mix64(x ^ (h + 0x632be59bd9b4e019ULL));
  x = mix64(x ^ (i + 0x85157af5a1c2d3b7ULL));
  x = mix64(x ^ (j + 0x2545f4914f6cdd1dULL));
  return static_cast<double>(x >> 40) * (1.0 / 16777216.0);
}

// Dropout keeps element (b, h, i, j) with probability 1 - p.
constexpr bool dropout_keep(uint64_t seed, double p, uint64_t b, uint64_t h, uint64_t i,
                            uint64_t j) {
  return p <= 0.0 || counter_uniform(seed, b, h, i, j) >= p;
}

}  // namespace attn
