// Trilinear and location scores on the fused dot-product kernels (src/attention_dot_form.cpp).
// With float32 inputs, attn::attention rewrites
//   trilinear  w1.q + w2.k + w3.(q*k)  as  [w3*q, w1.q, 1] . [k, 1, w2.k]
//   location   (W q)_j                 as  q . W_j   (keys = the rows of W)
// and runs the flash kernels (the decode kernel's forward below 16 query rows);
// attention_backward chains dq, dk of that form back to q, k and the
// weight. Covered here:
//   - forward (out, lse) and backward (dq, dk, dv, dbias, dweight) against the float64 reference
//     over lengths 0, 1, 16, 127, 128, 129 (Tq != Tk too), head widths 1, 3, 59, 64, grouped
//     heads, causal (both alignments), windows, ALiBi, key lengths including 0, fully masked rows
//     and user biases of every broadcast shape (Tq < 16 cases check the dispatch boundary);
//   - NaN in hidden keys reaches neither the outputs nor any gradient;
//   - that the fused route is taken: the results equal, bit for bit, the flash kernel (or, for
//     3 query rows, the decode kernel) run on a hand-built dot form;
//   - finite differences (float64, through the reference) of both weights' gradients against
//     the fused float32 backward, including trilinear's w1 whose gradient is exactly 0.
//
// Tolerances come from tolerance_for(float32, terms), terms = the longest reduction feeding an
// element (see ReductionTerms in support/attention_problem.h).
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <limits>
#include <string>
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
using testing::Tolerance;
using Sizes = testing::AttentionSizes;
using Inputs = testing::AttentionInputs;

enum class Kind { trilinear, location };
constexpr Kind kKinds[] = {Kind::trilinear, Kind::location};

const char* kind_name(Kind kind) { return kind == Kind::trilinear ? "trilinear" : "location"; }

// Weights scaled by 1/sqrt(fan-in) so that scores stay O(1) and the softmax is not saturated.
// The location weight has 3 rows more than the keys, so rows past Tk must get a zero gradient.
Score make_score(Kind kind, const Sizes& s, DType dtype, uint64_t seed) {
  const double r = 1.0 / std::sqrt(static_cast<double>(std::max<int64_t>(s.Dq, 1)));
  if (kind == Kind::trilinear) return TrilinearScore{random_tensor({3 * s.Dq}, dtype, seed, -r, r)};
  return LocationScore{random_tensor({s.Tk + 3, s.Dq}, dtype, seed, -r, r)};
}

const Tensor& score_weight(const Score& score) {
  if (const auto* t = std::get_if<TrilinearScore>(&score)) return t->weight;
  return std::get<LocationScore>(score).weight;
}

// float32 tolerances from the reduction lengths of attention_problem.h: the dot form's scores
// are D + 2 wide.
testing::ProblemTolerances tolerances(const Sizes& s) {
  return testing::tolerances_for(DType::f32, testing::terms_for(s, s.Dq + 2));
}

std::string label(const Sizes& s) { return testing::sizes_label(s); }

// float32 attention / attention_backward against the float64 reference.
void expect_matches_reference(const Sizes& s, const Inputs& in, const AttentionParams& p) {
  const testing::ProblemTolerances tol = tolerances(s);

  const AttentionOutput fast = attention(in.q, in.k, in.v, p);
  const AttentionOutput ref = reference::attention(in.q, in.k, in.v, p);
  testing::expect_outputs_match(fast, ref, tol, /*weights=*/false);

  const AttentionGrads g = attention_backward(in.q, in.k, in.v, p, fast, in.dout);
  const AttentionGrads r = reference::attention_backward(in.q, in.k, in.v, p, ref, in.dout);
  testing::expect_input_grads_match(g, r, tol);
  ASSERT_EQ(g.dscore.index(), p.score.index());
  EXPECT_TRUE(testing::compare_scores(g.dscore, r.dscore, tol.param, "dscore"));

  // The backward rebuilds P from the lse it is given: the reference's (which holds trilinear's
  // row term w1.q_i) must serve as well as the fused forward's own.
  const AttentionGrads from_ref = attention_backward(in.q, in.k, in.v, p, ref, in.dout);
  EXPECT_TRUE(all_close(from_ref.dq, r.dq, tol.grad, "dq from the reference's forward"));
  EXPECT_TRUE(all_close(score_weight(from_ref.dscore), score_weight(r.dscore), tol.param,
                        "dweight from the reference's forward"));
}

