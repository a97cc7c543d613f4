// One attn::attention problem checked against the float64 reference (attn/reference.h), as the
// front-end tests use it (test_attention_paths, test_dot_form_scores): its sizes, seeded inputs,
// a trace label, the reduction lengths its tolerances come from, and the comparisons of outputs,
// input gradients and score-parameter gradients. Header-only.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

#include "attn/attention.h"
#include "attn/tensor.h"
#include "support/bitwise_equal.h"
#include "support/test_support.h"

namespace attn::testing {

// Sizes of a problem: q [B, Hq, Tq, Dq], k [B, Hkv, Tk, Dk], v [B, Hkv, Tk, Dv].
struct AttentionSizes {
  int64_t B = 1, Hq = 1, Hkv = 1, Tq = 4, Tk = 4, Dq = 8, Dk = 8, Dv = 8;
};

// q, k, v and the output gradient dout of a problem.
struct AttentionInputs {
  Tensor q, k, v, dout;
};

// Inputs uniform in [-1, 1), q, k, v, dout seeded seed .. seed + 3.
inline AttentionInputs make_inputs(const AttentionSizes& s, DType dtype, uint64_t seed) {
  return {random_tensor({s.B, s.Hq, s.Tq, s.Dq}, dtype, seed),
          random_tensor({s.B, s.Hkv, s.Tk, s.Dk}, dtype, seed + 1),
          random_tensor({s.B, s.Hkv, s.Tk, s.Dv}, dtype, seed + 2),
          random_tensor({s.B, s.Hq, s.Tq, s.Dv}, dtype, seed + 3)};
}

// "B2 Hq4 Hkv2 Tq9 Tk11 D12/12/5": the sizes for a trace line.
inline std::string sizes_label(const AttentionSizes& s) {
  // std::string("B"), not "B" + ...: GCC 12 warns (-Wrestrict, a false positive) on the latter.
  return std::string("B") + std::to_string(s.B) + " Hq" + std::to_string(s.Hq) + " Hkv" +
         std::to_string(s.Hkv) + " Tq" + std::to_string(s.Tq) + " Tk" + std::to_string(s.Tk) +
         " D" + std::to_string(s.Dq) + "/" + std::to_string(s.Dk) + "/" + std::to_string(s.Dv);
}

// Lengths of the longest reductions feeding one element, for tolerance_for. An output element
// sums Tk products of scores `width` wide; a gradient of q, k or v chains the value product (Dv),
// the softmax row (Tk) and the score backward over queries or keys (Tq, Tk); a parameter or bias
// gradient sums over every (b, h, i, j).
struct ReductionTerms {
  int64_t forward = 1, grad = 1, param = 1;
};

// `score_width`: the widest vector the score reduces over besides the head widths (the hidden
// width of additive scores, D + 2 for the trilinear dot form).
inline ReductionTerms terms_for(const AttentionSizes& s, int64_t score_width) {
  const int64_t width = std::max({s.Dq, s.Dk, s.Dv, score_width});
  return {.forward = std::max(width, s.Tk),
          .grad = width + s.Tq + s.Tk,
          .param = std::max<int64_t>(1, s.B * s.Hq * s.Tq * s.Tk) + width};
}

// tolerance_for(dtype, terms, safety) of each reduction length.
struct ProblemTolerances {
  Tolerance forward, grad, param;
};

inline ProblemTolerances tolerances_for(DType dtype, const ReductionTerms& terms,
                                        double safety = kDefaultSafety) {
  return {tolerance_for(dtype, terms.forward, safety), tolerance_for(dtype, terms.grad, safety),
          tolerance_for(dtype, terms.param, safety)};
}

// (name, tensor) for every defined tensor of a score or of its gradient.
inline std::vector<std::pair<std::string, Tensor>> score_tensors(const Score& score) {
  std::vector<std::pair<std::string, Tensor>> out;
  auto add = [&](const char* name, const Tensor& t) {
    if (t.defined()) out.emplace_back(name, t);
  };
  std::visit(
      [&](const auto& sc) {
        using S = std::decay_t<decltype(sc)>;
        if constexpr (std::is_same_v<S, GeneralScore>) {
          add("weight", sc.weight);
          add("u", sc.u);
          add("v", sc.v);
        } else if constexpr (std::is_same_v<S, AdditiveScore>) {
          add("w_query", sc.w_query);
          add("w_key", sc.w_key);
          add("bias", sc.bias);
          add("v", sc.v);
        } else if constexpr (std::is_same_v<S, ConcatScore>) {
          add("weight", sc.weight);
          add("v", sc.v);
        } else if constexpr (std::is_same_v<S, CosineScore>) {
          add("tau", sc.tau);
        } else if constexpr (std::is_same_v<S, LocationScore> ||
                             std::is_same_v<S, TrilinearScore>) {
          add("weight", sc.weight);
        }
      },
      score);
  return out;
}

// A score gradient against the reference's: the same kind, the same fields, each within `tol`.
inline ::testing::AssertionResult compare_scores(const Score& actual, const Score& expected,
                                                 Tolerance tol, const std::string& what) {
  if (actual.index() != expected.index())
    return ::testing::AssertionFailure() << what << ": score kind differs";
  const auto a = score_tensors(actual), e = score_tensors(expected);
  if (a.size() != e.size())
    return ::testing::AssertionFailure() << what << ": " << a.size()
                                         << " gradient fields, expected " << e.size();
  for (std::size_t f = 0; f < a.size(); ++f) {
    auto r = all_close(a[f].second, e[f].second, tol, what + "." + e[f].first);
    if (!r) return r;
  }
  return ::testing::AssertionSuccess();
}

// out and lse (and weights and mean_weights when `weights`) within the forward tolerance.
inline void expect_outputs_match(const AttentionOutput& got, const AttentionOutput& want,
                                 const ProblemTolerances& tol, bool weights) {
  EXPECT_TRUE(all_close(got.out, want.out, tol.forward, "out"));
  EXPECT_TRUE(all_close(got.lse, want.lse, tol.forward, "lse"));
  if (weights) {
    EXPECT_TRUE(all_close(got.weights, want.weights, tol.forward, "weights"));
    EXPECT_TRUE(all_close(got.mean_weights, want.mean_weights, tol.forward, "mean_weights"));
  }
}

// dq, dk, dv within the gradient tolerance; dbias, present in both or neither, within the
// parameter tolerance (it sums over its broadcast dimensions).
inline void expect_input_grads_match(const AttentionGrads& got, const AttentionGrads& want,
                                     const ProblemTolerances& tol) {
  EXPECT_TRUE(all_close(got.dq, want.dq, tol.grad, "dq"));
  EXPECT_TRUE(all_close(got.dk, want.dk, tol.grad, "dk"));
  EXPECT_TRUE(all_close(got.dv, want.dv, tol.grad, "dv"));
  ASSERT_EQ(got.dbias.defined(), want.dbias.defined());
  if (want.dbias.defined()) {
    EXPECT_TRUE(all_close(got.dbias, want.dbias, tol.param, "dbias"));
  }
}

// Two runs' every output and gradient, bit for bit: out, lse, weights, mean_weights, dq, dk, dv,
// dbias, each score-parameter gradient and the local-p gradients (undefined in both passes).
inline void expect_same_bits(const AttentionOutput& got, const AttentionGrads& got_grads,
                             const AttentionOutput& want, const AttentionGrads& want_grads) {
  EXPECT_TRUE(bitwise_equal(got.out, want.out, "out"));
  EXPECT_TRUE(bitwise_equal(got.lse, want.lse, "lse"));
  EXPECT_TRUE(bitwise_equal(got.weights, want.weights, "weights"));
  EXPECT_TRUE(bitwise_equal(got.mean_weights, want.mean_weights, "mean_weights"));
  EXPECT_TRUE(bitwise_equal(got_grads.dq, want_grads.dq, "dq"));
  EXPECT_TRUE(bitwise_equal(got_grads.dk, want_grads.dk, "dk"));
  EXPECT_TRUE(bitwise_equal(got_grads.dv, want_grads.dv, "dv"));
  EXPECT_TRUE(bitwise_equal(got_grads.dbias, want_grads.dbias, "dbias"));
  EXPECT_TRUE(bitwise_equal(got_grads.dlocal.w_p, want_grads.dlocal.w_p, "dlocal.w_p"));
  EXPECT_TRUE(bitwise_equal(got_grads.dlocal.v_p, want_grads.dlocal.v_p, "dlocal.v_p"));
  const auto g = score_tensors(got_grads.dscore), w = score_tensors(want_grads.dscore);
  ASSERT_EQ(g.size(), w.size()) << "dscore fields";
  for (std::size_t f = 0; f < w.size(); ++f)
    EXPECT_TRUE(bitwise_equal(g[f].second, w[f].second, "dscore." + w[f].first));
}

}  // namespace attn::testing
