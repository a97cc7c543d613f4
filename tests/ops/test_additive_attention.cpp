// Fused additive / concat attention (src/kernels/additive/additive_attention.*), forward and backward,
// against the float64 oracle (attn::reference::attention / attention_backward), on every
// Highway target this machine supports (each case computes the oracle once, then runs the fused
// path under ScopedSimdTarget for every target; failures name the target). Sweeps Tq, Tk in
// {0, 1, 2, 3, 127, 128, 129, 513}, A and D in {1, 3, 59, 64, 128}, grouped-query heads, causal
// in both alignments, windows, key/query lengths, fully masked rows, ALiBi, additive bias masks
// broadcast as [Tk], [B, 1, 1, Tk] and [B, H, Tq, Tk] (dbias against the oracle and against
// finite differences), boolean `allowed` masks in broadcast shapes (with fully masked rows),
// dropout (against the oracle, and against the composed path on every target with the dropped
// elements compared exactly), explicit score vectors v (zeros, odd counts, wide spreads that
// move the split form's limit), saturated and non-finite tanh arguments, a misaligned V, and
// run-to-run determinism.
//
// Tolerances (forward error analysis, on top of tolerance_for's sqrt(terms) u summation bound):
// the fused kernel evaluates tanh(y) = 1 - 2 / (2^x + 1) with a polynomial exp2 (rel. error
// 1.8e-7 = 3u) and a reciprocal estimate plus one Newton step (~2u), so each t_a is off by at
// most ~6u, and a score s = sum_a v_a t_a by delta_s <= 6u sum_a |v_a| beyond the rounding that
// tolerance_for already counts. A probability moves by p_j (ds_j - sum_k p_k ds_k), so out and lse
// move by <= 2 delta_s max|V| and delta_s; gradients, linear in dS = P (dP - D), by the same factor
// times their own magnitude (|dS| scales with max|dO| max|V|), plus the rounding of the tanh
// argument itself, which saturating weights amplify (see bounds_for). Every bound below is
// tolerance_for(f32, terms, 16) plus that score term, with terms the longest reduction feeding an
// element (as in test_attention_paths.cpp).
#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "attention_validate.h"
#include "attn/attention.h"
#include "attn/reference.h"
#include "kernels/additive/additive_attention.h"
#include "kernels/composed/attention_composed.h"
#include "kernels/common/simd_target.h"
#include "support/attention_problem.h"
#include "support/bitwise_equal.h"
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
using attn::testing::all_close;
using attn::testing::Tolerance;

constexpr int64_t kUnbounded = attn::Window::unbounded;

enum class ScoreKind { additive, additive_nobias, concat };

struct Case {
  int64_t B = 1, Hq = 2, Hkv = 1, Tq = 0, Tk = 0, D = 8, A = 8, Dv = 8;
  ScoreKind kind = ScoreKind::additive;
  std::vector<int64_t> key_lengths, query_lengths;
  bool causal = false, bottom_right = false;
  int64_t left = kUnbounded, right = kUnbounded;
  bool alibi = false;
  Shape bias_shape;  // additive bias mask (broadcast against [B, Hq, Tq, Tk]); empty: none
  double weight_scale = 1.0;  // multiplies W_q, W_k: large values saturate the tanh
  // The score's v when not empty ([A]); random otherwise. The split form's range and operand
  // scale depend on the spread of |v| and drop units with v = 0 (kernel -inl.h, SplitScaleFor).
  std::vector<float> score_v;
  // Boolean `allowed` mask broadcast against [B, Hq, Tq, Tk]; empty: none. About a quarter of
  // its elements are false, and when it has a Tq dimension every 7th query row is entirely
  // false (fully masked rows).
  Shape allowed_shape;
  double dropout_p = 0.0;  // dropout on the probabilities (seed: the case's seed)
  uint64_t seed = 1;

  std::string str() const {
    static const char* kinds[] = {"additive", "additive_nobias", "concat"};
    std::string s = std::string(kinds[static_cast<int>(kind)]) + " B=" + std::to_string(B) +
                    " Hq=" + std::to_string(Hq) + " Hkv=" + std::to_string(Hkv) +
                    " Tq=" + std::to_string(Tq) + " Tk=" + std::to_string(Tk) +
                    " D=" + std::to_string(D) + " A=" + std::to_string(A) +
                    " Dv=" + std::to_string(Dv) + attn::testing::interval_masks_str(*this);
    if (alibi) s += " alibi";
    if (!bias_shape.empty()) s += " bias" + attn::shape_str(bias_shape);
    if (weight_scale != 1.0) s += " weight_scale=" + std::to_string(weight_scale);
    if (!score_v.empty()) s += " explicit_v";
    if (!allowed_shape.empty()) s += " allowed" + attn::shape_str(allowed_shape);
    if (dropout_p > 0.0) s += " dropout=" + std::to_string(dropout_p);
    return s;
  }
};

struct Inputs {
  Tensor q, k, v, dout;
  AttentionParams params;
};

