// The tolerance of a plain float32 attention against the float64 reference on the same inputs
// (test_decode_attention derives it): a score carries an absolute error ~ u (D + |s|); the
// output moves by <= 2 max|ds| max|v|, and the sums over Tk keys and D features add
// gamma_{D + Tk + 1}; tolerance_for's safety factor covers the chain.
#pragma once

#include <cstdint>

#include "support/test_support.h"

namespace attn::testing {

inline Tolerance float32_tolerance(int64_t D, int64_t Tk, double max_abs_score) {
  Tolerance tol = tolerance_for(DType::f32, D + Tk + 1);
  tol.atol += 32.0 * unit_roundoff(DType::f32) * max_abs_score;
  tol.rtol = tol.atol;
  return tol;
}

}  // namespace attn::testing
