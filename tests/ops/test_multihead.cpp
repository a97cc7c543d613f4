// Multi-head attention (attn/multihead.h): the fast path (BLAS projections around
// attn::attention) against the float64 oracle attn::reference::multihead_attention, forward and
// every gradient, in float32 and float64; every gradient again by central finite differences in
// float64; grouped-query heads, cross-attention widths, biases on/off, per-head scoring; the KV
// cache (token-by-token decoding equals the full causal forward, capacity growth, multi-token
// appends); and one error test per validation check.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "attn/multihead.h"
#include "support/test_support.h"

namespace attn {
namespace {

using attn::testing::expect_error;

using testing::all_close;
using testing::check_gradient;
using testing::random_tensor;
using testing::Tolerance;
using testing::tolerance_for;
using testing::weighted_sum;

constexpr DType f32 = DType::f32;
constexpr DType f64 = DType::f64;

// ---------------------------------------------------------------------------------------------
// Helpers.

// Xavier weights with random (not zero) biases, so that the bias paths are exercised.
MultiHeadWeights random_weights(const MultiHeadConfig& config, DType dtype, uint64_t seed) {
  MultiHeadWeights w = MultiHeadWeights::init(config, dtype, seed);
  if (config.bias) {
    w.b_q = random_tensor(w.b_q.shape(), dtype, seed + 1, -0.5, 0.5);
    w.b_k = random_tensor(w.b_k.shape(), dtype, seed + 2, -0.5, 0.5);
    w.b_v = random_tensor(w.b_v.shape(), dtype, seed + 3, -0.5, 0.5);
    w.b_o = random_tensor(w.b_o.shape(), dtype, seed + 4, -0.5, 0.5);
  }
  return w;
}

// Every weight field with its name, for loops over gradients (biases only when defined).
std::vector<std::pair<std::string, Tensor*>> fields(MultiHeadWeights& w) {
  std::vector<std::pair<std::string, Tensor*>> all = {
      {"w_q", &w.w_q}, {"b_q", &w.b_q}, {"w_k", &w.w_k}, {"b_k", &w.b_k},
      {"w_v", &w.w_v}, {"b_v", &w.b_v}, {"w_o", &w.w_o}, {"b_o", &w.b_o}};
  std::vector<std::pair<std::string, Tensor*>> defined;
  for (auto& f : all)
    if (f.second->defined()) defined.push_back(f);
  return defined;
}

struct Inputs {
  Tensor query, key, value;
};

Inputs random_inputs(const MultiHeadConfig& c, int64_t B, int64_t Tq, int64_t Tk, DType dtype,
                     uint64_t seed) {
  const int64_t Ek = c.key_input_dim ? c.key_input_dim : c.d_model;
  const int64_t Ev = c.value_input_dim ? c.value_input_dim : c.d_model;
  return {random_tensor({B, Tq, c.d_model}, dtype, seed),
          random_tensor({B, Tk, Ek}, dtype, seed + 1),
          random_tensor({B, Tk, Ev}, dtype, seed + 2)};
}

// One problem: config, sizes and attention parameters.
struct Case {
  std::string name;
  MultiHeadConfig config;
  int64_t B = 2, Tq = 5, Tk = 5;
  AttentionParams params;
};

// The error of a float32 result against the float64 oracle: every output element is a chain of
// reductions (input projection over E or Ek/Ev, scores over Dk, values over Tk, output
// projection over Hq * Dv), each contributing ~sqrt(terms) * u (tolerance_for).
int64_t forward_terms(const Case& c) {
  const int64_t E = c.config.d_model;
  const int64_t Dk = c.config.head_dim ? c.config.head_dim : E / c.config.num_heads;
  const int64_t Dv = c.config.value_head_dim ? c.config.value_head_dim : Dk;
  const int64_t Ein = std::max({E, c.config.key_input_dim, c.config.value_input_dim});
  return Ein + Dk + c.Tk + c.config.num_heads * Dv;
}
// Gradients add the sums over B * T rows of the weight gradients to the forward chain.
int64_t backward_terms(const Case& c) { return forward_terms(c) + c.B * std::max(c.Tq, c.Tk); }

// A tolerance for a reduction whose terms can cancel: the rounding error is relative to the sum
// of |terms|, not to the result, so the absolute part scales with the largest expected element.
Tolerance scaled(Tolerance tol, const Tensor& expected) {
  double largest = 1.0;
  for (double x : expected.to_vector()) largest = std::max(largest, std::abs(x));
  return {tol.atol * largest, tol.rtol};
}

std::vector<Case> forward_cases() {
  std::vector<Case> cases;
  {
    Case c{"mha", {.d_model = 16, .num_heads = 4}, 2, 5, 5, {}};
    cases.push_back(c);
  }
  {
    Case c{"gqa2_causal", {.d_model = 16, .num_heads = 4, .num_kv_heads = 2}, 2, 6, 6, {}};
    c.params.mask.causal = true;
    cases.push_back(c);
  }
  {
    Case c{"mqa_padded", {.d_model = 16, .num_heads = 4, .num_kv_heads = 1}, 2, 4, 7, {}};
    c.params.mask.key_lengths = {3, 7};
    cases.push_back(c);
  }
  {
    // Cross-attention: memory widths differ from d_model and from each other, head widths are
    // explicit (d_model / num_heads would be 4), Dv != Dk, Tq != Tk.
    Case c{"cross_widths",
           {.d_model = 12, .num_heads = 3, .head_dim = 5, .value_head_dim = 7, .key_input_dim = 9,
            .value_input_dim = 6},
           2, 4, 7, {}};
    cases.push_back(c);
  }
  {
    Case c{"no_bias", {.d_model = 8, .num_heads = 2, .bias = false}, 3, 3, 4, {}};
    cases.push_back(c);
  }
  {
    Case c{"one_head_one_token", {.d_model = 5, .num_heads = 1}, 1, 1, 1, {}};
    cases.push_back(c);
  }
  {
    // Odd sizes around a power of two, bottom-right causal with Tq < Tk (a chunk of a decode).
    Case c{"long_bottom_right", {.d_model = 12, .num_heads = 6, .num_kv_heads = 3}, 1, 17, 129, {}};
    c.params.mask.causal = true;
    c.params.mask.alignment = Alignment::bottom_right;
    cases.push_back(c);
  }
  {
    // No keys: every row is fully masked, attention gives 0, so output = b_o.
    Case c{"no_keys", {.d_model = 8, .num_heads = 2}, 2, 3, 0, {}};
    cases.push_back(c);
  }
  {
    Case c{"no_queries", {.d_model = 8, .num_heads = 2}, 2, 0, 3, {}};
    cases.push_back(c);
  }
  {
    Case c{"dropout_alibi", {.d_model = 16, .num_heads = 4, .num_kv_heads = 2}, 2, 5, 6, {}};
    c.params.dropout = {.p = 0.25, .seed = 7};
    c.params.mask.alibi_slopes = alibi_slopes(4);
    cases.push_back(c);
  }
  return cases;
}

// One scoring function per query head (Dq = Dk = head_dim = 3): per-head scoring through
// params.head_scores reaches step 4 unchanged.
AttentionParams per_head_scores(DType dtype, uint64_t seed) {
  const int64_t D = 3, A = 4;
  AttentionParams p;
  p.head_scores.push_back(ScaledDotScore{});
  p.head_scores.push_back(DotScore{});
  p.head_scores.push_back(
      GeneralScore{.weight = random_tensor({D, D}, dtype, seed), .u = {}, .v = {}});
  p.head_scores.push_back(AdditiveScore{.w_query = random_tensor({A, D}, dtype, seed + 1),
                                        .w_key = random_tensor({A, D}, dtype, seed + 2),
                                        .bias = random_tensor({A}, dtype, seed + 3),
                                        .v = random_tensor({A}, dtype, seed + 4)});
  return p;
}

// ---------------------------------------------------------------------------------------------
// Forward and backward against the float64 oracle.

void expect_matches_reference(const Case& c, DType dtype) {
  SCOPED_TRACE(c.name + " " + dtype_name(dtype));
  const MultiHeadWeights w = random_weights(c.config, dtype, 11);
  const Inputs in = random_inputs(c.config, c.B, c.Tq, c.Tk, dtype, 21);
  const AttentionParams& params = c.params;

  // Without returned weights (float32 dot-product scores may take the fused kernel).
  const MultiHeadOutput fast = multihead_attention(c.config, w, in.query, in.key, in.value, params);
  const MultiHeadOutput ref =
      reference::multihead_attention(c.config, w, in.query, in.key, in.value, params);
  EXPECT_EQ(fast.output.dtype(), dtype);
  const Tolerance fwd = tolerance_for(dtype, forward_terms(c));
  EXPECT_TRUE(all_close(fast.output, ref.output, fwd, "output"));
  EXPECT_TRUE(all_close(fast.q, ref.q, fwd, "projected q"));
  EXPECT_TRUE(all_close(fast.k, ref.k, fwd, "projected k"));
  EXPECT_TRUE(all_close(fast.v, ref.v, fwd, "projected v"));
  EXPECT_TRUE(all_close(fast.attention.lse, ref.attention.lse, fwd, "lse"));

  // With the alignment weights (the composed path).
  AttentionParams with_weights = params;
  with_weights.return_weights = true;
  const MultiHeadOutput fast_w =
      multihead_attention(c.config, w, in.query, in.key, in.value, with_weights);
  const MultiHeadOutput ref_w =
      reference::multihead_attention(c.config, w, in.query, in.key, in.value, with_weights);
  EXPECT_TRUE(all_close(fast_w.output, ref.output, fwd, "output with weights"));
  EXPECT_TRUE(all_close(fast_w.attention.weights, ref_w.attention.weights, fwd, "weights"));
  EXPECT_TRUE(all_close(fast_w.attention.mean_weights, ref_w.attention.mean_weights, fwd,
                        "mean_weights"));

  const Tensor dout = random_tensor(fast.output.shape(), dtype, 31);
  const MultiHeadGrads g =
      multihead_attention_backward(c.config, w, in.query, in.key, in.value, params, fast, dout);
  const MultiHeadGrads rg =
      reference::multihead_attention_backward(c.config, w, in.query, in.key, in.value, params, ref,
                                              dout);
  const Tolerance bwd = tolerance_for(dtype, backward_terms(c));
  EXPECT_TRUE(all_close(g.dquery, rg.dquery, scaled(bwd, rg.dquery), "dquery"));
  EXPECT_TRUE(all_close(g.dkey, rg.dkey, scaled(bwd, rg.dkey), "dkey"));
  EXPECT_TRUE(all_close(g.dvalue, rg.dvalue, scaled(bwd, rg.dvalue), "dvalue"));
  MultiHeadWeights gw = g.dweights, rw = rg.dweights;
  const auto got = fields(gw), want = fields(rw);
  ASSERT_EQ(got.size(), want.size());
  EXPECT_EQ(got.size(), c.config.bias ? 8u : 4u);
  for (std::size_t i = 0; i < got.size(); ++i)
    EXPECT_TRUE(all_close(*got[i].second, *want[i].second, scaled(bwd, *want[i].second),
                          "d" + got[i].first));
}

TEST(MultiHead, ForwardAndBackwardMatchReferenceFloat64) {
  for (const Case& c : forward_cases()) expect_matches_reference(c, f64);
}

TEST(MultiHead, ForwardAndBackwardMatchReferenceFloat32) {
  for (const Case& c : forward_cases()) expect_matches_reference(c, f32);
}

TEST(MultiHead, PerHeadScoringMatchesReference) {
  for (DType dtype : {f32, f64}) {
    Case c{"head_scores", {.d_model = 10, .num_heads = 4, .num_kv_heads = 2, .head_dim = 3}, 2,
           4, 6, {}};
    c.params = per_head_scores(dtype, 41);
    c.params.mask.causal = true;
    expect_matches_reference(c, dtype);
  }
}

TEST(MultiHead, NoKeysGivesOutputBias) {
  const MultiHeadConfig config{.d_model = 8, .num_heads = 2};
  const MultiHeadWeights w = random_weights(config, f64, 3);
  const Inputs in = random_inputs(config, 2, 3, 0, f64, 4);
  const MultiHeadOutput out = multihead_attention(config, w, in.query, in.key, in.value);
  for (int64_t b = 0; b < 2; ++b)
    for (int64_t t = 0; t < 3; ++t)
      for (int64_t e = 0; e < 8; ++e) EXPECT_EQ(out.output.get({b, t, e}), w.b_o.get({e}));
}

TEST(MultiHead, StridedInputsEqualContiguous) {
  const MultiHeadConfig config{.d_model = 8, .num_heads = 2, .num_kv_heads = 1};
  const MultiHeadWeights w = random_weights(config, f64, 5);
  // [T, B, E] storage viewed as [B, T, E]: the layout of a time-major sequence model.
  const Tensor time_major = random_tensor({4, 2, 8}, f64, 6);
  const Tensor x = time_major.transpose(0, 1);
  ASSERT_FALSE(x.is_contiguous());
  const MultiHeadOutput strided = multihead_attention(config, w, x, x, x);
  const Tensor xc = x.contiguous();
  const MultiHeadOutput packed = multihead_attention(config, w, xc, xc, xc);
  EXPECT_TRUE(all_close(strided.output, packed.output, tolerance_for(f64, 1, 1.0), "output"));
}

// ---------------------------------------------------------------------------------------------
// Every gradient by central finite differences (float64, small sizes).

void expect_gradients_by_finite_differences(const Case& c) {
  SCOPED_TRACE(c.name);
  MultiHeadWeights w = random_weights(c.config, f64, 51);
  Inputs in = random_inputs(c.config, c.B, c.Tq, c.Tk, f64, 61);
  AttentionParams params = c.params;
  const MultiHeadOutput saved =
      multihead_attention(c.config, w, in.query, in.key, in.value, params);
  const Tensor dout = random_tensor(saved.output.shape(), f64, 71);
  const MultiHeadGrads g =
      multihead_attention_backward(c.config, w, in.query, in.key, in.value, params, saved, dout);
  // check_gradient perturbs the tensors in place: w, in and params share their storage.
  auto loss = [&] {
    return weighted_sum(
        multihead_attention(c.config, w, in.query, in.key, in.value, params).output, dout);
  };
  EXPECT_TRUE(check_gradient(loss, in.query, g.dquery, "dquery"));
  EXPECT_TRUE(check_gradient(loss, in.key, g.dkey, "dkey"));
  EXPECT_TRUE(check_gradient(loss, in.value, g.dvalue, "dvalue"));
  MultiHeadWeights gw = g.dweights;
  const auto params_w = fields(w), grads_w = fields(gw);
  ASSERT_EQ(params_w.size(), grads_w.size());
  for (std::size_t i = 0; i < params_w.size(); ++i)
    EXPECT_TRUE(check_gradient(loss, *params_w[i].second, *grads_w[i].second,
                               "d" + params_w[i].first));
}

TEST(MultiHeadGradients, GroupedCrossAttentionWithBiases) {
  Case c{"gqa_cross",
         {.d_model = 8, .num_heads = 4, .num_kv_heads = 2, .head_dim = 3, .value_head_dim = 2,
          .key_input_dim = 5, .value_input_dim = 6},
         2, 3, 4, {}};
  c.params.mask.key_lengths = {4, 2};
  expect_gradients_by_finite_differences(c);
}

TEST(MultiHeadGradients, MultiQueryCausalWithDropoutNoBias) {
  Case c{"mqa_causal_dropout", {.d_model = 6, .num_heads = 3, .num_kv_heads = 1, .bias = false},
         2, 4, 4, {}};
  c.params.mask.causal = true;
  c.params.dropout = {.p = 0.3, .seed = 3};  // the keep mask is a pure function of the seed
  expect_gradients_by_finite_differences(c);
}

TEST(MultiHeadGradients, PerHeadScoresAndTheirParameters) {
  Case c{"head_scores", {.d_model = 6, .num_heads = 4, .num_kv_heads = 2, .head_dim = 3}, 1, 3,
         4, {}};
  c.params = per_head_scores(f64, 81);
  expect_gradients_by_finite_differences(c);

  // The scoring parameters' gradients come back through MultiHeadGrads::attention.
  MultiHeadWeights w = random_weights(c.config, f64, 91);
  const Inputs in = random_inputs(c.config, c.B, c.Tq, c.Tk, f64, 92);
  const MultiHeadOutput saved =
      multihead_attention(c.config, w, in.query, in.key, in.value, c.params);
  const Tensor dout = random_tensor(saved.output.shape(), f64, 93);
  const MultiHeadGrads g =
      multihead_attention_backward(c.config, w, in.query, in.key, in.value, c.params, saved, dout);
  ASSERT_EQ(g.attention.dhead_scores.size(), 4u);
  auto loss = [&] {
    return weighted_sum(
        multihead_attention(c.config, w, in.query, in.key, in.value, c.params).output, dout);
  };
  const auto& general = std::get<GeneralScore>(c.params.head_scores[2]);
  const auto& dgeneral = std::get<GeneralScore>(g.attention.dhead_scores[2]);
  EXPECT_TRUE(check_gradient(loss, general.weight, dgeneral.weight, "general.weight"));
  const auto& additive = std::get<AdditiveScore>(c.params.head_scores[3]);
  const auto& dadditive = std::get<AdditiveScore>(g.attention.dhead_scores[3]);
  EXPECT_TRUE(check_gradient(loss, additive.w_query, dadditive.w_query, "additive.w_query"));
  EXPECT_TRUE(check_gradient(loss, additive.v, dadditive.v, "additive.v"));
}

TEST(MultiHeadGradients, SelfAttentionInputGradientIsTheSumOfThree) {
  // With one tensor as query, key and value, d loss / d x = dquery + dkey + dvalue.
  const MultiHeadConfig config{.d_model = 6, .num_heads = 2};
  const MultiHeadWeights w = random_weights(config, f64, 101);
  Tensor x = random_tensor({2, 3, 6}, f64, 102);
  AttentionParams params;
  params.mask.causal = true;
  const MultiHeadOutput saved = multihead_attention(config, w, x, x, x, params);
  const Tensor dout = random_tensor(saved.output.shape(), f64, 103);
  const MultiHeadGrads g = multihead_attention_backward(config, w, x, x, x, params, saved, dout);
  Tensor dx = g.dquery.clone();
  for (int64_t i = 0; i < dx.numel(); ++i)
    dx.data<double>()[i] += g.dkey.get_flat(i) + g.dvalue.get_flat(i);
  auto loss = [&] {
    return weighted_sum(multihead_attention(config, w, x, x, x, params).output, dout);
  };
  EXPECT_TRUE(check_gradient(loss, x, dx, "dx"));
}

// ---------------------------------------------------------------------------------------------
// Initialisation.

TEST(MultiHeadWeights, XavierUniformDeterministicZeroBiases) {
  const MultiHeadConfig config{.d_model = 12, .num_heads = 4, .num_kv_heads = 2,
                               .key_input_dim = 7, .value_input_dim = 5};
  const MultiHeadWeights a = MultiHeadWeights::init(config, f32, 1);
  const MultiHeadWeights b = MultiHeadWeights::init(config, f32, 1);
  const MultiHeadWeights c = MultiHeadWeights::init(config, f32, 2);
  EXPECT_EQ(a.w_q.shape(), Shape({12, 12}));
  EXPECT_EQ(a.w_k.shape(), Shape({6, 7}));
  EXPECT_EQ(a.w_v.shape(), Shape({6, 5}));
  EXPECT_EQ(a.w_o.shape(), Shape({12, 12}));
  EXPECT_EQ(a.w_k.dtype(), f32);
  EXPECT_TRUE(all_close(a.w_k, b.w_k, {0.0, 0.0}, "same seed"));
  EXPECT_FALSE(all_close(a.w_k, c.w_k, {0.0, 0.0}, "other seed"));
  const double limit = std::sqrt(6.0 / (6 + 7));
  double largest = 0.0;
  for (double x : a.w_k.to_vector()) largest = std::max(largest, std::abs(x));
  EXPECT_LE(largest, limit);
  EXPECT_GT(largest, 0.5 * limit);  // 42 uniform draws reach past half the limit
  for (double x : a.b_v.to_vector()) EXPECT_EQ(x, 0.0);
  const MultiHeadWeights nb = MultiHeadWeights::init({.d_model = 4, .num_heads = 2, .bias = false},
                                                     f64, 1);
  EXPECT_FALSE(nb.b_q.defined());
  EXPECT_FALSE(nb.b_o.defined());
}

// ---------------------------------------------------------------------------------------------
// KV cache.

// Decodes `x` [B, T, E] in chunks of the given sizes through multihead_attention_step with causal
// masking and compares each chunk with the same rows of one full causal forward.
void expect_decoding_equals_full_forward(const MultiHeadConfig& config, DType dtype,
                                         const std::vector<int64_t>& chunks,
                                         int64_t initial_capacity) {
  const int64_t B = 2;
  int64_t T = 0;
  for (int64_t n : chunks) T += n;
  const MultiHeadWeights w = random_weights(config, dtype, 111);
  const Tensor x = random_tensor({B, T, config.d_model}, dtype, 112);
  AttentionParams params;
  params.mask.causal = true;
  const MultiHeadOutput full = multihead_attention(config, w, x, x, x, params);

  KVCache cache = KVCache::create(config, {.batch = B, .capacity = initial_capacity,
                                           .dtype = dtype});
  const Tolerance tol = tolerance_for(dtype, config.d_model + T);
  int64_t start = 0;
  for (int64_t n : chunks) {
    const Tensor step = x.slice(1, start, start + n);
    const MultiHeadOutput out =
        multihead_attention_step(config, w, cache, step, step, step, params);
    EXPECT_EQ(cache.length, start + n);
    EXPECT_TRUE(all_close(out.output, full.output.slice(1, start, start + n), tol,
                          "rows " + std::to_string(start) + ".." + std::to_string(start + n)));
    start += n;
  }
  EXPECT_TRUE(all_close(cache.keys(), full.k, tol, "cached keys"));
  EXPECT_TRUE(all_close(cache.values(), full.v, tol, "cached values"));
}

TEST(KVCache, TokenByTokenDecodingEqualsCausalForward) {
  const MultiHeadConfig gqa{.d_model = 16, .num_heads = 4, .num_kv_heads = 2};
  for (DType dtype : {f32, f64}) {
    SCOPED_TRACE(dtype_name(dtype));
    expect_decoding_equals_full_forward(gqa, dtype, {1, 1, 1, 1, 1, 1, 1}, 16);
  }
  const MultiHeadConfig mqa{.d_model = 8, .num_heads = 2, .num_kv_heads = 1, .bias = false};
  expect_decoding_equals_full_forward(mqa, f64, {1, 1, 1, 1, 1}, 8);
}

TEST(KVCache, GrowingFromCapacityOneKeepsEveryRow) {
  const MultiHeadConfig config{.d_model = 12, .num_heads = 3, .head_dim = 5, .value_head_dim = 3};
  expect_decoding_equals_full_forward(config, f64, {1, 1, 1, 1, 1, 1}, 1);
}

TEST(KVCache, AppendingSeveralTokensAtOnce) {
  const MultiHeadConfig config{.d_model = 16, .num_heads = 4, .num_kv_heads = 2};
  for (DType dtype : {f32, f64}) {
    SCOPED_TRACE(dtype_name(dtype));
    expect_decoding_equals_full_forward(config, dtype, {3, 1, 4, 2}, 2);
  }
}

TEST(KVCache, CapacityDoublesAndContentsSurvive) {
  const MultiHeadConfig config{.d_model = 4, .num_heads = 2};  // Dk = Dv = 2
  KVCache cache = KVCache::create(config, {.batch = 2, .capacity = 1, .dtype = f64});
  EXPECT_EQ(cache.capacity(), 1);
  const std::vector<int64_t> sizes = {1, 1, 1, 5, 1};
  const std::vector<int64_t> expected_capacity = {1, 2, 4, 8, 16};
  std::vector<Tensor> appended_k, appended_v;
  for (std::size_t s = 0; s < sizes.size(); ++s) {
    const Tensor k = random_tensor({2, 2, sizes[s], 2}, f64, 200 + s);
    const Tensor v = random_tensor({2, 2, sizes[s], 2}, f64, 300 + s);
    cache.append(k, v);
    appended_k.push_back(k);
    appended_v.push_back(v);
    EXPECT_EQ(cache.capacity(), expected_capacity[s]) << "after append " << s;
  }
  EXPECT_EQ(cache.length, 9);
  int64_t row = 0;
  for (std::size_t s = 0; s < sizes.size(); ++s) {
    EXPECT_TRUE(all_close(cache.keys().slice(2, row, row + sizes[s]), appended_k[s], {0.0, 0.0},
                          "keys of append " + std::to_string(s)));
    EXPECT_TRUE(all_close(cache.values().slice(2, row, row + sizes[s]), appended_v[s],
                          {0.0, 0.0}, "values of append " + std::to_string(s)));
    row += sizes[s];
  }
  cache.clear();
  EXPECT_EQ(cache.length, 0);
  EXPECT_EQ(cache.capacity(), 16);
}

TEST(KVCache, UndefinedCacheIsAllocatedOnFirstStep) {
  const MultiHeadConfig config{.d_model = 8, .num_heads = 2, .num_kv_heads = 1};
  const MultiHeadWeights w = random_weights(config, f32, 121);
  const Tensor x = random_tensor({3, 2, 8}, f32, 122);
  KVCache cache;
  multihead_attention_step(config, w, cache, x, x, x);
  EXPECT_EQ(cache.length, 2);
  EXPECT_EQ(cache.k.shape(), Shape({3, 1, 2, 4}));
  EXPECT_EQ(cache.k.dtype(), f32);
}

TEST(KVCache, CrossAttentionDecodingProjectsTheMemoryOnce) {
  // The first step appends the encoder memory; later steps append no keys ([B, 0, Ek]) and
  // attend one new decoder row each to the whole memory.
  const MultiHeadConfig config{.d_model = 8, .num_heads = 4, .num_kv_heads = 2,
                               .key_input_dim = 6, .value_input_dim = 5};
  const int64_t B = 2, Tq = 4, S = 7;
  const MultiHeadWeights w = random_weights(config, f64, 131);
  const Inputs in = random_inputs(config, B, Tq, S, f64, 132);
  const MultiHeadOutput full = multihead_attention(config, w, in.query, in.key, in.value);
  KVCache cache;
  const Tensor no_keys = Tensor::zeros({B, 0, 6}, f64), no_values = Tensor::zeros({B, 0, 5}, f64);
  const Tolerance tol = tolerance_for(f64, 8 + S);
  for (int64_t t = 0; t < Tq; ++t) {
    const Tensor q = in.query.slice(1, t, t + 1);
    const MultiHeadOutput out =
        t == 0 ? multihead_attention_step(config, w, cache, q, in.key, in.value)
               : multihead_attention_step(config, w, cache, q, no_keys, no_values);
    EXPECT_EQ(cache.length, S);
    EXPECT_TRUE(all_close(out.output, full.output.slice(1, t, t + 1), tol,
                          "row " + std::to_string(t)));
  }
}

// ---------------------------------------------------------------------------------------------
// Errors: one test per validation check, each naming the op and the offending sizes.


// A valid problem that each error test breaks in one way.
struct Problem {
  MultiHeadConfig config{.d_model = 8, .num_heads = 4, .num_kv_heads = 2, .key_input_dim = 6,
                         .value_input_dim = 5};
  MultiHeadWeights w = random_weights(config, f32, 141);
  Inputs in = random_inputs(config, 2, 3, 4, f32, 142);
  MultiHeadOutput run() const { return multihead_attention(config, w, in.query, in.key, in.value); }
};

TEST(MultiHeadErrors, ValidProblemRuns) { EXPECT_NO_THROW(Problem().run()); }

TEST(MultiHeadErrors, NumHeadsMustDivideDModel) {
  Problem p;
  p.config = {.d_model = 10, .num_heads = 4};
  expect_error([&] { p.run(); }, {"[multihead_attention]", "num_heads (4) must divide",
                                  "d_model (10)"});
}

TEST(MultiHeadErrors, NumKvHeadsMustDivideNumHeads) {
  Problem p;
  p.config.num_kv_heads = 3;
  expect_error([&] { p.run(); }, {"[multihead_attention]", "num_kv_heads (3) must divide",
                                  "num_heads (4)"});
}

TEST(MultiHeadErrors, SizesMustBePositive) {
  Problem p;
  p.config.d_model = 0;
  expect_error([&] { p.run(); }, {"[multihead_attention]", "d_model must be > 0"});
  Problem q;
  q.config.head_dim = -2;
  expect_error([&] { q.run(); }, {"[multihead_attention]", "head_dim -2"});
}

TEST(MultiHeadErrors, QueryWidthMustBeDModel) {
  Problem p;
  p.in.query = random_tensor({2, 3, 7}, f32, 1);
  expect_error([&] { p.run(); }, {"[multihead_attention]", "query has 7 features, d_model is 8"});
}

TEST(MultiHeadErrors, KeyWidthMustBeKeyInputDim) {
  Problem p;
  p.in.key = random_tensor({2, 4, 8}, f32, 1);
  expect_error([&] { p.run(); }, {"[multihead_attention]", "key has 8 features",
                                  "key_input_dim is 6"});
}

TEST(MultiHeadErrors, ValueWidthMustBeValueInputDim) {
  Problem p;
  p.in.value = random_tensor({2, 4, 6}, f32, 1);
  expect_error([&] { p.run(); }, {"[multihead_attention]", "value has 6 features",
                                  "value_input_dim is 5"});
}

TEST(MultiHeadErrors, InputsMustHaveRankThree) {
  Problem p;
  p.in.query = random_tensor({6, 8}, f32, 1);
  expect_error([&] { p.run(); }, {"[multihead_attention]", "query must be [B, Tq, d_model]",
                                  "[6, 8]"});
}

TEST(MultiHeadErrors, BatchSizesMustAgree) {
  Problem p;
  p.in.key = random_tensor({3, 4, 6}, f32, 1);
  expect_error([&] { p.run(); }, {"[multihead_attention]", "batch sizes differ", "[3, 4, 6]"});
}

TEST(MultiHeadErrors, KeyAndValueLengthsMustAgree) {
  Problem p;
  p.in.value = random_tensor({2, 5, 5}, f32, 1);
  expect_error([&] { p.run(); }, {"[multihead_attention]", "key and value lengths differ",
                                  "[2, 5, 5]"});
}

TEST(MultiHeadErrors, DtypesMustAgree) {
  Problem p;
  p.in.value = p.in.value.to(f64);
  expect_error([&] { p.run(); }, {"[multihead_attention]", "dtypes differ", "float64"});
}

TEST(MultiHeadErrors, WeightShapesAreChecked) {
  Problem p;
  p.w.w_k = random_tensor({4, 8}, f32, 1);  // [Hkv * Dk, Ek] = [4, 6]
  expect_error([&] { p.run(); }, {"[multihead_attention]", "weights.w_k must be [4, 6]",
                                  "got [4, 8]"});
  Problem q;
  q.w.b_o = random_tensor({7}, f32, 1);
  expect_error([&] { q.run(); }, {"[multihead_attention]", "weights.b_o must be [8]"});
}

TEST(MultiHeadErrors, BiasesMustMatchConfigBias) {
  Problem p;
  p.w.b_v = Tensor();
  expect_error([&] { p.run(); }, {"[multihead_attention]", "weights.b_v is undefined"});
  Problem q;
  q.config.bias = false;
  expect_error([&] { q.run(); }, {"[multihead_attention]", "config.bias is false"});
}

TEST(MultiHeadErrors, BackwardChecksDoutputAndSaved) {
  Problem p;
  const MultiHeadOutput saved = p.run();
  const Tensor bad = random_tensor({2, 3, 7}, f32, 1);
  expect_error(
      [&] {
        multihead_attention_backward(p.config, p.w, p.in.query, p.in.key, p.in.value, {}, saved,
                                     bad);
      },
      {"[multihead_attention_backward]", "doutput must match the output [2, 3, 8]", "[2, 3, 7]"});
  MultiHeadOutput stale = saved;
  stale.k = Tensor();
  expect_error(
      [&] {
        multihead_attention_backward(p.config, p.w, p.in.query, p.in.key, p.in.value, {}, stale,
                                     saved.output);
      },
      {"[multihead_attention_backward]", "saved.k must be [2, 2, 4, 2]", "undefined"});
}

TEST(MultiHeadErrors, CacheBatchMustMatch) {
  Problem p;
  KVCache cache = KVCache::create(p.config, {.batch = 3, .capacity = 4, .dtype = f32});
  const Tensor x = random_tensor({2, 1, 8}, f32, 1);
  const Tensor k = random_tensor({2, 1, 6}, f32, 2), v = random_tensor({2, 1, 5}, f32, 3);
  expect_error([&] { multihead_attention_step(p.config, p.w, cache, x, k, v); },
               {"[multihead_attention_step]", "cache batch 3 differs from the step's batch 2"});
}

TEST(MultiHeadErrors, CacheWidthsMustMatchConfig) {
  Problem p;
  MultiHeadConfig other = p.config;
  other.head_dim = 3;
  KVCache cache = KVCache::create(other, {.batch = 2, .capacity = 4, .dtype = f32});
  const Tensor x = random_tensor({2, 1, 8}, f32, 1);
  const Tensor k = random_tensor({2, 1, 6}, f32, 2), v = random_tensor({2, 1, 5}, f32, 3);
  expect_error([&] { multihead_attention_step(p.config, p.w, cache, x, k, v); },
               {"[multihead_attention_step]", "do not match the config", "head_dim 2"});
}

TEST(MultiHeadErrors, CacheDtypeMustMatchQuery) {
  Problem p;
  KVCache cache = KVCache::create(p.config, {.batch = 2, .capacity = 4, .dtype = f64});
  const Tensor x = random_tensor({2, 1, 8}, f32, 1);
  const Tensor k = random_tensor({2, 1, 6}, f32, 2), v = random_tensor({2, 1, 5}, f32, 3);
  expect_error([&] { multihead_attention_step(p.config, p.w, cache, x, k, v); },
               {"[multihead_attention_step]", "cache dtype float64", "float32"});
}

TEST(MultiHeadErrors, AppendChecksShapes) {
  KVCache cache = KVCache::create({.d_model = 8, .num_heads = 2}, {.batch = 2, .capacity = 2});
  expect_error([&] { cache.append(Tensor::zeros({2, 2, 1, 3}), Tensor::zeros({2, 2, 1, 4})); },
               {"[KVCache::append]", "widths differ", "[2, 2, 1, 3]"});
  expect_error([&] { cache.append(Tensor::zeros({1, 2, 1, 4}), Tensor::zeros({1, 2, 1, 4})); },
               {"[KVCache::append]", "new_k has batch 1, the cache 2"});
  expect_error([&] { cache.append(Tensor::zeros({2, 2, 1, 4}), Tensor::zeros({2, 2, 3, 4})); },
               {"[KVCache::append]", "differ in batch, heads or length"});
}

}  // namespace
}  // namespace attn
