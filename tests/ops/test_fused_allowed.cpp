// Boolean `allowed` masks in the fused dot-product kernels (flash forward, backward and the
// weights pass): read tile by tile through broadcast strides instead of falling back to the
// composed path. On every SIMD target against the float64 reference: every broadcast shape,
// combined with causal masks, key lengths, grouped-query heads, a bias, dropout and returned
// weights; rows the mask hides entirely give 0 output, lse -inf and 0 gradients.
//
// Tolerances: support/fused_checks.h, times the dropout scale where dropout is on.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "attention_validate.h"
#include "attn/attention.h"
#include "attn/reference.h"
#include "kernels/flash/flash_attention.h"
#include "kernels/flash/flash_backward.h"
#include "support/bitwise_equal.h"
#include "support/fused_checks.h"
#include "support/simd_targets.h"
#include "support/test_support.h"

// GCC 12 warns about members left to their default initialisers in designated initialisers
// (GCC bug 96868); every member of Case below has a default.
#pragma GCC diagnostic ignored "-Wmissing-field-initializers"

namespace {

using attn::AttentionOutput;
using attn::DType;
using attn::Shape;
using attn::Tensor;

constexpr int64_t kUnbounded = attn::Window::unbounded;

struct Case {
  int64_t B = 2, Hq = 2, Hkv = 1, Tq = 0, Tk = 0, D = 16, Dv = 16;
  Shape allowed_shape;     // right-aligned broadcast against [B, Hq, Tq, Tk]
  double density = 0.7;    // fraction of allowed entries
  bool hide_first_row = false;  // the mask's first row (all its broadcast copies) all false
  std::vector<int64_t> key_lengths, query_lengths;
  bool causal = false, bottom_right = false;
  int64_t left = kUnbounded, right = kUnbounded;
  Shape bias_shape;
  double dropout = 0.0;
  uint64_t seed = 1;

