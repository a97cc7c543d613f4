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
// mixing round so that neighbouring positions are independent. For parameter initialisation and
// sampling, where five rounds per number cost nothing; dropout uses the cheaper split hash below.
constexpr double counter_uniform(uint64_t seed, uint64_t b, uint64_t h, uint64_t i, uint64_t j) {
  uint64_t x = mix64(seed + 0x9e3779b97f4a7c15ULL);
  x = mix64(x ^ b);
  x = mix64(x ^ (h + 0x632be59bd9b4e019ULL));
  x = mix64(x ^ (i + 0x85157af5a1c2d3b7ULL));
  x = mix64(x ^ (j + 0x2545f4914f6cdd1dULL));
  return static_cast<double>(x >> 40) * (1.0 / 16777216.0);
}

// ---- Dropout's keep decision: a per-row key, then one cheap 32-bit round per element ----
//
// Dropout needs one decision per (b, h, i, j), Tq x Tk per head, so its hash is split so that a
// kernel pays the expensive part once per row and vectorises the rest:
//   row key  K = dropout_row_key(seed, b, h, i): four SplitMix64 finaliser rounds (mix64), one
//            per coordinate, giving a 64-bit key per query row;
//   element  u = dropout_bits(K, j): ONE round of 32-bit lane operations on (K_lo ^ j * golden,
//            K_hi): the two-multiply "lowbias32" integer finaliser (C. Wellons' hash-prospector
//            constants) with K_hi xored in between the multiplies; the top 24 bits are u.
//   keep     u >= dropout_threshold(p) = ceil(p 2^24), i.e. exactly u 2^-24 >= p.
//
// Why one round per element suffices: mix64 is a bijective avalanche mix, so after four rounds
// the keys of distinct rows (any change of seed, b, h or i) behave as independent uniform 64-bit
// values; the element round then only has to decorrelate the keys j = 0, 1, 2, ... of ONE row.
// j -> K_lo ^ j * golden is a bijection of 32-bit values that spreads consecutive j over all bit
// positions (golden = 2^32 / phi, odd), and lowbias32 is a bijection with near-ideal avalanche
// (every input bit flips every output bit with probability ~1/2), so within a row no two keys
// j < 2^32 share a 32-bit hash and neighbouring keys are decorrelated. K_hi, xored after the
// first multiply, makes rows whose low key halves happen to coincide (chance 2^-32 per pair)
// still differ. tests/ops/test_dropout_rng.cpp checks keep rates against binomial bounds,
// correlations between neighbours in j, i, h and seed, and chi-square uniformity of u.
// Keys j >= 2^32 fold their high half into the row key (mix64), so no two (i, j) alias.

// The golden-ratio odd constant that spreads consecutive keys j over the 32 bits.
inline constexpr uint32_t kDropoutKeyStep = 0x9e3779b9u;
// The two multipliers of the lowbias32 finaliser.
inline constexpr uint32_t kDropoutMul1 = 0x7feb352du;
inline constexpr uint32_t kDropoutMul2 = 0x846ca68bu;

// The per-row key of query row i of head h of batch b (dropout's expensive part, once per row).
constexpr uint64_t dropout_row_key(uint64_t seed, uint64_t b, uint64_t h, uint64_t i) {
  uint64_t x = mix64(seed + 0x9e3779b97f4a7c15ULL);
  x = mix64(x ^ b);
  x = mix64(x ^ (h + 0x632be59bd9b4e019ULL));
  return mix64(x ^ (i + 0x85157af5a1c2d3b7ULL));
}

// The 24-bit uniform of key j (j < 2^32) of the row with key `row_key`: one round of 32-bit
// multiply-xorshift. The SIMD kernels (src/kernels/common/dropout_mask-inl.h) run exactly these lane
// operations with the constants above.
constexpr uint32_t dropout_bits(uint64_t row_key, uint32_t j) {
  uint32_t x = static_cast<uint32_t>(row_key) ^ (j * kDropoutKeyStep);
  x ^= x >> 16;
  x *= kDropoutMul1;
  x ^= static_cast<uint32_t>(row_key >> 32);
  x ^= x >> 15;
  x *= kDropoutMul2;
  x ^= x >> 16;
  return x >> 8;
}

// Keep iff dropout_bits(...) >= this: ceil(p 2^24) (p 2^24 is exact in double), 0 for p <= 0
// (keep all), 2^24 for p >= 1 (keep none).
constexpr uint32_t dropout_threshold(double p) {
  if (p <= 0.0) return 0;
  if (p >= 1.0) return uint32_t{1} << 24;
  const double t = p * 16777216.0;
  const auto floor_t = static_cast<uint32_t>(t);
  return static_cast<double>(floor_t) < t ? floor_t + 1 : floor_t;
}

// The row key of (row_key, j) for any 64-bit j: keys j >= 2^32 get their high half mixed in.
constexpr uint64_t dropout_key_for(uint64_t row_key, uint64_t j) {
  return (j >> 32) == 0 ? row_key : mix64(row_key ^ (j >> 32));
}

// Uniform in [0, 1) with 24 bits for dropout element (seed, b, h, i, j): dropout_bits 2^-24.
constexpr double dropout_uniform(uint64_t seed, uint64_t b, uint64_t h, uint64_t i, uint64_t j) {
  const uint64_t key = dropout_key_for(dropout_row_key(seed, b, h, i), j);
  return static_cast<double>(dropout_bits(key, static_cast<uint32_t>(j))) * (1.0 / 16777216.0);
}

// Dropout keeps element (b, h, i, j) with probability 1 - p: dropout_uniform(...) >= p.
constexpr bool dropout_keep(uint64_t seed, double p, uint64_t b, uint64_t h, uint64_t i,
                            uint64_t j) {
  if (p <= 0.0) return true;
  const uint64_t key = dropout_key_for(dropout_row_key(seed, b, h, i), j);
  return dropout_bits(key, static_cast<uint32_t>(j)) >= dropout_threshold(p);
}

}  // namespace attn
