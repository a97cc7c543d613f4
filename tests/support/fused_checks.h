// Error bounds and comparisons shared by the tests of the fused dot-product kernels (flash
// forward and backward, with weights, dropout and boolean masks). Header-only.
//
// Forward (error analysis of test_flash_attention.cpp): a score s = scale q.k + bias + alibi
// carries an absolute error ~ u (sqrt(D) + |s|_max); a probability p_j changes by
// p_j (ds_j - sum p ds), so the output moves by <= 2 max|ds| max|v|; the sums over Tk keys and D
// features add ~ u sqrt(D + Tk). Gradients: the same score error, times the largest gradient
// element, plus the probabilistic summation bound of the D + Dv + Tq + Tk terms each gradient
// element accumulates. `factor` scales both (1 / (1 - p) with dropout: every kept probability is
// multiplied by it).
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>

#include "attn/attention.h"
#include "attn/tensor.h"
#include "support/simd_targets.h"
#include "support/test_support.h"

namespace attn::testing {

// The sizes an error bound of a dot-product attention depends on.
struct DotBound {
  int64_t B = 1, Hq = 1, Tq = 0, Tk = 0, D = 0, Dv = 0;
  double max_abs_score = 0.0;  // the largest |score| of a visible key
  double factor = 1.0;         // scales the whole bound (dropout's 1 / (1 - p))
};

inline Tolerance dot_forward_tolerance(const DotBound& s) {
  const double u = unit_roundoff(DType::f32);
  const double terms = std::sqrt(static_cast<double>(s.D + s.Tk + 1));
  const double bound = 16.0 * u * (terms + 2.0 * s.max_abs_score) * s.factor;
  return {bound, bound};
}

// `summed_rows` query rows feed each element (Tq; B Hq Tq for a fully broadcast dbias).
inline Tolerance dot_grad_tolerance(const DotBound& s, const Tensor& expected,
                                    int64_t summed_rows) {
  const double u = unit_roundoff(DType::f32);
  const Tolerance sums = tolerance_for(DType::f32, s.D + s.Dv + summed_rows + s.Tk);
  const double bound = (sums.atol + 32.0 * u * s.max_abs_score) * s.factor *
                       std::max(1.0, max_abs_finite(expected));
  return {bound, bound};
}

// out, lse (and weights and mean_weights when the reference has them) within the bound.
inline void expect_forward_close(const AttentionOutput& got, const AttentionOutput& want,
                                 const DotBound& s) {
  const Tolerance tol = dot_forward_tolerance(s);
  EXPECT_TRUE(all_close(got.out, want.out, tol, "out"));
  EXPECT_TRUE(all_close(got.lse, want.lse, tol, "lse"));
  if (want.weights.defined()) {
    EXPECT_TRUE(all_close(got.weights, want.weights, tol, "weights"));
    EXPECT_TRUE(all_close(got.mean_weights, want.mean_weights, tol, "mean_weights"));
  }
}

// dq, dk, dv and dbias (summed over its broadcast dimensions: up to B Hq Tq rows) within the
// bound.
inline void expect_grads_close(const AttentionGrads& got, const AttentionGrads& want,
                               const DotBound& s) {
  EXPECT_TRUE(all_close(got.dq, want.dq, dot_grad_tolerance(s, want.dq, s.Tq), "dq"));
  EXPECT_TRUE(all_close(got.dk, want.dk, dot_grad_tolerance(s, want.dk, s.Tq), "dk"));
  EXPECT_TRUE(all_close(got.dv, want.dv, dot_grad_tolerance(s, want.dv, s.Tq), "dv"));
  ASSERT_EQ(got.dbias.defined(), want.dbias.defined());
  if (want.dbias.defined()) {
    EXPECT_EQ(got.dbias.shape(), want.dbias.shape());
    EXPECT_TRUE(all_close(got.dbias, want.dbias,
                          dot_grad_tolerance(s, want.dbias, s.B * s.Hq * s.Tq), "dbias"));
  }
}

// The bound of a scaled-dot case whose inputs come from random_qkv (|q|, |k| <= 1, so
// |scale q.k| <= sqrt(D)) with an optional bias in [-1, 1). Case: the fields of random_qkv plus
// bias_shape and drop_scale().
template <class Case>
DotBound unit_input_bound(const Case& c) {
  return {.B = c.B, .Hq = c.Hq, .Tq = c.Tq, .Tk = c.Tk, .D = c.D, .Dv = c.Dv,
          .max_abs_score = std::sqrt(static_cast<double>(c.D)) + (c.bias_shape.empty() ? 0 : 1),
          .factor = c.drop_scale()};
}

// "B=2 Hq=4 Hkv=2 Tq=129 Tk=70 D=16 Dv=8": the sizes of a case (fields as random_qkv's) for a
// trace line.
template <class Case>
std::string sizes_str(const Case& c) {
  return "B=" + std::to_string(c.B) + " Hq=" + std::to_string(c.Hq) +
         " Hkv=" + std::to_string(c.Hkv) + " Tq=" + std::to_string(c.Tq) +
         " Tk=" + std::to_string(c.Tk) + " D=" + std::to_string(c.D) +
         " Dv=" + std::to_string(c.Dv);
}

// Random q, k, v and dout of a test case (fields B, Hq, Hkv, Tq, Tk, D, Dv, seed), uniform in
// [-1, 1), seeded seed .. seed + 3.
struct QkvTensors {
  Tensor q, k, v, dout;
};
template <class Case>
QkvTensors random_qkv(const Case& c) {
  return {random_tensor({c.B, c.Hq, c.Tq, c.D}, DType::f32, c.seed),
          random_tensor({c.B, c.Hkv, c.Tk, c.D}, DType::f32, c.seed + 1),
          random_tensor({c.B, c.Hkv, c.Tk, c.Dv}, DType::f32, c.seed + 2),
          random_tensor({c.B, c.Hq, c.Tq, c.Dv}, DType::f32, c.seed + 3)};
}

}  // namespace attn::testing