// Parameters scaled by 1/sqrt(fan-in) so that tanh arguments stay O(1) (times weight_scale).
Tensor param(const Shape& shape, uint64_t seed, double fan_in, double scale = 1.0) {
  const double r = scale / std::sqrt(fan_in);
  return attn::testing::random_tensor(shape, DType::f32, seed, -r, r);
}

Inputs make_inputs(const Case& c) {
  Inputs in;
  in.q = attn::testing::random_tensor({c.B, c.Hq, c.Tq, c.D}, DType::f32, c.seed);
  in.k = attn::testing::random_tensor({c.B, c.Hkv, c.Tk, c.D}, DType::f32, c.seed + 1);
  in.v = attn::testing::random_tensor({c.B, c.Hkv, c.Tk, c.Dv}, DType::f32, c.seed + 2);
  in.dout = attn::testing::random_tensor({c.B, c.Hq, c.Tq, c.Dv}, DType::f32, c.seed + 3);
  const double d = static_cast<double>(c.D);
  switch (c.kind) {
    case ScoreKind::additive:
    case ScoreKind::additive_nobias: {
      attn::AdditiveScore s;
      s.w_query = param({c.A, c.D}, c.seed + 4, d, c.weight_scale);
      s.w_key = param({c.A, c.D}, c.seed + 5, d, c.weight_scale);
      if (c.kind == ScoreKind::additive) s.bias = param({c.A}, c.seed + 6, 4.0);
      s.v = param({c.A}, c.seed + 7, 1.0);
      in.params.score = s;
      break;
    }
    case ScoreKind::concat:
      in.params.score = attn::ConcatScore{param({c.A, 2 * c.D}, c.seed + 4, 2 * d, c.weight_scale),
                                          param({c.A}, c.seed + 7, 1.0)};
      break;
  }
  if (!c.score_v.empty()) {
    Tensor sv = c.kind == ScoreKind::concat ? std::get<attn::ConcatScore>(in.params.score).v
                                            : std::get<attn::AdditiveScore>(in.params.score).v;
    EXPECT_EQ(sv.numel(), static_cast<int64_t>(c.score_v.size()));
    std::memcpy(sv.data<float>(), c.score_v.data(), c.score_v.size() * sizeof(float));
  }
  attn::Mask& m = in.params.mask;
  attn::testing::set_interval_masks(c, m);
  if (c.alibi) m.alibi_slopes = attn::alibi_slopes(c.Hq);
  if (!c.bias_shape.empty())
    m.bias = attn::testing::random_tensor(c.bias_shape, DType::f32, c.seed + 8, -2.0, 2.0);
  if (!c.allowed_shape.empty()) {
    m.allowed = Tensor::empty(c.allowed_shape, DType::b8);
    bool* allowed = m.allowed.data<bool>();
    const int64_t dims = static_cast<int64_t>(c.allowed_shape.size());
    const int64_t tk = c.allowed_shape.back();
    const bool has_q = dims >= 2 && c.allowed_shape[static_cast<size_t>(dims - 2)] > 1;
    for (int64_t x = 0; x < m.allowed.numel(); ++x) {
      const uint64_t h = (static_cast<uint64_t>(x) + c.seed) * 0x9E3779B97F4A7C15ull;
      const bool dead_row = has_q && (x / tk) % 7 == 3;
      allowed[x] = !dead_row && (h >> 40) % 4 != 0;
    }
  }
  in.params.dropout = attn::Dropout{c.dropout_p, c.seed + 9};
  return in;
}

const Tensor& score_v(const attn::Score& s) {
  if (const auto* a = std::get_if<attn::AdditiveScore>(&s)) return a->v;
  return std::get<attn::ConcatScore>(s).v;
}