// Both kinds on sizes `s` against the reference: the kind's weight seeded score_seed, the masks
// `add_masks` sets, inputs seeded input_seed; `note` ends the trace line.
void expect_kinds_match_reference(const Sizes& s, uint64_t score_seed, uint64_t input_seed,
                                  const std::function<void(AttentionParams&)>& add_masks = {},
                                  const std::string& note = "") {
  for (Kind kind : kKinds) {
    SCOPED_TRACE(std::string(kind_name(kind)) + " " + label(s) + note);
    AttentionParams p;
    p.score = make_score(kind, s, DType::f32, score_seed);
    if (add_masks) add_masks(p);
    expect_matches_reference(s, make_inputs(s, DType::f32, input_seed), p);
  }
}

// ---------------------------------------------------------------------------------------------
// Against the reference.

TEST(DotFormScores, LengthSweep) {
  // Every (Tq, Tk) from {1, 16, 127, 128, 129}: Tq < 16 runs the composed/decode paths, the rest
  // the fused kernels with partial tiles (48 query rows) and key blocks on both sides of 128.
  const int64_t lengths[] = {1, 16, 127, 128, 129};
  for (int64_t tq : lengths)
    for (int64_t tk : lengths)
      expect_kinds_match_reference({.Hq = 2, .Tq = tq, .Tk = tk, .Dq = 3, .Dk = 3, .Dv = 5}, 10,
                                   20);
}

TEST(DotFormScores, NoKeys) {
  // Tk = 0: every row is fully masked; out 0, lse -inf, every gradient 0.
  for (int64_t tq : {16, 129})
    expect_kinds_match_reference({.Hq = 2, .Tq = tq, .Tk = 0, .Dq = 8, .Dk = 8, .Dv = 6}, 30, 40);
}

TEST(DotFormScores, HeadWidthSweep) {
  for (int64_t width : {1, 3, 59, 64})
    expect_kinds_match_reference(
        {.Hq = 2, .Tq = 40, .Tk = 57, .Dq = width, .Dk = width, .Dv = width == 59 ? 3 : 7}, 50, 60);
}

TEST(DotFormScores, LocationWithDifferentKeyWidth) {
  // The location score never reads the keys, so Dk is free; dk must be all zero.
  const Sizes s{.B = 2, .Hq = 2, .Tq = 33, .Tk = 45, .Dq = 7, .Dk = 13, .Dv = 4};
  SCOPED_TRACE(label(s));
  AttentionParams p;
  p.score = make_score(Kind::location, s, DType::f32, 70);
  const Inputs in = make_inputs(s, DType::f32, 80);
  expect_matches_reference(s, in, p);
  const AttentionOutput out = attention(in.q, in.k, in.v, p);
  const AttentionGrads g = attention_backward(in.q, in.k, in.v, p, out, in.dout);
  EXPECT_TRUE(all_close(g.dk, Tensor::zeros(in.k.shape(), DType::f32), Tolerance{}, "dk"));
}

TEST(DotFormScores, GroupedHeadsCausalAndLengths) {
  // Keys are per kv head; trilinear's w2.k_j term and location's keys must reach every query
  // head of the group, and dk / dweight sum over them. Batch 1 has no keys (fully masked rows),
  // batch 0 hides some queries.
  for (int64_t hkv : {1, 2, 4})
    for (Alignment alignment : {Alignment::top_left, Alignment::bottom_right})
      expect_kinds_match_reference(
          {.B = 2, .Hq = 4, .Hkv = hkv, .Tq = 37, .Tk = 50, .Dq = 5, .Dk = 5, .Dv = 6}, 90, 100,
          [&](AttentionParams& p) {
            p.mask.causal = true;
            p.mask.alignment = alignment;
            p.mask.key_lengths = {41, 0};
            p.mask.query_lengths = {30, 37};
          },
          alignment == Alignment::top_left ? " top-left" : " bottom-right");
}