  std::string str() const {
    std::string s = attn::testing::sizes_str(*this) + " allowed" +
                    attn::shape_str(allowed_shape) + attn::testing::interval_masks_str(*this);
    if (hide_first_row) s += " hidden_first_row";
    if (!bias_shape.empty()) s += " bias" + attn::shape_str(bias_shape);
    if (dropout > 0.0) s += " dropout=" + std::to_string(dropout);
    return s;
  }
  double drop_scale() const { return 1.0 / (1.0 - dropout); }
};

Tensor random_mask(const Case& c) {
  const Tensor u = attn::testing::random_tensor(c.allowed_shape, DType::f64, c.seed + 5, 0, 1);
  Tensor m = Tensor::empty(c.allowed_shape, DType::b8);
  bool* out = m.data<bool>();
  const double* x = u.data<double>();
  const int64_t cols = c.allowed_shape.back();
  const int64_t rows = c.allowed_shape.size() >= 2 ? c.allowed_shape.end()[-2] : 1;
  for (int64_t e = 0; e < m.numel(); ++e) {
    const bool first_row = (e / cols) % rows == 0;
    out[e] = x[e] < c.density && !(c.hide_first_row && first_row);
  }
  return m;
}

attn::testing::FusedProblem make_problem(const Case& c) {
  return attn::testing::make_fused_problem(c, [&](attn::AttentionParams& params) {
    params.score = attn::ScaledDotScore{};
    params.mask.allowed = random_mask(c);
    params.mask.bias = attn::testing::random_bias(c, 1.0);
    params.dropout = {c.dropout, 77 + c.seed};
    params.return_weights = true;
  });
}

class FusedAllowedTest
    : public attn::testing::EveryTargetTest<attn::kernels::flash_attention_target_name> {
 protected:
  void check(const Case& c) {
    SCOPED_TRACE(target_label() + ": " + c.str());
    const attn::testing::FusedProblem p = make_problem(c);
    ASSERT_TRUE(attn::kernels::flash_attention_supported(DType::f32, p.params));
    ASSERT_TRUE(attn::kernels::flash_backward_supported(DType::f32, p.params));
    const auto [got, want, got_g, want_g] = attn::testing::expect_fused_matches_reference(c, p);
    // Entries the mask hides: weights exactly 0; rows it hides entirely: out and dq exactly 0.
    const std::vector<double> w = want.weights.to_vector(), gw = got.weights.to_vector();
    for (size_t e = 0; e < w.size(); ++e) {
      if (w[e] == 0.0) {
        ASSERT_EQ(gw[e], 0.0) << "weights element " << e;
      }
    }
    const std::vector<double> lse = want.lse.to_vector(), out = got.out.to_vector(),
                              dq = got_g.dq.to_vector();
    for (size_t row = 0; row < lse.size(); ++row) {
      if (!(std::isinf(lse[row]) && lse[row] < 0)) continue;
      ASSERT_EQ(got.lse.to_vector()[row], -std::numeric_limits<double>::infinity()) << row;
      for (size_t e = 0; e < static_cast<size_t>(c.Dv); ++e)
        ASSERT_EQ(out[row * static_cast<size_t>(c.Dv) + e], 0.0) << "row " << row;
      for (size_t e = 0; e < static_cast<size_t>(c.D); ++e)
        ASSERT_EQ(dq[row * static_cast<size_t>(c.D) + e], 0.0) << "row " << row;
    }
  }
};

TEST_P(FusedAllowedTest, BroadcastShapes) {
  const int64_t B = 2, H = 2, Tq = 129, Tk = 70;
  const Shape shapes[] = {{B, H, Tq, Tk}, {Tq, Tk}, {B, 1, 1, Tk}, {H, Tq, 1},
                          {B, 1, Tq, Tk}, {1, H, 1, Tk}};
  int n = 0;
  for (const Shape& shape : shapes)
    check({.B = B, .Hq = H, .Tq = Tq, .Tk = Tk, .D = 17, .Dv = 9, .allowed_shape = shape,
           .seed = static_cast<uint64_t>(++n)});
}

TEST_P(FusedAllowedTest, SizesAndDensities) {
  const int64_t sizes[] = {1, 127, 128, 129};
  int n = 0;
  for (int64_t tq : sizes)
    for (int64_t tk : sizes) {
      const double density = (n % 3 == 0) ? 0.05 : 0.8;
      check({.B = 1, .Tq = tq, .Tk = tk, .D = 32, .Dv = 32, .allowed_shape = {tq, tk},
             .density = density, .seed = static_cast<uint64_t>(++n)});
    }
}

TEST_P(FusedAllowedTest, WithOtherMasksBiasAndDropout) {
  for (bool bottom_right : {false, true})
    check({.Hq = 4, .Hkv = 2, .Tq = 100, .Tk = 130, .D = 16, .Dv = 16,
           .allowed_shape = {2, 4, 100, 130}, .key_lengths = {130, 40}, .causal = true,
           .bottom_right = bottom_right});
  check({.Tq = 64, .Tk = 200, .D = 16, .Dv = 16, .allowed_shape = {64, 200}, .left = 30,
         .bias_shape = {2, 1, 64, 200}, .dropout = 0.3});
}

TEST_P(FusedAllowedTest, RowsHiddenByTheMask) {
  check({.Tq = 129, .Tk = 64, .allowed_shape = {2, 1, 129, 64}, .hide_first_row = true});
  check({.Tq = 50, .Tk = 50, .allowed_shape = {50, 50}, .density = 0.01});
}

ATTN_INSTANTIATE_ON_EVERY_SIMD_TARGET(FusedAllowedTest);

// The front-end runs an `allowed` mask on the fused kernels: attention() with enough query rows
// returns exactly what the fused glue returns.
TEST(FusedAllowedFrontEnd, DispatchesToFusedKernels) {
  const Case c{.Hq = 4, .Hkv = 2, .Tq = 64, .Tk = 100, .D = 32, .Dv = 16,
               .allowed_shape = {2, 1, 64, 100}, .causal = true};
  const attn::testing::FusedProblem p = make_problem(c);
  const AttentionOutput front = attn::attention(p.q, p.k, p.v, p.params);
  const AttentionOutput fused = attn::kernels::flash_attention(p.dims, p.q, p.k, p.v, p.params);
  EXPECT_TRUE(attn::testing::bitwise_equal(front.out, fused.out, "out"));
}

}  // namespace