// The bound of the header comment: tolerance_for(terms) plus the approximate-tanh score error
// delta_s = 6u sum|v_a|, propagated with factor 2 max|V| (out) or 2 (relative, gradients).
struct Bounds {
  Tolerance fwd, grad, param;
};
Bounds bounds_for(const Case& c, const Inputs& in) {
  const double u = attn::testing::unit_roundoff(DType::f32);
  double v1 = 0.0;
  const Tensor sv = score_v(in.params.score);
  for (int64_t a = 0; a < sv.numel(); ++a) v1 += std::abs(sv.data<float>()[a]);
  const double delta_s = 6.0 * u * v1;
  const int64_t width = std::max({c.D, c.A, c.Dv});
  const double vmax = std::max(1.0, attn::testing::max_abs_finite(in.v));
  // Rounding the tanh argument y = W_q q + W_k k + b (|y| <= y_max) moves 1 - t^2 by a relative
  // 2 |t| delta_y <= 2 u y_max, and the gradients through W (dq = dQp W_q) carry it over terms of
  // size |W| |dQp| that may cancel: a relative 4 u y_max on every gradient. It matters only for
  // saturating weights (SaturatedTanh: y_max ~ 1e3).
  double y_max = 0.0;
  const double qmax = attn::testing::max_abs_finite(in.q);
  const double kmax = attn::testing::max_abs_finite(in.k);
  if (const auto* s = std::get_if<attn::AdditiveScore>(&in.params.score)) {
    for (int64_t a = 0; a < c.A; ++a) {
      double y = s->bias.defined() ? std::abs(s->bias.data<float>()[a]) : 0.0;
      for (int64_t d = 0; d < c.D; ++d)
        y += std::abs(s->w_query.data<float>()[a * c.D + d]) * qmax +
             std::abs(s->w_key.data<float>()[a * c.D + d]) * kmax;
      y_max = std::max(y_max, y);
    }
  } else {
    const Tensor& w = std::get<attn::ConcatScore>(in.params.score).weight;
    for (int64_t a = 0; a < c.A; ++a) {
      double y = 0.0;
      for (int64_t d = 0; d < 2 * c.D; ++d)
        y += std::abs(w.data<float>()[a * 2 * c.D + d]) * std::max(qmax, kmax);
      y_max = std::max(y_max, y);
    }
  }
  const double grad_rel = 2.0 * delta_s + 4.0 * u * y_max;
  Bounds b;
  b.fwd = attn::testing::tolerance_for(DType::f32, std::max(width, c.Tk) + c.A);
  b.fwd.atol += 2.0 * delta_s * vmax;
  b.grad = attn::testing::tolerance_for(DType::f32, width + c.Tq + c.Tk + c.A);
  b.grad.atol += grad_rel * vmax;
  b.grad.rtol += grad_rel;
  b.param = attn::testing::tolerance_for(DType::f32,
                                         std::max<int64_t>(1, c.B * c.Hq * c.Tq * c.Tk) + width);
  b.param.atol += grad_rel * vmax;
  b.param.rtol += grad_rel;
  return b;
}

::testing::AssertionResult scores_close(const attn::Score& got, const attn::Score& want,
                                        Tolerance tol) {
  std::vector<std::pair<std::string, std::pair<Tensor, Tensor>>> fields;
  if (const auto* w = std::get_if<attn::AdditiveScore>(&want)) {
    const auto* g = std::get_if<attn::AdditiveScore>(&got);
    if (g == nullptr) return ::testing::AssertionFailure() << "dscore is not an AdditiveScore";
    if (g->bias.defined() != w->bias.defined())
      return ::testing::AssertionFailure() << "dscore.bias defined: " << g->bias.defined()
                                           << ", expected " << w->bias.defined();
    fields = {{"w_query", {g->w_query, w->w_query}}, {"w_key", {g->w_key, w->w_key}},
              {"v", {g->v, w->v}}};
    if (w->bias.defined()) fields.push_back({"bias", {g->bias, w->bias}});
  } else {
    const auto* g = std::get_if<attn::ConcatScore>(&got);
    const auto& wc = std::get<attn::ConcatScore>(want);
    if (g == nullptr) return ::testing::AssertionFailure() << "dscore is not a ConcatScore";
    fields = {{"weight", {g->weight, wc.weight}}, {"v", {g->v, wc.v}}};
  }
  for (const auto& [name, pair] : fields) {
    auto r = all_close(pair.first, pair.second, tol, "dscore." + name);
    if (!r) return r;
  }
  return ::testing::AssertionSuccess();
}

struct Fused {
  AttentionOutput out;
  AttentionGrads grads;
};

Fused run_fused(const Inputs& in) {
  const attn::detail::AttentionDims dims =
      attn::detail::validate_attention("attention", in.q, in.k, in.v, in.params);
  const AttentionParams p = attn::detail::convert_params(in.params, DType::f32);
  Fused f;
  f.out = attn::kernels::additive_attention_forward(dims, in.q, in.k, in.v, p);
  f.grads = attn::kernels::additive_attention_backward(dims, in.q, in.k, in.v, p, f.out, in.dout);
  return f;
}

// Every output of two fused runs, forward and backward, bit for bit.
void expect_same_bits(const Fused& a, const Fused& b) {
  attn::testing::expect_same_bits(a.out, a.grads, b.out, b.grads);
}