TEST(DotFormScores, WindowAndAlibi) {
  const Sizes s{.Hq = 4, .Hkv = 2, .Tq = 64, .Tk = 80, .Dq = 8, .Dk = 8, .Dv = 6};
  expect_kinds_match_reference(s, 110, 120, [&](AttentionParams& p) {
    p.mask.window = Window{20, 5};
    p.mask.alibi_slopes = alibi_slopes(s.Hq);
  });
}

TEST(DotFormScores, TrilinearWithUserBias) {
  // The user's bias is added to the trilinear score as given, and its gradient is reduced to its
  // own broadcast shape.
  const Sizes s{.B = 2, .Hq = 4, .Hkv = 2, .Tq = 24, .Tk = 29, .Dq = 6, .Dk = 6, .Dv = 5};
  const Shape shapes[] = {{s.Tk}, {s.B, 1, 1, s.Tk}, {s.B, s.Hq, s.Tq, s.Tk}, {s.Hq, 1, 1},
                          {s.Tq, 1}};
  for (const Shape& shape : shapes) {
    SCOPED_TRACE(label(s) + " bias " + shape_str(shape));
    AttentionParams p;
    p.score = make_score(Kind::trilinear, s, DType::f32, 130);
    p.mask.bias = random_tensor(shape, DType::f32, 140, -2.0, 2.0);
    p.mask.causal = true;
    expect_matches_reference(s, make_inputs(s, DType::f32, 150), p);
  }
}

TEST(DotFormScores, RowsMaskedByAnInfiniteBias) {
  // A row whose every score is -inf through the bias counts as fully masked: out 0, lse -inf,
  // zero gradients, also for trilinear's row and column terms.
  const Sizes s{.B = 2, .Hq = 2, .Tq = 20, .Tk = 18, .Dq = 8, .Dk = 8, .Dv = 6};
  Tensor bias = random_tensor({s.B, s.Hq, s.Tq, s.Tk}, DType::f32, 170);
  for (int64_t j = 0; j < s.Tk; ++j) {
    bias.set({1, 0, 3, j}, -std::numeric_limits<double>::infinity());
    bias.set({0, 1, 19, j}, -std::numeric_limits<double>::infinity());
  }
  expect_kinds_match_reference(s, 160, 180, [&](AttentionParams& p) { p.mask.bias = bias; });
}

