// Fused dot-product attention forward (src/kernels/flash/flash_attention.*) against a float64 plain
// loop written here, on every Highway target this machine supports (the test name carries the
// target, so a failure names it). Sweeps edge sizes (0, 1, 2, 3, 127, 128, 129, 513), odd head
// dims, grouped-query heads, causal masks in both alignments with Tq != Tk, windows, key and
// query lengths, broadcast biases, ALiBi, fully masked rows, +-1e4 logits and NaN inputs.
//
// Tolerance (forward error analysis): a score s = scale q.k + bias + alibi carries an absolute
// error ~ u (sqrt(D) + |s|_max); a probability p_j changes by p_j (ds_j - sum p ds), so the output
// moves by <= 2 max|ds| max|v|; summation over Tk keys and D features adds ~ u sqrt(D + Tk).
#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "attention_validate.h"
#include "attn/attention.h"
#include "attn/reference.h"
#include "kernels/flash/flash_attention.h"
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
using attn::kernels::FlashAttentionArgs;

constexpr int64_t kUnbounded = attn::Window::unbounded;

using Case = attn::testing::FlashCase;

struct Inputs {
  Tensor q, k, v, bias;
  std::vector<float> slopes;
};

Inputs make_inputs(const Case& c) {
  Inputs in;
  in.q = attn::testing::random_tensor({c.B, c.Hq, c.Tq, c.D}, DType::f32, c.seed);
  in.k = attn::testing::random_tensor({c.B, c.Hkv, c.Tk, c.D}, DType::f32, c.seed + 1);
  in.v = attn::testing::random_tensor({c.B, c.Hkv, c.Tk, c.Dv}, DType::f32, c.seed + 2);
  if (!c.bias_shape.empty())
    in.bias = attn::testing::random_tensor(c.bias_shape, DType::f32, c.seed + 3, -c.bias_range,
                                           c.bias_range);
  if (c.alibi)
    for (int64_t h = 0; h < c.Hq; ++h) in.slopes.push_back(std::ldexp(1.0f, -(int)(h + 1)));
  return in;
}

// The bias dimension sizes right-aligned to 4 (missing leading dimensions are 1).
std::vector<int64_t> bias_dims4(const Shape& shape) {
  std::vector<int64_t> dims(4, 1);
  for (size_t d = 0; d < shape.size(); ++d) dims[4 - shape.size() + d] = shape[d];
  return dims;
}

struct Result {
  Tensor out, lse;  // float32 from the kernel, float64 from the reference
  double max_abs_score = 0.0;
};

Result run_kernel(const Case& c, const Inputs& in) {
  Result r;
  r.out = Tensor::full({c.B, c.Hq, c.Tq, c.Dv}, 12345.0, DType::f32);  // poison: all written?
  r.lse = Tensor::full({c.B, c.Hq, c.Tq}, 12345.0, DType::f32);
  FlashAttentionArgs a;
  a.q = in.q.data<float>();
  a.k = in.k.data<float>();
  a.v = in.v.data<float>();
  a.out = r.out.data<float>();
  a.lse = r.lse.data<float>();
  a.batch = c.B, a.q_heads = c.Hq, a.kv_heads = c.Hkv, a.q_len = c.Tq, a.k_len = c.Tk;
  a.head_dim = c.D, a.value_dim = c.Dv;
  a.scale = static_cast<float>(c.scale_value());
  a.key_lengths = c.key_lengths.empty() ? nullptr : c.key_lengths.data();
  a.query_lengths = c.query_lengths.empty() ? nullptr : c.query_lengths.data();
  a.causal = c.causal, a.bottom_right = c.bottom_right;
  a.window_left = c.left, a.window_right = c.right;
  if (in.bias.defined()) {
    // Contiguous strides of the bias, 0 where it broadcasts.
    const std::vector<int64_t> dims = bias_dims4(c.bias_shape);
    const int64_t full[4] = {c.B, c.Hq, c.Tq, c.Tk};
    int64_t strides[4], running = 1;
    for (int d = 3; d >= 0; --d) {
      strides[d] = (dims[d] == 1 && full[d] != 1) ? 0 : running;
      running *= dims[d];
    }
    a.bias = {in.bias.data<float>(), strides[0], strides[1], strides[2], strides[3]};
  }
  a.alibi_slopes = in.slopes.empty() ? nullptr : in.slopes.data();
  attn::kernels::flash_attention_forward(a);
  return r;
}