// The oracle once, then the fused path on every target.
void check(const Case& c) {
  SCOPED_TRACE(c.str());
  const Inputs in = make_inputs(c);
  ASSERT_TRUE(attn::kernels::additive_attention_supported(DType::f32, in.params));
  const AttentionOutput want = attn::reference::attention(in.q, in.k, in.v, in.params);
  const AttentionGrads want_g =
      attn::reference::attention_backward(in.q, in.k, in.v, in.params, want, in.dout);
  const Bounds tol = bounds_for(c, in);
  attn::testing::for_each_simd_target(attn::kernels::additive_attention_target_name, [&](auto&) {
    const Fused got = run_fused(in);
    EXPECT_TRUE(all_close(got.out.out, want.out, tol.fwd, "out"));
    EXPECT_TRUE(all_close(got.out.lse, want.lse, tol.fwd, "lse"));
    EXPECT_TRUE(all_close(got.grads.dq, want_g.dq, tol.grad, "dq"));
    EXPECT_TRUE(all_close(got.grads.dk, want_g.dk, tol.grad, "dk"));
    EXPECT_TRUE(all_close(got.grads.dv, want_g.dv, tol.grad, "dv"));
    EXPECT_TRUE(scores_close(got.grads.dscore, want_g.dscore, tol.param));
    if (c.bias_shape.empty()) {
      EXPECT_FALSE(got.grads.dbias.defined());
    } else {
      // dbias sums dS over the broadcast dimensions: a reduction as long as a parameter's.
      EXPECT_TRUE(all_close(got.grads.dbias, want_g.dbias, tol.param, "dbias"));
    }
    EXPECT_TRUE(got.grads.dhead_scores.empty());
    // Fully masked rows: exactly 0 output and 0 dq, lse -inf, not merely close.
    const double* ref_lse = want.lse.data<double>();
    const float* out = got.out.out.data<float>();
    const float* dq = got.grads.dq.data<float>();
    for (int64_t row = 0; row < c.B * c.Hq * c.Tq; ++row) {
      if (!std::isinf(ref_lse[row])) continue;
      ASSERT_EQ(got.out.lse.data<float>()[row], -std::numeric_limits<float>::infinity()) << row;
      for (int64_t e = 0; e < c.Dv; ++e) ASSERT_EQ(out[row * c.Dv + e], 0.0f) << row;
      for (int64_t e = 0; e < c.D; ++e) ASSERT_EQ(dq[row * c.D + e], 0.0f) << row;
    }
  });
}

const int64_t kSizes[] = {0, 1, 2, 3, 127, 128, 129, 513};
const int64_t kDims[] = {1, 3, 59, 64, 128};

TEST(AdditiveAttention, SizeSweep) {
  int n = 0;
  for (int64_t tq : kSizes)
    for (int64_t tk : kSizes) {
      const int64_t d = kDims[n % 5], a = kDims[(n + 2) % 5];
      const auto kind = static_cast<ScoreKind>(n % 3);
      ++n;
      // The float64 oracle materialises Tq Tk A tanh values: keep the big products narrow.
      if (tq * tk > 128 * 129 && (a > 3 || d > 3)) continue;
      check({.Tq = tq, .Tk = tk, .D = d, .A = a, .Dv = d, .kind = kind,
             .seed = static_cast<uint64_t>(n)});
    }
  check({.Hq = 1, .Tq = 513, .Tk = 513, .D = 16, .A = 16, .Dv = 16, .seed = 99});
}

TEST(AdditiveAttention, HiddenAndHeadDims) {
  int n = 0;
  for (int64_t a : kDims)
    for (int64_t d : kDims) {
      if ((a + d) % 2 != 0 && a != 128 && d != 128) continue;  // half the grid, both extremes
      check({.Hq = 2, .Hkv = 1, .Tq = 33, .Tk = 70, .D = d, .A = a, .Dv = (n % 2) ? 59 : d,
             .kind = static_cast<ScoreKind>(n % 3), .seed = static_cast<uint64_t>(10 + n)});
      ++n;
    }
}

TEST(AdditiveAttention, GroupedQueryHeads) {
  for (auto [hq, hkv] : {std::pair{6, 2}, std::pair{8, 1}, std::pair{3, 3}})
    check({.B = 2, .Hq = hq, .Hkv = hkv, .Tq = 40, .Tk = 129, .D = 16, .A = 24, .Dv = 16,
           .causal = true, .bottom_right = true});
}

TEST(AdditiveAttention, CausalBothAlignments) {
  const std::pair<int64_t, int64_t> sizes[] = {{129, 200}, {200, 129}, {1, 130},
                                               {128, 128}, {127, 3},   {2, 1}};
  for (auto [tq, tk] : sizes)
    for (bool bottom_right : {false, true})
      check({.B = 2, .Tq = tq, .Tk = tk, .D = 8, .A = 16, .Dv = 9, .kind = ScoreKind::concat,
             .causal = true, .bottom_right = bottom_right});
}

TEST(AdditiveAttention, BiasBroadcastShapes) {
  const int64_t B = 2, H = 2, Tq = 33, Tk = 129;
  const Shape shapes[] = {{Tk}, {B, 1, 1, Tk}, {B, H, Tq, Tk}};
  int n = 0;
  for (const Shape& shape : shapes)
    for (ScoreKind kind : {ScoreKind::additive, ScoreKind::concat}) {
      check({.B = B, .Hq = H, .Tq = Tq, .Tk = Tk, .D = 8, .A = 16, .Dv = 9, .kind = kind,
             .bias_shape = shape, .seed = static_cast<uint64_t>(40 + n)});
      // With masks: grouped-query heads, causal bottom-right, key lengths, ALiBi on top.
      check({.B = B, .Hq = H, .Hkv = 1, .Tq = Tq, .Tk = Tk, .D = 3, .A = 5, .Dv = 3,
             .kind = kind, .key_lengths = {129, 40}, .causal = true, .bottom_right = true,
             .alibi = true, .bias_shape = shape, .seed = static_cast<uint64_t>(50 + n)});
      ++n;
    }
}

