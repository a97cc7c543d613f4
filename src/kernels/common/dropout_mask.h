// Dropout keep decisions for the fused kernels (internal): exactly attn::dropout_keep of
// attn/random.h, the decisions of the reference and composed paths.
//
// random.h splits the hash: a per-row key (four SplitMix64 rounds over seed, b, h, i) and one
// round of 32-bit lane operations per key j. DropoutMask holds the per-call constants (the
// integer threshold, the scale) and computes row keys once per query row; the per-element round
// runs vectorised in dropout_mask-inl.h (per Highway target), keep() is its scalar form. Both
// call or mirror random.h's functions and constants instead of repeating them. Tests (in
// tests/ops/test_fused_dropout.cpp): DropoutMask.MatchesRandomH checks keep() against dropout_keep;
// FusedDropoutTest.SameKeepPatternAsComposed checks the SIMD round on every target.
#pragma once

#include <cstdint>

#include "attn/random.h"

namespace attn::kernels {

class DropoutMask {
 public:
  // p in [0, 1) (the front-end validates it); p == 0: active() is false and nothing is dropped.
  DropoutMask(double p, uint64_t seed)
      : active_(p > 0.0),
        threshold_(dropout_threshold(p)),
        scale_(static_cast<float>(1.0 / (1.0 - p))),
        seed_(seed) {}

  bool active() const { return active_; }
  // 1 / (1 - p) in float32, as the composed path scales kept weights.
  float scale() const { return scale_; }
  // Keep iff the 24-bit uniform of an element is >= threshold() (ceil(p 2^24)).
  uint32_t threshold() const { return threshold_; }

  // The row key of query row i of head h (a query head) of batch b.
  uint64_t row(int64_t b, int64_t h, int64_t i) const {
    return dropout_row_key(seed_, static_cast<uint64_t>(b), static_cast<uint64_t>(h),
                           static_cast<uint64_t>(i));
  }
  // Whether key j (j < 2^32, as every kernel's Tk is) of the row with key `row_key` is kept.
  bool keep(uint64_t row_key, int64_t j) const {
    return dropout_bits(row_key, static_cast<uint32_t>(j)) >= threshold_;
  }

  // Row keys of rows [row0, row0 + rows) of head h split into 32-bit halves for the SIMD round,
  // lanes [rows, lanes) set to key 0 (computed, never used).
  void fill_row_keys(int64_t b, int64_t h, int64_t row0, int64_t rows, int64_t lanes,
                     uint32_t* key_lo, uint32_t* key_hi) const {
    for (int64_t lane = 0; lane < lanes; ++lane) {
      const uint64_t key = lane < rows ? row(b, h, row0 + lane) : 0;
      key_lo[lane] = static_cast<uint32_t>(key);
      key_hi[lane] = static_cast<uint32_t>(key >> 32);
    }
  }

 private:
  bool active_;
  uint32_t threshold_;
  float scale_;
  uint64_t seed_;
};

}  // namespace attn::kernels
