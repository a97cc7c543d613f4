// Error bounds, comparisons and problem set-up shared by the tests of the fused dot-product
// kernels (flash forward and backward, with weights, dropout and boolean masks): the bounds
// below, random inputs of a case, the flash tests' case struct, a validated problem and the
// fused glue run against the float64 reference. Header-only.
//
// Forward (error analysis of test_flash_attention.cpp): a score s = scale q.k + bias + alibi
// carries an absolute error ~ u (D + |s|_max); a probability p_j changes by
// p_j (ds_j - sum p ds), so the output moves by <= 2 max|ds| max|v|; the sums over Tk keys and D
// features add at most gamma_{D + Tk} (tolerance_for: a worst-case bound, for any summation
// order). Gradients: the same score error, times the largest gradient element, plus the
// worst-case bound of the D + Dv + Tq + Tk terms each gradient element accumulates. `factor`
// scales both (1 / (1 - p) with dropout: every kept probability is multiplied by it).
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "attention_validate.h"
#include "attn/attention.h"
#include "attn/reference.h"
#include "attn/tensor.h"
#include "kernels/flash/flash_attention.h"
#include "kernels/flash/flash_backward.h"
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
  const double sums = tolerance_for(DType::f32, s.D + s.Tk + 1).atol;  // worst case, any order
  const double bound = (sums + 32.0 * u * s.max_abs_score) * s.factor;
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

// The case's bias (fields bias_shape, seed): undefined when bias_shape is empty, else uniform
// in [-range, range), seeded seed + 4 (after random_qkv's four tensors).
template <class Case>
Tensor random_bias(const Case& c, double range) {
  if (c.bias_shape.empty()) return {};
  return random_tensor(c.bias_shape, DType::f32, c.seed + 4, -range, range);
}

// A case of the flash kernels' tests (test_flash_attention, test_flash_backward): sizes, the
// score's scale, interval masks, a broadcast bias and ALiBi.
struct FlashCase {
  int64_t B = 1, Hq = 2, Hkv = 1, Tq = 0, Tk = 0, D = 0, Dv = 0;
  double scale = 0.0;  // 0: ScaledDotScore's default 1 / sqrt(D); < 0: DotScore (scale 1)
  std::vector<int64_t> key_lengths, query_lengths;
  bool causal = false, bottom_right = false;
  int64_t left = Window::unbounded, right = Window::unbounded;
  Shape bias_shape;  // empty: no bias; right-aligned broadcast against [B, Hq, Tq, Tk]
  double bias_range = 1.0;
  bool alibi = false;
  uint64_t seed = 1;

  std::string str() const {
    std::string s = sizes_str(*this) + interval_masks_str(*this);
    if (scale < 0.0) s += " dot";
    if (!bias_shape.empty()) s += " bias" + shape_str(bias_shape);
    if (alibi) s += " alibi";
    return s;
  }

  double scale_value() const {
    if (scale < 0.0) return 1.0;
    return scale != 0.0 ? scale : 1.0 / std::sqrt(static_cast<double>(std::max<int64_t>(D, 1)));
  }
};

// Inputs and parameters of a fused-kernel call, validated as the front-end would.
struct FusedProblem {
  Tensor q, k, v, dout;
  AttentionParams params;
  detail::AttentionDims dims;
};

// q, k, v, dout from random_qkv and the case's interval masks; `add_params` sets the score and
// whatever else the test needs before the problem is validated.
template <class Case>
FusedProblem make_fused_problem(const Case& c,
                                const std::function<void(AttentionParams&)>& add_params) {
  FusedProblem p;
  auto [q, k, v, dout] = random_qkv(c);
  p.q = q, p.k = k, p.v = v, p.dout = dout;
  set_interval_masks(c, p.params.mask);
  add_params(p.params);
  p.dims = detail::validate_attention("attention", p.q, p.k, p.v, p.params);
  return p;
}

// The fused glue, called directly so that every Tq (also below the front-end's fused-path
// threshold) runs on the fused kernels.
inline AttentionOutput fused_forward(const FusedProblem& p) {
  EXPECT_TRUE(kernels::flash_attention_supported(DType::f32, p.params));
  return kernels::flash_attention(p.dims, p.q, p.k, p.v, p.params);
}
inline AttentionGrads fused_backward(const FusedProblem& p, const AttentionOutput& fwd) {
  EXPECT_TRUE(kernels::flash_backward_supported(DType::f32, p.params));
  return kernels::flash_attention_backward(p.dims, p.q, p.k, p.v, p.params, fwd, p.dout);
}

// A fused forward and backward and the float64 reference's, for further checks.
struct FusedAndReference {
  AttentionOutput got, want;
  AttentionGrads got_grads, want_grads;
};

// Runs `p` on the fused kernels and on the reference and expects the forward (with weights when
// requested) and the gradients within the bound of a case with unit inputs (unit_input_bound).
template <class Case>
FusedAndReference expect_fused_matches_reference(const Case& c, const FusedProblem& p) {
  FusedAndReference r;
  r.got = fused_forward(p);
  r.got_grads = fused_backward(p, r.got);
  r.want = reference::attention(p.q, p.k, p.v, p.params);
  r.want_grads = reference::attention_backward(p.q, p.k, p.v, p.params, r.want, p.dout);
  expect_forward_close(r.got, r.want, unit_input_bound(c));
  expect_grads_close(r.got_grads, r.want_grads, unit_input_bound(c));
  return r;
}

// Weights the reference gives exactly 0 (masked keys, fully masked rows) must be exactly 0.
inline ::testing::AssertionResult masked_weights_zero(const Tensor& got, const Tensor& want) {
  const std::vector<double> g = got.to_vector(), w = want.to_vector();
  for (size_t e = 0; e < w.size(); ++e)
    if (w[e] == 0.0 && g[e] != 0.0)
      return ::testing::AssertionFailure()
             << "weights element " << e << " = " << g[e] << " where the reference has 0";
  return ::testing::AssertionSuccess();
}

}  // namespace attn::testing