// dbias of the fused backward against central finite differences of the float64 reference
// forward: L = sum(out * dout) as a function of the bias, for each broadcast shape.
TEST(AdditiveAttention, BiasGradientMatchesFiniteDifferences) {
  const int64_t B = 2, H = 2, Tq = 5, Tk = 17;
  const Shape shapes[] = {{Tk}, {B, 1, 1, Tk}, {B, H, Tq, Tk}};
  for (const Shape& shape : shapes) {
    const Case c{.B = B, .Hq = H, .Tq = Tq, .Tk = Tk, .D = 8, .A = 16, .Dv = 8,
                 .key_lengths = {17, 9}, .causal = true, .bias_shape = shape};
    SCOPED_TRACE(c.str());
    const Inputs in = make_inputs(c);
    const Fused got = run_fused(in);
    ASSERT_TRUE(got.grads.dbias.defined());
    const Tensor q = in.q.to(DType::f64), k = in.k.to(DType::f64), v = in.v.to(DType::f64);
    const Tensor dout = in.dout.to(DType::f64);
    AttentionParams p = attn::detail::convert_params(in.params, DType::f64);
    p.mask.bias = p.mask.bias.contiguous().clone();
    const auto loss = [&] {
      return attn::testing::weighted_sum(attn::reference::attention(q, k, v, p).out, dout);
    };
    const Bounds tol = bounds_for(c, in);
    EXPECT_TRUE(attn::testing::check_gradient(loss, p.mask.bias, got.grads.dbias, "dbias",
                                              p.mask.bias.numel(), 1e-6,
                                              tol.param.atol + tol.param.rtol));
  }
}

TEST(AdditiveAttention, Windows) {
  const std::pair<int64_t, int64_t> windows[] = {
      {0, 0}, {3, kUnbounded}, {kUnbounded, 2}, {16, 16}, {100, 0}};
  for (auto [left, right] : windows)
    for (bool causal : {false, true})
      for (bool bottom_right : {false, true})
        check({.Tq = 70, .Tk = 150, .D = 8, .A = 16, .Dv = 8, .causal = causal,
               .bottom_right = bottom_right, .left = left, .right = right});
}

TEST(AdditiveAttention, LengthsAndFullyMaskedRows) {
  for (bool causal : {false, true})
    for (bool bottom_right : {false, true})
      check({.B = 4, .Tq = 50, .Tk = 100, .D = 8, .A = 16, .Dv = 12,
             .key_lengths = {0, 1, 100, 37}, .query_lengths = {50, 0, 5, 40}, .causal = causal,
             .bottom_right = bottom_right, .left = 20});
  // Bottom-right with Tq > Tk: the first Tq - Tk rows see no key.
  check({.Tq = 150, .Tk = 50, .D = 8, .A = 8, .Dv = 8, .causal = true, .bottom_right = true});
  // A window entirely beyond the keys for the later rows.
  check({.Tq = 100, .Tk = 60, .D = 8, .A = 8, .Dv = 8, .left = 0, .right = 0});
}

TEST(AdditiveAttention, Alibi) {
  for (bool causal : {false, true})
    check({.Hq = 4, .Hkv = 2, .Tq = 70, .Tk = 140, .D = 8, .A = 16, .Dv = 8, .causal = causal,
           .bottom_right = true, .alibi = true});
}

// |v| in [0.25, 1] for A = 16 units, alternating signs: a spread of 2 binades, so the split
// form's limit is L = floor((122 - 2) / 2) = 60 on |Qp'|, |Kp'| (kernel -inl.h, SplitScaleFor).
std::vector<float> narrow_v(int64_t A) {
  std::vector<float> v(static_cast<size_t>(A));
  for (int64_t a = 0; a < A; ++a)
    v[static_cast<size_t>(a)] =
        (a % 2 ? -1.0f : 1.0f) * (0.25f + 0.75f * static_cast<float>(a) / static_cast<float>(A));
  return v;
}

TEST(AdditiveAttention, SplitFormNearItsLimit) {
  // The kernels use 2^(Qp' + Kp') = 2^Qp' 2^Kp' while every |Qp'|, |Kp'| <= L (Qp' = 2 log2(e)
  // Qp), L = 60 for narrow_v. Weights 10 / sqrt(D) with D = 4 and |q|, |k| <= 1 keep
  // |Qp| <= 20.5, so |Qp'| <= 59.1: still the split form, with factors near 2^+-59, paired
  // products near the scaled range's ends and many saturated units.
  check({.Tq = 65, .Tk = 70, .D = 4, .A = 16, .Dv = 8, .weight_scale = 10.0,
         .score_v = narrow_v(16)});
  check({.Tq = 65, .Tk = 70, .D = 2, .A = 16, .Dv = 8, .kind = ScoreKind::concat,
         .weight_scale = 10.0, .score_v = narrow_v(16)});
}

