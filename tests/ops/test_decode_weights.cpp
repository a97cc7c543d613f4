// Weights on request from the decode kernel (src/kernels/decode/decode_attention.*): with
// DecodeAttentionArgs::weights set, a pass after the split-KV merge writes the softmax
// probabilities [B, Hq, Tq, Tk], so a decoder step that wants its alignment (Tq = 1, heatmaps)
// stays on the decode kernel instead of falling back to the composed path. Checked against the
// float64 oracle attn::reference::attention on every Highway target: Tq in {1, 3, 16}, Tk in
// {1, 8, 127, 128, 129, 1000} (and 4099, split over the keys), odd head dims, grouped-query
// heads, key lengths including 0 and 1, query lengths, causal in both alignments, windows, and
// float32 and bf16 caches (bf16 against the reference on the bf16-rounded K and V), and many
// (batch, kv head) pairs over short caches (the one-split path, B up to 64). Masked
// weights and fully masked rows must be exactly 0, every element must be written, and the
// weights pass must leave out and lse bitwise unchanged. The Tensor-level glue also returns
// mean_weights, and attention() with return_weights at Tq = 1 dispatches to it. With ALiBi and
// additive biases (broadcast shapes, -inf entries) the weights include them, as in the
// reference.
//
// Tolerance (as in test_decode_attention.cpp): a score carries an absolute error
// ~ u (sqrt(D) + |s|); a probability p_j moves by p_j (ds_j - sum p ds) <= 2 p_j max|ds|, and
// the sums over Tk keys and D features add ~ u sqrt(D + Tk): the error of a plain float32
// implementation. A bf16 cache is allowed twice that on the same rounded inputs. With ALiBi the
// |s| counts only keys that carry weight (alibi_score_bound, tests/support/decode_kernel_checks.h).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "attention_validate.h"
#include "attn/attention.h"
#include "attn/reference.h"
#include "kernels/decode/decode_attention.h"
#include "kernels/common/fused_args.h"
#include "support/bitwise_equal.h"
#include "support/decode_kernel_checks.h"
#include "support/fused_checks.h"
#include "support/simd_targets.h"
#include "support/test_support.h"

// GCC 12 warns about members left to their default initialisers in designated initialisers
// (GCC bug 96868); every member of Case below has a default.
#pragma GCC diagnostic ignored "-Wmissing-field-initializers"

namespace {

using attn::DType;
using attn::Tensor;
using attn::kernels::DecodeAttentionArgs;
using attn::kernels::KvType;

constexpr int64_t kUnbounded = attn::Window::unbounded;

struct Case {
  int64_t B = 1, Hq = 4, Hkv = 2, Tq = 1, Tk = 0, D = 64, Dv = 0;  // Dv 0: = D
  std::vector<int64_t> key_lengths, query_lengths;
  bool causal = false, bottom_right = true;
  int64_t left = kUnbounded, right = kUnbounded;
  KvType kv = KvType::f32;
  uint64_t seed = 1;
  attn::Shape bias_shape;  // empty: no bias; else uniform in [-1, 1), right-aligned broadcast
  bool alibi = false;      // the standard slopes attn::alibi_slopes(Hq)

