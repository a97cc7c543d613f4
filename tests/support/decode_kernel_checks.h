// Error bound shared by the decode kernel's tests (test_decode_attention, test_decode_weights).
// Header-only; `Case` is either test's case struct (fields Tq, Tk, D, alibi, bias_shape, kv and
// scale()).
//
// A score carries an absolute error ~ u (sqrt(D) + |s|); a probability p_j moves by
// p_j (ds_j - sum p ds) <= 2 p_j max|ds|, and the sums over Tk keys and D features add
// ~ u sqrt(D + Tk): the error of a plain float32 implementation. A bf16 cache is allowed twice
// that on the same rounded inputs.
#pragma once

#include <algorithm>

#include "kernels/decode/decode_attention.h"
#include "support/test_support.h"

namespace attn::testing {

// The largest |ALiBi term| of a key that carries weight. A key whose penalty exceeds the row's
// smallest by more than 2 max|scale q.k + bias| + 64 has p < e^-64, so its (larger) score error
// moves nothing. In every case of those tests a row with a visible key has one within Tq
// positions of pos(i) (causal keeps the keys up to pos(i); otherwise pos(i) lies inside the keys
// or at most Tq before key 0), so the smallest penalty is at most slope * Tq; every standard
// slope is < 1.
template <class Case>
double alibi_score_bound(const Case& c, double max_abs_rest) {
  if (!c.alibi) return 0.0;
  const double all_keys = static_cast<double>(c.Tk + c.Tq);
  return std::min(all_keys, static_cast<double>(c.Tq) + 2.0 * max_abs_rest + 64.0);
}

// The bound above for inputs (and bias) uniform in [-1, 1): |scale q.k| <= scale * D, |bias| <= 1.
template <class Case>
Tolerance decode_tolerance(const Case& c) {
  const double u = unit_roundoff(DType::f32);
  const double max_abs_rest =
      c.scale() * static_cast<double>(c.D) + (c.bias_shape.empty() ? 0.0 : 1.0);
  const double max_abs_score = max_abs_rest + alibi_score_bound(c, max_abs_rest);
  Tolerance tol = tolerance_for(DType::f32, c.D + c.Tk + 1);
  tol.atol += 32.0 * u * max_abs_score;
  tol.rtol = tol.atol;
  if (c.kv == kernels::KvType::bf16) tol.atol *= 2.0, tol.rtol *= 2.0;
  return tol;
}

}  // namespace attn::testing
