// Dropout in the fused dot-product kernels (flash forward and backward): the keep decision of
// (b, h, i, j) is attn::dropout_keep (attn/random.h), regenerated in the backward, and lse is the
// one before dropout. Checked on every SIMD target against the float64 reference (forward and
// gradients), and for the keep pattern itself against the composed path element by element.
//
// Tolerances: support/fused_checks.h, times the dropout scale 1 / (1 - p) that multiplies every
// kept probability.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "attention_validate.h"
#include "attn/attention.h"
#include "attn/random.h"
#include "attn/reference.h"
#include "kernels/composed/attention_composed.h"
#include "kernels/common/dropout_mask.h"
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

using attn::AttentionGrads;
using attn::AttentionOutput;
using attn::AttentionParams;
using attn::DType;
using attn::Shape;
using attn::Tensor;

constexpr int64_t kUnbounded = attn::Window::unbounded;

struct Case {
  int64_t B = 1, Hq = 2, Hkv = 1, Tq = 0, Tk = 0, D = 16, Dv = 16;
  std::vector<int64_t> key_lengths, query_lengths;
  bool causal = false, bottom_right = false;
  int64_t left = kUnbounded, right = kUnbounded;
  Shape bias_shape;
  double p = 0.3;
  uint64_t seed = 1;

  std::string str() const {
    std::string s = attn::testing::sizes_str(*this) + attn::testing::interval_masks_str(*this) +
                    " dropout=" + std::to_string(p);
    if (!bias_shape.empty()) s += " bias" + attn::shape_str(bias_shape);
    return s;
  }
  double drop_scale() const { return 1.0 / (1.0 - p); }
};

using attn::testing::FusedProblem;
using attn::testing::fused_backward;
using attn::testing::fused_forward;

FusedProblem make_problem(const Case& c) {
  return attn::testing::make_fused_problem(c, [&](AttentionParams& params) {
    params.score = attn::ScaledDotScore{};
    params.mask.bias = attn::testing::random_bias(c, 1.0);
    params.dropout = {c.p, 1000 + c.seed};
  });
}

class FusedDropoutTest
    : public attn::testing::EveryTargetTest<attn::kernels::flash_backward_target_name> {
 protected:
  void check(const Case& c) {
    SCOPED_TRACE(target_label() + ": " + c.str());
    attn::testing::expect_fused_matches_reference(c, make_problem(c));
  }
};

TEST_P(FusedDropoutTest, SizeSweep) {
  const int64_t sizes[] = {1, 127, 128, 129};
  int n = 0;
  for (int64_t tq : sizes)
    for (int64_t tk : sizes) {
      const int64_t d = (n % 2 == 0) ? 17 : 64;
      check({.Tq = tq, .Tk = tk, .D = d, .Dv = d - 4, .p = n % 3 == 0 ? 0.5 : 0.2,
             .seed = static_cast<uint64_t>(++n)});
    }
}

TEST_P(FusedDropoutTest, MasksGroupedHeadsAndBias) {
  for (bool bottom_right : {false, true})
    check({.B = 2, .Hq = 4, .Hkv = 2, .Tq = 129, .Tk = 70, .D = 16, .Dv = 8,
           .key_lengths = {70, 31}, .query_lengths = {129, 60}, .causal = true,
           .bottom_right = bottom_right, .p = 0.4});
  check({.B = 2, .Hq = 2, .Tq = 100, .Tk = 130, .D = 32, .Dv = 32, .left = 20, .right = 3,
         .bias_shape = {2, 1, 100, 130}, .p = 0.25});
}

TEST_P(FusedDropoutTest, FullyMaskedRows) {
  // Bottom-right causal with Tq > Tk: the first rows see no key; and a batch without keys.
  check({.Tq = 150, .Tk = 40, .causal = true, .bottom_right = true});
  check({.B = 2, .Tq = 40, .Tk = 64, .key_lengths = {0, 64}});
}

// lse is the statistic before dropout: bitwise the same with and without it.
TEST_P(FusedDropoutTest, LseUnaffected) {
  const Case c{.Hq = 2, .Tq = 129, .Tk = 129, .causal = true, .p = 0.5};
  FusedProblem p = make_problem(c);
  const AttentionOutput with = fused_forward(p);
  p.params.dropout = {};
  const AttentionOutput without = fused_forward(p);
  EXPECT_TRUE(attn::testing::bitwise_equal(with.lse, without.lse, "lse"));
}