// Plain float64 loops following attention.h literally, one key at a time.
Result run_reference(const Case& c, const Inputs& in) {
  Result r;
  r.out = Tensor::zeros({c.B, c.Hq, c.Tq, c.Dv}, DType::f64);
  r.lse = Tensor::zeros({c.B, c.Hq, c.Tq}, DType::f64);
  const float* q = in.q.data<float>();
  const float* k = in.k.data<float>();
  const float* v = in.v.data<float>();
  double* out = r.out.data<double>();
  double* lse = r.lse.data<double>();
  const double scale = c.scale_value();
  const std::vector<int64_t> bd = bias_dims4(c.bias_shape);
  const int64_t G = c.Hq / c.Hkv;
  std::vector<double> s(static_cast<size_t>(c.Tk));
  std::vector<bool> visible(static_cast<size_t>(c.Tk));
  for (int64_t b = 0; b < c.B; ++b) {
    const int64_t kl = c.key_lengths.empty() ? c.Tk : c.key_lengths[b];
    const int64_t ql = c.query_lengths.empty() ? c.Tq : c.query_lengths[b];
    for (int64_t h = 0; h < c.Hq; ++h) {
      const int64_t kvh = h / G;
      for (int64_t i = 0; i < c.Tq; ++i) {
        const int64_t pos = i + (c.bottom_right ? kl - ql : 0);
        double max = -std::numeric_limits<double>::infinity();
        bool any = false;
        for (int64_t j = 0; j < c.Tk; ++j) {
          bool ok = j < kl && i < ql;
          if (c.causal) ok = ok && j <= pos;
          if (c.left != kUnbounded) ok = ok && j >= pos - c.left;
          if (c.right != kUnbounded) ok = ok && j <= pos + c.right;
          visible[j] = ok;
          if (!ok) continue;
          double dot = 0.0;
          for (int64_t d = 0; d < c.D; ++d)
            dot += static_cast<double>(q[((b * c.Hq + h) * c.Tq + i) * c.D + d]) *
                   static_cast<double>(k[((b * c.Hkv + kvh) * c.Tk + j) * c.D + d]);
          double score = scale * dot;
          if (in.bias.defined()) {
            const int64_t idx[4] = {b, h, i, j};
            int64_t flat = 0;
            for (int d = 0; d < 4; ++d) flat = flat * bd[d] + (bd[d] == 1 ? 0 : idx[d]);
            score += in.bias.data<float>()[flat];
          }
          if (c.alibi) score -= in.slopes[h] * std::abs(static_cast<double>(pos - j));
          s[j] = score;
          if (std::isfinite(score)) r.max_abs_score = std::max(r.max_abs_score, std::abs(score));
          max = std::isnan(score) || std::isnan(max) ? NAN : std::max(max, score);
          any = true;
        }
        const int64_t row = (b * c.Hq + h) * c.Tq + i;
        if (!any) {
          lse[row] = -std::numeric_limits<double>::infinity();
          continue;
        }
        double sum = 0.0;
        for (int64_t j = 0; j < c.Tk; ++j)
          if (visible[j]) sum += std::exp(s[j] - max);
        for (int64_t j = 0; j < c.Tk; ++j) {
          if (!visible[j]) continue;
          const double p = std::exp(s[j] - max) / sum;
          for (int64_t e = 0; e < c.Dv; ++e)
            out[row * c.Dv + e] += p * v[((b * c.Hkv + kvh) * c.Tk + j) * c.Dv + e];
        }
        lse[row] = max + std::log(sum);
      }
    }
  }
  return r;
}

