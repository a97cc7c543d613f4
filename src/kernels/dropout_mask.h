// Dropout keep decisions for the fused kernels (internal): exactly attn::dropout_keep of
// attn/random.h, the decisions of the reference and composed paths, split so that a kernel pays
// one mixing round per (i, j) instead of five.
//
// counter_uniform(seed, b, h, i, j) chains five SplitMix64 rounds, one per coordinate. The first
// four depend only on the query row (b, h, i), so a kernel computes them once per row (row()) and
// the last one per key (keep()). The constants below are random.h's; DropoutMask.MatchesRandomH
// in tests/test_fused_dropout.cpp checks the two agree bit for bit.
#pragma once

#include <cmath>
#include <cstdint>

#include "attn/random.h"

namespace attn::kernels {

class DropoutMask {
 public:
  // p in [0, 1) (the front-end validates it); p == 0: active() is false and nothing is dropped.
  DropoutMask(double p, uint64_t seed)
      : active_(p > 0.0),
        // keep iff u 2^-24 >= p for the 24-bit u: u >= ceil(p 2^24), exact (p 2^24 is exact).
        threshold_(static_cast<uint64_t>(std::ceil(p * 16777216.0))),
        scale_(static_cast<float>(1.0 / (1.0 - p))),
        seed_state_(mix64(seed + 0x9e3779b97f4a7c15ULL)) {}

  bool active() const { return active_; }
  // 1 / (1 - p) in float32, as the composed path scales kept weights.
  float scale() const { return scale_; }

  // The per-row part of the hash of query row i of head h (a query head) of batch b.
  uint64_t row(int64_t b, int64_t h, int64_t i) const {
    uint64_t x = mix64(seed_state_ ^ static_cast<uint64_t>(b));
    x = mix64(x ^ (static_cast<uint64_t>(h) + 0x632be59bd9b4e019ULL));
    return mix64(x ^ (static_cast<uint64_t>(i) + 0x85157af5a1c2d3b7ULL));
  }
  // Whether key j of the row with per-row hash `row_hash` is kept.
  bool keep(uint64_t row_hash, int64_t j) const {
    const uint64_t x = mix64(row_hash ^ (static_cast<uint64_t>(j) + 0x2545f4914f6cdd1dULL));
    return (x >> 40) >= threshold_;
  }
  // The factor of P_ij: scale() when kept, 0 when dropped.
  float factor(uint64_t row_hash, int64_t j) const {
    return keep(row_hash, j) ? scale_ : 0.0f;
  }

 private:
  bool active_;
  uint64_t threshold_;
  float scale_;
  uint64_t seed_state_;
};

}  // namespace attn::kernels