TEST(DotFormScores, NaNKeyPaddingDoesNotLeak) {
  // Hidden keys (past key_lengths) hold NaN in k and v: attention.h promises they are never
  // read, so nothing may reach the outputs or any gradient (0 * NaN in trilinear's w2 gradient
  // sum would). The result must equal the reference run with zero padding.
  // (NaN in hidden query rows is left out: the flash backward itself lets it into dq, dk, dv.)
  const Sizes s{.B = 2, .Hq = 4, .Hkv = 2, .Tq = 30, .Tk = 40, .Dq = 8, .Dk = 8, .Dv = 6};
  // Batch 1's keys from 25 on (past its key length) set to `value` in k and v.
  auto fill_hidden_keys = [&](Inputs& in, double value) {
    for (int64_t h = 0; h < s.Hkv; ++h)
      for (int64_t j = 25; j < s.Tk; ++j) {
        for (int64_t c = 0; c < s.Dk; ++c) in.k.set({1, h, j, c}, value);
        for (int64_t c = 0; c < s.Dv; ++c) in.v.set({1, h, j, c}, value);
      }
  };
  const testing::ProblemTolerances tol = tolerances(s);
  for (Kind kind : kKinds) {
    SCOPED_TRACE(std::string(kind_name(kind)) + " " + label(s));
    AttentionParams p;
    p.score = make_score(kind, s, DType::f32, 175);
    p.mask.key_lengths = {40, 25};
    p.mask.query_lengths = {22, 30};
    Inputs zeroed = make_inputs(s, DType::f32, 185);
    fill_hidden_keys(zeroed, 0.0);
    Inputs poisoned{zeroed.q, zeroed.k.clone(), zeroed.v.clone(), zeroed.dout};
    fill_hidden_keys(poisoned, std::numeric_limits<double>::quiet_NaN());
    const AttentionOutput fast = attention(poisoned.q, poisoned.k, poisoned.v, p);
    const AttentionOutput ref = reference::attention(zeroed.q, zeroed.k, zeroed.v, p);
    EXPECT_TRUE(all_close(fast.out, ref.out, tol.forward, "out"));
    const AttentionGrads g =
        attention_backward(poisoned.q, poisoned.k, poisoned.v, p, fast, poisoned.dout);
    const AttentionGrads r =
        reference::attention_backward(zeroed.q, zeroed.k, zeroed.v, p, ref, zeroed.dout);
    testing::expect_input_grads_match(g, r, tol);
    EXPECT_TRUE(testing::compare_scores(g.dscore, r.dscore, tol.param, "dscore"));
  }
}

// ---------------------------------------------------------------------------------------------
// The fused route is taken: the flash kernel on a hand-built dot form gives the same bits.

// x rounded to multiples of 1/16: with such inputs every product and sum of the dot-form
// transforms below is exact in float32, so the hand-built form equals the library's bit for bit
// whatever order either sums in.
Tensor dyadic(const Tensor& x) {
  Tensor out = Tensor::empty(x.shape(), DType::f32);
  for (int64_t i = 0; i < x.numel(); ++i)
    out.data<float>()[i] = std::round(static_cast<float>(x.get_flat(i)) * 16.0f) / 16.0f;
  return out;
}

// q' = [w3 * q, w1 . q, 1] and k' = [k, 1, w2 . k].
Inputs trilinear_dot_form(const Inputs& in, const Tensor& weight) {
  const int64_t D = in.q.size(3);
  auto w = [&](int64_t part, int64_t c) { return weight.get({part * D + c}); };
  auto build = [&](const Tensor& x, bool queries) {
    Tensor out = Tensor::empty({x.size(0), x.size(1), x.size(2), D + 2}, DType::f32);
    for (int64_t b = 0; b < x.size(0); ++b)
      for (int64_t h = 0; h < x.size(1); ++h)
        for (int64_t i = 0; i < x.size(2); ++i) {
          double term = 0.0;  // w1 . q or w2 . k
          for (int64_t c = 0; c < D; ++c) {
            const double value = x.get({b, h, i, c});
            term += w(queries ? 0 : 1, c) * value;
            out.set({b, h, i, c}, queries ? w(2, c) * value : value);
          }
          out.set({b, h, i, D}, queries ? term : 1.0);
          out.set({b, h, i, D + 1}, queries ? 1.0 : term);
        }
    return out;
  };
  return {build(in.q, true), build(in.k, false), in.v, in.dout};
}

// k'[b, h] = W[0:Tk] for every batch and kv head.
Inputs location_dot_form(const Inputs& in, const Tensor& weight) {
  const int64_t B = in.k.size(0), H = in.k.size(1), Tk = in.k.size(2), D = in.q.size(3);
  Tensor keys = Tensor::empty({B, H, Tk, D}, DType::f32);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t j = 0; j < Tk; ++j)
        for (int64_t c = 0; c < D; ++c) keys.set({b, h, j, c}, weight.get({j, c}));
  return {in.q, keys, in.v, in.dout};
}