// The keep pattern, element by element: with V the identity (Tk = Dv), out[i][j] is the dropped
// probability P_ij keep_ij / (1 - p) itself, so the fused and composed outputs are exactly 0 at
// the same places, and the kept values agree.
TEST_P(FusedDropoutTest, SameKeepPatternAsComposed) {
  const Case c{.B = 2, .Hq = 3, .Tq = 129, .Tk = 130, .D = 16, .Dv = 130, .causal = true,
               .bottom_right = true, .p = 0.5};
  FusedProblem p = make_problem(c);
  std::vector<float> eye(static_cast<size_t>(c.B * c.Tk * c.Tk), 0.0f);
  for (int64_t b = 0; b < c.B; ++b)
    for (int64_t j = 0; j < c.Tk; ++j) eye[static_cast<size_t>((b * c.Tk + j) * c.Tk + j)] = 1.0f;
  std::memcpy(p.v.data<float>(), eye.data(), eye.size() * sizeof(float));
  const AttentionOutput fused = fused_forward(p);
  const AttentionOutput composed =
      attn::kernels::composed_attention_forward<float>(p.dims, p.q, p.k, p.v, p.params);
  const std::vector<double> f = fused.out.to_vector(), m = composed.out.to_vector();
  int64_t kept = 0, dropped = 0;
  for (size_t e = 0; e < f.size(); ++e) {
    ASSERT_EQ(f[e] == 0.0, m[e] == 0.0) << "element " << e << ": fused " << f[e]
                                        << ", composed " << m[e];
    (f[e] == 0.0 ? dropped : kept) += 1;
  }
  EXPECT_GT(kept, 0);
  EXPECT_GT(dropped, 0);
  const auto tol = attn::testing::dot_forward_tolerance(attn::testing::unit_input_bound(c));
  EXPECT_TRUE(attn::testing::all_close(fused.out, composed.out, tol, "out"));
}

ATTN_INSTANTIATE_ON_EVERY_SIMD_TARGET(FusedDropoutTest);

// The kernels' split hash (per-row key, one 32-bit round per key) is attn::dropout_keep bit for
// bit; the SIMD round of dropout_mask-inl.h is checked through the kernels above, on every
// target, against the composed path's dropout_keep element by element.
TEST(DropoutMask, MatchesRandomH) {
  for (double p : {0.1, 1.0 / 3.0, 0.5, 0.9, 1.0 - 1.0 / 16777216.0})
    for (uint64_t seed : {uint64_t{0}, uint64_t{42}, ~uint64_t{0}}) {
      const attn::kernels::DropoutMask mask(p, seed);
      ASSERT_TRUE(mask.active());
      EXPECT_EQ(mask.scale(), static_cast<float>(1.0 / (1.0 - p)));
      EXPECT_EQ(mask.threshold(), static_cast<uint32_t>(std::ceil(p * 16777216.0))) << "p " << p;
      // The 32-bit halves the SIMD round loads are the row keys; padding lanes get key 0.
      uint32_t lo[5], hi[5];
      mask.fill_row_keys(1, 2, 7, 3, 5, lo, hi);
      for (int64_t lane = 0; lane < 5; ++lane) {
        const uint64_t key = lane < 3 ? mask.row(1, 2, 7 + lane) : 0;
        EXPECT_EQ(lo[lane], static_cast<uint32_t>(key));
        EXPECT_EQ(hi[lane], static_cast<uint32_t>(key >> 32));
      }
      int64_t kept = 0;
      for (int64_t b = 0; b < 3; ++b)
        for (int64_t h = 0; h < 4; ++h)
          for (int64_t i = 0; i < 40; i += 3) {
            const uint64_t row = mask.row(b, h, i);
            for (int64_t j = 0; j < 200; ++j) {
              const bool want = attn::dropout_keep(seed, p, static_cast<uint64_t>(b),
                                                   static_cast<uint64_t>(h),
                                                   static_cast<uint64_t>(i),
                                                   static_cast<uint64_t>(j));
              ASSERT_EQ(mask.keep(row, j), want) << "p " << p << " seed " << seed << " (" << b
                                                 << ", " << h << ", " << i << ", " << j << ")";
              kept += want;
            }
          }
      // Roughly 1 - p of 33600 decisions kept (a sanity check of the test itself).
      EXPECT_NEAR(static_cast<double>(kept) / 33600.0, 1.0 - p, 0.02) << "p " << p;
    }
  EXPECT_FALSE(attn::kernels::DropoutMask(0.0, 7).active());
}

// The front-end now runs dropout on the fused kernels: attention() and attention_backward() with
// enough query rows return exactly what the fused glue returns.
TEST(FusedDropoutFrontEnd, DispatchesToFusedKernels) {
  const Case c{.B = 2, .Hq = 4, .Hkv = 2, .Tq = 64, .Tk = 100, .D = 32, .Dv = 16,
               .causal = true, .p = 0.3};
  const FusedProblem p = make_problem(c);
  const AttentionOutput front = attn::attention(p.q, p.k, p.v, p.params);
  const AttentionOutput fused = fused_forward(p);
  const AttentionGrads front_g =
      attn::attention_backward(p.q, p.k, p.v, p.params, front, p.dout);
  const AttentionGrads fused_g = fused_backward(p, fused);
  EXPECT_TRUE(attn::testing::bitwise_equal(front.out, fused.out, "out"));
  EXPECT_TRUE(attn::testing::bitwise_equal(front_g.dk, fused_g.dk, "dk"));
  EXPECT_TRUE(attn::testing::bitwise_equal(front_g.dv, fused_g.dv, "dv"));
}

}  // namespace
