// Shared by the sequence-parallel tests (ring and Ulysses), which run under mpirun: a case of
// sharded attention compared with single-process attn::attention / attention_backward on the
// gathered sequence. Every rank builds the same full tensors from the same seeds, runs the method
// on its shard, and compares its rows of the result with its rows of the single-process one.
//
// Bound: both sides are float32 computations of the same sums in different orders (the ring
// merges per-block results by log-sum-exp), each within tolerance_for(f32, terms) of the exact
// value, with `terms` the longest reduction feeding the result (Tk + D for out; Tq + Tk + D + A
// for dq, dk, dv; Tq Tk + D + A for the score's parameter gradients, summed over every pair).
// The absolute part scales with the largest magnitude of the expected tensor, since a gradient
// element can be a cancelling sum of terms of that size.
#pragma once

#include <gtest/gtest.h>
#include <mpi.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <variant>
#include <vector>

#include "attn/dist/ring_attention.h"
#include "attn/dist/ulysses_attention.h"
#include "mpi_test_main.h"
#include "support/test_support.h"

namespace attn::testing::sequence_parallel {

using attn::AttentionGrads, attn::AttentionOutput, attn::AttentionParams, attn::DType, attn::Score,
    attn::Tensor, attn::dist::Layout;
using attn::testing::all_close, attn::testing::random_tensor, attn::testing::tolerance_for;
using attn::testing::rank_of, attn::testing::ranks;

enum class Method { ring, ulysses };

struct Case {
  std::string name;
  int64_t B = 2, Hq = 4, Hkv = 2, Tq = 37, Tk = 37, D = 16, Dv = 16;
  bool causal = false;
  Layout layout = Layout::zigzag;
  std::vector<int64_t> key_lengths, query_lengths;
  Score score = attn::ScaledDotScore{};
  DType dtype = DType::f32;
  bool backward = true;
  int64_t A = 0;  // hidden width of additive / concat scores
  std::optional<attn::Window> window;  // over global positions
  bool alibi = false;                  // ALiBi over global positions
  Method method = Method::ring;
  attn::Alignment alignment = attn::Alignment::top_left;
  attn::LocalAttention local;  // Luong local attention (Ulysses only)
};

inline double max_abs(const Tensor& t) {
  double m = 0;
  for (double x : t.to_vector())
    if (std::isfinite(x)) m = std::max(m, std::fabs(x));
  return m;
}

// all_close with the bound of the header comment.
inline ::testing::AssertionResult close(const Tensor& actual, const Tensor& expected, DType dtype,
                                 int64_t terms, const std::string& what, double extra_atol = 0) {
  attn::testing::Tolerance tol = tolerance_for(dtype == DType::f64 ? DType::f64 : DType::f32, terms);
  tol.atol = tol.atol * std::max(1.0, max_abs(expected)) + extra_atol;
  return all_close(actual, expected, tol, what);
}

inline Tensor shard(const Tensor& full, Layout layout) {
  return attn::dist::shard_sequence(full, 2, ranks(), rank_of(), layout);
}

inline std::vector<Tensor*> score_tensors(Score& s) {
  return std::visit(
      [](auto& x) -> std::vector<Tensor*> {
        using S = std::decay_t<decltype(x)>;
        if constexpr (std::is_same_v<S, attn::GeneralScore>) return {&x.weight, &x.u, &x.v};
        else if constexpr (std::is_same_v<S, attn::AdditiveScore>) return {&x.w_query, &x.w_key, &x.bias, &x.v};
        else if constexpr (std::is_same_v<S, attn::ConcatScore>) return {&x.weight, &x.v};
        else if constexpr (std::is_same_v<S, attn::CosineScore>) return {&x.tau};
        else if constexpr (std::is_same_v<S, attn::TrilinearScore>) return {&x.weight};
        else if constexpr (std::is_same_v<S, attn::LocationScore>) return {&x.weight};
        else return {};
      },
      s);
}

inline void run_case(const Case& c) {
  SCOPED_TRACE(std::string(c.method == Method::ring ? "ring " : "ulysses ") + c.name + " on " +
               std::to_string(ranks()) + " ranks");
  const uint64_t seed = 1000 + c.name.size() * 7;
  const DType out_dtype = c.dtype == DType::bf16 ? DType::f32 : c.dtype;
  const Tensor q = random_tensor({c.B, c.Hq, c.Tq, c.D}, out_dtype, seed).to(c.dtype);
  const Tensor k = random_tensor({c.B, c.Hkv, c.Tk, c.D}, out_dtype, seed + 1).to(c.dtype);
  const Tensor v = random_tensor({c.B, c.Hkv, c.Tk, c.Dv}, out_dtype, seed + 2).to(c.dtype);
  const Tensor dout = random_tensor({c.B, c.Hq, c.Tq, c.Dv}, out_dtype, seed + 3);
  AttentionParams params;
  params.score = c.score;
  params.mask.causal = c.causal;
  params.mask.key_lengths = c.key_lengths;
  params.mask.query_lengths = c.query_lengths;
  params.mask.window = c.window;
  params.mask.alignment = c.alignment;
  params.mask.local = c.local;
  if (c.alibi) params.mask.alibi_slopes = attn::alibi_slopes(c.Hq);

  // All-bf16 inputs: attn's AVX512_BF16 kernel rounds P to bf16 (relative 2^-9) against the
  // block's own running maximum, so the ring (other blocks) and the single call round differently:
  // out moves by up to 2 2^-9 max|v|, which moves D_i = dO_i . O_i by Dv max|dO| times that, and
  // dq (dk) by max|k| (max|q|) times D_i's change.
  double out_extra = 0, grad_extra = 0;
  if (c.dtype == DType::bf16) {
    out_extra = std::ldexp(2.0, -9) * max_abs(v);
    grad_extra = out_extra * static_cast<double>(c.Dv) * max_abs(dout) *
                 std::max(max_abs(q), max_abs(k));
  }
  const AttentionOutput ref = attn::attention(q, k, v, params);
  const AttentionOutput got =
      c.method == Method::ring
          ? attn::dist::ring_attention(shard(q, c.layout), shard(k, c.layout), shard(v, c.layout),
                                       params, MPI_COMM_WORLD, {c.layout})
          : attn::dist::ulysses_attention(shard(q, c.layout), shard(k, c.layout),
                                          shard(v, c.layout), params, MPI_COMM_WORLD, {c.layout});
  EXPECT_TRUE(close(got.out, shard(ref.out, c.layout), c.dtype, c.Tk + c.D + c.A, "out", out_extra));
  EXPECT_TRUE(close(got.lse, shard(ref.lse, c.layout), c.dtype, c.Tk + c.D + c.A, "lse", out_extra));
  if (!c.backward) return;

  const AttentionGrads rg = attn::attention_backward(q, k, v, params, ref, dout);
  const Tensor sq = shard(q, c.layout), sk = shard(k, c.layout), sv = shard(v, c.layout),
               sdout = shard(dout, c.layout);
  AttentionGrads gg =
      c.method == Method::ring
          ? attn::dist::ring_attention_backward(sq, sk, sv, params, got, sdout, MPI_COMM_WORLD,
                                                {c.layout})
          : attn::dist::ulysses_attention_backward(sq, sk, sv, params, got, sdout,
                                                   MPI_COMM_WORLD, {c.layout});
  const int64_t terms = c.Tq + c.Tk + c.D + c.A;
  EXPECT_TRUE(close(gg.dq, shard(rg.dq, c.layout), c.dtype, terms, "dq", grad_extra));
  EXPECT_TRUE(close(gg.dk, shard(rg.dk, c.layout), c.dtype, terms, "dk", grad_extra));
  EXPECT_TRUE(close(gg.dv, shard(rg.dv, c.layout), c.dtype, terms, "dv", grad_extra));
  for (auto [want, have, what] : {std::tuple{&rg.dlocal.w_p, &gg.dlocal.w_p, "dlocal.w_p"},
                                  std::tuple{&rg.dlocal.v_p, &gg.dlocal.v_p, "dlocal.v_p"}}) {
    ASSERT_EQ(want->defined(), have->defined()) << what;
    if (want->defined()) {
      EXPECT_TRUE(close(*have, *want, c.dtype, c.Tq * c.Tk + c.D + c.A, what));
    }
  }
  Score expected = rg.dscore;
  std::vector<Tensor*> want = score_tensors(expected), have = score_tensors(gg.dscore);
  ASSERT_EQ(want.size(), have.size());
  for (std::size_t i = 0; i < want.size(); ++i) {
    ASSERT_EQ(want[i]->defined(), have[i]->defined()) << "score gradient " << i;
    if (want[i]->defined()) {
      EXPECT_TRUE(close(*have[i], *want[i], c.dtype, c.Tq * c.Tk + c.D + c.A,
                        "score gradient " + std::to_string(i)));
    }
  }
}

}  // namespace attn::testing::sequence_parallel
