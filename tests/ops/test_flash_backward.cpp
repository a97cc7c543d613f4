// Fused dot-product attention backward (src/kernels/flash/flash_backward.*) against the library's
// float64 oracle, attn::reference::attention_backward, on every Highway target this machine
// supports (the test name carries the target). Sweeps Tq, Tk in {0, 1, 2, 3, 127, 128, 129, 513},
// head dims {1, 3, 59, 64, 128} (Dv != D too), grouped-query heads, causal masks in both
// alignments with Tq != Tk, windows, key and query lengths, bias broadcasts (dbias reduced to the
// bias's shape), ALiBi, fully masked rows (exactly 0 gradients), and run-to-run determinism.
//
// The fused backward is fed the float32 forward (attn::attention), the oracle its own float64
// forward, so the bound covers both passes.
//
// Tolerance (forward error analysis, u = 2^-24): a recomputed score carries an absolute error
// ~ u (sqrt(D) + |s|_max) (products, bias, ALiBi, and lse's own error of the same size), which
// perturbs every P_ij relatively by that much and so every gradient by that fraction of its
// magnitude; the chained reductions (dO.V over Dv, D_i over Dv, then dQ over Tk keys, dK and dV
// over Tq rows, dbias over the broadcast dimensions) add ~ u sqrt(terms) of the size of the
// terms, at most max(1, |grad|_max) here (inputs in [-1, 1]). Hence
//   bound = tolerance_for(f32, D + Dv + Tq + Tk) + 32 u |s|_max, times max(1, |grad|_max).
#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <ostream>
#include <string>
#include <utility>
#include <vector>

#include "attention_validate.h"
#include "attn/attention.h"
#include "attn/reference.h"
#include "kernels/composed/attention_composed.h"
#include "kernels/flash/flash_backward.h"
#include "kernels/common/simd_target.h"
#include "support/bitwise_equal.h"
#include "support/fused_checks.h"
#include "support/simd_targets.h"
#include "support/test_support.h"

// GCC 12 warns about members left to their default initialisers in designated initialisers
// (GCC bug 96868); every member of Case (FlashCase) has a default.
#pragma GCC diagnostic ignored "-Wmissing-field-initializers"

