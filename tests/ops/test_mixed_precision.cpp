// Mixed precision through the public API: a float32 (or float64, or bf16) query against bf16 K
// and V (attention.h's dtype contract), and attn::KVCache / multihead_attention_step with a bf16
// cache. Every result is compared against the float64 reference run on the SAME bf16 K and V
// (widened exactly to float64), so the rounding of the cache, the caller's choice, is outside
// the comparison; the query is never rounded. (The backward with a float32 query against bf16
// K and V is in test_bf16_attention's BackwardMatchesReferenceOnSameInputs.)
//
// Tolerance (as test_decode_attention derives it): the error of a plain float32 implementation
// on those inputs. A score carries an absolute error ~ u (D + |s|) with |s| <= scale sum |q k|;
// the output moves by <= 2 max|ds| max|v|, and the sums over Tk keys and D features add
// gamma_{D + Tk + 1}; tolerance_for's safety factor covers the chain. Inputs are in [-1, 1), so
// max |s| <= scale D.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <vector>

#include "attn/attention.h"
#include "attn/multihead.h"
#include "attn/reference.h"
#include "support/float32_tolerance.h"
#include "support/test_support.h"

namespace attn {
namespace {

using namespace attn::testing;  // random_tensor, Tolerance, tolerance_for, all_close

// A bf16 cache [B, H, capacity, D] whose first `length` rows hold random values and whose
// spare rows hold NaN (never to be read), and the view of the valid rows (strided over the
// capacity, as KVCache::keys() returns it).
struct Cache {
  Tensor storage, view;
};
Cache bf16_cache(int64_t B, int64_t H, int64_t length, int64_t D, uint64_t seed) {
  const int64_t capacity = length + 5;
  Tensor storage =
      Tensor::full({B, H, capacity, D}, std::numeric_limits<double>::quiet_NaN(), DType::bf16);
  Tensor view = storage.slice(2, 0, length);
  view.copy_from(random_tensor({B, H, length, D}, DType::f32, seed));
  return {storage, view};
}

struct DecodeCase {
  int64_t B, Hq, Hkv, Tq, Tk, D;
};

void expect_forward_matches_reference(const Tensor& q, const Tensor& k, const Tensor& v,
                                      const AttentionParams& params, Tolerance tol) {
  const AttentionOutput got = attention(q, k, v, params);
  const AttentionOutput want = reference::attention(q, k, v, params);
  const DType out_dtype = q.dtype() == DType::f64 ? DType::f64 : DType::f32;
  EXPECT_EQ(got.out.dtype(), out_dtype);
  EXPECT_TRUE(all_close(got.out, want.out, tol, "out"));
  EXPECT_TRUE(all_close(got.lse, want.lse, tol, "lse"));
  if (params.return_weights) {
    EXPECT_TRUE(all_close(got.weights, want.weights, tol, "weights"));
  }
}

// Decoder steps: the decode kernel reads the strided bf16 cache in place (its NaN spare rows
// would poison the output if anything read or widened them).
TEST(MixedPrecision, Float32QueryAgainstBf16CacheDecodeShapes) {
  const DecodeCase cases[] = {{1, 8, 8, 1, 1, 64},   {1, 8, 2, 1, 130, 64},
                              {2, 8, 2, 3, 1000, 64}, {2, 4, 4, 16, 70, 33},
                              {3, 4, 1, 1, 600, 128}, {1, 2, 2, 2, 0, 16}};
  for (const DecodeCase& c : cases) {
    SCOPED_TRACE(::testing::Message() << "B" << c.B << " Hq" << c.Hq << " Hkv" << c.Hkv << " Tq"
                                      << c.Tq << " Tk" << c.Tk << " D" << c.D);
    const Tensor q = random_tensor({c.B, c.Hq, c.Tq, c.D}, DType::f32, 1);
    const Cache k = bf16_cache(c.B, c.Hkv, c.Tk, c.D, 2), v = bf16_cache(c.B, c.Hkv, c.Tk, c.D, 3);
    ASSERT_FALSE(k.view.is_contiguous() && c.Tk > 0);
    AttentionParams params;
    params.mask.causal = true;
    params.mask.alignment = Alignment::bottom_right;
    if (c.B > 1 && c.Tk > 0) {
      params.mask.key_lengths.assign(static_cast<size_t>(c.B), c.Tk);
      params.mask.key_lengths[1] = std::max<int64_t>(c.Tq, c.Tk / 2);
    }
    const double scale = 1.0 / std::sqrt(static_cast<double>(c.D));
    const Tolerance tol = float32_tolerance(c.D, c.Tk, scale * static_cast<double>(c.D));
    expect_forward_matches_reference(q, k.view, v.view, params, tol);
    // The weights, an additive bias and ALiBi on the same path.
    params.return_weights = true;
    params.mask.alibi_slopes = alibi_slopes(c.Hq);
    if (c.Tk > 0) params.mask.bias = random_tensor({c.Tk}, DType::f32, 4);
    const double max_abs = scale * static_cast<double>(c.D) + 1.0 +
                           params.mask.alibi_slopes.front() * static_cast<double>(c.Tk);
    expect_forward_matches_reference(q, k.view, v.view, params,
                                     float32_tolerance(c.D, c.Tk, max_abs));
  }
}

// Many queries (prefill), other scores, a float64 query: K and V are widened to the query's
// dtype (exactly) and the float paths run.
TEST(MixedPrecision, WideningPathsMatchReference) {
  const int64_t B = 2, Hq = 4, Hkv = 2, Tq = 40, Tk = 70, D = 32;
  const Cache k = bf16_cache(B, Hkv, Tk, D, 12), v = bf16_cache(B, Hkv, Tk, D, 13);
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  AttentionParams causal;
  causal.mask.causal = true;
  {
    SCOPED_TRACE("prefill, fused float32 kernel");
    const Tensor q = random_tensor({B, Hq, Tq, D}, DType::f32, 11);
    expect_forward_matches_reference(q, k.view, v.view, causal,
                                     float32_tolerance(D, Tk, scale * D));
  }
  {
    SCOPED_TRACE("decoder step with a general score (dot form)");
    const Tensor q = random_tensor({B, Hq, 1, D}, DType::f32, 14);
    AttentionParams general;
    general.score = GeneralScore{.weight = random_tensor({D, D}, DType::f32, 15, -0.2, 0.2)};
    // |q W| <= 0.2 D per feature: scores up to 0.2 D^2.
    expect_forward_matches_reference(q, k.view, v.view, general,
                                     float32_tolerance(2 * D, Tk, 0.2 * D * D));
  }
  {
    SCOPED_TRACE("decoder step with an additive score");
    const int64_t A = 8;
    const Tensor q = random_tensor({B, Hq, 1, D}, DType::f32, 16);
    AttentionParams additive;
    additive.score = AdditiveScore{.w_query = random_tensor({A, D}, DType::f32, 17),
                                   .w_key = random_tensor({A, D}, DType::f32, 18),
                                   .v = random_tensor({A}, DType::f32, 19)};
    expect_forward_matches_reference(q, k.view, v.view, additive,
                                     float32_tolerance(2 * D + A, Tk, 2.0 * A * D));
  }
  {
    SCOPED_TRACE("float64 query");
    const Tensor q = random_tensor({B, Hq, 3, D}, DType::f64, 20);
    expect_forward_matches_reference(q, k.view, v.view, causal, tolerance_for(DType::f64, D + Tk));
  }
}

// All-bf16 decoder steps take the decode kernel too (no P rounding): float32-level accuracy.
TEST(MixedPrecision, Bf16QueryDecodeStepIsFloat32Accurate) {
  const int64_t B = 1, Hq = 8, Hkv = 2, Tk = 900, D = 64;
  const Tensor q = random_tensor({B, Hq, 1, D}, DType::f32, 30).to(DType::bf16);
  const Cache k = bf16_cache(B, Hkv, Tk, D, 31), v = bf16_cache(B, Hkv, Tk, D, 32);
  expect_forward_matches_reference(q, k.view, v.view, {},
                                   float32_tolerance(D, Tk, static_cast<double>(D) / 8.0));
}

TEST(MixedPrecision, OtherDtypeMixesAreRejected) {
  const Tensor q32 = random_tensor({1, 1, 4, 8}, DType::f32, 1);
  const Tensor qbf = q32.to(DType::bf16);
  expect_error([&] { attention(qbf, q32, q32); }, {"[attention]", "dtypes differ"});
  expect_error([&] { attention(q32, qbf, q32); },
                        {"[attention]", "dtypes differ", "float32, bf16, float32"});
  expect_error([&] { attention(q32, q32.to(DType::f64), q32.to(DType::f64)); },
                        {"[attention]", "dtypes differ"});
}

// ---------------------------------------------------------------------------------------------
// KV cache in bf16.

// Decodes `steps` tokens one by one into a float32 and a bf16 cache (growing from capacity 2)
// with grouped heads. The bf16 cache holds exactly the float32 cache's rows rounded to bf16;
// each step matches the float64 reference over the bf16 keys; and each step's attention equals
// the full causal attention of all the steps' queries over the same (final) bf16 keys.
TEST(KVCacheBf16, DecodingMatchesReferenceAndFullAttention) {
  const MultiHeadConfig config{.d_model = 32, .num_heads = 8, .num_kv_heads = 2, .head_dim = 16};
  const MultiHeadWeights w = MultiHeadWeights::init(config, DType::f32, 7);
  const int64_t B = 2, steps = 9, Dk = 16;
  KVCache c32 = KVCache::create(config, {.batch = B, .capacity = 2, .dtype = DType::f32});
  KVCache c16 = KVCache::create(config, {.batch = B, .capacity = 2, .dtype = DType::bf16});
  const Tensor x = random_tensor({B, steps, config.d_model}, DType::f32, 8, -2.0, 2.0);
  AttentionParams params;
  params.mask.causal = true;
  std::vector<MultiHeadOutput> outs;
  for (int64_t t = 0; t < steps; ++t) {
    const Tensor xt = x.slice(1, t, t + 1).contiguous();
    multihead_attention_step(config, w, c32, xt, xt, xt, params);
    outs.push_back(multihead_attention_step(config, w, c16, xt, xt, xt, params));
    const MultiHeadOutput& o = outs.back();
    ASSERT_EQ(c16.k.dtype(), DType::bf16);
    ASSERT_EQ(o.k.dtype(), DType::bf16);
    EXPECT_EQ(o.attention.out.dtype(), DType::f32);
    EXPECT_EQ(o.output.dtype(), DType::f32);
    // The cache is the float32 projections rounded once.
    EXPECT_EQ(c16.keys().to_vector(), c32.keys().to(DType::bf16).to_vector());
    EXPECT_EQ(c16.values().to_vector(), c32.values().to(DType::bf16).to_vector());
    AttentionParams step = params;
    step.mask.alignment = Alignment::bottom_right;
    const AttentionOutput want = reference::attention(o.q, c16.keys(), c16.values(), step);
    // |q|, |k| per feature are O(1) here (inputs in [-2, 2), Xavier weights): scores <= ~D.
    const Tolerance tol = float32_tolerance(Dk, t + 1, static_cast<double>(Dk));
    EXPECT_TRUE(all_close(o.attention.out, want.out, tol, "step out"));
    EXPECT_TRUE(all_close(o.attention.lse, want.lse, tol, "step lse"));
  }
  // Full attention: the queries of every step [B, Hq, steps, Dk] over the final bf16 cache.
  Tensor q_all = Tensor::empty({B, config.num_heads, steps, Dk});
  for (int64_t t = 0; t < steps; ++t) q_all.slice(2, t, t + 1).copy_from(outs[static_cast<size_t>(t)].q);
  const AttentionOutput full = attention(q_all, c16.keys(), c16.values(), params);
  const Tolerance tol = float32_tolerance(Dk, steps, static_cast<double>(Dk));
  const Tolerance twice{2.0 * tol.atol, 2.0 * tol.rtol};
  for (int64_t t = 0; t < steps; ++t)
    EXPECT_TRUE(all_close(outs[static_cast<size_t>(t)].attention.out, full.out.slice(2, t, t + 1),
                          twice, "step vs full"))
        << "step " << t;
}

TEST(KVCacheBf16, AppendRoundsAndDtypeErrors) {
  const MultiHeadConfig config{.d_model = 8, .num_heads = 2};
  KVCache cache = KVCache::create(config, {.batch = 1, .capacity = 1, .dtype = DType::bf16});
  const Tensor k = random_tensor({1, 2, 3, 4}, DType::f32, 1), v = random_tensor({1, 2, 3, 4}, DType::f32, 2);
  cache.append(k, v);
  EXPECT_EQ(cache.keys().to_vector(), k.to(DType::bf16).to_vector());
  EXPECT_EQ(cache.values().to_vector(), v.to(DType::bf16).to_vector());
  // The first append of bf16 rows fixes a bf16 cache.
  KVCache lazy;
  lazy.append(k.to(DType::bf16), v.to(DType::bf16));
  EXPECT_EQ(lazy.k.dtype(), DType::bf16);
  expect_error(
      [&] { KVCache::create(config, {.batch = 1, .capacity = 1, .dtype = DType::b8}); },
      {"[KVCache::create]", "float32, float64 or bf16", "bool"});
  // A float64 cache against a float32 query: neither the query's dtype nor bf16.
  const MultiHeadWeights w = MultiHeadWeights::init(config, DType::f32, 3);
  KVCache c64 = KVCache::create(config, {.batch = 1, .capacity = 1, .dtype = DType::f64});
  const Tensor x = random_tensor({1, 1, 8}, DType::f32, 4);
  expect_error([&] { multihead_attention_step(config, w, c64, x, x, x); },
                        {"[multihead_attention_step]", "cache dtype float64", "float32", "bf16"});
}

}  // namespace
}  // namespace attn