  int64_t dv() const { return Dv == 0 ? D : Dv; }
  double scale() const { return 1.0 / std::sqrt(static_cast<double>(D)); }
  std::string str() const {
    std::string s = "B=" + std::to_string(B) + " Hq=" + std::to_string(Hq) +
                    " Hkv=" + std::to_string(Hkv) + " Tq=" + std::to_string(Tq) +
                    " Tk=" + std::to_string(Tk) + " D=" + std::to_string(D) +
                    " Dv=" + std::to_string(dv());
    s += kv == KvType::bf16 ? " bf16" : " f32";
    if (!bias_shape.empty()) s += " bias" + attn::shape_str(bias_shape);
    if (alibi) s += " alibi";
    return s + attn::testing::interval_masks_str(*this);
  }
};

// The inputs: dense float32 q, and K and V both as the kernel stores them (bf16 bit patterns
// for a bf16 cache) and as the reference sees them (the same values widened back to float32).
struct Inputs {
  Tensor q, k, v;
  std::vector<uint16_t> k_bf16, v_bf16;
  Tensor bias;                 // float32 of c.bias_shape, or undefined
  std::vector<double> slopes;  // ALiBi slopes, or empty
};

Tensor stored_values(const Case& c, const Tensor& dense, std::vector<uint16_t>& bits) {
  if (c.kv == KvType::f32) return dense;
  bits.resize(static_cast<size_t>(dense.numel()));
  attn::kernels::float_to_bf16(dense.data<float>(), bits.data(), bits.size());
  Tensor rounded = dense.clone();
  float* p = rounded.data<float>();
  for (size_t e = 0; e < bits.size(); ++e) p[e] = attn::kernels::bf16_to_float(bits[e]);
  return rounded;
}

Inputs make_inputs(const Case& c) {
  Inputs in;
  in.q = attn::testing::random_tensor({c.B, c.Hq, c.Tq, c.D}, DType::f32, c.seed);
  in.k = stored_values(
      c, attn::testing::random_tensor({c.B, c.Hkv, c.Tk, c.D}, DType::f32, c.seed + 1),
      in.k_bf16);
  in.v = stored_values(
      c, attn::testing::random_tensor({c.B, c.Hkv, c.Tk, c.dv()}, DType::f32, c.seed + 2),
      in.v_bf16);
  if (!c.bias_shape.empty())
    in.bias = attn::testing::random_tensor(c.bias_shape, DType::f32, c.seed + 3);
  if (c.alibi) in.slopes = attn::alibi_slopes(c.Hq);
  return in;
}

struct Result {
  Tensor out, lse, weights;
};

// The raw kernel on contiguous caches; weights only when asked. Every output starts poisoned,
// so an element the kernel forgets to write fails the comparison.
Result run_kernel(const Case& c, const Inputs& in, bool with_weights) {
  Result r;
  constexpr double kPoison = 12345.0;
  r.out = Tensor::full({c.B, c.Hq, c.Tq, c.dv()}, kPoison, DType::f32);
  r.lse = Tensor::full({c.B, c.Hq, c.Tq}, kPoison, DType::f32);
  DecodeAttentionArgs a;
  a.q = in.q.data<float>();
  const bool bf16 = c.kv == KvType::bf16;
  a.k = {bf16 ? static_cast<const void*>(in.k_bf16.data()) : in.k.data<float>(),
         c.Hkv * c.Tk * c.D, c.Tk * c.D, c.D};
  a.v = {bf16 ? static_cast<const void*>(in.v_bf16.data()) : in.v.data<float>(),
         c.Hkv * c.Tk * c.dv(), c.Tk * c.dv(), c.dv()};
  a.kv_type = c.kv;
  a.out = r.out.data<float>();
  a.lse = r.lse.data<float>();
  if (with_weights) {
    r.weights = Tensor::full({c.B, c.Hq, c.Tq, c.Tk}, kPoison, DType::f32);
    a.weights = r.weights.data<float>();
  }
  attn::testing::set_kernel_problem(c, a);
  a.scale = static_cast<float>(c.scale());
  if (in.bias.defined()) {
    const attn::detail::AttentionDims dims{.B = c.B, .Hq = c.Hq, .Hkv = c.Hkv, .Tq = c.Tq,
                                           .Tk = c.Tk, .Dq = c.D, .Dk = c.D, .Dv = c.dv()};
    a.bias = attn::kernels::broadcast_bias(in.bias, dims);
  }
  const std::vector<float> slopes(in.slopes.begin(), in.slopes.end());
  if (!slopes.empty()) a.alibi_slopes = slopes.data();
  attn::kernels::decode_attention_forward(a);
  return r;
}

attn::AttentionParams params_of(const Case& c) {
  attn::AttentionParams p;
  p.score = attn::ScaledDotScore{c.scale()};
  attn::testing::set_interval_masks(c, p.mask);
  p.return_weights = true;
  return p;
}

// params_of plus the inputs' bias and ALiBi slopes.
attn::AttentionParams params_of(const Case& c, const Inputs& in) {
  attn::AttentionParams p = params_of(c);
  p.mask.bias = in.bias;
  p.mask.alibi_slopes = in.slopes;
  return p;
}

attn::testing::Tolerance tolerance(const Case& c) { return attn::testing::decode_tolerance(c); }

using attn::testing::bitwise_equal;
using attn::testing::masked_weights_zero;

class DecodeWeightsTest
    : public attn::testing::EveryTargetTest<attn::kernels::decode_attention_target_name> {
 protected:
  // One case with a float32 and a bf16 cache on the forced target, against the oracle.
  void check(Case c) {
    for (KvType kv : {KvType::f32, KvType::bf16}) {
      c.kv = kv;
      SCOPED_TRACE(target_label() + ": " + c.str());
      const Inputs in = make_inputs(c);
      const Result got = run_kernel(c, in, /*with_weights=*/true);
      const attn::AttentionOutput want =
          attn::reference::attention(in.q, in.k, in.v, params_of(c, in));
      const auto tol = tolerance(c);
      EXPECT_TRUE(attn::testing::all_close(got.weights, want.weights, tol, "weights"));
      EXPECT_TRUE(masked_weights_zero(got.weights, want.weights));
      EXPECT_TRUE(attn::testing::all_close(got.out, want.out, tol, "out"));
      // The weights pass only reads the merged statistics: out and lse are those of a forward
      // without weights, bit for bit.
      const Result plain = run_kernel(c, in, /*with_weights=*/false);
      EXPECT_TRUE(bitwise_equal(got.out, plain.out, "out"));
      EXPECT_TRUE(bitwise_equal(got.lse, plain.lse, "lse"));
    }
  }
};

TEST_P(DecodeWeightsTest, SizeSweep) {
  const std::pair<int64_t, int64_t> heads[] = {{8, 2}, {4, 4}, {8, 1}};
  const int64_t dims[] = {3, 59, 64};
  int n = 0;
  for (int64_t tq : {1, 3, 16})
    for (int64_t tk : {1, 8, 127, 128, 129, 1000}) {
      const auto [hq, hkv] = heads[n % 3];
      const int64_t d = dims[n % 3];
      ++n;
      check({.Hq = hq, .Hkv = hkv, .Tq = tq, .Tk = tk, .D = d, .seed = static_cast<uint64_t>(n)});
    }
  // Odd value width, and a cache long enough to be split over the keys (merge across splits).
  check({.Hq = 4, .Hkv = 2, .Tq = 3, .Tk = 129, .D = 59, .Dv = 31});
  ASSERT_GT(attn::kernels::decode_attention_split(1, 1, 4099).count, 1);
  check({.Hq = 2, .Hkv = 1, .Tq = 1, .Tk = 4099, .D = 16, .causal = true});
}

TEST_P(DecodeWeightsTest, LengthsCausalWindows) {
  for (bool causal : {false, true})
    for (bool bottom_right : {false, true}) {
      // Key lengths 0 and 1: a batch row with no key at all (weights all 0) and with one.
      check({.B = 4, .Hq = 4, .Hkv = 2, .Tq = 3, .Tk = 129, .D = 59,
             .key_lengths = {129, 1, 0, 70}, .causal = causal, .bottom_right = bottom_right});
      check({.B = 3, .Hq = 4, .Hkv = 1, .Tq = 16, .Tk = 1000, .D = 32,
             .key_lengths = {1000, 300, 5}, .query_lengths = {16, 3, 0}, .causal = causal,
             .bottom_right = bottom_right, .left = 200});
      check({.Hq = 2, .Hkv = 2, .Tq = 1, .Tk = 128, .D = 16, .causal = causal,
             .bottom_right = bottom_right, .left = 40, .right = 3});
    }
  // Bottom-right with Tq > key length: the first rows see no key at all.
  check({.B = 2, .Hq = 4, .Hkv = 2, .Tq = 16, .Tk = 127, .D = 64, .key_lengths = {127, 7},
         .causal = true});
}

// Many (batch, kv head) pairs over short caches (the one-split path, items finishing their own
// rows): a seq2seq decoder step drawing its alignment, Tk around the 64-key blocks, key
// lengths 0 and 1, grouped heads with several queries (row groups of 4, 2 and 1).
TEST_P(DecodeWeightsTest, ManyRowsShortCaches) {
  int n = 0;
  for (int64_t tk : {1, 8, 49, 50, 127, 128, 129}) {
    ++n;
    const int64_t B = 12;
    std::vector<int64_t> lengths(static_cast<size_t>(B));
    for (int64_t b = 0; b < B; ++b) {
      const int64_t pick[] = {tk, 0, 1, tk / 2};
      lengths[static_cast<size_t>(b)] = pick[b % 4];
    }
    ASSERT_EQ(attn::kernels::decode_attention_split(B, 2, tk).count, 1);
    check({.B = B, .Hq = 6, .Hkv = 2, .Tq = n % 2 == 0 ? 2 : 1, .Tk = tk, .D = 32,
           .key_lengths = lengths, .causal = n % 3 == 0, .seed = static_cast<uint64_t>(n)});
  }
  check({.B = 64, .Hq = 1, .Hkv = 1, .Tq = 1, .Tk = 50, .D = 256, .causal = true});
}

// Weights with ALiBi and additive biases: the probabilities include both (stored raw scores
// carry them), broadcast bias shapes, both alignments, key lengths with fully masked rows,
// one-split and split caches.
TEST_P(DecodeWeightsTest, AlibiAndBias) {
  uint64_t n = 0;
  for (int64_t tq : {1, 3, 16})
    for (int64_t tk : {1, 50, 129})
      for (bool bottom_right : {false, true})
        check({.B = 2, .Hq = 8, .Hkv = 2, .Tq = tq, .Tk = tk, .D = 32,
               .key_lengths = {tk, tk / 3}, .causal = true, .bottom_right = bottom_right,
               .seed = ++n, .alibi = true});
  for (int64_t tk : {50, 1100}) {
    const attn::Shape shapes[] = {{tk}, {2, 1, 1, tk}, {2, 8, 3, tk}, {8, 1, 1}};
    for (const attn::Shape& shape : shapes)
      check({.B = 2, .Hq = 8, .Hkv = 8, .Tq = 3, .Tk = tk, .D = 64, .key_lengths = {tk, tk / 2},
             .seed = ++n, .bias_shape = shape, .alibi = tk == 50});
  }
  ASSERT_GT(attn::kernels::decode_attention_split(1, 2, 4099).count, 1);
  check({.Hq = 8, .Hkv = 2, .Tq = 1, .Tk = 4099, .D = 16, .causal = true,
         .bias_shape = {4099}, .alibi = true});
}

// A -inf bias on every key of a row: its weights are all exactly 0 (and out 0, lse -inf); a
// -inf bias on single keys gives exactly 0 weights there.
TEST_P(DecodeWeightsTest, BiasMasksKeysAndRows) {
  const float inf = std::numeric_limits<float>::infinity();
  for (KvType kv : {KvType::f32, KvType::bf16}) {
    const Case c{.B = 1, .Hq = 4, .Hkv = 2, .Tq = 2, .Tk = 129, .D = 32, .kv = kv,
                 .bias_shape = {1, 4, 2, 129}};
    SCOPED_TRACE(target_label() + ": " + c.str());
    Inputs in = make_inputs(c);
    float* bias = in.bias.data<float>();
    std::fill_n(bias + 2 * c.Tk, c.Tk, -inf);                            // head 1, query 0
    for (int64_t j = 0; j < c.Tk; j += 3) bias[5 * c.Tk + j] = -inf;  // head 2, query 1
    const Result got = run_kernel(c, in, /*with_weights=*/true);
    const attn::AttentionOutput want =
        attn::reference::attention(in.q, in.k, in.v, params_of(c, in));
    EXPECT_TRUE(attn::testing::all_close(got.weights, want.weights, tolerance(c), "weights"));
    EXPECT_TRUE(attn::testing::all_close(got.out, want.out, tolerance(c), "out"));
    EXPECT_TRUE(masked_weights_zero(got.weights, want.weights));
    const float* w = got.weights.data<float>();
    for (int64_t j = 0; j < c.Tk; ++j) ASSERT_EQ(w[2 * c.Tk + j], 0.0f) << j;
    for (int64_t j = 0; j < c.Tk; j += 3) ASSERT_EQ(w[5 * c.Tk + j], 0.0f) << j;
    EXPECT_TRUE(std::isinf(got.lse.data<float>()[2]));
    for (int64_t e = 0; e < c.dv(); ++e) ASSERT_EQ(got.out.data<float>()[2 * c.dv() + e], 0.0f);
  }
}

ATTN_INSTANTIATE_ON_EVERY_SIMD_TARGET(DecodeWeightsTest);

// ---------------------------------------------------------------------------------------------

// The Tensor-level glue returns weights and mean_weights as the reference does.
TEST(DecodeWeightsGlue, WeightsAndMeanMatchReference) {
  const int64_t B = 3, Hq = 8, Hkv = 2, Tq = 3, Tk = 129, D = 59;
  const Tensor q = attn::testing::random_tensor({B, Hq, Tq, D}, DType::f32, 17);
  const Tensor k = attn::testing::random_tensor({B, Hkv, Tk, D}, DType::f32, 18);
  const Tensor v = attn::testing::random_tensor({B, Hkv, Tk, D}, DType::f32, 19);
  const Case c{.B = B, .Hq = Hq, .Hkv = Hkv, .Tq = Tq, .Tk = Tk, .D = D,
               .key_lengths = {129, 1, 0}, .causal = true};
  const attn::AttentionParams params = params_of(c);
  const attn::detail::AttentionDims dims =
      attn::detail::validate_attention("attention", q, k, v, params);
  ASSERT_TRUE(attn::kernels::decode_attention_supported(DType::f32, dims, params));
  const attn::AttentionOutput got = attn::kernels::decode_attention(dims, q, k, v, params);
  const attn::AttentionOutput want = attn::reference::attention(q, k, v, params);
  ASSERT_TRUE(got.weights.defined() && got.mean_weights.defined());
  EXPECT_EQ(got.weights.shape(), (attn::Shape{B, Hq, Tq, Tk}));
  EXPECT_EQ(got.mean_weights.shape(), (attn::Shape{B, Tq, Tk}));
  const auto tol = tolerance(c);
  EXPECT_TRUE(attn::testing::all_close(got.weights, want.weights, tol, "weights"));
  EXPECT_TRUE(attn::testing::all_close(got.mean_weights, want.mean_weights, tol, "mean"));
  EXPECT_TRUE(masked_weights_zero(got.weights, want.weights));
  EXPECT_TRUE(masked_weights_zero(got.mean_weights, want.mean_weights));
}

// A decoder step asking for its alignment (Tq = 1, return_weights) takes the decode kernel:
// attention() returns bitwise what the decode glue computes.
TEST(DecodeWeightsGlue, AttentionDispatchesDecoderStepWithWeights) {
  const int64_t B = 8, Hq = 1, Hkv = 1, Tq = 1, Tk = 50, D = 32;
  const Tensor q = attn::testing::random_tensor({B, Hq, Tq, D}, DType::f32, 27);
  const Tensor k = attn::testing::random_tensor({B, Hkv, Tk, D}, DType::f32, 28);
  const Tensor v = attn::testing::random_tensor({B, Hkv, Tk, D}, DType::f32, 29);
  attn::AttentionParams params;
  params.score = attn::DotScore{};
  params.mask.key_lengths = {50, 49, 8, 1, 0, 50, 30, 12};
  params.return_weights = true;
  const attn::detail::AttentionDims dims =
      attn::detail::validate_attention("attention", q, k, v, params);
  ASSERT_TRUE(attn::kernels::decode_attention_supported(DType::f32, dims, params));
  const attn::AttentionOutput front = attn::attention(q, k, v, params);
  const attn::AttentionOutput direct = attn::kernels::decode_attention(dims, q, k, v, params);
  EXPECT_TRUE(bitwise_equal(front.out, direct.out, "out"));
  EXPECT_TRUE(bitwise_equal(front.lse, direct.lse, "lse"));
  EXPECT_TRUE(bitwise_equal(front.weights, direct.weights, "weights"));
  EXPECT_TRUE(bitwise_equal(front.mean_weights, direct.mean_weights, "mean_weights"));
}

}  // namespace
