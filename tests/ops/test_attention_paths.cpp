// attn::attention / attention_backward (the composed BLAS path) against the float64 plain-loop
// reference, in float32 and float64: every score kind, shape sweeps, every mask kind and their
// compositions, dropout, per-head scores, returned weights, and the numerical edge cases
// (fully masked rows, large logits, NaN rows, strided views, run-to-run determinism).
//
// Tolerances come from tolerance_for(dtype, terms): `terms` is the length of the longest
// reduction feeding an element (see Terms below), never one epsilon for everything.
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "attn/attention.h"
#include "attn/reference.h"
#include "support/attention_problem.h"
#include "support/test_support.h"

namespace attn {
namespace {

using testing::all_close;
using testing::make_inputs;
using testing::random_tensor;
using testing::score_tensors;
using testing::tolerance_for;
using testing::Tolerance;
using Sizes = testing::AttentionSizes;
using Inputs = testing::AttentionInputs;

constexpr DType kDtypes[] = {DType::f32, DType::f64};

// Parameters scaled by 1/sqrt(fan-in) so that scores stay O(1) and the softmax is not saturated.
Tensor param(const Shape& shape, DType dtype, uint64_t seed, double fan_in) {
  const double r = 1.0 / std::sqrt(fan_in);
  return random_tensor(shape, dtype, seed, -r, r);
}

constexpr int64_t kHidden = 6;  // A of additive/concat/local-p; r of low-rank general

enum class Kind { dot, scaled, general, low_rank, additive, additive_nobias, concat, cosine,
                  location, trilinear };
const std::vector<Kind> kAllKinds = {Kind::dot,      Kind::scaled,   Kind::general,
                                     Kind::low_rank, Kind::additive, Kind::additive_nobias,
                                     Kind::concat,   Kind::cosine,   Kind::location,
                                     Kind::trilinear};

const char* kind_name(Kind k) {
  static const char* names[] = {"dot",      "scaled_dot", "general",  "general_low_rank",
                                "additive", "additive_nobias", "concat", "cosine",
                                "location", "trilinear"};
  return names[static_cast<int>(k)];
}

Score make_score(Kind kind, const Sizes& s, DType dtype, uint64_t seed) {
  const double dq = static_cast<double>(s.Dq), dk = static_cast<double>(s.Dk);
  switch (kind) {
    case Kind::dot: return DotScore{};
    case Kind::scaled: return ScaledDotScore{};
    case Kind::general: return GeneralScore{param({s.Dq, s.Dk}, dtype, seed, dq), {}, {}};
    case Kind::low_rank:
      return GeneralScore{{}, param({kHidden, s.Dq}, dtype, seed, dq),
                          param({kHidden, s.Dk}, dtype, seed + 1, dk)};
    case Kind::additive:
      return AdditiveScore{param({kHidden, s.Dq}, dtype, seed, dq),
                           param({kHidden, s.Dk}, dtype, seed + 1, dk),
                           param({kHidden}, dtype, seed + 2, 4.0),
                           param({kHidden}, dtype, seed + 3, 1.0)};
    case Kind::additive_nobias:
      return AdditiveScore{param({kHidden, s.Dq}, dtype, seed, dq),
                           param({kHidden, s.Dk}, dtype, seed + 1, dk), {},
                           param({kHidden}, dtype, seed + 3, 1.0)};
    case Kind::concat:
      return ConcatScore{param({kHidden, s.Dq + s.Dk}, dtype, seed, dq + dk),
                         param({kHidden}, dtype, seed + 1, 1.0)};
    case Kind::cosine: return CosineScore{Tensor::full({1}, 4.0, dtype), 1e-8};
    case Kind::location: return LocationScore{param({s.Tk + 3, s.Dq}, dtype, seed, dq)};
    case Kind::trilinear: return TrilinearScore{param({3 * s.Dq}, dtype, seed, dq)};
  }
  return DotScore{};
}

struct Results {
  AttentionOutput out;
  AttentionGrads grads;
};

Results run_fast(const Inputs& in, const AttentionParams& p) {
  Results r;
  r.out = attention(in.q, in.k, in.v, p);
  r.grads = attention_backward(in.q, in.k, in.v, p, r.out, in.dout);
  return r;
}

// Forward and backward of the fast path against the reference. Tolerances: the reduction
// lengths of attention_problem.h, with the additive scores' hidden width among the widths.
void expect_matches_reference(const Sizes& s, const Inputs& in, const AttentionParams& p,
                              bool backward = true, double safety = testing::kDefaultSafety) {
  const DType dtype = in.q.dtype();
  const testing::ProblemTolerances tol =
      testing::tolerances_for(dtype, testing::terms_for(s, kHidden), safety);

  const AttentionOutput fast = attention(in.q, in.k, in.v, p);
  const AttentionOutput ref = reference::attention(in.q, in.k, in.v, p);
  ASSERT_EQ(fast.out.dtype(), dtype);
  testing::expect_outputs_match(fast, ref, tol, p.return_weights);
  if (!backward) return;

  const AttentionGrads g = attention_backward(in.q, in.k, in.v, p, fast, in.dout);
  const AttentionGrads r = reference::attention_backward(in.q, in.k, in.v, p, ref, in.dout);
  ASSERT_EQ(g.dq.dtype(), dtype);
  testing::expect_input_grads_match(g, r, tol);
  EXPECT_TRUE(testing::compare_scores(g.dscore, r.dscore, tol.param, "dscore"));
  ASSERT_EQ(g.dhead_scores.size(), r.dhead_scores.size());
  for (std::size_t h = 0; h < r.dhead_scores.size(); ++h)
    EXPECT_TRUE(testing::compare_scores(g.dhead_scores[h], r.dhead_scores[h], tol.param,
                                        "dhead_scores[" + std::to_string(h) + "]"));
  if (p.mask.local.kind == LocalKind::predictive) {
    EXPECT_TRUE(all_close(g.dlocal.w_p, r.dlocal.w_p, tol.param, "dlocal.w_p"));
    EXPECT_TRUE(all_close(g.dlocal.v_p, r.dlocal.v_p, tol.param, "dlocal.v_p"));
  }
}

std::string label(DType dtype, const Sizes& s) {
  return std::string(dtype_name(dtype)) + " " + testing::sizes_label(s);
}

// Every dtype and every kind of `kinds` on sizes `s` against the reference: the kind's score
// seeded score_seed, the masks `add_masks` sets, inputs seeded input_seed.
void expect_kinds_match_reference(const Sizes& s, const std::vector<Kind>& kinds,
                                  uint64_t score_seed, uint64_t input_seed,
                                  const std::function<void(AttentionParams&)>& add_masks = {}) {
  for (DType dtype : kDtypes)
    for (Kind kind : kinds) {
      SCOPED_TRACE(std::string(kind_name(kind)) + " " + label(dtype, s));
      AttentionParams p;
      p.score = make_score(kind, s, dtype, score_seed);
      if (add_masks) add_masks(p);
      expect_matches_reference(s, make_inputs(s, dtype, input_seed), p);
    }
}

// ---------------------------------------------------------------------------------------------
// Scores.

TEST(AttentionPaths, EveryScoreKindMatchesReference) {
  expect_kinds_match_reference({.B = 2, .Hq = 4, .Hkv = 2, .Tq = 9, .Tk = 11, .Dq = 12, .Dk = 12,
                                .Dv = 5},
                               kAllKinds, 100, 7);
}

TEST(AttentionPaths, ScoresWithDifferentQueryAndKeyWidths) {
  // general, additive, concat and location accept Dq != Dk.
  expect_kinds_match_reference({.B = 2, .Hq = 2, .Tq = 6, .Tk = 7, .Dq = 5, .Dk = 9, .Dv = 3},
                               {Kind::general, Kind::low_rank, Kind::additive, Kind::concat,
                                Kind::location},
                               200, 11);
}

TEST(AttentionPaths, ScoresUnderCausalWindow) {
  // The kernel works on blocks of query rows (about 2^16 / Tk rows) and only on the keys the
  // block's rows can see: with Tq = 300 and Tk = 513 there are three blocks, each with its own
  // key range, so every score kind must index keys (and location weights) from the range start.
  expect_kinds_match_reference({.Hq = 2, .Hkv = 1, .Tq = 300, .Tk = 513, .Dq = 4, .Dk = 4,
                                .Dv = 3},
                               kAllKinds, 300, 13, [](AttentionParams& p) {
                                 p.mask.causal = true;
                                 p.mask.alignment = Alignment::bottom_right;
                                 p.mask.window = Window{100, 0};
                               });
}

TEST(AttentionPaths, ScoresThatReduceToADotProductAtFusedSizes) {
  // With Tq >= 16, float32 general and cosine scores transform q and k once and run the fused
  // dot-product kernels (src/attention_dot_form.cpp); the backward chains through the transform.
  // Zero rows in q and k take cosine's eps branch.
  for (DType dtype : kDtypes)
    for (Kind kind : {Kind::general, Kind::low_rank, Kind::cosine}) {
      const int64_t dq = kind == Kind::cosine ? 8 : 5, dk = kind == Kind::cosine ? 8 : 9;
      const Sizes s{.B = 2, .Hq = 4, .Hkv = 2, .Tq = 40, .Tk = 57, .Dq = dq, .Dk = dk, .Dv = 6};
      SCOPED_TRACE(std::string(kind_name(kind)) + " " + label(dtype, s));
      AttentionParams p;
      p.score = make_score(kind, s, dtype, 400);
      p.mask.key_lengths = {57, 31};
      p.mask.causal = true;
      p.mask.alignment = Alignment::bottom_right;
      Inputs in = make_inputs(s, dtype, 17);
      for (int64_t d = 0; d < s.Dq; ++d) in.q.set({1, 2, 5, d}, 0.0);
      for (int64_t d = 0; d < s.Dk; ++d) in.k.set({0, 1, 3, d}, 0.0);
      expect_matches_reference(s, in, p);
    }
}

TEST(AttentionPaths, PerHeadScores) {
  const Sizes s{.B = 2, .Hq = 4, .Hkv = 2, .Tq = 7, .Tk = 8, .Dq = 6, .Dk = 6, .Dv = 4};
  for (DType dtype : kDtypes) {
    SCOPED_TRACE(label(dtype, s));
    AttentionParams p;
    p.head_scores = {make_score(Kind::additive, s, dtype, 1), make_score(Kind::cosine, s, dtype, 2),
                     make_score(Kind::low_rank, s, dtype, 3),
                     make_score(Kind::additive, s, dtype, 4)};
    p.mask.causal = true;
    expect_matches_reference(s, make_inputs(s, dtype, 17), p);
  }
}

// ---------------------------------------------------------------------------------------------
// Shapes.

TEST(AttentionPaths, SequenceLengthSweep) {
  const std::pair<int64_t, int64_t> lengths[] = {
      {0, 5},     {5, 0},     {0, 0},     {1, 1},     {1, 129},   {2, 3},     {3, 2},
      {127, 128}, {128, 127}, {129, 129}, {128, 513}, {513, 129}, {513, 513}, {3, 513}};
  for (DType dtype : kDtypes)
    for (auto [tq, tk] : lengths) {
      const Sizes s{.Tq = tq, .Tk = tk, .Dq = 16, .Dk = 16, .Dv = 8};
      SCOPED_TRACE(label(dtype, s));
      AttentionParams p;
      p.mask.causal = tq > 100;  // causal on the large ones keeps the reference quick
      p.mask.alignment = Alignment::bottom_right;
      expect_matches_reference(s, make_inputs(s, dtype, 19), p);
    }
}

TEST(AttentionPaths, HeadDimensionSweep) {
  for (DType dtype : kDtypes)
    for (int64_t dim : {1, 3, 59, 64, 128}) {
      const Sizes s{.Hq = 2, .Tq = 33, .Tk = 29, .Dq = dim, .Dk = dim, .Dv = dim == 59 ? 3 : dim};
      SCOPED_TRACE(label(dtype, s));
      expect_matches_reference(s, make_inputs(s, dtype, 23), AttentionParams{});
    }
}

TEST(AttentionPaths, BatchWithDifferentLengths) {
  const Sizes s{.B = 3, .Hq = 2, .Hkv = 2, .Tq = 10, .Tk = 12};
  for (DType dtype : kDtypes)
    for (bool causal : {false, true}) {
      SCOPED_TRACE(label(dtype, s) + (causal ? " causal" : ""));
      AttentionParams p;
      p.mask.key_lengths = {12, 5, 1};
      p.mask.query_lengths = {10, 4, 7};
      p.mask.causal = causal;
      p.mask.alignment = Alignment::bottom_right;
      expect_matches_reference(s, make_inputs(s, dtype, 29), p);
    }
}

TEST(AttentionPaths, GroupedQueryHeads) {
  for (int64_t hkv : {1, 2, 4})
    expect_kinds_match_reference(
        {.B = 2, .Hq = 4, .Hkv = hkv, .Tq = 6, .Tk = 9, .Dq = 8, .Dk = 8, .Dv = 5},
        {Kind::scaled, Kind::additive, Kind::cosine, Kind::low_rank, Kind::trilinear}, 31, 37,
        [](AttentionParams& p) { p.mask.key_lengths = {9, 6}; });
}

// ---------------------------------------------------------------------------------------------
// Masks.

Sizes mask_sizes(int64_t tq, int64_t tk) {
  return {.B = 2, .Hq = 2, .Hkv = 1, .Tq = tq, .Tk = tk, .Dq = 6, .Dk = 6, .Dv = 4};
}

TEST(AttentionPaths, CausalAlignmentsWithUnequalLengths) {
  for (DType dtype : kDtypes)
    for (auto [tq, tk] : {std::pair<int64_t, int64_t>{5, 9}, {9, 5}, {7, 7}})
      for (Alignment align : {Alignment::top_left, Alignment::bottom_right}) {
        const Sizes s = mask_sizes(tq, tk);
        SCOPED_TRACE(label(dtype, s) +
                     (align == Alignment::top_left ? " top_left" : " bottom_right"));
        AttentionParams p;
        p.mask.causal = true;
        p.mask.alignment = align;
        expect_matches_reference(s, make_inputs(s, dtype, 41), p);
        p.mask.key_lengths = {tk, tk - 2};
        p.mask.query_lengths = {tq - 1, tq};
        expect_matches_reference(s, make_inputs(s, dtype, 43), p);
      }
}

TEST(AttentionPaths, SlidingWindows) {
  const Window windows[] = {{2, 1}, {0, 0}, {3, Window::unbounded}, {Window::unbounded, 2},
                            {Window::unbounded - 1, 1}};
  for (DType dtype : kDtypes)
    for (const Window& w : windows)
      for (bool causal : {false, true}) {
        const Sizes s = mask_sizes(8, 11);
        SCOPED_TRACE(label(dtype, s) + " window " + std::to_string(w.left) + "," +
                     std::to_string(w.right) + (causal ? " causal" : ""));
        AttentionParams p;
        p.mask.window = w;
        p.mask.causal = causal;
        p.mask.alignment = Alignment::bottom_right;
        expect_matches_reference(s, make_inputs(s, dtype, 47), p);
      }
}

TEST(AttentionPaths, BooleanAllowedMaskBroadcasts) {
  const Sizes s = mask_sizes(6, 7);
  const Shape shapes[] = {{7}, {6, 7}, {6, 1}, {2, 1, 6, 7}, {1, 2, 1, 7}, {2, 2, 6, 7}};
  for (DType dtype : kDtypes)
    for (const Shape& shape : shapes) {
      SCOPED_TRACE(label(dtype, s) + " allowed " + shape_str(shape));
      AttentionParams p;
      p.mask.allowed = random_tensor(shape, DType::b8, 53, 0.0, 1.4);  // ~70% true
      expect_matches_reference(s, make_inputs(s, dtype, 59), p);
    }
}

TEST(AttentionPaths, BiasBroadcastsAndItsGradientReduces) {
  const Shape shapes[] = {{7}, {6, 7}, {6, 1}, {2, 6, 7}, {2, 1, 6, 7}, {1, 2, 6, 7},
                          {2, 2, 6, 7}, {1, 1, 1, 1}};
  for (DType dtype : kDtypes)
    for (int64_t hkv : {1, 2})
      for (const Shape& shape : shapes) {
        Sizes s = mask_sizes(6, 7);
        s.Hkv = hkv;
        SCOPED_TRACE(label(dtype, s) + " bias " + shape_str(shape));
        AttentionParams p;
        p.mask.bias = random_tensor(shape, dtype, 61, -2.0, 2.0);
        p.mask.causal = true;
        expect_matches_reference(s, make_inputs(s, dtype, 67), p);
      }
}

TEST(AttentionPaths, Alibi) {
  for (DType dtype : kDtypes)
    for (Alignment align : {Alignment::top_left, Alignment::bottom_right}) {
      Sizes s = mask_sizes(5, 9);
      s.Hq = 4;
      SCOPED_TRACE(label(dtype, s));
      AttentionParams p;
      p.mask.alibi_slopes = alibi_slopes(s.Hq);
      p.mask.alignment = align;
      p.mask.causal = align == Alignment::bottom_right;
      expect_matches_reference(s, make_inputs(s, dtype, 71), p);
    }
}

TEST(AttentionPaths, LocalMonotonic) {
  for (DType dtype : kDtypes)
    for (int64_t half_width : {0, 1, 3}) {
      const Sizes s = mask_sizes(7, 12);
      SCOPED_TRACE(label(dtype, s) + " D=" + std::to_string(half_width));
      AttentionParams p;
      p.mask.local.kind = LocalKind::monotonic;
      p.mask.local.half_width = half_width;
      p.mask.alignment = Alignment::bottom_right;
      expect_matches_reference(s, make_inputs(s, dtype, 73), p);
    }
}

AttentionParams local_p_params(const Sizes& s, DType dtype, int64_t half_width, uint64_t seed) {
  AttentionParams p;
  p.mask.local.kind = LocalKind::predictive;
  p.mask.local.half_width = half_width;
  p.mask.local.w_p = param({kHidden, s.Dq}, dtype, seed, 0.25);  // spread the centres
  p.mask.local.v_p = param({kHidden}, dtype, seed + 1, 0.5);
  return p;
}

TEST(AttentionPaths, LocalPredictive) {
  for (DType dtype : kDtypes)
    for (int64_t half_width : {1, 2, 5}) {
      const Sizes s = mask_sizes(8, 15);
      SCOPED_TRACE(label(dtype, s) + " D=" + std::to_string(half_width));
      AttentionParams p = local_p_params(s, dtype, half_width, 79);
      p.mask.key_lengths = {15, 9};
      p.return_weights = true;
      expect_matches_reference(s, make_inputs(s, dtype, 83), p);
      p.score = make_score(Kind::additive, s, dtype, 5);
      expect_matches_reference(s, make_inputs(s, dtype, 89), p);
    }
}

TEST(AttentionPaths, EveryMaskComposed) {
  for (DType dtype : kDtypes)
    for (LocalKind local : {LocalKind::none, LocalKind::monotonic, LocalKind::predictive}) {
      Sizes s = mask_sizes(9, 13);
      s.Hq = 4;
      s.Hkv = 2;
      SCOPED_TRACE(label(dtype, s) + " local " + std::to_string(static_cast<int>(local)));
      AttentionParams p = local_p_params(s, dtype, 4, 97);
      p.mask.local.kind = local;
      p.score = make_score(Kind::general, s, dtype, 101);
      p.mask.key_lengths = {13, 10};
      p.mask.query_lengths = {8, 9};
      p.mask.causal = true;
      p.mask.alignment = Alignment::bottom_right;
      p.mask.window = Window{6, 1};
      p.mask.allowed = random_tensor({2, 1, 9, 13}, DType::b8, 103, 0.0, 1.5);
      p.mask.bias = random_tensor({4, 9, 13}, dtype, 107);
      p.mask.alibi_slopes = alibi_slopes(4);
      p.dropout = {0.2, 11};
      p.return_weights = true;
      expect_matches_reference(s, make_inputs(s, dtype, 109), p);
    }
}

// ---------------------------------------------------------------------------------------------
// Dropout and returned weights.

TEST(AttentionPaths, DropoutMatchesReference) {
  for (DType dtype : kDtypes)
    for (double rate : {0.1, 0.5}) {
      Sizes s = mask_sizes(20, 24);
      s.Hkv = 2;
      SCOPED_TRACE(label(dtype, s) + " p=" + std::to_string(rate));
      AttentionParams p;
      p.dropout = {rate, 1234};
      p.return_weights = true;
      expect_matches_reference(s, make_inputs(s, dtype, 113), p);
    }
}

TEST(AttentionPaths, DropoutChangesOutputAndSeedMatters) {
  const Sizes s = mask_sizes(16, 16);
  const Inputs in = make_inputs(s, DType::f64, 127);
  AttentionParams p;
  const Tensor plain = attention(in.q, in.k, in.v, p).out;
  p.dropout = {0.5, 1};
  const AttentionOutput a = attention(in.q, in.k, in.v, p);
  p.dropout.seed = 2;
  const AttentionOutput b = attention(in.q, in.k, in.v, p);
  EXPECT_NE(a.out.to_vector(), plain.to_vector());
  EXPECT_NE(a.out.to_vector(), b.out.to_vector());
  EXPECT_EQ(a.lse.to_vector(), b.lse.to_vector());  // dropout acts after the softmax
}

TEST(AttentionPaths, ReturnedWeightsAreRowStochasticAndMeanIsHeadMean) {
  for (DType dtype : kDtypes) {
    Sizes s = mask_sizes(9, 11);
    s.Hq = 3;
    s.Hkv = 1;
    SCOPED_TRACE(label(dtype, s));
    AttentionParams p;
    p.mask.causal = true;
    p.mask.query_lengths = {9, 6};
    p.dropout = {0.3, 5};  // weights are pre-dropout: still stochastic
    p.return_weights = true;
    const Inputs in = make_inputs(s, dtype, 131);
    const AttentionOutput o = attention(in.q, in.k, in.v, p);
    ASSERT_EQ(o.weights.shape(), Shape({s.B, s.Hq, s.Tq, s.Tk}));
    ASSERT_EQ(o.mean_weights.shape(), Shape({s.B, s.Tq, s.Tk}));
    const Tolerance tol = tolerance_for(dtype, s.Tk);
    for (int64_t b = 0; b < s.B; ++b)
      for (int64_t i = 0; i < s.Tq; ++i) {
        const bool live = i < p.mask.query_lengths[static_cast<std::size_t>(b)];
        for (int64_t h = 0; h < s.Hq; ++h) {
          double sum = 0.0;
          for (int64_t j = 0; j < s.Tk; ++j) sum += o.weights.get({b, h, i, j});
          EXPECT_NEAR(sum, live ? 1.0 : 0.0, tol.atol) << "b " << b << " h " << h << " i " << i;
        }
        for (int64_t j = 0; j < s.Tk; ++j) {
          double mean = 0.0;
          for (int64_t h = 0; h < s.Hq; ++h) mean += o.weights.get({b, h, i, j});
          mean /= static_cast<double>(s.Hq);
          EXPECT_NEAR(o.mean_weights.get({b, i, j}), mean, tol.atol);
          if (j > i) {
            EXPECT_EQ(o.mean_weights.get({b, i, j}), 0.0);  // causal
          }
        }
      }
  }
}

// ---------------------------------------------------------------------------------------------
// Numerical edge cases.

bool all_finite(const Tensor& t) {
  for (double x : t.to_vector())
    if (!std::isfinite(x)) return false;
  return true;
}

TEST(AttentionPaths, FullyMaskedRowsGiveZerosAndNoNaN) {
  for (DType dtype : kDtypes) {
    Sizes s = mask_sizes(5, 6);
    s.Hkv = 2;
    SCOPED_TRACE(label(dtype, s));
    AttentionParams p;
    p.score = make_score(Kind::additive, s, dtype, 137);
    p.mask.key_lengths = {6, 0};      // batch 1 has no keys at all
    p.mask.query_lengths = {4, 5};    // row 4 of batch 0 is padding
    Tensor allowed = Tensor::full({5, 6}, 1.0, DType::b8);
    for (int64_t j = 0; j < 6; ++j) allowed.set({1, j}, 0.0);  // row 1: nothing allowed
    p.mask.allowed = allowed;
    Tensor bias = Tensor::zeros({5, 6}, dtype);
    for (int64_t j = 0; j < 6; ++j) bias.set({2, j}, -INFINITY);  // row 2: every score -inf
    p.mask.bias = bias;
    p.return_weights = true;
    const Inputs in = make_inputs(s, dtype, 139);
    const Results r = run_fast(in, p);
    const double neg_inf = -std::numeric_limits<double>::infinity();
    for (int64_t b = 0; b < s.B; ++b)
      for (int64_t h = 0; h < s.Hq; ++h)
        for (int64_t i = 0; i < s.Tq; ++i) {
          const bool masked = b == 1 || i == 1 || i == 2 || i == 4;
          if (!masked) {
            EXPECT_TRUE(std::isfinite(r.out.lse.get({b, h, i})));
            continue;
          }
          EXPECT_EQ(r.out.lse.get({b, h, i}), neg_inf) << b << " " << h << " " << i;
          for (int64_t c = 0; c < s.Dv; ++c) EXPECT_EQ(r.out.out.get({b, h, i, c}), 0.0);
          for (int64_t j = 0; j < s.Tk; ++j) EXPECT_EQ(r.out.weights.get({b, h, i, j}), 0.0);
          for (int64_t c = 0; c < s.Dq; ++c) EXPECT_EQ(r.grads.dq.get({b, h, i, c}), 0.0);
        }
    // Batch 1 sees no key: its key and value gradients are exactly zero.
    for (int64_t g = 0; g < s.Hkv; ++g)
      for (int64_t j = 0; j < s.Tk; ++j) {
        for (int64_t c = 0; c < s.Dk; ++c) EXPECT_EQ(r.grads.dk.get({1, g, j, c}), 0.0);
        for (int64_t c = 0; c < s.Dv; ++c) EXPECT_EQ(r.grads.dv.get({1, g, j, c}), 0.0);
      }
    EXPECT_TRUE(all_finite(r.out.out));
    EXPECT_TRUE(all_finite(r.grads.dq));
    EXPECT_TRUE(all_finite(r.grads.dk));
    EXPECT_TRUE(all_finite(r.grads.dv));
    EXPECT_TRUE(all_finite(r.grads.dbias));
    for (const auto& [name, t] : score_tensors(r.grads.dscore)) EXPECT_TRUE(all_finite(t)) << name;
    expect_matches_reference(s, in, p);
  }
}

TEST(AttentionPaths, LargeLogitsDoNotOverflow) {
  for (DType dtype : kDtypes) {
    Sizes s = mask_sizes(7, 9);
    SCOPED_TRACE(label(dtype, s));
    AttentionParams p;
    p.score = DotScore{};
    // Scores of magnitude ~1e4 from a large bias: exp would overflow without the max shift.
    p.mask.bias = random_tensor({7, 9}, dtype, 149, -1e4, 1e4);
    const Inputs in = make_inputs(s, dtype, 151);
    const Results r = run_fast(in, p);
    EXPECT_TRUE(all_finite(r.out.out));
    EXPECT_TRUE(all_finite(r.out.lse));
    EXPECT_TRUE(all_finite(r.grads.dq));
    EXPECT_TRUE(all_finite(r.grads.dbias));
    // lse ~ 1e4: its absolute error scales with the logits.
    const AttentionOutput ref = reference::attention(in.q, in.k, in.v, p);
    EXPECT_TRUE(all_close(r.out.out, ref.out, tolerance_for(dtype, s.Tk), "out"));
    EXPECT_TRUE(all_close(r.out.lse, ref.lse, tolerance_for(dtype, s.Tk), "lse"));
    // Scores of up to ~1e3 * Dk through the GEMM itself (scale 1e3).
    AttentionParams plain;
    plain.score = ScaledDotScore{1e3};
    const AttentionOutput fast_big = attention(in.q, in.k, in.v, plain);
    const AttentionOutput ref_big = reference::attention(in.q, in.k, in.v, plain);
    EXPECT_TRUE(all_finite(fast_big.out));
    EXPECT_TRUE(all_close(fast_big.lse, ref_big.lse, tolerance_for(dtype, s.Dk), "lse x1e3"));
  }
}

TEST(AttentionPaths, NaNQueryRowStaysInItsRow) {
  for (DType dtype : kDtypes)
    for (Kind kind : {Kind::scaled, Kind::additive, Kind::cosine}) {
      Sizes s = mask_sizes(6, 8);
      SCOPED_TRACE(std::string(kind_name(kind)) + " " + label(dtype, s));
      AttentionParams p;
      p.score = make_score(kind, s, dtype, 157);
      Inputs in = make_inputs(s, dtype, 163);
      in.q.set({1, 0, 3, 2}, std::numeric_limits<double>::quiet_NaN());
      const AttentionOutput o = attention(in.q, in.k, in.v, p);
      for (int64_t b = 0; b < s.B; ++b)
        for (int64_t h = 0; h < s.Hq; ++h)
          for (int64_t i = 0; i < s.Tq; ++i) {
            const bool poisoned = b == 1 && h == 0 && i == 3;
            for (int64_t c = 0; c < s.Dv; ++c)
              EXPECT_EQ(std::isnan(o.out.get({b, h, i, c})), poisoned) << b << h << i << c;
          }
      const AttentionOutput ref = reference::attention(in.q, in.k, in.v, p);
      EXPECT_TRUE(all_close(o.out, ref.out, tolerance_for(dtype, s.Tk), "out"));
    }
}

TEST(AttentionPaths, StridedViewsGiveTheSameResult) {
  for (DType dtype : kDtypes) {
    Sizes s = mask_sizes(7, 10);
    s.Hkv = 2;
    SCOPED_TRACE(label(dtype, s));
    // [B, T, H, D] storage viewed as [B, H, T, D].
    const Tensor q_bthd = random_tensor({s.B, s.Tq, s.Hq, s.Dq}, dtype, 167);
    const Tensor k_bthd = random_tensor({s.B, s.Tk, s.Hkv, s.Dk}, dtype, 173);
    const Tensor v_bthd = random_tensor({s.B, s.Tk, s.Hkv, s.Dv}, dtype, 179);
    Inputs view{q_bthd.transpose(1, 2), k_bthd.transpose(1, 2), v_bthd.transpose(1, 2),
                random_tensor({s.B, s.Hq, s.Tq, s.Dv}, dtype, 181)};
    ASSERT_FALSE(view.q.is_contiguous());
    const Inputs dense{view.q.contiguous(), view.k.contiguous(), view.v.contiguous(), view.dout};
    AttentionParams p;
    p.score = make_score(Kind::general, s, dtype, 191);
    p.mask.causal = true;
    const Results a = run_fast(view, p), b = run_fast(dense, p);
    EXPECT_EQ(a.out.out.to_vector(), b.out.out.to_vector());
    EXPECT_EQ(a.grads.dq.to_vector(), b.grads.dq.to_vector());
    EXPECT_EQ(a.grads.dk.to_vector(), b.grads.dk.to_vector());
    EXPECT_EQ(a.grads.dk.shape(), view.k.shape());
    expect_matches_reference(s, view, p);
  }
}

TEST(AttentionPaths, MixedParameterDtypesAreConverted) {
  // float32 inputs with float64 parameters: the front-end converts them to the input dtype.
  const Sizes s = mask_sizes(5, 6);
  AttentionParams p;
  p.score = make_score(Kind::additive, s, DType::f64, 193);
  p.mask.bias = random_tensor({6}, DType::f64, 197);
  const Inputs in = make_inputs(s, DType::f32, 199);
  const Results r = run_fast(in, p);
  EXPECT_EQ(r.out.out.dtype(), DType::f32);
  EXPECT_EQ(r.grads.dbias.dtype(), DType::f32);
  expect_matches_reference(s, in, p);
}

TEST(AttentionPaths, RunsAreBitwiseReproducible) {
  for (DType dtype : kDtypes) {
    const Sizes s{.B = 3, .Hq = 4, .Hkv = 2, .Tq = 70, .Tk = 90, .Dq = 16, .Dk = 16, .Dv = 8};
    SCOPED_TRACE(label(dtype, s));
    AttentionParams p = local_p_params(s, dtype, 6, 211);
    p.score = make_score(Kind::additive, s, dtype, 223);
    p.mask.bias = random_tensor({90}, dtype, 227);  // shared by every task: per-thread partials
    p.dropout = {0.25, 99};
    p.return_weights = true;
    const Inputs in = make_inputs(s, dtype, 229);
    // Large enough to run on every thread: the shared bias, score and local-p gradients go
    // through the per-thread partials.
    expect_matches_reference(s, in, p);
    const Results a = run_fast(in, p), b = run_fast(in, p);
    testing::expect_same_bits(a.out, a.grads, b.out, b.grads);
  }
}

}  // namespace
}  // namespace attn