attn::testing::Tolerance tolerance(const Case& c, double max_abs_score) {
  return attn::testing::dot_forward_tolerance(
      {.Tk = c.Tk, .D = c.D, .max_abs_score = max_abs_score});
}

class FlashAttentionTest
    : public attn::testing::EveryTargetTest<attn::kernels::flash_attention_target_name> {
 protected:
  // Runs one case on the forced target and compares with the float64 loops.
  void check(const Case& c) {
    SCOPED_TRACE(target_label() + ": " + c.str());
    const Inputs in = make_inputs(c);
    const Result got = run_kernel(c, in);
    const Result want = run_reference(c, in);
    const auto tol = tolerance(c, want.max_abs_score);
    EXPECT_TRUE(attn::testing::all_close(got.out, want.out, tol, "out"));
    EXPECT_TRUE(attn::testing::all_close(got.lse, want.lse, tol, "lse"));
    // Fully masked rows: exactly 0 and -inf, not merely close.
    const float* out = got.out.data<float>();
    const double* ref_lse = want.lse.data<double>();
    for (int64_t row = 0; row < c.B * c.Hq * c.Tq; ++row) {
      if (!std::isinf(ref_lse[row])) continue;
      for (int64_t e = 0; e < c.Dv; ++e)
        ASSERT_EQ(out[row * c.Dv + e], 0.0f) << "fully masked row " << row << " column " << e;
    }
  }
};

const int64_t kSizes[] = {0, 1, 2, 3, 127, 128, 129, 513};
const int64_t kDims[] = {1, 3, 59, 64, 128};

TEST_P(FlashAttentionTest, SizeSweep) {
  int n = 0;
  for (int64_t tq : kSizes)
    for (int64_t tk : kSizes) {
      const int64_t d = kDims[n++ % 5];
      // The largest products only at the small head dims, to keep the float64 loops short.
      if (tq * tk > 128 * 513 && d > 64) continue;
      check({.Tq = tq, .Tk = tk, .D = d, .Dv = d, .seed = static_cast<uint64_t>(n)});
    }
  check({.Tq = 513, .Tk = 513, .D = 64, .Dv = 64, .seed = 99});
}

TEST_P(FlashAttentionTest, HeadDims) {
  for (int64_t d : kDims)
    for (int64_t dv : {d, int64_t{5}, int64_t{130}})
      check({.Hq = 4, .Hkv = 2, .Tq = 129, .Tk = 127, .D = d, .Dv = dv});
}

TEST_P(FlashAttentionTest, GroupedQueryHeads) {
  for (auto [hq, hkv] : {std::pair{6, 2}, std::pair{8, 1}, std::pair{3, 3}})
    check({.B = 2, .Hq = hq, .Hkv = hkv, .Tq = 70, .Tk = 129, .D = 64, .Dv = 64, .causal = true,
           .bottom_right = true});
}

TEST_P(FlashAttentionTest, CausalBothAlignments) {
  const std::pair<int64_t, int64_t> sizes[] = {{129, 513}, {513, 129}, {1, 513}, {128, 128},
                                               {127, 3},   {3, 127},   {2, 1}};
  for (auto [tq, tk] : sizes)
    for (bool bottom_right : {false, true})
      check({.B = 2, .Tq = tq, .Tk = tk, .D = 64, .Dv = 59, .causal = true,
             .bottom_right = bottom_right});
}

TEST_P(FlashAttentionTest, Windows) {
  const std::pair<int64_t, int64_t> windows[] = {
      {0, 0}, {3, kUnbounded}, {kUnbounded, 2}, {16, 16}, {0, kUnbounded}, {100, 0}};
  for (auto [left, right] : windows)
    for (bool causal : {false, true})
      for (bool bottom_right : {false, true})
        check({.Tq = 129, .Tk = 300, .D = 64, .Dv = 64, .causal = causal,
               .bottom_right = bottom_right, .left = left, .right = right});
}