TEST(AdditiveAttention, ScoreVectorEdgeCases) {
  // Units with v = 0 leave the split form's score loop (they add exactly 0), but their dv is
  // still sum dS t; A odd leaves one unit without a partner for the shared reciprocal.
  std::vector<float> with_zeros = narrow_v(7);
  with_zeros[0] = with_zeros[3] = with_zeros[6] = 0.0f;
  check({.Tq = 33, .Tk = 77, .D = 5, .A = 7, .Dv = 6, .score_v = with_zeros});
  // Every v = 0: no unit at all, uniform weights.
  check({.Tq = 9, .Tk = 20, .D = 3, .A = 4, .Dv = 5, .score_v = std::vector<float>(4, 0.0f)});
  // |v| spread over 2^66 (one unit at 1e-20): the limit drops to L = 28 and the operands carry
  // a large scale 2^-sigma; projections of O(1) stay in the split form.
  std::vector<float> spread = narrow_v(6);
  spread[2] = 1e-20f;
  check({.Tq = 40, .Tk = 50, .D = 4, .A = 6, .Dv = 4, .score_v = spread});
  // |v| spread over 2^80 (1e-20 and 1e4): L = 21, and the O(1) projections still fit it.
  spread[4] = 1e4f;
  check({.Tq = 40, .Tk = 50, .D = 4, .A = 6, .Dv = 4, .score_v = spread});
  // |v| spread over 2^125 (2e-38, near the smallest normal float, and ~0.6): no split form at
  // all (L < 0), the call runs the plain form.
  spread = narrow_v(6);
  spread[5] = 2e-38f;
  check({.Tq = 40, .Tk = 50, .D = 4, .A = 6, .Dv = 4, .score_v = spread});
}

TEST(AdditiveAttention, SaturatedTanh) {
  // Weights 1e3 / sqrt(D): most tanh arguments lie far beyond the clamp at |x| = 64 (|y| ~ 22),
  // where tanh is exactly +-1 in float; scores still vary through the few unsaturated units.
  check({.Tq = 65, .Tk = 70, .D = 4, .A = 16, .Dv = 8, .weight_scale = 1e3});
  check({.Tq = 65, .Tk = 70, .D = 4, .A = 16, .Dv = 8, .kind = ScoreKind::concat,
         .weight_scale = 30.0});
}

// tanh at its edge arguments, through D = 1 so Qp = w q exactly: +-0, +-inf, huge, tiny and
// NaN queries. Infinite arguments give tanh = +-1 (finite rows); a NaN query makes its own row
// NaN and no other.
TEST(AdditiveAttention, EdgeArguments) {
  const float inf = std::numeric_limits<float>::infinity();
  const std::vector<float> special = {0.0f, -0.0f, inf, -inf, 1e30f, -1e30f, 1e-30f, 44.0f,
                                      -44.0f, 88.7f, -88.7f, 1e-40f};
  Case c{.Hq = 1, .Tq = static_cast<int64_t>(special.size()) + 1, .Tk = 37, .D = 1, .A = 5,
         .Dv = 4, .kind = ScoreKind::additive_nobias};
  Inputs in = make_inputs(c);
  for (size_t i = 0; i < special.size(); ++i) in.q.data<float>()[i] = special[i];
  in.q.data<float>()[special.size()] = std::numeric_limits<float>::quiet_NaN();
  const AttentionOutput want = attn::reference::attention(in.q, in.k, in.v, in.params);
  attn::testing::for_each_simd_target(attn::kernels::additive_attention_target_name, [&](auto&) {
    const attn::detail::AttentionDims dims =
        attn::detail::validate_attention("attention", in.q, in.k, in.v, in.params);
    const AttentionOutput got =
        attn::kernels::additive_attention_forward(dims, in.q, in.k, in.v, in.params);
    const float* out = got.out.data<float>();
    const int64_t nan_row = static_cast<int64_t>(special.size());
    for (int64_t e = 0; e < c.Dv; ++e) EXPECT_TRUE(std::isnan(out[nan_row * c.Dv + e])) << e;
    for (int64_t row = 0; row < nan_row; ++row)
      for (int64_t e = 0; e < c.Dv; ++e) ASSERT_TRUE(std::isfinite(out[row * c.Dv + e])) << row;
    // Compare the finite rows against the oracle.
    const Bounds tol = bounds_for(c, in);
    for (int64_t row = 0; row < nan_row; ++row) {
      const Tensor g = got.out.reshape({c.Tq, c.Dv}).select(0, row).contiguous();
      const Tensor w = want.out.reshape({c.Tq, c.Dv}).select(0, row).contiguous();
      EXPECT_TRUE(all_close(g, w, tol.fwd, "out row " + std::to_string(row)));
    }
  });
}

