// The float64 attention oracle (attn::reference) checked on its own: hand-computed tiny cases,
// mask semantics against independent constructions, exact zeros for fully masked rows, dropout
// determinism, NaN confinement, and central finite differences of every gradient it returns.
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <limits>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "attn/attention.h"
#include "attn/random.h"
#include "attn/reference.h"
#include "support/test_support.h"

namespace attn {
namespace {

using testing::all_close;
using testing::check_gradient;
using testing::random_tensor;
using testing::tolerance_for;
using testing::weighted_sum;

constexpr DType f64 = DType::f64;
constexpr double kInf = std::numeric_limits<double>::infinity();

// ---------------------------------------------------------------------------------------------
// Helpers.

struct Sizes {
  int64_t B = 1, Hq = 1, Hkv = 1, Tq = 3, Tk = 4, Dq = 3, Dk = 3, Dv = 2;
};

struct Inputs {
  Tensor q, k, v;
};

Inputs random_inputs(const Sizes& s, uint64_t seed) {
  return {random_tensor({s.B, s.Hq, s.Tq, s.Dq}, f64, seed),
          random_tensor({s.B, s.Hkv, s.Tk, s.Dk}, f64, seed + 1),
          random_tensor({s.B, s.Hkv, s.Tk, s.Dv}, f64, seed + 2)};
}

// One random instance of every scoring function (and the optional variants) for `s`.
// dot, scaled_dot, cosine and trilinear need s.Dq == s.Dk.
struct NamedScore {
  std::string name;
  Score score;
};

std::vector<NamedScore> every_score(const Sizes& s, uint64_t seed) {
  const int64_t A = 3, rank = 2;
  std::vector<NamedScore> scores;
  if (s.Dq == s.Dk) {
    scores.push_back({"dot", DotScore{}});
    scores.push_back({"scaled_dot", ScaledDotScore{}});
    scores.push_back({"scaled_dot_0.7", ScaledDotScore{0.7}});
    scores.push_back({"cosine", CosineScore{Tensor::full({1}, 2.5, f64), 1e-8}});
    scores.push_back({"trilinear", TrilinearScore{random_tensor({3 * s.Dq}, f64, seed + 1)}});
  }
  scores.push_back({"general_full",
                    GeneralScore{random_tensor({s.Dq, s.Dk}, f64, seed + 2), {}, {}}});
  scores.push_back({"general_low_rank",
                    GeneralScore{{}, random_tensor({rank, s.Dq}, f64, seed + 3),
                                 random_tensor({rank, s.Dk}, f64, seed + 4)}});
  scores.push_back({"additive", AdditiveScore{random_tensor({A, s.Dq}, f64, seed + 5),
                                              random_tensor({A, s.Dk}, f64, seed + 6),
                                              random_tensor({A}, f64, seed + 7),
                                              random_tensor({A}, f64, seed + 8)}});
  scores.push_back({"additive_no_bias", AdditiveScore{random_tensor({A, s.Dq}, f64, seed + 9),
                                                      random_tensor({A, s.Dk}, f64, seed + 10),
                                                      {},
                                                      random_tensor({A}, f64, seed + 11)}});
  scores.push_back({"concat", ConcatScore{random_tensor({A, s.Dq + s.Dk}, f64, seed + 12),
                                          random_tensor({A}, f64, seed + 13)}});
  scores.push_back({"location", LocationScore{random_tensor({s.Tk + 2, s.Dq}, f64, seed + 14)}});
  return scores;
}

// The tensor fields of a score, by name, undefined ones included (so a parameter struct and its
// gradient struct line up field by field).
std::vector<std::pair<std::string, Tensor>> score_tensors(const Score& score) {
  return std::visit(
      [](const auto& s) -> std::vector<std::pair<std::string, Tensor>> {
        using S = std::decay_t<decltype(s)>;
        if constexpr (std::is_same_v<S, GeneralScore>)
          return {{"weight", s.weight}, {"u", s.u}, {"v", s.v}};
        else if constexpr (std::is_same_v<S, AdditiveScore>)
          return {{"w_query", s.w_query}, {"w_key", s.w_key}, {"bias", s.bias}, {"v", s.v}};
        else if constexpr (std::is_same_v<S, ConcatScore>)
          return {{"weight", s.weight}, {"v", s.v}};
        else if constexpr (std::is_same_v<S, CosineScore>)
          return {{"tau", s.tau}};
        else if constexpr (std::is_same_v<S, LocationScore> || std::is_same_v<S, TrilinearScore>)
          return {{"weight", s.weight}};
        else
          return {};
      },
      score);
}

// The location score is the one scoring function that never reads the keys.
bool reads_keys(const Score& score) { return !std::holds_alternative<LocationScore>(score); }

int64_t count_nonzero(const Tensor& t) {
  int64_t n = 0;
  for (double x : t.to_vector()) n += x != 0.0;
  return n;
}

bool all_finite(const Tensor& t) {
  for (double x : t.to_vector())
    if (!std::isfinite(x)) return false;
  return true;
}

// Checks the parameter gradient `grad` of `score` against finite differences: same alternative,
// defined exactly where the parameter is, and every defined field matches.
void expect_score_gradients(const std::function<double()>& loss, const Score& score,
                            const Score& grad, const std::string& what) {
  ASSERT_EQ(grad.index(), score.index()) << what << ": gradient is not a " << score_name(score);
  const auto params = score_tensors(score), grads = score_tensors(grad);
  ASSERT_EQ(params.size(), grads.size());
  for (std::size_t f = 0; f < params.size(); ++f) {
    const std::string field = what + " " + params[f].first;
    ASSERT_EQ(params[f].second.defined(), grads[f].second.defined()) << field;
    if (!params[f].second.defined()) continue;
    EXPECT_GT(count_nonzero(grads[f].second), 0) << field << " gradient is all zero";
    EXPECT_TRUE(check_gradient(loss, params[f].second, grads[f].second, field));
  }
}

// Which gradients a case is expected to carry signal in (a test that compares 0 with 0 proves
// nothing, so every gradient checked must also be non-zero unless the case says otherwise).
struct GradExpectations {
  bool keys_used = true;  // false for the location score, which never reads the keys
};

// Central finite differences of loss = sum(out * W) against every gradient the reference
// returns: dq, dk, dv, the score's (or per-head scores') parameters, the bias, local-p.
void expect_gradients(const Inputs& in, const AttentionParams& params, const std::string& what,
                      GradExpectations expect = {}) {
  const AttentionOutput fwd = reference::attention(in.q, in.k, in.v, params);
  const Tensor W = random_tensor(fwd.out.shape(), f64, 777);
  const AttentionGrads grads = reference::attention_backward(in.q, in.k, in.v, params, fwd, W);
  // The loss reads the parameter tensors through `params`, whose tensors share storage with the
  // ones check_gradient perturbs in place.
  auto loss = [&] { return weighted_sum(reference::attention(in.q, in.k, in.v, params).out, W); };

  EXPECT_GT(count_nonzero(grads.dq), 0) << what << " dq is all zero";
  EXPECT_GT(count_nonzero(grads.dv), 0) << what << " dv is all zero";
  if (expect.keys_used) {
    EXPECT_GT(count_nonzero(grads.dk), 0) << what << " dk is all zero";
  }
  EXPECT_TRUE(check_gradient(loss, in.q, grads.dq, what + " dq"));
  EXPECT_TRUE(check_gradient(loss, in.k, grads.dk, what + " dk"));
  EXPECT_TRUE(check_gradient(loss, in.v, grads.dv, what + " dv"));

  if (params.head_scores.empty()) {
    expect_score_gradients(loss, params.score, grads.dscore, what + " score");
  } else {
    ASSERT_EQ(grads.dhead_scores.size(), params.head_scores.size()) << what;
    for (std::size_t h = 0; h < params.head_scores.size(); ++h)
      expect_score_gradients(loss, params.head_scores[h], grads.dhead_scores[h],
                             what + " head " + std::to_string(h));
  }
  ASSERT_EQ(grads.dbias.defined(), params.mask.bias.defined()) << what;
  if (params.mask.bias.defined()) {
    ASSERT_EQ(grads.dbias.shape(), params.mask.bias.shape()) << what;
    EXPECT_GT(count_nonzero(grads.dbias), 0) << what << " dbias is all zero";
    EXPECT_TRUE(check_gradient(loss, params.mask.bias, grads.dbias, what + " dbias"));
  }
  if (params.mask.local.kind == LocalKind::predictive) {
    ASSERT_TRUE(grads.dlocal.w_p.defined() && grads.dlocal.v_p.defined()) << what;
    EXPECT_GT(count_nonzero(grads.dlocal.w_p), 0) << what << " dw_p is all zero";
    EXPECT_TRUE(check_gradient(loss, params.mask.local.w_p, grads.dlocal.w_p, what + " w_p"));
    EXPECT_TRUE(check_gradient(loss, params.mask.local.v_p, grads.dlocal.v_p, what + " v_p"));
  }
}

// ---------------------------------------------------------------------------------------------
// Hand-computed cases: one query [1, 2], keys [0.5, -1] and [2, 0.25], values [1, -1], [3, 2].
// Each case states its two scores worked out on paper; the output is then
// softmax(s) . v and lse = log(e^s0 + e^s1).

struct HandCase {
  std::string name;
  Score score;
  double s0, s1;
};

std::vector<HandCase> hand_cases() {
  auto t = [](std::vector<double> values, Shape shape) { return Tensor::from(values, shape); };
  return {
      // q . k0 = 0.5 - 2, q . k1 = 2 + 0.5
      {"dot", DotScore{}, -1.5, 2.5},
      {"scaled_dot default 1/sqrt(2)", ScaledDotScore{}, -1.5 / std::sqrt(2.0),
       2.5 / std::sqrt(2.0)},
      {"scaled_dot 0.3", ScaledDotScore{0.3}, -0.45, 0.75},
      // q^T W = [1, 0] for W = [[1, 2], [0, -1]]
      {"general full", GeneralScore{t({1, 2, 0, -1}, {2, 2}), {}, {}}, 0.5, 2.0},
      // u . q = 3, v . k0 = 1 + 1, v . k1 = 4 - 0.25
      {"general low rank", GeneralScore{{}, t({1, 1}, {1, 2}), t({2, -1}, {1, 2})}, 6.0, 11.25},
      // 2 tanh(q_0 + k_1 + 0.5)
      {"additive", AdditiveScore{t({1, 0}, {1, 2}), t({0, 1}, {1, 2}), t({0.5}, {1}), t({2}, {1})},
       2.0 * std::tanh(0.5), 2.0 * std::tanh(1.75)},
      // 2 tanh(q_0 + k_1)
      {"concat", ConcatScore{t({1, 0, 0, 1}, {1, 4}), t({2}, {1})}, 0.0, 2.0 * std::tanh(1.25)},
      // 2 (q . k) / (|q| |k|): |q| = sqrt(5), |k0| = sqrt(1.25), |k1| = sqrt(4.0625)
      {"cosine", CosineScore{t({2}, {1}), 1e-8}, -1.2, 5.0 / std::sqrt(5.0 * 4.0625)},
      // rows 0 and 1 of W pick q_0 and q_1; row 2 (unused, Tk = 2) must not matter
      {"location", LocationScore{t({1, 0, 0, 1, 5, 5}, {3, 2})}, 1.0, 2.0},
      // q_0 + k_1 + q . k with w = [1, 0, 0, 1, 1, 1]
      {"trilinear", TrilinearScore{t({1, 0, 0, 1, 1, 1}, {6})}, -1.5, 3.75},
  };
}

TEST(ReferenceAttention, HandComputedScores) {
  const Tensor q = Tensor::from(std::vector<double>{1, 2}, {1, 1, 1, 2});
  const Tensor k = Tensor::from(std::vector<double>{0.5, -1, 2, 0.25}, {1, 1, 2, 2});
  const Tensor v = Tensor::from(std::vector<double>{1, -1, 3, 2}, {1, 1, 2, 2});
  // A handful of exp/log/tanh evaluations, each within a few ulps.
  const testing::Tolerance tol = tolerance_for(f64, 4, 64.0);
  for (const HandCase& c : hand_cases()) {
    AttentionParams params;
    params.score = c.score;
    params.return_weights = true;
    const AttentionOutput out = reference::attention(q, k, v, params);
    const double e0 = std::exp(c.s0), e1 = std::exp(c.s1);
    const double a0 = e0 / (e0 + e1), a1 = e1 / (e0 + e1);
    const Tensor expected_out =
        Tensor::from(std::vector<double>{a0 * 1 + a1 * 3, a0 * -1 + a1 * 2}, {1, 1, 1, 2});
    EXPECT_TRUE(all_close(out.out, expected_out, tol, c.name + " out"));
    EXPECT_TRUE(all_close(out.lse, Tensor::from(std::vector<double>{std::log(e0 + e1)}, {1, 1, 1}),
                          tol, c.name + " lse"));
    EXPECT_TRUE(all_close(out.weights, Tensor::from(std::vector<double>{a0, a1}, {1, 1, 1, 2}), tol,
                          c.name + " weights"));
    EXPECT_EQ(out.out.dtype(), f64);
  }
}

// Local-p by hand: w_p = 0 gives tanh(0) = 0, sigmoid(0) = 1/2, p = S / 2 = 2 for S = 4 keys.
// half_width 2 (sigma 1) keeps every key; weights are softmax * exp(-(j - 2)^2 / 2), with no
// renormalisation, so they sum to less than 1.
TEST(ReferenceAttention, HandComputedLocalPredictive) {
  const Tensor q = Tensor::from(std::vector<double>{1, 0}, {1, 1, 1, 2});
  const Tensor k = Tensor::from(std::vector<double>{0, 0, 1, 0, 2, 0, -1, 0}, {1, 1, 4, 2});
  const Tensor v = Tensor::from(std::vector<double>{1, 2, 3, 4}, {1, 1, 4, 1});
  AttentionParams params;
  params.score = DotScore{};  // scores = [0, 1, 2, -1]
  params.mask.local = {LocalKind::predictive, 2, Tensor::zeros({3, 2}, f64),
                       Tensor::from(std::vector<double>{1, -2, 0.5}, {3})};
  params.return_weights = true;
  const AttentionOutput out = reference::attention(q, k, v, params);

  const double s[4] = {0, 1, 2, -1};
  double sum = 0.0;
  for (double x : s) sum += std::exp(x);
  std::vector<double> weights(4);
  double expected = 0.0, weight_sum = 0.0;
  for (int j = 0; j < 4; ++j) {
    weights[j] = std::exp(s[j]) / sum * std::exp(-(j - 2.0) * (j - 2.0) / 2.0);
    expected += weights[j] * (j + 1);
    weight_sum += weights[j];
  }
  const testing::Tolerance tol = tolerance_for(f64, 8, 64.0);
  EXPECT_TRUE(all_close(out.weights, Tensor::from(weights, {1, 1, 1, 4}), tol, "local-p weights"));
  EXPECT_TRUE(all_close(out.out, Tensor::from(std::vector<double>{expected}, {1, 1, 1, 1}), tol,
                        "local-p out"));
  EXPECT_TRUE(all_close(out.lse, Tensor::from(std::vector<double>{std::log(sum)}, {1, 1, 1}), tol,
                        "local-p lse (before the Gaussian)"));
  EXPECT_LT(weight_sum, 0.99);

  // half_width 1 keeps keys 1, 2, 3 only (|j - 2| <= 1); key 0 is excluded from the softmax.
  params.mask.local.half_width = 1;  // sigma = 1/2
  const AttentionOutput narrow = reference::attention(q, k, v, params);
  double narrow_sum = 0.0;
  for (int j = 1; j < 4; ++j) narrow_sum += std::exp(s[j]);
  std::vector<double> narrow_weights(4, 0.0);
  for (int j = 1; j < 4; ++j)
    narrow_weights[j] = std::exp(s[j]) / narrow_sum * std::exp(-(j - 2.0) * (j - 2.0) * 2.0);
  EXPECT_TRUE(all_close(narrow.weights, Tensor::from(narrow_weights, {1, 1, 1, 4}), tol,
                        "local-p half_width 1 weights"));

  // S_b is the batch's key length: key_lengths {3} gives p = 1.5 over keys 0..2.
  params.mask.local.half_width = 2;
  params.mask.key_lengths = {3};
  const AttentionOutput padded = reference::attention(q, k, v, params);
  double padded_sum = 0.0;
  for (int j = 0; j < 3; ++j) padded_sum += std::exp(s[j]);
  std::vector<double> padded_weights(4, 0.0);
  for (int j = 0; j < 3; ++j)
    padded_weights[j] = std::exp(s[j]) / padded_sum * std::exp(-(j - 1.5) * (j - 1.5) / 2.0);
  EXPECT_TRUE(all_close(padded.weights, Tensor::from(padded_weights, {1, 1, 1, 4}), tol,
                        "local-p with key_lengths weights"));
}

// ---------------------------------------------------------------------------------------------
// Numerics.

TEST(ReferenceAttention, SoftmaxStableAtLargeScores) {
  // q = [100], keys 100 and 99.99 (scores 1e4 and 9999), then -100 and -99.99.
  const Tensor q = Tensor::from(std::vector<double>{100}, {1, 1, 1, 1});
  const Tensor v = Tensor::from(std::vector<double>{1, 0, 0, 1}, {1, 1, 2, 2});
  const testing::Tolerance tol = tolerance_for(f64, 4, 64.0);
  AttentionParams params;
  params.score = DotScore{};
  params.return_weights = true;

  const Tensor k_pos = Tensor::from(std::vector<double>{100, 99.99}, {1, 1, 2, 1});
  const double s_pos[2] = {100.0 * 100.0, 100.0 * 99.99};  // the scores as float64 computes them
  const double w_pos = std::exp(s_pos[1] - s_pos[0]);
  AttentionOutput out = reference::attention(q, k_pos, v, params);
  EXPECT_TRUE(all_close(out.weights,
                        Tensor::from(std::vector<double>{1 / (1 + w_pos), w_pos / (1 + w_pos)},
                                     {1, 1, 1, 2}),
                        tol, "+1e4 weights"));
  EXPECT_TRUE(all_close(out.lse,
                        Tensor::from(std::vector<double>{s_pos[0] + std::log1p(w_pos)}, {1, 1, 1}),
                        tol, "+1e4 lse"));

  const Tensor k_neg = Tensor::from(std::vector<double>{-100, -99.99}, {1, 1, 2, 1});
  out = reference::attention(q, k_neg, v, params);
  EXPECT_TRUE(all_close(out.weights,
                        Tensor::from(std::vector<double>{w_pos / (1 + w_pos), 1 / (1 + w_pos)},
                                     {1, 1, 1, 2}),
                        tol, "-1e4 weights"));
  EXPECT_TRUE(all_finite(out.out));
  const AttentionGrads g =
      reference::attention_backward(q, k_neg, v, params, out, Tensor::full({1, 1, 1, 2}, 1.0, f64));
  EXPECT_TRUE(all_finite(g.dq) && all_finite(g.dk) && all_finite(g.dv));

  // Scores 1e4 apart: the smaller weight underflows to exactly 0, nothing overflows.
  const Tensor k_far = Tensor::from(std::vector<double>{100, -100}, {1, 1, 2, 1});
  out = reference::attention(q, k_far, v, params);
  EXPECT_EQ(out.weights.get({0, 0, 0, 0}), 1.0);
  EXPECT_EQ(out.weights.get({0, 0, 0, 1}), 0.0);
  EXPECT_EQ(out.lse.get({0, 0, 0}), 1e4);
}

// ---------------------------------------------------------------------------------------------
// Fully masked rows: output 0, weights 0, lse -inf, every gradient through them exactly 0.

struct MaskedRowCase {
  std::string name;
  Sizes sizes;
  Mask mask;
  // rows (b, i) expected fully masked (every head)
  std::vector<std::pair<int64_t, int64_t>> masked_rows;
};

std::vector<MaskedRowCase> masked_row_cases() {
  std::vector<MaskedRowCase> cases;
  {
    MaskedRowCase c{"query_lengths {1, 0}", {2, 2, 1, 3, 4, 3, 3, 2}, {}, {}};
    c.mask.query_lengths = {1, 0};
    c.masked_rows = {{0, 1}, {0, 2}, {1, 0}, {1, 1}, {1, 2}};
    cases.push_back(c);
  }
  {
    MaskedRowCase c{"key_lengths {0, 2}", {2, 2, 1, 3, 4, 3, 3, 2}, {}, {}};
    c.mask.key_lengths = {0, 2};
    c.masked_rows = {{0, 0}, {0, 1}, {0, 2}};
    cases.push_back(c);
  }
  {
    // pos(i) = i + 2 - 4 = i - 2: rows 0 and 1 see no key.
    MaskedRowCase c{"causal bottom_right Tk < Tq", {1, 2, 2, 4, 2, 3, 3, 2}, {}, {}};
    c.mask.causal = true;
    c.mask.alignment = Alignment::bottom_right;
    c.masked_rows = {{0, 0}, {0, 1}};
    cases.push_back(c);
  }
  {
    // Only key j == i is in the window; rows 3, 4 have no such key.
    MaskedRowCase c{"window 0/0 with Tq > Tk", {1, 1, 1, 5, 3, 3, 3, 2}, {}, {}};
    c.mask.window = Window{0, 0};
    c.masked_rows = {{0, 3}, {0, 4}};
    cases.push_back(c);
  }
  {
    // A -inf bias on every key of row 1: nothing to attend, treated like a masked row.
    MaskedRowCase c{"-inf bias row", {1, 1, 1, 3, 4, 3, 3, 2}, {}, {}};
    Tensor bias = Tensor::zeros({3, 4}, f64);
    for (int64_t j = 0; j < 4; ++j) bias.set({1, j}, -kInf);
    c.mask.bias = bias;
    c.masked_rows = {{0, 1}};
    cases.push_back(c);
  }
  return cases;
}

TEST(ReferenceAttention, FullyMaskedRowsAreExactZeros) {
  for (const MaskedRowCase& c : masked_row_cases()) {
    const Sizes& s = c.sizes;
    const Inputs in = random_inputs(s, 10);
    for (const NamedScore& ns : every_score(s, 20)) {
      const std::string what = c.name + " / " + ns.name;
      AttentionParams params;
      params.score = ns.score;
      params.mask = c.mask;
      params.return_weights = true;
      const AttentionOutput out = reference::attention(in.q, in.k, in.v, params);
      // dout = 1 everywhere, so any leak from a masked row would show.
      const Tensor dout = Tensor::full(out.out.shape(), 1.0, f64);
      const AttentionGrads g = reference::attention_backward(in.q, in.k, in.v, params, out, dout);
      EXPECT_TRUE(all_finite(out.out) && all_finite(g.dq) && all_finite(g.dk) && all_finite(g.dv))
          << what;
      for (auto [b, i] : c.masked_rows)
        for (int64_t h = 0; h < s.Hq; ++h) {
          EXPECT_EQ(out.lse.get({b, h, i}), -kInf) << what;
          EXPECT_EQ(count_nonzero(out.out.select(0, b).select(0, h).select(0, i)), 0) << what;
          EXPECT_EQ(count_nonzero(out.weights.select(0, b).select(0, h).select(0, i)), 0) << what;
          EXPECT_EQ(count_nonzero(g.dq.select(0, b).select(0, h).select(0, i)), 0) << what;
        }
      if (c.mask.bias.defined()) {
        // The -inf row passes no gradient to its bias entries.
        EXPECT_EQ(count_nonzero(g.dbias.select(0, 1)), 0) << what;
      }
    }
  }
}

// Every row of a batch masked: the batch's keys, values and the score parameters get exactly 0.
TEST(ReferenceAttention, FullyMaskedBatchPassesNoGradient) {
  const Sizes s{1, 2, 1, 3, 4, 3, 3, 2};
  const Inputs in = random_inputs(s, 30);
  for (const NamedScore& ns : every_score(s, 31)) {
    for (int variant = 0; variant < 2; ++variant) {
      AttentionParams params;
      params.score = ns.score;
      if (variant == 0) params.mask.key_lengths = {0};
      else params.mask.query_lengths = {0};
      const std::string what = ns.name + (variant == 0 ? " key_lengths 0" : " query_lengths 0");
      const AttentionOutput out = reference::attention(in.q, in.k, in.v, params);
      const AttentionGrads g = reference::attention_backward(
          in.q, in.k, in.v, params, out, Tensor::full(out.out.shape(), 1.0, f64));
      EXPECT_EQ(count_nonzero(out.out), 0) << what;
      for (double x : out.lse.to_vector()) EXPECT_EQ(x, -kInf) << what;
      EXPECT_EQ(count_nonzero(g.dq) + count_nonzero(g.dk) + count_nonzero(g.dv), 0) << what;
      for (const auto& [field, t] : score_tensors(g.dscore)) {
        if (t.defined()) {
          EXPECT_EQ(count_nonzero(t), 0) << what << " " << field;
        }
      }
    }
  }
}

TEST(ReferenceAttention, EmptySequences) {
  const Inputs no_queries = random_inputs({1, 2, 1, 0, 3, 4, 4, 2}, 40);
  AttentionOutput out = reference::attention(no_queries.q, no_queries.k, no_queries.v);
  EXPECT_EQ(out.out.shape(), (Shape{1, 2, 0, 2}));
  EXPECT_EQ(out.lse.shape(), (Shape{1, 2, 0}));

  const Inputs no_keys = random_inputs({1, 2, 1, 3, 0, 4, 4, 2}, 41);
  out = reference::attention(no_keys.q, no_keys.k, no_keys.v);
  EXPECT_EQ(out.out.shape(), (Shape{1, 2, 3, 2}));
  EXPECT_EQ(count_nonzero(out.out), 0);
  for (double x : out.lse.to_vector()) EXPECT_EQ(x, -kInf);
  const AttentionGrads g = reference::attention_backward(
      no_keys.q, no_keys.k, no_keys.v, {}, out, Tensor::full({1, 2, 3, 2}, 1.0, f64));
  EXPECT_EQ(count_nonzero(g.dq), 0);
  EXPECT_EQ(g.dk.shape(), (Shape{1, 1, 0, 4}));
}

// ---------------------------------------------------------------------------------------------
// Mask semantics, each against an independent construction.

// Builds the boolean [B, Hq, Tq, Tk] mask that `allowed(b, h, i, j)` describes.
template <class Fn>
Tensor bool_mask(const Sizes& s, Fn&& allowed) {
  Tensor m = Tensor::zeros({s.B, s.Hq, s.Tq, s.Tk}, DType::b8);
  for (int64_t b = 0; b < s.B; ++b)
    for (int64_t h = 0; h < s.Hq; ++h)
      for (int64_t i = 0; i < s.Tq; ++i)
        for (int64_t j = 0; j < s.Tk; ++j) m.set({b, h, i, j}, allowed(b, h, i, j) ? 1.0 : 0.0);
  return m;
}

// attention with `mask` must equal attention with the same visibility given as `allowed`.
void expect_same_as_allowed(const Inputs& in, const Mask& mask, const Tensor& allowed,
                            const std::string& what) {
  AttentionParams a, b;
  a.mask = mask;
  a.return_weights = b.return_weights = true;
  b.mask.allowed = allowed;
  const AttentionOutput x = reference::attention(in.q, in.k, in.v, a);
  const AttentionOutput y = reference::attention(in.q, in.k, in.v, b);
  const testing::Tolerance exact{0.0, 0.0};
  EXPECT_TRUE(all_close(x.out, y.out, exact, what + " out"));
  EXPECT_TRUE(all_close(x.lse, y.lse, exact, what + " lse"));
  EXPECT_TRUE(all_close(x.weights, y.weights, exact, what + " weights"));
}

TEST(ReferenceAttention, MasksMatchExplicitBooleanMasks) {
  const Sizes s{2, 2, 1, 4, 6, 3, 3, 2};
  const Inputs in = random_inputs(s, 50);
  const std::vector<int64_t> key_len{6, 4}, query_len{4, 3};
  {
    Mask m;
    m.causal = true;
    expect_same_as_allowed(in, m, bool_mask(s, [](auto, auto, auto i, auto j) { return j <= i; }),
                           "causal top_left");
  }
  {
    Mask m;
    m.causal = true;
    m.alignment = Alignment::bottom_right;
    m.key_lengths = key_len;
    m.query_lengths = query_len;
    expect_same_as_allowed(in, m, bool_mask(s, [&](int64_t b, auto, int64_t i, int64_t j) {
                             const int64_t pos = i + key_len[b] - query_len[b];
                             return i < query_len[b] && j < key_len[b] && j <= pos;
                           }),
                           "causal bottom_right with lengths");
  }
  {
    Mask m;
    m.window = Window{1, 2};
    expect_same_as_allowed(in, m, bool_mask(s, [](auto, auto, int64_t i, int64_t j) {
                             return i - 1 <= j && j <= i + 2;
                           }),
                           "window 1/2");
    m.window = Window{Window::unbounded, 0};
    expect_same_as_allowed(in, m, bool_mask(s, [](auto, auto, int64_t i, int64_t j) {
                             return j <= i;
                           }),
                           "window unbounded/0 == causal");
  }
  {
    Mask m;
    m.local = {LocalKind::monotonic, 1, {}, {}};
    m.alignment = Alignment::bottom_right;
    expect_same_as_allowed(in, m, bool_mask(s, [&](auto, auto, int64_t i, int64_t j) {
                             return std::abs(j - (i + s.Tk - s.Tq)) <= 1;
                           }),
                           "local-m bottom_right");
  }
}

TEST(ReferenceAttention, AllowedBroadcastsLikeNumpy) {
  const Sizes s{2, 2, 1, 3, 4, 3, 3, 2};
  const Inputs in = random_inputs(s, 55);
  // [Tk] pattern, and the same pattern as a full tensor.
  const Tensor row = Tensor::from(std::vector<double>{1, 0, 1, 1}, {4}).to(DType::b8);
  Mask m;
  m.allowed = row;
  expect_same_as_allowed(in, m, bool_mask(s, [](auto, auto, auto, int64_t j) { return j != 1; }),
                         "allowed [Tk]");
  const Tensor per_head = Tensor::from(std::vector<double>{1, 0}, {2, 1, 1}).to(DType::b8);
  m.allowed = per_head;  // [Hq, 1, 1]: head 1 sees nothing
  AttentionParams p;
  p.mask = m;
  const AttentionOutput out = reference::attention(in.q, in.k, in.v, p);
  for (double x : out.lse.select(1, 1).to_vector()) EXPECT_EQ(x, -kInf);
  for (double x : out.lse.select(1, 0).to_vector()) EXPECT_TRUE(std::isfinite(x));
}

// key_lengths must be the same as cutting the keys off.
TEST(ReferenceAttention, KeyLengthsEqualTruncatedKeys) {
  const Sizes s{1, 2, 1, 3, 5, 3, 3, 2};
  const Inputs in = random_inputs(s, 60);
  AttentionParams p;
  p.mask.key_lengths = {3};
  const AttentionOutput masked = reference::attention(in.q, in.k, in.v, p);
  const AttentionOutput cut =
      reference::attention(in.q, in.k.slice(2, 0, 3), in.v.slice(2, 0, 3), AttentionParams{});
  EXPECT_TRUE(all_close(masked.out, cut.out, tolerance_for(f64, 5), "key_lengths out"));
  EXPECT_TRUE(all_close(masked.lse, cut.lse, tolerance_for(f64, 5), "key_lengths lse"));
}

// Additive bias and ALiBi: ALiBi is the bias -slope[h] |pos(i) - j|.
TEST(ReferenceAttention, AlibiEqualsExplicitBias) {
  const Sizes s{1, 3, 1, 4, 5, 3, 3, 2};
  const Inputs in = random_inputs(s, 65);
  for (Alignment alignment : {Alignment::top_left, Alignment::bottom_right}) {
    AttentionParams a, b;
    a.mask.alibi_slopes = alibi_slopes(s.Hq);
    a.mask.alignment = b.mask.alignment = alignment;
    Tensor bias = Tensor::zeros({s.Hq, s.Tq, s.Tk}, f64);  // broadcast over B
    const int64_t shift = alignment == Alignment::bottom_right ? s.Tk - s.Tq : 0;
    for (int64_t h = 0; h < s.Hq; ++h)
      for (int64_t i = 0; i < s.Tq; ++i)
        for (int64_t j = 0; j < s.Tk; ++j)
          bias.set({h, i, j}, -a.mask.alibi_slopes[h] * std::abs(i + shift - j));
    b.mask.bias = bias;
    const AttentionOutput x = reference::attention(in.q, in.k, in.v, a);
    const AttentionOutput y = reference::attention(in.q, in.k, in.v, b);
    EXPECT_TRUE(all_close(x.out, y.out, tolerance_for(f64, 5), "alibi out"));
    EXPECT_TRUE(all_close(x.lse, y.lse, tolerance_for(f64, 5), "alibi lse"));
  }
}

// Grouped-query attention equals ordinary attention with each kv head repeated Hq / Hkv times.
TEST(ReferenceAttention, GroupedQueryEqualsRepeatedHeads) {
  const Sizes s{2, 4, 2, 3, 4, 3, 3, 2};
  const Inputs in = random_inputs(s, 70);
  Tensor k_rep = Tensor::empty({s.B, s.Hq, s.Tk, s.Dk}, f64);
  Tensor v_rep = Tensor::empty({s.B, s.Hq, s.Tk, s.Dv}, f64);
  for (int64_t h = 0; h < s.Hq; ++h) {
    k_rep.select(1, h).copy_from(in.k.select(1, h / 2));
    v_rep.select(1, h).copy_from(in.v.select(1, h / 2));
  }
  AttentionParams p;
  p.mask.causal = true;
  const AttentionOutput gqa = reference::attention(in.q, in.k, in.v, p);
  const AttentionOutput mha = reference::attention(in.q, k_rep, v_rep, p);
  EXPECT_TRUE(all_close(gqa.out, mha.out, {0.0, 0.0}, "gqa out"));
}

// Per-head scores: head h of the output equals single-head attention with head_scores[h].
TEST(ReferenceAttention, HeadScoresActPerHead) {
  const Sizes s{1, 3, 1, 3, 4, 3, 3, 2};
  const Inputs in = random_inputs(s, 75);
  const std::vector<NamedScore> scores = every_score(s, 76);
  AttentionParams p;
  p.head_scores = {scores[0].score, scores[5].score, scores[7].score};
  p.return_weights = true;
  const AttentionOutput out = reference::attention(in.q, in.k, in.v, p);
  Tensor mean = Tensor::zeros({s.B, s.Tq, s.Tk}, f64);
  for (int64_t h = 0; h < s.Hq; ++h) {
    AttentionParams single;
    single.score = p.head_scores[h];
    const AttentionOutput one = reference::attention(in.q.slice(1, h, h + 1), in.k, in.v, single);
    EXPECT_TRUE(all_close(out.out.slice(1, h, h + 1), one.out, {0.0, 0.0},
                          "head " + std::to_string(h)));
    for (int64_t i = 0; i < s.Tq; ++i)
      for (int64_t j = 0; j < s.Tk; ++j)
        mean.set({0, i, j}, mean.get({0, i, j}) + out.weights.get({0, h, i, j}) / s.Hq);
  }
  EXPECT_TRUE(all_close(out.mean_weights, mean, tolerance_for(f64, s.Hq), "mean_weights"));
}

// float32 and strided inputs are converted: results equal the float64 contiguous run.
TEST(ReferenceAttention, ConvertsDtypeAndStrides) {
  const Sizes s{1, 2, 1, 3, 4, 3, 3, 2};
  const Inputs in = random_inputs(s, 80);
  const AttentionOutput base = reference::attention(in.q, in.k, in.v);

  const Tensor q32 = in.q.to(DType::f32), k32 = in.k.to(DType::f32), v32 = in.v.to(DType::f32);
  const AttentionOutput from32 = reference::attention(q32, k32, v32);
  const AttentionOutput exact32 = reference::attention(q32.to(f64), k32.to(f64), v32.to(f64));
  EXPECT_EQ(from32.out.dtype(), f64);
  EXPECT_TRUE(all_close(from32.out, exact32.out, {0.0, 0.0}, "float32 inputs"));

  // q stored as [B, Tq, Hq, Dq] and viewed as [B, Hq, Tq, Dq].
  Tensor q_t = in.q.transpose(1, 2).clone().transpose(1, 2);
  ASSERT_FALSE(q_t.is_contiguous());
  const AttentionOutput strided = reference::attention(q_t, in.k, in.v);
  EXPECT_TRUE(all_close(strided.out, base.out, {0.0, 0.0}, "strided q"));
}

TEST(ReferenceAttention, ValidatesLikeTheFrontEnd) {
  const Inputs in = random_inputs({1, 1, 1, 2, 3, 4, 5, 2}, 85);
  AttentionParams p;
  p.score = DotScore{};
  try {
    reference::attention(in.q, in.k, in.v, p);
    ADD_FAILURE() << "dot score with Dq != Dk accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("[reference::attention]"), std::string::npos) << e.what();
  }
  const Inputs ok = random_inputs({1, 1, 1, 2, 3, 4, 4, 2}, 86);
  const AttentionOutput out = reference::attention(ok.q, ok.k, ok.v);
  EXPECT_THROW(reference::attention_backward(ok.q, ok.k, ok.v, {}, out,
                                             Tensor::zeros({1, 1, 2, 3}, f64)),
               Error);
}

// ---------------------------------------------------------------------------------------------
// Dropout.

TEST(ReferenceAttention, DropoutIsReproducibleAndScaled) {
  const Sizes s{1, 2, 1, 4, 5, 3, 3, 2};
  const Inputs in = random_inputs(s, 90);
  AttentionParams p;
  p.return_weights = true;
  const AttentionOutput plain = reference::attention(in.q, in.k, in.v, p);
  p.dropout = {0.0, 1234};
  EXPECT_TRUE(all_close(reference::attention(in.q, in.k, in.v, p).out, plain.out, {0.0, 0.0},
                        "p = 0"));

  p.dropout = {0.3, 1234};
  const AttentionOutput a = reference::attention(in.q, in.k, in.v, p);
  const AttentionOutput b = reference::attention(in.q, in.k, in.v, p);
  EXPECT_TRUE(all_close(a.out, b.out, {0.0, 0.0}, "same seed"));
  EXPECT_TRUE(all_close(a.weights, plain.weights, {0.0, 0.0}, "weights are before dropout"));
  p.dropout.seed = 4321;
  const AttentionOutput c = reference::attention(in.q, in.k, in.v, p);
  EXPECT_FALSE(all_close(a.out, c.out, {0.0, 0.0}, "different seeds"));

  // out_i = sum_j w_ij keep(seed, b, h, i, j) / (1 - p) v_j, written out independently.
  Tensor expected = Tensor::zeros(a.out.shape(), f64);
  for (int64_t h = 0; h < s.Hq; ++h)
    for (int64_t i = 0; i < s.Tq; ++i)
      for (int64_t j = 0; j < s.Tk; ++j) {
        if (!dropout_keep(1234, 0.3, 0, h, i, j)) continue;
        for (int64_t c2 = 0; c2 < s.Dv; ++c2)
          expected.set({0, h, i, c2}, expected.get({0, h, i, c2}) +
                                          a.weights.get({0, h, i, j}) / 0.7 * in.v.get({0, 0, j, c2}));
      }
  EXPECT_TRUE(all_close(a.out, expected, tolerance_for(f64, s.Tk), "dropout out"));
}

// With one-hot values v_j = e_j the output row is the dropped-out weight row itself, so the
// fraction of kept weights can be read off: about 1 - p.
TEST(ReferenceAttention, DropoutKeepRate) {
  const Sizes s{2, 4, 4, 32, 32, 4, 4, 32};
  Inputs in = random_inputs(s, 95);
  in.v = Tensor::zeros({s.B, s.Hkv, s.Tk, s.Tk}, f64);
  for (int64_t b = 0; b < s.B; ++b)
    for (int64_t g = 0; g < s.Hkv; ++g)
      for (int64_t j = 0; j < s.Tk; ++j) in.v.set({b, g, j, j}, 1.0);
  const double p = 0.25;
  AttentionParams params;
  params.dropout = {p, 99};
  params.return_weights = true;
  const AttentionOutput out = reference::attention(in.q, in.k, in.v, params);
  // Each output element is one weight times 1 or 0 (the other one-hot terms add exact zeros).
  const std::vector<double> dropped = out.out.to_vector(), weights = out.weights.to_vector();
  std::vector<double> expected(dropped.size(), 0.0);
  int64_t kept = 0;
  for (std::size_t n = 0; n < dropped.size(); ++n) {
    if (dropped[n] == 0.0) continue;  // softmax weights are > 0 here: 0 means dropped
    ++kept;
    expected[n] = weights[n] / (1 - p);
  }
  EXPECT_TRUE(all_close(out.out, Tensor::from(expected, out.out.shape()), tolerance_for(f64, 1),
                        "kept weights scaled by 1 / (1 - p)"));
  const double n = static_cast<double>(dropped.size());
  const double rate = static_cast<double>(kept) / n;
  // Binomial standard deviation sqrt(p (1 - p) / n) = 0.0048 for n = 8192: allow 5 of them.
  EXPECT_NEAR(rate, 1 - p, 5 * std::sqrt(p * (1 - p) / n));
}

// ---------------------------------------------------------------------------------------------
// NaN confinement: a NaN in one query row poisons that row's output only.

TEST(ReferenceAttention, NanQueryStaysInItsRow) {
  const Sizes s{2, 2, 1, 3, 4, 3, 3, 2};
  const Inputs in = random_inputs(s, 100);
  Tensor q_nan = in.q.clone();
  q_nan.set({1, 0, 1, 2}, std::numeric_limits<double>::quiet_NaN());
  std::vector<NamedScore> cases = every_score(s, 101);
  AttentionParams local_p;
  local_p.mask.local = {LocalKind::predictive, 2, random_tensor({3, s.Dq}, f64, 102),
                        random_tensor({3}, f64, 103)};
  for (const NamedScore& ns : cases) {
    for (bool use_local_p : {false, true}) {
      AttentionParams p = use_local_p ? local_p : AttentionParams{};
      p.score = ns.score;
      const std::string what = ns.name + (use_local_p ? " local-p" : "");
      const AttentionOutput clean = reference::attention(in.q, in.k, in.v, p);
      const AttentionOutput dirty = reference::attention(q_nan, in.k, in.v, p);
      for (int64_t b = 0; b < s.B; ++b)
        for (int64_t h = 0; h < s.Hq; ++h)
          for (int64_t i = 0; i < s.Tq; ++i) {
            const Tensor row = dirty.out.select(0, b).select(0, h).select(0, i);
            if (b == 1 && h == 0 && i == 1) {
              for (double x : row.to_vector()) EXPECT_TRUE(std::isnan(x)) << what;
            } else {
              EXPECT_TRUE(all_close(row, clean.out.select(0, b).select(0, h).select(0, i),
                                    {0.0, 0.0}, what));
            }
          }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Finite-difference checks of every gradient.

TEST(ReferenceAttentionGradients, EveryScoreKind) {
  const Sizes s{2, 2, 1, 3, 4, 3, 3, 2};
  for (const NamedScore& ns : every_score(s, 200)) {
    const Inputs in = random_inputs(s, 210);
    AttentionParams p;
    p.score = ns.score;
    expect_gradients(in, p, ns.name, {reads_keys(ns.score)});
  }
}

// Scores that allow Dq != Dk, with non-trivial masks.
TEST(ReferenceAttentionGradients, UnequalWidthsWithMasks) {
  const Sizes s{1, 2, 2, 4, 5, 3, 4, 3};
  for (const NamedScore& ns : every_score(s, 220)) {
    const Inputs in = random_inputs(s, 230);
    AttentionParams p;
    p.score = ns.score;
    p.mask.causal = true;
    p.mask.alignment = Alignment::bottom_right;
    expect_gradients(in, p, ns.name + " Dq != Dk",
                     {reads_keys(ns.score)});
  }
}

TEST(ReferenceAttentionGradients, BiasWithBroadcasting) {
  const Sizes s{2, 2, 1, 3, 4, 3, 3, 2};
  const std::vector<Shape> bias_shapes = {
      {s.B, s.Hq, s.Tq, s.Tk}, {1, s.Hq, 1, s.Tk}, {s.Tq, s.Tk}, {s.B, 1, s.Tq, 1}, {s.Tk}, {1}};
  for (const Shape& shape : bias_shapes) {
    const Inputs in = random_inputs(s, 240);
    AttentionParams p;
    p.mask.bias = random_tensor(shape, f64, 241);
    p.mask.key_lengths = {4, 3};
    expect_gradients(in, p, "bias " + shape_str(shape));
  }
}

TEST(ReferenceAttentionGradients, LocalAttention) {
  const Sizes s{2, 2, 1, 4, 7, 3, 3, 2};
  for (const NamedScore& ns : every_score(s, 250)) {
    const Inputs in = random_inputs(s, 260);
    AttentionParams p;
    p.score = ns.score;
    p.mask.key_lengths = {7, 5};
    p.mask.local = {LocalKind::predictive, 2, random_tensor({3, s.Dq}, f64, 261, -2.0, 2.0),
                    random_tensor({3}, f64, 262, -2.0, 2.0)};
    expect_gradients(in, p, ns.name + " local-p",
                     {reads_keys(ns.score)});
  }
  const Inputs in = random_inputs(s, 270);
  AttentionParams p;
  p.mask.local = {LocalKind::monotonic, 1, {}, {}};
  p.mask.alignment = Alignment::bottom_right;
  expect_gradients(in, p, "local-m");
}

TEST(ReferenceAttentionGradients, Dropout) {
  const Sizes s{2, 2, 1, 4, 5, 3, 3, 2};
  for (const NamedScore& ns : every_score(s, 280)) {
    const Inputs in = random_inputs(s, 290);
    AttentionParams p;
    p.score = ns.score;
    p.dropout = {0.3, 17};  // the keep mask is a function of the seed: FD sees the same mask
    expect_gradients(in, p, ns.name + " dropout",
                     {reads_keys(ns.score)});
  }
  // Dropout after local-p's Gaussian.
  const Inputs in = random_inputs(s, 295);
  AttentionParams p;
  p.dropout = {0.4, 5};
  p.mask.local = {LocalKind::predictive, 3, random_tensor({2, s.Dq}, f64, 296, -2.0, 2.0),
                  random_tensor({2}, f64, 297, -2.0, 2.0)};
  expect_gradients(in, p, "local-p + dropout");
}

TEST(ReferenceAttentionGradients, GroupedQueryAndHeadScores) {
  const Sizes s{2, 4, 2, 3, 4, 3, 3, 2};
  const Inputs in = random_inputs(s, 300);
  AttentionParams gqa;
  gqa.score = every_score(s, 301)[7].score;  // additive: kv-head gradients summed over the group
  expect_gradients(in, gqa, "gqa additive");

  const std::vector<NamedScore> scores = every_score(s, 310);
  AttentionParams heads;
  heads.head_scores = {scores[3].score, scores[4].score, scores[5].score, scores[9].score};
  heads.mask.causal = true;
  expect_gradients(in, heads, "head_scores cosine/trilinear/general/concat");

  // The unused params.score gets an all-zero gradient of its own alternative.
  const AttentionOutput fwd = reference::attention(in.q, in.k, in.v, heads);
  heads.score = scores[5].score;  // general full, ignored because head_scores is set
  const AttentionGrads g = reference::attention_backward(in.q, in.k, in.v, heads, fwd,
                                                         Tensor::full(fwd.out.shape(), 1.0, f64));
  ASSERT_TRUE(std::holds_alternative<GeneralScore>(g.dscore));
  EXPECT_EQ(count_nonzero(std::get<GeneralScore>(g.dscore).weight), 0);
}

// Every mask kind at once.
TEST(ReferenceAttentionGradients, ComposedMasks) {
  const Sizes s{2, 4, 2, 5, 7, 3, 4, 3};
  for (const NamedScore& ns : every_score(s, 320)) {
    const Inputs in = random_inputs(s, 330);
    AttentionParams p;
    p.score = ns.score;
    p.mask.causal = true;
    p.mask.alignment = Alignment::bottom_right;
    p.mask.key_lengths = {7, 6};
    p.mask.query_lengths = {5, 3};
    p.mask.window = Window{3, Window::unbounded};
    p.mask.bias = random_tensor({s.B, 1, s.Tq, s.Tk}, f64, 331);
    p.mask.alibi_slopes = alibi_slopes(s.Hq);
    Tensor allowed = Tensor::full({s.Tq, s.Tk}, 1.0, DType::b8);
    allowed.set({4, 5}, 0.0);
    p.mask.allowed = allowed;
    p.dropout = {0.2, 3};
    expect_gradients(in, p, ns.name + " composed",
                     {reads_keys(ns.score)});
  }
}

}  // namespace
}  // namespace attn
