// The 8-bit KV cache storage kind (attn/quantized.h): block quantisation, attention of a float
// query against 8-bit K and V, and attn::KVCache / multihead_attention_step with an 8-bit cache.
//
// Two separate claims, two comparisons:
// 1. Arithmetic: attention(q, k8, v8) computes attention over the dequantised values s * q;
//    compared against the float64 reference run on exactly those values (dequantize(., f64) is
//    exact), with the float32 tolerance test_mixed_precision derives for any float32
//    implementation (a score carries ~u (D + |s|), the sums over Tk and D add gamma_{D+Tk+1}).
// 2. Quantisation: against the float64 reference on the ORIGINAL values, the error is bounded
//    from the block scales. Per element |x - s q| <= s / 2. A score moves by
//    delta_j <= scale sum_c |q_c| s_{j, block(c)} / 2, so with Delta = max_j delta_j every
//    probability moves by a factor in [e^(-2 Delta), e^(2 Delta)]: |p'_j - p_j| <= p_j (e^(2 Delta) - 1)
//    and out' - out = sum (p'_j - p_j) v_j + sum p'_j (v'_j - v_j), so
//    |out' - out| <= (e^(2 Delta) - 1) max|v| + max_j |v'_j - v_j|, and |lse' - lse| <= Delta.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "attn/attention.h"
#include "attn/multihead.h"
#include "attn/quantized.h"
#include "attn/reference.h"
#include "support/float32_tolerance.h"
#include "support/test_support.h"