// Tq = 50 takes the flash kernels; Tq = 3 (a few decoder steps) the decode kernel, forward only
// (the backward of so few rows is the composed path's).
TEST(DotFormScores, FusedRouteEqualsTheDotFormsKernel) {
  const Tolerance exact{};
  for (int64_t tq : {50, 3}) {
    const Sizes s{.B = 2, .Hq = 4, .Hkv = 2, .Tq = tq, .Tk = 70, .Dq = 9, .Dk = 9, .Dv = 5};
    for (Kind kind : kKinds) {
      SCOPED_TRACE(std::string(kind_name(kind)) + " " + label(s));
      Inputs in = make_inputs(s, DType::f32, 190);
      in.q = dyadic(in.q);
      in.k = dyadic(in.k);
      AttentionParams p;
      p.score = make_score(kind, s, DType::f32, 200);
      if (kind == Kind::trilinear) p.score = TrilinearScore{dyadic(score_weight(p.score))};
      p.mask.causal = true;
      p.mask.alignment = Alignment::bottom_right;
      p.mask.key_lengths = {70, 45};
      const Tensor& weight = score_weight(p.score);
      const Inputs form = kind == Kind::trilinear ? trilinear_dot_form(in, weight)
                                                  : location_dot_form(in, weight);
      AttentionParams dot = p;
      dot.score = DotScore{};

      const AttentionOutput fused = attention(in.q, in.k, in.v, p);
      const AttentionOutput kernel = attention(form.q, form.k, form.v, dot);
      EXPECT_TRUE(all_close(fused.out, kernel.out, exact, "out"));
      EXPECT_TRUE(all_close(fused.lse, kernel.lse, exact, "lse"));
      if (tq < 16) continue;

      // dv passes through the transform untouched; location's dq too.
      const AttentionGrads g = attention_backward(in.q, in.k, in.v, p, fused, in.dout);
      const AttentionGrads f = attention_backward(form.q, form.k, form.v, dot, kernel, form.dout);
      EXPECT_TRUE(all_close(g.dv, f.dv, exact, "dv"));
      if (kind == Kind::location) {
        EXPECT_TRUE(all_close(g.dq, f.dq, exact, "dq"));
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Finite differences of the weight gradients.

TEST(DotFormScores, WeightGradientsMatchFiniteDifferences) {
  // The loss sum(out * dout) is evaluated by the float64 reference; the analytic gradient is the
  // fused float32 backward's. Trilinear's first third (w1) must come out 0: its row term cancels
  // in the softmax, so the loss does not depend on it.
  const Sizes s{.B = 2, .Hq = 4, .Hkv = 2, .Tq = 24, .Tk = 37, .Dq = 6, .Dk = 6, .Dv = 5};
  const Tolerance tol = tolerances(s).param;
  for (Kind kind : kKinds) {
    SCOPED_TRACE(std::string(kind_name(kind)) + " " + label(s));
    const Inputs in = make_inputs(s, DType::f32, 210);
    AttentionParams p;
    p.score = make_score(kind, s, DType::f32, 220);
    p.mask.causal = true;
    p.mask.alignment = Alignment::bottom_right;
    p.mask.key_lengths = {37, 20};
    const AttentionOutput out = attention(in.q, in.k, in.v, p);
    const AttentionGrads g = attention_backward(in.q, in.k, in.v, p, out, in.dout);

    const Inputs in64{in.q.to(DType::f64), in.k.to(DType::f64), in.v.to(DType::f64),
                      in.dout.to(DType::f64)};
    AttentionParams p64 = p;
    Tensor weight = score_weight(p.score).to(DType::f64).clone();
    if (kind == Kind::trilinear)
      p64.score = TrilinearScore{weight};
    else
      p64.score = LocationScore{weight};
    auto loss = [&] {
      return testing::weighted_sum(reference::attention(in64.q, in64.k, in64.v, p64).out,
                                   in64.dout);
    };
    EXPECT_TRUE(testing::check_gradient(loss, weight, score_weight(g.dscore).to(DType::f64),
                                        "dweight", weight.numel(), 1e-6, tol.rtol));
  }
}

}  // namespace
}  // namespace attn
