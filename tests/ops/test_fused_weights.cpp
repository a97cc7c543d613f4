// Weights on request from the fused kernels: return_weights = true runs a second pass of the
// flash (dot, scaled dot, and through the dot form general and cosine) and additive/concat
// kernels that recomputes the scores and writes the softmax probabilities, instead of falling
// back to the composed path. Checked against the float64 reference (attn::reference) on every
// SIMD target: Tq, Tk in {0, 1, 127, 128, 129}, odd head dims, Tq != Tk, causal in both
// alignments, key and query lengths, grouped-query heads, bias and ALiBi, fully masked rows.
//
// Tolerance (as in test_flash_attention.cpp): a score carries an absolute error
// ~ u (sqrt(D) + |s|_max) (plus the tanh's few ulps per hidden unit for additive scores); a
// probability p_j moves by p_j (ds_j - sum p ds) <= 2 p_j max|ds|, and the sums add
// ~ u sqrt(Tk). Masked weights and fully masked rows must be exactly 0.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "attention_dot_form.h"
#include "attention_validate.h"
#include "attn/attention.h"
#include "attn/reference.h"
#include "kernels/additive/additive_attention.h"
#include "kernels/flash/flash_attention.h"
#include "support/bitwise_equal.h"
#include "support/fused_checks.h"
#include "support/simd_targets.h"
#include "support/test_support.h"

// GCC 12 warns about members left to their default initialisers in designated initialisers
// (GCC bug 96868); every member of Case below has a default.
#pragma GCC diagnostic ignored "-Wmissing-field-initializers"

namespace {

using attn::AttentionOutput;
using attn::AttentionParams;
using attn::DType;
using attn::Shape;
using attn::Tensor;

constexpr int64_t kUnbounded = attn::Window::unbounded;

enum class ScoreKind { scaled_dot, dot, general, cosine, additive, concat };

struct Case {
  ScoreKind kind = ScoreKind::scaled_dot;
  int64_t B = 1, Hq = 2, Hkv = 1, Tq = 0, Tk = 0, D = 8, Dv = 8;
  std::vector<int64_t> key_lengths, query_lengths;
  bool causal = false, bottom_right = false;
  int64_t left = kUnbounded, right = kUnbounded;
  Shape bias_shape;  // empty: no bias
  bool alibi = false;
  uint64_t seed = 1;