// Bitwise: the forward for any thread count; the backward run to run at a fixed thread count.
TEST(AdditiveAttention, Deterministic) {
  const Case c{.B = 2, .Hq = 4, .Hkv = 2, .Tq = 150, .Tk = 190, .D = 16, .A = 32, .Dv = 16,
               .causal = true};
  const Inputs in = make_inputs(c);
  const int threads = omp_get_max_threads();
  const Fused first = run_fused(in);
  const Fused again = run_fused(in);
  expect_same_bits(first, again);
  omp_set_num_threads(1);
  const Fused single = run_fused(in);
  omp_set_num_threads(threads);
  EXPECT_TRUE(attn::testing::bitwise_equal(first.out.out, single.out.out, "out"));
  EXPECT_TRUE(attn::testing::bitwise_equal(first.out.lse, single.out.lse, "lse"));
}

// V with whole-vector rows (Dv = 16) but one float off alignment, a view into a larger buffer:
// the forward copies it instead of reading it in place (kernel _forward-inl.h). Same inputs,
// so the same bits as the aligned V on every target, forward and backward.
TEST(AdditiveAttention, MisalignedValues) {
  const Case c{.B = 2, .Hq = 2, .Hkv = 1, .Tq = 70, .Tk = 90, .D = 8, .A = 16, .Dv = 16,
               .causal = true};
  const Inputs in = make_inputs(c);
  std::vector<float> storage(static_cast<size_t>(in.v.numel() + 1));
  std::memcpy(storage.data() + 1, in.v.data<float>(),
              static_cast<size_t>(in.v.numel()) * sizeof(float));
  Inputs shifted = in;
  shifted.v = Tensor::wrap(storage.data() + 1, in.v.shape());
  ASSERT_NE(reinterpret_cast<uintptr_t>(shifted.v.data<float>()) % 64, 0u);
  attn::testing::for_each_simd_target(attn::kernels::additive_attention_target_name, [&](auto&) {
    const Fused aligned = run_fused(in);
    const Fused off = run_fused(shifted);
    expect_same_bits(aligned, off);
  });
}

TEST(AdditiveAttention, AllowedMasks) {
  // Broadcast shapes read in place; lengths 0, 1, 127, 128, 129, Tq != Tk, grouped heads, with
  // the interval masks on top; fully masked rows (every 7th row of a mask with a Tq dimension)
  // give exactly 0 output and gradients (checked in check()).
  for (int64_t tk : {0, 1, 127, 128, 129}) {
    check({.Tq = 37, .Tk = tk, .allowed_shape = {tk}});
    check({.B = 2, .Hq = 4, .Hkv = 2, .Tq = 21, .Tk = tk, .allowed_shape = {2, 1, 21, tk}});
  }
  check({.Tq = 0, .Tk = 5, .allowed_shape = {1, 2, 0, 5}});
  check({.Tq = 1, .Tk = 129, .allowed_shape = {1, 2, 1, 129}});
  check({.B = 2, .Hq = 6, .Hkv = 2, .Tq = 129, .Tk = 70, .D = 5, .A = 9, .Dv = 7,
         .allowed_shape = {2, 6, 129, 70}});
  check({.Tq = 128, .Tk = 127, .causal = true, .bottom_right = true, .bias_shape = {127},
         .allowed_shape = {128, 127}});
  check({.Tq = 50, .Tk = 90, .left = 20, .right = 5, .alibi = true,
         .allowed_shape = {1, 1, 50, 90}});
  check({.Tq = 40, .Tk = 130, .kind = ScoreKind::concat, .key_lengths = {100},
         .allowed_shape = {40, 130}});
}

TEST(AdditiveAttention, DropoutAgainstReference) {
  // The reference draws the same keep decisions (attn::dropout_keep); out, lse (before dropout)
  // and every gradient against float64, with the other masks on top.
  check({.Tq = 65, .Tk = 129, .dropout_p = 0.3});
  check({.B = 2, .Hq = 4, .Hkv = 2, .Tq = 127, .Tk = 128, .D = 6, .A = 11, .Dv = 5,
         .causal = true, .dropout_p = 0.5});
  check({.Tq = 1, .Tk = 1, .dropout_p = 0.2});
  check({.Tq = 30, .Tk = 77, .kind = ScoreKind::concat, .bias_shape = {1, 1, 30, 77},
         .allowed_shape = {30, 77}, .dropout_p = 0.25});
}

// Dropout, fused against the composed path (the fused kernel's fallback, which draws its keep
// decisions from attn::dropout_keep) on every SIMD target: out, lse and every gradient within
// the tolerance of check(), and the dropped elements the same bit for bit: with V_j = e_j (Tk
// <= Dv), out[i, j] = P_ij keep_ij / (1 - p), which is 0 exactly where the element was dropped.
class AdditiveDropout
    : public attn::testing::EveryTargetTest<attn::kernels::additive_attention_target_name> {};