TEST_P(FlashAttentionTest, KeyAndQueryLengths) {
  for (bool causal : {false, true})
    for (bool bottom_right : {false, true})
      check({.B = 4, .Tq = 129, .Tk = 200, .D = 32, .Dv = 48,
             .key_lengths = {0, 1, 200, 77}, .query_lengths = {129, 0, 5, 100}, .causal = causal,
             .bottom_right = bottom_right, .left = 40});
}

TEST_P(FlashAttentionTest, BiasBroadcasts) {
  const int64_t B = 2, H = 2, Tq = 129, Tk = 130;
  const Shape shapes[] = {{B, H, Tq, Tk}, {H, Tq, Tk}, {Tq, Tk}, {B, 1, 1, Tk},
                          {1, H, Tq, 1},  {Tk},        {B, H, 1, 1}};
  for (const Shape& shape : shapes)
    for (bool causal : {false, true})
      check({.B = B, .Hq = H, .Hkv = 1, .Tq = Tq, .Tk = Tk, .D = 64, .Dv = 64,
             .causal = causal, .bias_shape = shape, .bias_range = 2.0});
}

TEST_P(FlashAttentionTest, Alibi) {
  for (bool causal : {false, true})
    for (bool bottom_right : {false, true})
      check({.Hq = 4, .Hkv = 2, .Tq = 100, .Tk = 257, .D = 64, .Dv = 64, .causal = causal,
             .bottom_right = bottom_right, .bias_shape = {100, 257}, .alibi = true});
}

TEST_P(FlashAttentionTest, FullyMaskedRows) {
  // Bottom-right with Tq > Tk: the first Tq - Tk rows see no key.
  check({.Tq = 300, .Tk = 100, .D = 64, .Dv = 64, .causal = true, .bottom_right = true});
  // A window that lies entirely beyond the keys for the later rows.
  check({.Tq = 200, .Tk = 150, .D = 16, .Dv = 16, .left = 0, .right = 0});
  // No keys at all in one batch, and masked rows inside otherwise visible tiles.
  check({.B = 2, .Tq = 40, .Tk = 64, .D = 8, .Dv = 8, .key_lengths = {0, 64},
         .query_lengths = {40, 17}});
}

TEST_P(FlashAttentionTest, LargeLogits) {
  // q.k up to ~1e4 in magnitude through the scale, and +-1e4 additive biases.
  check({.Tq = 129, .Tk = 257, .D = 64, .Dv = 64, .scale = 1e4 / 8.0});
  check({.Tq = 129, .Tk = 257, .D = 64, .Dv = 64, .causal = true, .bias_shape = {129, 257},
         .bias_range = 1e4});
}

TEST_P(FlashAttentionTest, NanStaysInItsRow) {
  const Case c{.Hq = 1, .Tq = 70, .Tk = 90, .D = 16, .Dv = 16};
  Inputs in = make_inputs(c);
  in.q.data<float>()[33 * c.D + 5] = std::numeric_limits<float>::quiet_NaN();
  const Result got = run_kernel(c, in);
  const Result want = run_reference(c, in);
  const float* out = got.out.data<float>();
  for (int64_t e = 0; e < c.Dv; ++e) EXPECT_TRUE(std::isnan(out[33 * c.Dv + e])) << e;
  EXPECT_TRUE(attn::testing::all_close(got.out, want.out, tolerance(c, want.max_abs_score)));
}

TEST_P(FlashAttentionTest, BitwiseReproducibleAcrossThreadCounts) {
  const Case c{.B = 2, .Hq = 4, .Hkv = 2, .Tq = 300, .Tk = 300, .D = 64, .Dv = 64,
               .causal = true, .bias_shape = {2, 1, 1, 300}};
  const Inputs in = make_inputs(c);
  const int threads = omp_get_max_threads();
  const Result first = run_kernel(c, in);
  omp_set_num_threads(1);
  const Result single = run_kernel(c, in);
  omp_set_num_threads(threads);
  const Result again = run_kernel(c, in);
  EXPECT_TRUE(attn::testing::bitwise_equal(first.out, single.out, "out with one thread"));
  EXPECT_TRUE(attn::testing::bitwise_equal(first.out, again.out, "out again"));
}