namespace {

using attn::DType;
using attn::Shape;
using attn::Tensor;

constexpr int64_t kUnbounded = attn::Window::unbounded;

using Case = attn::testing::FlashCase;
using Problem = attn::testing::FusedProblem;

Problem make_problem(const Case& c) {
  return attn::testing::make_fused_problem(c, [&](attn::AttentionParams& params) {
    if (c.scale < 0.0)
      params.score = attn::DotScore{};
    else
      params.score = attn::ScaledDotScore{c.scale == 0.0 ? std::nullopt
                                                       : std::optional<double>(c.scale)};
    params.mask.bias = attn::testing::random_bias(c, c.bias_range);
    if (c.alibi) params.mask.alibi_slopes = attn::alibi_slopes(c.Hq);
  });
}

attn::AttentionGrads run_fused(const Problem& p, const attn::AttentionOutput& forward) {
  const attn::AttentionParams params = attn::detail::convert_params(p.params, DType::f32);
  EXPECT_TRUE(attn::kernels::flash_backward_supported(DType::f32, params));
  return attn::kernels::flash_attention_backward(p.dims, p.q, p.k, p.v, params, forward, p.dout);
}

// Largest |score| the inputs allow: |scale q.k| <= scale D, plus |bias|, plus ALiBi's
// slope * distance (slopes <= 1/2, distance < Tq + Tk).
double max_abs_score(const Case& c) {
  double s = c.scale_value() * static_cast<double>(c.D);
  if (!c.bias_shape.empty()) s += c.bias_range;
  if (c.alibi) s += 0.5 * static_cast<double>(c.Tq + c.Tk);
  return s;
}

attn::testing::DotBound bound_of(const Case& c) {
  return {.B = c.B, .Hq = c.Hq, .Tq = c.Tq, .Tk = c.Tk, .D = c.D, .Dv = c.Dv,
          .max_abs_score = max_abs_score(c)};
}

// Rows and keys that no mask lets through must get exactly 0, not merely small values: dq rows
// whose oracle lse is -inf (fully masked), and dk / dv rows of keys whose oracle dv row is all 0
// (seen by no query: dv_j = sum_i P_ij dO_i is never exactly 0 otherwise). An exact 0 of the
// oracle elsewhere is not a mask (Tk = 1 gives dq = dk = 0 up to rounding) and is not checked.
::testing::AssertionResult exact_zero_rows(const Tensor& got, const Tensor& masked_when_zero,
                                           const Tensor& lse, const std::string& what) {
  const std::vector<double> g = got.to_vector(), w = masked_when_zero.to_vector();
  const std::vector<double> l = lse.defined() ? lse.to_vector() : std::vector<double>{};
  const int64_t rows = got.numel() == 0 ? 0 : got.numel() / got.size(got.dim() - 1);
  const size_t width = rows == 0 ? 0 : static_cast<size_t>(got.size(got.dim() - 1));
  const size_t ref_width = rows == 0 ? 0 : w.size() / static_cast<size_t>(rows);
  for (size_t r = 0; r < static_cast<size_t>(rows); ++r) {
    bool masked;
    if (!l.empty()) {
      masked = std::isinf(l[r]) && l[r] < 0;
    } else {
      masked = true;
      for (size_t e = 0; e < ref_width; ++e) masked = masked && w[r * ref_width + e] == 0.0;
    }
    if (!masked) continue;
    for (size_t e = 0; e < width; ++e)
      if (g[r * width + e] != 0.0)
        return ::testing::AssertionFailure() << what << " row " << r << " column " << e << " = "
                                             << g[r * width + e] << " in a masked row, expected 0";
  }
  return ::testing::AssertionSuccess();
}

class FlashBackwardTest
    : public attn::testing::EveryTargetTest<attn::kernels::flash_backward_target_name> {
 protected:
  void check(const Case& c) {
    SCOPED_TRACE(target_label() + ": " + c.str());
    const Problem p = make_problem(c);
    const attn::AttentionOutput fwd = attn::attention(p.q, p.k, p.v, p.params);
    const attn::AttentionGrads got = run_fused(p, fwd);
    const attn::AttentionOutput ref_fwd = attn::reference::attention(p.q, p.k, p.v, p.params);
    const attn::AttentionGrads want =
        attn::reference::attention_backward(p.q, p.k, p.v, p.params, ref_fwd, p.dout);
    // dq, dk, dv and dbias (summed over every broadcast dimension: up to B Hq Tq Tk terms).
    attn::testing::expect_grads_close(got, want, bound_of(c));
    EXPECT_TRUE(exact_zero_rows(got.dq, want.dq, ref_fwd.lse, "dq"));
    EXPECT_TRUE(exact_zero_rows(got.dk, want.dv, Tensor{}, "dk"));
    EXPECT_TRUE(exact_zero_rows(got.dv, want.dv, Tensor{}, "dv"));
  }
};

TEST_P(FlashBackwardTest, SizeSweep) {
  const int64_t sizes[] = {0, 1, 2, 3, 127, 128, 129, 513};
  for (int64_t Tq : sizes)
    for (int64_t Tk : sizes) check({.Tq = Tq, .Tk = Tk, .D = 16, .Dv = 8});
}

TEST_P(FlashBackwardTest, HeadDims) {
  for (int64_t D : {1, 3, 59, 64, 128})
    for (int64_t Dv : {D, int64_t{3}, int64_t{64}})
      check({.Tq = 67, .Tk = 130, .D = D, .Dv = Dv, .seed = static_cast<uint64_t>(D + Dv)});
}

TEST_P(FlashBackwardTest, DotScoreAndExplicitScale) {
  check({.Tq = 50, .Tk = 70, .D = 24, .Dv = 24, .scale = -1.0});
  check({.Tq = 50, .Tk = 70, .D = 24, .Dv = 24, .scale = 0.37});
}

TEST_P(FlashBackwardTest, GroupedQueryHeads) {
  check({.B = 2, .Hq = 6, .Hkv = 2, .Tq = 40, .Tk = 97, .D = 32, .Dv = 16});
  check({.B = 1, .Hq = 4, .Hkv = 1, .Tq = 129, .Tk = 64, .D = 8, .Dv = 8, .causal = true});
}

TEST_P(FlashBackwardTest, CausalBothAlignments) {
  for (bool bottom_right : {false, true})
    for (auto [Tq, Tk] : {std::pair<int64_t, int64_t>{100, 100}, {70, 200}, {200, 70}, {1, 129}})
      check({.Tq = Tq, .Tk = Tk, .D = 32, .Dv = 32, .causal = true, .bottom_right = bottom_right});
}

TEST_P(FlashBackwardTest, Windows) {
  check({.Tq = 150, .Tk = 150, .D = 16, .Dv = 16, .left = 20, .right = 0});
  check({.Tq = 150, .Tk = 150, .D = 16, .Dv = 16, .left = 7, .right = 9});
  check({.Tq = 90, .Tk = 180, .D = 16, .Dv = 16, .causal = true, .bottom_right = true, .left = 33});
  check({.Tq = 150, .Tk = 150, .D = 16, .Dv = 16, .left = kUnbounded, .right = 5});
}

TEST_P(FlashBackwardTest, KeyAndQueryLengths) {
  check({.B = 3, .Tq = 80, .Tk = 120, .D = 16, .Dv = 16, .key_lengths = {120, 55, 0},
         .query_lengths = {80, 30, 80}});
  check({.B = 2, .Tq = 80, .Tk = 120, .D = 16, .Dv = 16, .key_lengths = {100, 7},
         .query_lengths = {60, 80}, .causal = true, .bottom_right = true});
}

TEST_P(FlashBackwardTest, BiasBroadcastsAndAlibi) {
  const Shape shapes[] = {{2, 2, 60, 90}, {2, 1, 60, 90}, {90}, {2, 1, 1, 90}, {60, 1}, {2, 1, 1}};
  for (const Shape& shape : shapes)
    check({.B = 2, .Tq = 60, .Tk = 90, .D = 16, .Dv = 16, .causal = true,
           .bottom_right = true, .bias_shape = shape});
  check({.Tq = 60, .Tk = 90, .D = 16, .Dv = 16, .bias_shape = {60, 90}, .alibi = true});
  check({.Tq = 130, .Tk = 130, .D = 16, .Dv = 16, .causal = true, .alibi = true});
}

TEST_P(FlashBackwardTest, FullyMaskedRows) {
  // Top-left causal with Tq > Tk under bottom-right alignment masks the first rows entirely;
  // a zero-length sequence masks a whole batch; a -inf bias row masks through the scores.
  check({.Tq = 100, .Tk = 40, .D = 16, .Dv = 16, .causal = true, .bottom_right = true});
  check({.B = 2, .Tq = 50, .Tk = 50, .D = 16, .Dv = 16, .key_lengths = {50, 0}});
  check({.Tq = 50, .Tk = 50, .D = 16, .Dv = 16, .left = 0, .right = 0, .seed = 3});
  Case c{.Tq = 60, .Tk = 60, .D = 16, .Dv = 16};
  const Problem p = make_problem(c);
  Problem masked = p;
  masked.params.mask.bias = Tensor::zeros({60, 1}, DType::f32);
  masked.params.mask.bias.data<float>()[7] = -std::numeric_limits<float>::infinity();
  const attn::AttentionOutput fwd = attn::attention(masked.q, masked.k, masked.v, masked.params);
  const attn::AttentionGrads got = run_fused(masked, fwd);
  for (int64_t h = 0; h < c.Hq; ++h)
    for (int64_t d = 0; d < c.D; ++d)
      ASSERT_EQ(got.dq.data<float>()[(h * c.Tq + 7) * c.D + d], 0.0f) << "head " << h;
}

TEST_P(FlashBackwardTest, RunToRunBitwiseIdentical) {
  const Case c{.B = 2, .Hq = 4, .Hkv = 2, .Tq = 200, .Tk = 300, .D = 40, .Dv = 24,
               .causal = true, .bias_shape = {300}};
  const Problem p = make_problem(c);
  const attn::AttentionOutput fwd = attn::attention(p.q, p.k, p.v, p.params);
  const int threads = omp_get_max_threads();
  const attn::AttentionGrads first = run_fused(p, fwd);
  const attn::AttentionGrads second = run_fused(p, fwd);
  using attn::testing::bitwise_equal;
  for (const auto& [a, b, name] : {std::tuple{first.dq, second.dq, "dq"},
                                   std::tuple{first.dk, second.dk, "dk"},
                                   std::tuple{first.dv, second.dv, "dv"},
                                   std::tuple{first.dbias, second.dbias, "dbias"}})
    EXPECT_TRUE(bitwise_equal(a, b, name))
        << name << " differs between two runs with " << threads << " threads";
  // dK and dV are owned by one work item each: identical for any thread count too.
  omp_set_num_threads(1);
  const attn::AttentionGrads single = run_fused(p, fwd);
  omp_set_num_threads(threads);
  EXPECT_TRUE(bitwise_equal(single.dk, first.dk, "dk with one thread"));
  EXPECT_TRUE(bitwise_equal(single.dv, first.dv, "dv with one thread"));
}

ATTN_INSTANTIATE_ON_EVERY_SIMD_TARGET(FlashBackwardTest);

TEST(FlashBackwardGlue, SupportedPredicate) {
  attn::AttentionParams params;
  EXPECT_TRUE(attn::kernels::flash_backward_supported(DType::f32, params));
  params.score = attn::DotScore{};
  EXPECT_TRUE(attn::kernels::flash_backward_supported(DType::f32, params));
  EXPECT_FALSE(attn::kernels::flash_backward_supported(DType::f64, params));
  params.dropout.p = 0.1;  // the keep mask is regenerated from the counter-based hash
  EXPECT_TRUE(attn::kernels::flash_backward_supported(DType::f32, params));
  params.dropout.p = 0.0;
  params.score = attn::CosineScore{};
  EXPECT_FALSE(attn::kernels::flash_backward_supported(DType::f32, params));
  params.score = attn::ScaledDotScore{};
  params.head_scores = {attn::DotScore{}};
  EXPECT_FALSE(attn::kernels::flash_backward_supported(DType::f32, params));
  params.head_scores.clear();
  params.mask.allowed = Tensor::full({1}, 1.0, DType::b8);  // read tile by tile
  EXPECT_TRUE(attn::kernels::flash_backward_supported(DType::f32, params));
  params.mask.local.kind = attn::LocalKind::monotonic;
  EXPECT_FALSE(attn::kernels::flash_backward_supported(DType::f32, params));
}

// The fused gradients against the composed backward too (the fallback the front-end uses for
// everything else; called directly, so this stays a fused-vs-composed check once
// attn::attention_backward dispatches to the fused kernel), on the same float32 forward.
TEST(FlashBackwardGlue, MatchesComposedPath) {
  const Case c{.B = 2, .Hq = 4, .Hkv = 2, .Tq = 65, .Tk = 130, .D = 32, .Dv = 32, .scale = 0.3,
               .key_lengths = {130, 100}, .causal = true, .bottom_right = true, .left = 50,
               .bias_shape = {2, 1, 65, 130}, .alibi = true};
  const Problem p = make_problem(c);
  const attn::AttentionOutput fwd = attn::attention(p.q, p.k, p.v, p.params);
  const attn::AttentionGrads got = run_fused(p, fwd);
  const attn::AttentionGrads composed = attn::kernels::composed_attention_backward<float>(
      p.dims, p.q, p.k, p.v, attn::detail::convert_params(p.params, DType::f32), fwd, p.dout);
  // Both are float32 from the same forward: each within the bound of the exact gradient, so
  // within twice it of each other.
  attn::testing::DotBound twice = bound_of(c);
  twice.factor = 2.0;
  attn::testing::expect_grads_close(got, composed, twice);
  EXPECT_TRUE(std::holds_alternative<attn::ScaledDotScore>(got.dscore));
}

// Query rows past query_lengths are padding: NaN there (in q and in dout) must reach no gradient,
// and the gradients must equal those of the same problem with zeros in the padding, bit for bit.
TEST(FlashBackwardGlue, NaNInHiddenQueryRowsDoesNotLeak) {
  const Case c{.B = 2, .Hq = 4, .Hkv = 2, .Tq = 30, .Tk = 40, .D = 32, .Dv = 32, .scale = 0.3,
               .query_lengths = {22, 30}};
  Problem clean = make_problem(c);
  Problem poisoned = make_problem(c);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const int64_t rows = c.Tq * c.D;
  for (int64_t h = 0; h < c.Hq; ++h) {
    float* q = poisoned.q.data<float>() + h * rows;
    float* dout = poisoned.dout.data<float>() + h * rows;
    float* q_zero = clean.q.data<float>() + h * rows;
    float* dout_zero = clean.dout.data<float>() + h * rows;
    std::fill(q + 22 * c.D, q + rows, nan);
    std::fill(dout + 22 * c.Dv, dout + rows, nan);
    std::fill(q_zero + 22 * c.D, q_zero + rows, 0.0f);
    std::fill(dout_zero + 22 * c.Dv, dout_zero + rows, 0.0f);
  }
  const attn::AttentionOutput fwd = attn::attention(clean.q, clean.k, clean.v, clean.params);
  const attn::AttentionGrads want = run_fused(clean, fwd);
  const attn::AttentionGrads got = run_fused(poisoned, fwd);
  const std::pair<const char*, std::pair<const Tensor*, const Tensor*>> grads[] = {
      {"dq", {&got.dq, &want.dq}}, {"dk", {&got.dk, &want.dk}}, {"dv", {&got.dv, &want.dv}}};
  for (const auto& [name, pair] : grads) {
    const std::vector<double> a = pair.first->to_vector(), b = pair.second->to_vector();
    ASSERT_EQ(a.size(), b.size()) << name;
    for (std::size_t i = 0; i < a.size(); ++i) {
      ASSERT_TRUE(std::isfinite(a[i])) << name << "[" << i << "] = " << a[i];
      ASSERT_EQ(a[i], b[i]) << name << "[" << i << "]";
    }
  }
}

}  // namespace