namespace attn {
namespace {

using namespace attn::testing;  // random_tensor, Tolerance, tolerance_for, all_close

double max_abs(const std::vector<double>& x) {
  double m = 0.0;
  for (double e : x) m = std::max(m, std::abs(e));
  return m;
}

// Every element within half its block's scale; the scale is the block's max |x| / 127 in
// float32; an all-zero block has scale 0 and zero values.
TEST(Int8Quantize, ElementErrorWithinHalfTheBlockScale) {
  for (int64_t D : {1, 31, 32, 70, 128}) {
    SCOPED_TRACE(::testing::Message() << "D " << D);
    Tensor x = random_tensor({3, 2, D}, DType::f32, static_cast<uint64_t>(D), -3.0, 3.0);
    x.select(0, 1).select(0, 0).fill(0.0);  // one all-zero row
    const QuantizedTensor q = quantize_int8(x);
    ASSERT_EQ(q.shape(), x.shape());
    ASSERT_EQ(q.scales().shape(), (Shape{3, 2, int8_blocks(D)}));
    const Tensor back = dequantize(q, DType::f64);
    for (int64_t a = 0; a < 3; ++a)
      for (int64_t b = 0; b < 2; ++b)
        for (int64_t blk = 0; blk < int8_blocks(D); ++blk) {
          const int64_t lo = blk * kInt8Block, hi = std::min(D, lo + kInt8Block);
          double amax = 0.0;
          for (int64_t e = lo; e < hi; ++e) amax = std::max(amax, std::abs(x.get({a, b, e})));
          const double s = q.scales().get({a, b, blk});
          EXPECT_EQ(s, static_cast<double>(static_cast<float>(amax / 127.0)));
          for (int64_t e = lo; e < hi; ++e) {
            EXPECT_LE(std::abs(x.get({a, b, e}) - back.get({a, b, e})), s / 2.0 * (1 + 1e-6))
                << "at " << a << "," << b << "," << e;
            if (s == 0.0) {
              EXPECT_EQ(back.get({a, b, e}), 0.0);
            }
          }
        }
  }
  expect_error([] { quantize_int8(Tensor::full({2, 4}, std::nan(""))); },
               {"[quantize_int8]", "non-finite"});
  expect_error([] { quantize_int8(Tensor::zeros({2, 4}, DType::b8)); },
               {"[quantize_int8]", "float32, float64 or bf16", "bool"});
}

// An 8-bit cache [B, H, capacity, D] with random rows, spare rows whose scales are NaN (never
// to be read), and the view of the first `length` rows.
struct Cache {
  QuantizedTensor storage, view;
  Tensor original;  // the float32 values quantised into the view
};
Cache int8_cache(int64_t B, int64_t H, int64_t length, int64_t D, uint64_t seed) {
  const int64_t capacity = length + 3;
  Cache c;
  c.storage = QuantizedTensor::zeros({B, H, capacity, D});
  c.storage.scales().fill(std::numeric_limits<double>::quiet_NaN());
  c.view = c.storage.slice(2, 0, length);
  c.original = random_tensor({B, H, length, D}, DType::f32, seed);
  quantize_int8_into(c.original, c.view);
  return c;
}

struct DecodeCase {
  int64_t B, Hq, Hkv, Tq, Tk, D;
};

// Decoder steps on the kernel path (D a multiple of 32) and the dequantising fall-backs (D = 40,
// a prefill of 40 queries, a float64 query): attention over the dequantised values.
TEST(Int8Attention, MatchesReferenceOnDequantisedValues) {
  const DecodeCase cases[] = {{1, 8, 8, 1, 1, 64},    {1, 8, 2, 1, 130, 128},
                              {2, 8, 2, 3, 1000, 64}, {3, 4, 1, 1, 600, 32},
                              {2, 4, 4, 16, 70, 40},  {2, 4, 2, 40, 90, 32},
                              {1, 2, 2, 2, 0, 32}};
  for (const DecodeCase& c : cases) {
    for (DType qtype : {DType::f32, DType::f64}) {
      SCOPED_TRACE(::testing::Message() << "B" << c.B << " Hq" << c.Hq << " Hkv" << c.Hkv << " Tq"
                                        << c.Tq << " Tk" << c.Tk << " D" << c.D << " q "
                                        << dtype_name(qtype));
      const Tensor q = random_tensor({c.B, c.Hq, c.Tq, c.D}, qtype, 1);
      const Cache k = int8_cache(c.B, c.Hkv, c.Tk, c.D, 2), v = int8_cache(c.B, c.Hkv, c.Tk, c.D, 3);
      AttentionParams params;
      params.mask.causal = true;
      params.mask.alignment = Alignment::bottom_right;
      if (c.B > 1 && c.Tk > 0) {
        params.mask.key_lengths.assign(static_cast<size_t>(c.B), c.Tk);
        params.mask.key_lengths[1] = std::max<int64_t>(c.Tq, c.Tk / 2);
      }
      params.return_weights = true;
      const AttentionOutput got = attention(q, k.view, v.view, params);
      const AttentionOutput want = reference::attention(q.to(DType::f64),
                                                        dequantize(k.view, DType::f64),
                                                        dequantize(v.view, DType::f64), params);
      EXPECT_EQ(got.out.dtype(), qtype);
      const double scale = 1.0 / std::sqrt(static_cast<double>(c.D));
      const Tolerance tol = float32_tolerance(c.D, c.Tk, scale * static_cast<double>(c.D));
      EXPECT_TRUE(all_close(got.out, want.out, tol, "out"));
      EXPECT_TRUE(all_close(got.lse, want.lse, tol, "lse"));
      EXPECT_TRUE(all_close(got.weights, want.weights, tol, "weights"));
    }
  }
}

// Against the ORIGINAL float values: the quantisation error within the bound derived from the
// block scales (header comment), plus the float32 tolerance.
TEST(Int8Attention, QuantisationErrorWithinScaleBound) {
  const int64_t B = 1, Hq = 8, Hkv = 2, Tq = 1, Tk = 300, D = 64;
  const Tensor q = random_tensor({B, Hq, Tq, D}, DType::f32, 21, -2.0, 2.0);
  const Cache k = int8_cache(B, Hkv, Tk, D, 22), v = int8_cache(B, Hkv, Tk, D, 23);
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  // Delta = max over heads and keys of scale sum_c |q_c| s_{j, block(c)} / 2.
  double delta = 0.0;
  const int64_t G = Hq / Hkv;
  for (int64_t h = 0; h < Hq; ++h)
    for (int64_t j = 0; j < Tk; ++j) {
      double d = 0.0;
      for (int64_t c = 0; c < D; ++c)
        d += std::abs(q.get({0, h, 0, c})) * k.view.scales().get({0, h / G, j, c / kInt8Block});
      delta = std::max(delta, scale * d / 2.0);
    }
  double v_err = 0.0;
  for (int64_t h = 0; h < Hkv; ++h)
    for (int64_t j = 0; j < Tk; ++j)
      for (int64_t blk = 0; blk < D / kInt8Block; ++blk)
        v_err = std::max(v_err, v.view.scales().get({0, h, j, blk}) / 2.0);
  const double v_max = max_abs(v.original.to_vector());
  const AttentionOutput got = attention(q, k.view, v.view);
  const AttentionOutput exact = reference::attention(q, k.original, v.original);
  const Tolerance f32 = float32_tolerance(D, Tk, scale * 2.0 * D);
  const double out_bound = std::expm1(2.0 * delta) * v_max + v_err + f32.atol * 2.0;
  const double lse_bound = delta + f32.atol * 2.0;
  const std::vector<double> got_out = got.out.to_vector(), want_out = exact.out.to_vector();
  double worst = 0.0;
  for (size_t i = 0; i < got_out.size(); ++i)
    worst = std::max(worst, std::abs(got_out[i] - want_out[i]));
  EXPECT_LE(worst, out_bound) << "Delta " << delta << ", max |v' - v| " << v_err;
  EXPECT_GT(worst, 0.0);  // the cache did quantise
  const std::vector<double> got_lse = got.lse.to_vector(), want_lse = exact.lse.to_vector();
  for (size_t i = 0; i < got_lse.size(); ++i)
    EXPECT_LE(std::abs(got_lse[i] - want_lse[i]), lse_bound) << "row " << i;
}

// Decoding token by token into an 8-bit and a float32 cache (growing from capacity 2): the
// 8-bit cache holds exactly the float32 cache's rows quantised; each step matches the float64
// reference over the dequantised keys, and stays within the quantisation bound's scale of the
// float32 cache's step.
TEST(KVCacheInt8, DecodingMatchesReferenceOnDequantisedCache) {
  const MultiHeadConfig config{.d_model = 64, .num_heads = 8, .num_kv_heads = 2, .head_dim = 32};
  const MultiHeadWeights w = MultiHeadWeights::init(config, DType::f32, 7);
  const int64_t B = 2, steps = 9, Dk = 32;
  KVCache c32 = KVCache::create(config, {.batch = B, .capacity = 2, .dtype = DType::f32});
  KVCache c8 = KVCache::create(config, {.batch = B, .capacity = 2, .int8 = true});
  ASSERT_TRUE(c8.is_int8());
  const Tensor x = random_tensor({B, steps, config.d_model}, DType::f32, 8, -2.0, 2.0);
  AttentionParams params;
  params.mask.causal = true;
  for (int64_t t = 0; t < steps; ++t) {
    const Tensor xt = x.slice(1, t, t + 1).contiguous();
    const MultiHeadOutput o32 = multihead_attention_step(config, w, c32, xt, xt, xt, params);
    const MultiHeadOutput o8 = multihead_attention_step(config, w, c8, xt, xt, xt, params);
    ASSERT_EQ(c8.length, t + 1);
    EXPECT_FALSE(o8.k.defined());
    EXPECT_EQ(o8.output.dtype(), DType::f32);
    EXPECT_EQ(dequantize(c8.int8_keys(), DType::f64).to_vector(),
              dequantize(quantize_int8(c32.keys()), DType::f64).to_vector());
    EXPECT_EQ(dequantize(c8.int8_values(), DType::f64).to_vector(),
              dequantize(quantize_int8(c32.values()), DType::f64).to_vector());
    AttentionParams step = params;
    step.mask.alignment = Alignment::bottom_right;
    const AttentionOutput want =
        reference::attention(o8.q.to(DType::f64), dequantize(c8.int8_keys(), DType::f64),
                             dequantize(c8.int8_values(), DType::f64), step);
    const Tolerance tol = float32_tolerance(Dk, t + 1, 4.0 * static_cast<double>(Dk));
    EXPECT_TRUE(all_close(o8.attention.out, want.out, tol, "step out")) << "step " << t;
    EXPECT_TRUE(all_close(o8.attention.lse, want.lse, tol, "step lse")) << "step " << t;
    // Against the float32 cache: 8-bit error only (a loose sanity bound: values are O(1),
    // scales ~ max / 127).
    EXPECT_TRUE(all_close(o8.attention.out, o32.attention.out, Tolerance{0.1, 0.1}, "vs f32"));
  }
}

TEST(KVCacheInt8, Errors) {
  const MultiHeadConfig config{.d_model = 32, .num_heads = 2};
  expect_error([&] { KVCache::create(config, {.dtype = DType::bf16, .int8 = true}); },
               {"[KVCache::create]", "8-bit", "bf16"});
  KVCache cache = KVCache::create(config, {.batch = 1, .capacity = 1, .int8 = true});
  expect_error([&] { cache.append(Tensor::zeros({1, 2, 1, 8}), Tensor::zeros({1, 2, 1, 16})); },
               {"[KVCache::append]", "do not match the 8-bit cache"});
  const MultiHeadWeights w = MultiHeadWeights::init(config, DType::f32, 3);
  const Tensor x = random_tensor({2, 1, 32}, DType::f32, 4);  // batch 2, cache batch 1
  expect_error([&] { multihead_attention_step(config, w, cache, x, x, x); },
               {"[multihead_attention_step]", "8-bit cache", "batch 2"});
  const QuantizedTensor k = quantize_int8(random_tensor({1, 2, 5, 32}, DType::f32, 5));
  const QuantizedTensor v = quantize_int8(random_tensor({1, 2, 4, 32}, DType::f32, 6));
  expect_error([&] { attention(random_tensor({1, 2, 1, 32}, DType::f32, 7), k, v); },
               "[attention]");
  expect_error([&] { attention(Tensor::zeros({1, 2, 1, 32}, DType::b8), k, k); },
               {"[attention]", "float32, float64 or bf16", "bool"});
  QuantizedTensor bad = k;
  bad.scales() = Tensor::zeros({1, 2, 5, 2});  // two blocks where D = 32 has one
  expect_error([&] { attention(random_tensor({1, 2, 1, 32}, DType::f32, 8), bad, bad); },
               {"[attention]", "8-bit k scales must be float32 [1, 2, 5, 1]", "[1, 2, 5, 2]"});
}

}  // namespace
}  // namespace attn