ATTN_INSTANTIATE_ON_EVERY_SIMD_TARGET(FlashAttentionTest);

// The Tensor-level glue the front-end calls (it derives the broadcast strides of the bias
// itself), against the library's float64 oracle.
TEST(FlashAttentionGlue, MatchesReferenceOracle) {
  const int64_t B = 2, Hq = 4, Hkv = 2, Tq = 65, Tk = 130, D = 32;
  const Tensor q = attn::testing::random_tensor({B, Hq, Tq, D}, DType::f32, 7);
  const Tensor k = attn::testing::random_tensor({B, Hkv, Tk, D}, DType::f32, 8);
  const Tensor v = attn::testing::random_tensor({B, Hkv, Tk, D}, DType::f32, 9);
  const Shape bias_shapes[] = {{B, 1, Tq, Tk}, {Tk}, {Hq, 1, 1}, {B, Hq, Tq, Tk}, {1, 1, Tq, 1}};
  for (const Shape& bias_shape : bias_shapes) {
    SCOPED_TRACE("bias " + attn::shape_str(bias_shape));
    attn::AttentionParams params;
    params.score = attn::ScaledDotScore{0.3};
    params.mask.key_lengths = {130, 100};
    params.mask.causal = true;
    params.mask.alignment = attn::Alignment::bottom_right;
    params.mask.window = attn::Window{.left = 50, .right = attn::Window::unbounded};
    params.mask.bias = attn::testing::random_tensor(bias_shape, DType::f32, 10);
    params.mask.alibi_slopes = attn::alibi_slopes(Hq);
    ASSERT_TRUE(attn::kernels::flash_attention_supported(DType::f32, params));

    const attn::detail::AttentionDims dims =
        attn::detail::validate_attention("attention", q, k, v, params);
    const attn::AttentionOutput got = attn::kernels::flash_attention(dims, q, k, v, params);
    const attn::AttentionOutput want = attn::reference::attention(q, k, v, params);
    // |score| <= 0.3 |q.k| + |bias| + |ALiBi| <= 0.3 * D + 1 + (1/4 slope) * (50-key window).
    const double max_abs_score = 0.3 * D + 1.0 + 0.25 * 50;
    const auto tol = tolerance({.Tk = Tk, .D = D}, max_abs_score);
    EXPECT_TRUE(attn::testing::all_close(got.out, want.out, tol, "out"));
    EXPECT_TRUE(attn::testing::all_close(got.lse, want.lse, tol, "lse"));
  }
}

TEST(FlashAttentionGlue, SupportedPredicate) {
  attn::AttentionParams params;
  EXPECT_TRUE(attn::kernels::flash_attention_supported(DType::f32, params));
  EXPECT_FALSE(attn::kernels::flash_attention_supported(DType::f64, params));
  params.dropout.p = 0.1;  // the keep mask is regenerated from the counter-based hash
  EXPECT_TRUE(attn::kernels::flash_attention_supported(DType::f32, params));
  params.dropout.p = 0.0;
  params.score = attn::CosineScore{};
  EXPECT_FALSE(attn::kernels::flash_attention_supported(DType::f32, params));
  params.score = attn::DotScore{};
  params.return_weights = true;  // weights come from a second pass of the fused kernel
  EXPECT_TRUE(attn::kernels::flash_attention_supported(DType::f32, params));
  params.return_weights = false;
  params.mask.allowed = Tensor::full({1}, 1.0, DType::b8);  // read tile by tile
  EXPECT_TRUE(attn::kernels::flash_attention_supported(DType::f32, params));
  params.mask.local.kind = attn::LocalKind::monotonic;
  EXPECT_FALSE(attn::kernels::flash_attention_supported(DType::f32, params));
}

}  // namespace