TEST_P(AdditiveDropout, MatchesComposedPath) {
  const Case cases[] = {
      {.Tq = 1, .Tk = 1, .dropout_p = 0.4},
      {.Tq = 129, .Tk = 64, .D = 5, .A = 9, .Dv = 64, .dropout_p = 0.3},
      {.B = 2, .Hq = 4, .Hkv = 2, .Tq = 33, .Tk = 17, .Dv = 17, .causal = true,
       .bottom_right = true, .dropout_p = 0.5},
      {.Tq = 20, .Tk = 31, .Dv = 40, .kind = ScoreKind::concat, .allowed_shape = {20, 31},
       .dropout_p = 0.1},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.str());
    Inputs in = make_inputs(c);
    float* v = in.v.data<float>();  // V_j = e_j for every (b, kv head)
    for (int64_t row = 0; row < c.B * c.Hkv * c.Tk; ++row)
      for (int64_t e = 0; e < c.Dv; ++e) v[row * c.Dv + e] = e == row % c.Tk ? 1.0f : 0.0f;
    const attn::detail::AttentionDims dims =
        attn::detail::validate_attention("attention", in.q, in.k, in.v, in.params);
    const AttentionParams p = attn::detail::convert_params(in.params, DType::f32);
    const AttentionOutput want =
        attn::kernels::composed_attention_forward<float>(dims, in.q, in.k, in.v, p);
    const AttentionGrads want_g = attn::kernels::composed_attention_backward<float>(
        dims, in.q, in.k, in.v, p, want, in.dout);
    const Fused got = run_fused(in);
    const Bounds tol = bounds_for(c, in);
    EXPECT_TRUE(all_close(got.out.out, want.out, tol.fwd, "out"));
    EXPECT_TRUE(all_close(got.out.lse, want.lse, tol.fwd, "lse"));
    EXPECT_TRUE(all_close(got.grads.dq, want_g.dq, tol.grad, "dq"));
    EXPECT_TRUE(all_close(got.grads.dk, want_g.dk, tol.grad, "dk"));
    EXPECT_TRUE(all_close(got.grads.dv, want_g.dv, tol.grad, "dv"));
    EXPECT_TRUE(scores_close(got.grads.dscore, want_g.dscore, tol.param));
    int64_t dropped = 0;
    const float* got_out = got.out.out.data<float>();
    const float* want_out = want.out.data<float>();
    for (int64_t row = 0; row < c.B * c.Hq * c.Tq; ++row)
      for (int64_t j = 0; j < c.Tk; ++j) {
        const bool want_dropped = want_out[row * c.Dv + j] == 0.0f;
        dropped += want_dropped;
        ASSERT_EQ(got_out[row * c.Dv + j] == 0.0f, want_dropped) << "row " << row << " key " << j;
      }
    if (c.B * c.Hq * c.Tq * c.Tk > 100) {
      EXPECT_GT(dropped, 0);  // the mask did something
    }
  }
}

ATTN_INSTANTIATE_ON_EVERY_SIMD_TARGET(AdditiveDropout);

TEST(AdditiveAttention, SupportedPredicate) {
  Inputs in = make_inputs({.Tq = 4, .Tk = 4});
  AttentionParams p = in.params;
  EXPECT_TRUE(attn::kernels::additive_attention_supported(DType::f32, p));
  EXPECT_FALSE(attn::kernels::additive_attention_supported(DType::f64, p));
  p.mask.bias = Tensor::zeros({4});  // read in place through broadcast strides
  EXPECT_TRUE(attn::kernels::additive_attention_supported(DType::f32, p));
  p = in.params;
  p.mask.allowed = Tensor::full({1}, 1.0, DType::b8);  // read in place like the bias
  EXPECT_TRUE(attn::kernels::additive_attention_supported(DType::f32, p));
  p = in.params;
  p.dropout.p = 0.1;  // keep decisions regenerated from attn/random.h
  EXPECT_TRUE(attn::kernels::additive_attention_supported(DType::f32, p));
  p = in.params;
  p.return_weights = true;  // weights come from a second pass of the fused kernel
  EXPECT_TRUE(attn::kernels::additive_attention_supported(DType::f32, p));
  p = in.params;
  p.head_scores = {in.params.score, in.params.score};
  EXPECT_FALSE(attn::kernels::additive_attention_supported(DType::f32, p));
  p = in.params;
  p.mask.local.kind = attn::LocalKind::monotonic;
  EXPECT_FALSE(attn::kernels::additive_attention_supported(DType::f32, p));
  p = in.params;
  p.score = attn::ScaledDotScore{};
  EXPECT_FALSE(attn::kernels::additive_attention_supported(DType::f32, p));
  p = in.params;
  p.mask.causal = true;
  p.mask.key_lengths = {3};
  p.mask.window = attn::Window{2, 0};
  p.mask.alibi_slopes = attn::alibi_slopes(2);
  EXPECT_TRUE(attn::kernels::additive_attention_supported(DType::f32, p));
}

}  // namespace