  std::string str() const {
    static const char* kinds[] = {"scaled_dot", "dot", "general", "cosine", "additive", "concat"};
    std::string s = std::string(kinds[static_cast<int>(kind)]) + " " +
                    attn::testing::sizes_str(*this) + attn::testing::interval_masks_str(*this);
    if (!bias_shape.empty()) s += " bias" + attn::shape_str(bias_shape);
    if (alibi) s += " alibi";
    return s;
  }
  bool additive() const { return kind == ScoreKind::additive || kind == ScoreKind::concat; }
};

struct Problem {
  Tensor q, k, v;
  AttentionParams params;
  double sum_abs_v = 0.0;  // additive: sum |v_a|, the scale of the tanh's error in a score
};

// Uniform in +-1/sqrt(fan_in): O(1) projections.
Tensor param(const Shape& shape, uint64_t seed, int64_t fan_in) {
  const double r = 1.0 / std::sqrt(static_cast<double>(std::max<int64_t>(fan_in, 1)));
  return attn::testing::random_tensor(shape, DType::f32, seed, -r, r);
}

Problem make_problem(const Case& c) {
  Problem p;
  p.q = attn::testing::random_tensor({c.B, c.Hq, c.Tq, c.D}, DType::f32, c.seed);
  p.k = attn::testing::random_tensor({c.B, c.Hkv, c.Tk, c.D}, DType::f32, c.seed + 1);
  p.v = attn::testing::random_tensor({c.B, c.Hkv, c.Tk, c.Dv}, DType::f32, c.seed + 2);
  const int64_t A = 12;  // hidden width of the additive scores
  switch (c.kind) {
    case ScoreKind::scaled_dot: p.params.score = attn::ScaledDotScore{}; break;
    case ScoreKind::dot: p.params.score = attn::DotScore{}; break;
    case ScoreKind::general:
      p.params.score = attn::GeneralScore{param({c.D, c.D}, c.seed + 3, c.D), {}, {}};
      break;
    case ScoreKind::cosine:
      p.params.score = attn::CosineScore{Tensor::full({1}, 5.0, DType::f32), 1e-8};
      break;
    case ScoreKind::additive:
      p.params.score = attn::AdditiveScore{param({A, c.D}, c.seed + 3, c.D),
                                           param({A, c.D}, c.seed + 4, c.D),
                                           param({A}, c.seed + 5, 4), param({A}, c.seed + 6, 1)};
      break;
    case ScoreKind::concat:
      p.params.score = attn::ConcatScore{param({A, 2 * c.D}, c.seed + 3, 2 * c.D),
                                         param({A}, c.seed + 6, 1)};
      break;
  }
  if (c.additive()) {
    const attn::Score& s = p.params.score;
    const Tensor& v = c.kind == ScoreKind::additive ? std::get<attn::AdditiveScore>(s).v
                                                    : std::get<attn::ConcatScore>(s).v;
    for (double x : v.to_vector()) p.sum_abs_v += std::abs(x);
  }
  attn::Mask& m = p.params.mask;
  attn::testing::set_interval_masks(c, m);
  if (!c.bias_shape.empty())
    m.bias = attn::testing::random_tensor(c.bias_shape, DType::f32, c.seed + 7, -2.0, 2.0);
  if (c.alibi) m.alibi_slopes = attn::alibi_slopes(c.Hq);
  p.params.return_weights = true;
  return p;
}

// The fused kernel's glue, called directly so that every Tq (also below the front-end's
// fused-path threshold) runs on it.
AttentionOutput run_fused(const Case& c, const Problem& p) {
  const AttentionParams params = attn::detail::convert_params(p.params, DType::f32);
  const attn::detail::AttentionDims dims =
      attn::detail::validate_attention("attention", p.q, p.k, p.v, params);
  if (c.additive()) {
    EXPECT_TRUE(attn::kernels::additive_attention_supported(DType::f32, params));
    return attn::kernels::additive_attention_forward(dims, p.q, p.k, p.v, params);
  }
  if (c.kind == ScoreKind::general || c.kind == ScoreKind::cosine) {
    const auto form = attn::detail::to_dot_form(dims, p.q, p.k, params);
    EXPECT_TRUE(form.has_value());
    if (!form) return {};
    EXPECT_TRUE(attn::kernels::flash_attention_supported(DType::f32, form->params));
    return attn::kernels::flash_attention(form->dims, form->q, form->k, p.v, form->params);
  }
  EXPECT_TRUE(attn::kernels::flash_attention_supported(DType::f32, params));
  return attn::kernels::flash_attention(dims, p.q, p.k, p.v, params);
}

// Largest |score| over visible keys, read back from the reference: s_ij = lse_i + log w_ij.
double max_abs_score(const AttentionOutput& ref, int64_t Tk) {
  const std::vector<double> w = ref.weights.to_vector(), lse = ref.lse.to_vector();
  double m = 0.0;
  for (size_t row = 0; row < lse.size(); ++row)
    for (int64_t j = 0; j < Tk; ++j) {
      const double p = w[row * static_cast<size_t>(Tk) + static_cast<size_t>(j)];
      if (p > 0.0) m = std::max(m, std::abs(lse[row] + std::log(p)));
    }
  return m;
}

attn::testing::Tolerance tolerance(const Case& c, const Problem& p, double max_abs_s) {
  const double u = attn::testing::unit_roundoff(DType::f32);
  const double sums = attn::testing::tolerance_for(DType::f32, c.D + c.Tk + 1).atol;
  // The additive kernel's tanh: ~4 ulp per hidden unit, weighted by |v_a|.
  const double bound = sums + 16.0 * u * (2.0 * max_abs_s + 8.0 * p.sum_abs_v);
  return {bound, bound};
}

using attn::testing::masked_weights_zero;

class FusedWeightsTest
    : public attn::testing::EveryTargetTest<attn::kernels::flash_attention_target_name> {
 protected:
  void check(const Case& c) {
    SCOPED_TRACE(target_label() + ": " + c.str());
    const Problem p = make_problem(c);
    const AttentionOutput got = run_fused(c, p);
    const AttentionOutput want = attn::reference::attention(p.q, p.k, p.v, p.params);
    ASSERT_TRUE(got.weights.defined() && got.mean_weights.defined());
    EXPECT_EQ(got.weights.shape(), (Shape{c.B, c.Hq, c.Tq, c.Tk}));
    EXPECT_EQ(got.mean_weights.shape(), (Shape{c.B, c.Tq, c.Tk}));
    const auto tol = tolerance(c, p, max_abs_score(want, c.Tk));
    EXPECT_TRUE(attn::testing::all_close(got.out, want.out, tol, "out"));
    EXPECT_TRUE(attn::testing::all_close(got.weights, want.weights, tol, "weights"));
    EXPECT_TRUE(attn::testing::all_close(got.mean_weights, want.mean_weights, tol, "mean"));
    EXPECT_TRUE(masked_weights_zero(got.weights, want.weights));
    EXPECT_TRUE(masked_weights_zero(got.mean_weights, want.mean_weights));
  }
};

const int64_t kSizes[] = {0, 1, 127, 128, 129};
const ScoreKind kKinds[] = {ScoreKind::scaled_dot, ScoreKind::dot,      ScoreKind::general,
                            ScoreKind::cosine,     ScoreKind::additive, ScoreKind::concat};

TEST_P(FusedWeightsTest, SizeSweepEveryScore) {
  int n = 0;
  for (int64_t tq : kSizes)
    for (int64_t tk : kSizes) {
      const ScoreKind kind = kKinds[n % 6];
      const int64_t d = (n % 3 == 0) ? 1 : (n % 3 == 1 ? 33 : 64);
      check({.kind = kind, .Tq = tq, .Tk = tk, .D = d, .Dv = d + 2,
             .seed = static_cast<uint64_t>(++n)});
    }
}

TEST_P(FusedWeightsTest, CausalLengthsAndGroupedHeads) {
  for (ScoreKind kind : kKinds)
    for (bool bottom_right : {false, true}) {
      check({.kind = kind, .B = 2, .Hq = 4, .Hkv = 2, .Tq = 129, .Tk = 70, .D = 17, .Dv = 9,
             .key_lengths = {70, 33}, .causal = true, .bottom_right = bottom_right});
      check({.kind = kind, .B = 2, .Hq = 3, .Hkv = 1, .Tq = 50, .Tk = 131, .D = 16, .Dv = 16,
             .query_lengths = {50, 7}, .causal = true, .bottom_right = bottom_right,
             .left = 20});
    }
}

TEST_P(FusedWeightsTest, BiasAndAlibi) {
  for (bool causal : {false, true})
    check({.B = 2, .Hq = 4, .Hkv = 2, .Tq = 100, .Tk = 129, .D = 32, .Dv = 32, .causal = causal,
           .bias_shape = {2, 1, 100, 129}, .alibi = true});
  check({.kind = ScoreKind::additive, .Hq = 4, .Hkv = 2, .Tq = 100, .Tk = 129, .D = 32,
         .Dv = 32, .causal = true, .alibi = true});
}

TEST_P(FusedWeightsTest, FullyMaskedRows) {
  for (ScoreKind kind : {ScoreKind::scaled_dot, ScoreKind::concat}) {
    // Bottom-right with Tq > Tk: the first Tq - Tk rows see no key.
    check({.kind = kind, .Tq = 200, .Tk = 60, .D = 8, .Dv = 8, .causal = true,
           .bottom_right = true});
    // A batch without keys, and query rows past the query length.
    check({.kind = kind, .B = 2, .Tq = 40, .Tk = 64, .D = 8, .Dv = 8, .key_lengths = {0, 64},
           .query_lengths = {40, 17}});
  }
}

ATTN_INSTANTIATE_ON_EVERY_SIMD_TARGET(FusedWeightsTest);

// The front-end no longer falls back: with return_weights and enough query rows, attention()
// returns exactly what the fused glue returns (the composed path would differ in the last bits).
TEST(FusedWeightsFrontEnd, DispatchesToFusedKernels) {
  for (ScoreKind kind : {ScoreKind::scaled_dot, ScoreKind::additive}) {
    const Case c{.kind = kind, .B = 2, .Hq = 4, .Hkv = 2, .Tq = 64, .Tk = 100, .D = 32,
                 .Dv = 16, .causal = true, .bottom_right = true};
    SCOPED_TRACE(c.str());
    const Problem p = make_problem(c);
    const AttentionOutput front = attn::attention(p.q, p.k, p.v, p.params);
    const AttentionOutput fused = run_fused(c, p);
    EXPECT_TRUE(attn::testing::bitwise_equal(front.out, fused.out, "out"));
    EXPECT_TRUE(attn::testing::bitwise_equal(front.weights, fused.weights, "weights"));
    EXPECT_TRUE(
        attn::testing::bitwise_equal(front.mean_weights, fused.mean_weights, "mean_weights"));
  }
}

// The weights pass must not change out or lse: a forward with weights is bitwise the forward
// without.
TEST(FusedWeightsFrontEnd, OutputUnchangedByWeightsPass) {
  for (ScoreKind kind : {ScoreKind::scaled_dot, ScoreKind::concat}) {
    const Case c{.kind = kind, .Hq = 2, .Tq = 129, .Tk = 129, .D = 24, .Dv = 24,
                 .causal = true};
    SCOPED_TRACE(c.str());
    Problem p = make_problem(c);
    const AttentionOutput with = run_fused(c, p);
    p.params.return_weights = false;
    const AttentionOutput without = run_fused(c, p);
    EXPECT_FALSE(without.weights.defined());
    EXPECT_TRUE(attn::testing::bitwise_equal(with.out, without.out, "out"));
    EXPECT_TRUE(attn::testing::bitwise_equal(with.lse, without.lse, "lse"));
  }
}

}  // namespace
