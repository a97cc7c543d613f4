// Transformer encoder and decoder layers (nn/transformer.h).
//
// - Forward against an independent float64 composition: attn::reference::multihead_attention (or,
//   with RoPE, plain-loop projections and rotations around attn::reference::attention), plain-loop
//   LayerNorm and feed-forward, residuals; for float32 and float64 layers.
// - Every gradient (input, memory, each named parameter) by central finite differences in
//   float64, for pre- and post-norm, RoPE, grouped-query heads, padding and active dropout.
// - Pre- vs post-norm behaviour, padding masks (padded positions do not change valid outputs),
//   incremental decoding with the KV cache == the full causal forward row by row (also in chunks
//   and after reordering the batch), and the validation messages.
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <limits>
#include <numbers>
#include <string>
#include <vector>

#include "attn/multihead.h"
#include "attn/reference.h"
#include "nn/transformer.h"
#include "support/test_support.h"

namespace attn::nn {
namespace {

using attn::testing::expect_error;

using attn::testing::all_close;
using attn::testing::check_gradient;
using attn::testing::random_tensor;
using attn::testing::Tolerance;
using attn::testing::tolerance_for;
using attn::testing::weighted_sum;


// Small sizes: finite differences run the whole layer twice per checked element.
TransformerConfig small_config(NormPlacement norm, DType dtype = DType::f64) {
  TransformerConfig c;
  c.d_model = 8;
  c.num_heads = 2;
  c.ffn_dim = 12;
  c.activation = Activation::gelu;  // smooth: no kink for finite differences to straddle
  c.norm = norm;
  c.dtype = dtype;
  return c;
}

// Replaces every parameter by U(-0.5, 0.5) (LayerNorm gains around 1), so that biases and
// LayerNorm affine terms, which start at 0 and 1, take part in every check.
void randomize(const ParameterList& list, uint64_t seed) {
  for (std::size_t i = 0; i < list.size(); ++i) {
    const Parameter& p = list[i];
    const bool gain = p.name.find("norm") != std::string::npos &&
                      p.name.find("weight") != std::string::npos;
    Tensor(p.value).copy_from(random_tensor(p.value.shape(), DType::f64, seed + 17 * i,
                                            gain ? 0.5 : -0.5, gain ? 1.5 : 0.5));
  }
}

// ---------------------------------------------------------------------------------------------
// The float64 oracle, written without the layer's code.

using Rows = std::vector<double>;  // row-major [N, width]

Rows layer_norm_rows(const Rows& x, int64_t width, const LayerNorm& ln) {
  const Rows g = ln.params.gamma.to_vector(), b = ln.params.beta.to_vector();
  Rows y(x.size());
  for (std::size_t r = 0; r < x.size() / width; ++r) {
    double mean = 0.0, var = 0.0;
    for (int64_t j = 0; j < width; ++j) mean += x[r * width + j];
    mean /= double(width);
    for (int64_t j = 0; j < width; ++j) var += std::pow(x[r * width + j] - mean, 2);
    var /= double(width);
    for (int64_t j = 0; j < width; ++j)
      y[r * width + j] = (x[r * width + j] - mean) / std::sqrt(var + ln.eps) * g[j] + b[j];
  }
  return y;
}

// y = x W^T + b for W [out, in].
Rows linear_rows(const Rows& x, const Tensor& weight, const Tensor& bias) {
  const int64_t out = weight.size(0), in = weight.size(1);
  const Rows w = weight.to_vector();
  const Rows b = bias.defined() ? bias.to_vector() : Rows(out, 0.0);
  const std::size_t n = x.size() / in;
  Rows y(n * out);
  for (std::size_t r = 0; r < n; ++r)
    for (int64_t o = 0; o < out; ++o) {
      double s = b[o];
      for (int64_t i = 0; i < in; ++i) s += x[r * in + i] * w[o * in + i];
      y[r * out + o] = s;
    }
  return y;
}

Rows feed_forward_rows(const Rows& x, const FeedForward& f) {
  Rows h = linear_rows(x, f.in.params.weight, f.in.params.bias);
  for (double& v : h) {
    if (f.activation == Activation::relu) v = v > 0.0 ? v : 0.0;
    else if (f.activation == Activation::gelu) v = 0.5 * v * (1.0 + std::erf(v / std::sqrt(2.0)));
    else v = 0.5 * v * (1.0 + std::tanh(std::sqrt(2.0 / std::numbers::pi) * (v + 0.044715 * v * v * v)));
  }
  return linear_rows(h, f.out.params.weight, f.out.params.bias);
}

Rows add_rows(const Rows& a, const Rows& b) {
  Rows y(a.size());
  for (std::size_t i = 0; i < a.size(); ++i) y[i] = a[i] + b[i];
  return y;
}

// [B, T, H * D] rows -> [B, H, T, D] tensor, rotating each (b, h, t) vector by position t.
Tensor heads_of(const Rows& y, int64_t B, int64_t Tn, int64_t H, int64_t D,
                const RopeConfig* rope) {
  Tensor t = Tensor::zeros({B, H, Tn, D}, DType::f64);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t s = 0; s < Tn; ++s) {
        const double* row = &y[((b * Tn + s) * H + h) * D];
        for (int64_t d = 0; d < D; ++d) t.set({b, h, s, d}, row[d]);
        if (!rope) continue;
        for (int64_t i = 0; i < D / 2; ++i) {
          const bool inter = rope->layout == RopeLayout::interleaved;
          const int64_t ia = inter ? 2 * i : i, ib = inter ? 2 * i + 1 : i + D / 2;
          const double angle = double(s) * std::pow(rope->base, -2.0 * double(i) / double(D));
          t.set({b, h, s, ia}, row[ia] * std::cos(angle) - row[ib] * std::sin(angle));
          t.set({b, h, s, ib}, row[ia] * std::sin(angle) + row[ib] * std::cos(angle));
        }
      }
  return t;
}

// Multi-head attention of query rows [B, T, C] over key/value rows [B, S, M].
Rows attention_rows(const AttentionSublayer& s, const Rows& q_in, const Rows& kv_in, int64_t B,
                    int64_t Tq, int64_t Tk, const AttentionParams& params,
                    const RopeConfig* rope) {
  const MultiHeadWeights w64{s.weights.w_q.to(DType::f64), s.weights.b_q.to(DType::f64),
                             s.weights.w_k.to(DType::f64), s.weights.b_k.to(DType::f64),
                             s.weights.w_v.to(DType::f64), s.weights.b_v.to(DType::f64),
                             s.weights.w_o.to(DType::f64), s.weights.b_o.to(DType::f64)};
  const int64_t C = s.weights.w_q.size(1), M = s.weights.w_k.size(1);
  if (!rope) {
    const Tensor q = Tensor::from(q_in, {B, Tq, C}), kv = Tensor::from(kv_in, {B, Tk, M});
    return reference::multihead_attention(s.config, w64, q, kv, kv, params).output.to_vector();
  }
  const int64_t Hq = s.config.num_heads;
  const int64_t Hkv = s.config.num_kv_heads ? s.config.num_kv_heads : Hq, D = C / Hq;
  const Tensor q = heads_of(linear_rows(q_in, w64.w_q, w64.b_q), B, Tq, Hq, D, rope);
  const Tensor k = heads_of(linear_rows(kv_in, w64.w_k, w64.b_k), B, Tk, Hkv, D, rope);
  const Tensor v = heads_of(linear_rows(kv_in, w64.w_v, w64.b_v), B, Tk, Hkv, D, nullptr);
  const Tensor a = reference::attention(q, k, v, params).out;
  Rows merged(B * Tq * Hq * D);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < Hq; ++h)
      for (int64_t t = 0; t < Tq; ++t)
        for (int64_t d = 0; d < D; ++d)
          merged[((b * Tq + t) * Hq + h) * D + d] = a.get({b, h, t, d});
  return linear_rows(merged, w64.w_o, w64.b_o);
}

// One residual block: pre  y = x + f(LN(x)),  post  y = LN(x + f(x)).
template <class F>
Rows residual_rows(NormPlacement norm, const LayerNorm& ln, const Rows& x, int64_t C, F&& f) {
  if (norm == NormPlacement::pre) return add_rows(x, f(layer_norm_rows(x, C, ln)));
  return layer_norm_rows(add_rows(x, f(x)), C, ln);
}

Tensor oracle_encoder(const EncoderLayer& layer, const Tensor& x,
                      const std::vector<int64_t>& lengths) {
  const TransformerConfig& c = layer.config;
  const int64_t B = x.size(0), T = x.size(1), C = c.d_model;
  AttentionParams params;
  params.mask.key_lengths = lengths;
  const RopeConfig* rope = c.rope ? &*c.rope : nullptr;
  Rows h = residual_rows(c.norm, layer.norm1, x.to_vector(), C, [&](const Rows& u) {
    return attention_rows(layer.self_attn, u, u, B, T, T, params, rope);
  });
  h = residual_rows(c.norm, layer.norm2, h, C,
                    [&](const Rows& u) { return feed_forward_rows(u, layer.ffn); });
  return Tensor::from(h, {B, T, C});
}

Tensor oracle_decoder(const DecoderLayer& layer, const Tensor& x, const Tensor& memory,
                      const DecoderOptions& options) {
  const TransformerConfig& c = layer.config;
  const int64_t B = x.size(0), T = x.size(1), S = memory.size(1), C = c.d_model;
  AttentionParams self_params;
  self_params.mask.causal = c.causal;
  self_params.mask.key_lengths = options.lengths;
  AttentionParams cross_params;
  cross_params.mask.key_lengths = options.memory_lengths;
  const RopeConfig* rope = c.rope ? &*c.rope : nullptr;
  const Rows mem = memory.to_vector();
  Rows h = residual_rows(c.norm, layer.norm1, x.to_vector(), C, [&](const Rows& u) {
    return attention_rows(layer.self_attn, u, u, B, T, T, self_params, rope);
  });
  h = residual_rows(c.norm, layer.norm2, h, C, [&](const Rows& u) {
    return attention_rows(layer.cross_attn, u, mem, B, T, S, cross_params, nullptr);
  });
  h = residual_rows(c.norm, layer.norm3, h, C,
                    [&](const Rows& u) { return feed_forward_rows(u, layer.ffn); });
  return Tensor::from(h, {B, T, C});
}

// Tolerance of a layer output against the oracle: the longest reduction is the FFN's F terms
// (or C), and LayerNorm divides by a standard deviation that can be ~0.3, amplifying by ~3.
Tolerance layer_tolerance(const TransformerConfig& c) {
  return tolerance_for(c.dtype, c.ffn_dim + c.d_model, 64.0);
}

// ---------------------------------------------------------------------------------------------
// Forward against the oracle.

struct Variant {
  const char* name;
  NormPlacement norm;
  bool rope;
  int64_t kv_heads;
  Activation activation;
};

const Variant kVariants[] = {
    {"post", NormPlacement::post, false, 0, Activation::relu},
    {"pre", NormPlacement::pre, false, 0, Activation::gelu},
    {"post_gqa_rope", NormPlacement::post, true, 1, Activation::gelu_tanh},
    {"pre_rope", NormPlacement::pre, true, 0, Activation::relu},
};

TransformerConfig variant_config(const Variant& v, DType dtype) {
  TransformerConfig c = small_config(v.norm, dtype);
  c.num_kv_heads = v.kv_heads;
  c.activation = v.activation;
  if (v.rope) c.rope = RopeConfig{};
  return c;
}

TEST(TransformerEncoder, ForwardMatchesFloat64Composition) {
  for (const Variant& v : kVariants)
    for (DType dtype : {DType::f32, DType::f64}) {
      SCOPED_TRACE(std::string(v.name) + " " + dtype_name(dtype));
      EncoderLayer layer = EncoderLayer::create(variant_config(v, dtype), 3);
      ParameterList params;
      layer.parameters("", params);
      randomize(params, 5);
      const Tensor x = random_tensor({2, 5, 8}, dtype, 7);
      const std::vector<int64_t> lengths{5, 3};
      const Tensor out = layer.forward(x, {lengths}).out;
      EXPECT_TRUE(all_close(out, oracle_encoder(layer, x, lengths), layer_tolerance(layer.config),
                            "encoder output"));
    }
}

TEST(TransformerDecoder, ForwardMatchesFloat64Composition) {
  for (const Variant& v : kVariants)
    for (DType dtype : {DType::f32, DType::f64}) {
      SCOPED_TRACE(std::string(v.name) + " " + dtype_name(dtype));
      TransformerConfig config = variant_config(v, dtype);
      config.memory_dim = 6;  // cross-attention memory narrower than the decoder
      DecoderLayer layer = DecoderLayer::create(config, 11);
      ParameterList params;
      layer.parameters("", params);
      randomize(params, 13);
      const Tensor x = random_tensor({2, 5, 8}, dtype, 17);
      const Tensor memory = random_tensor({2, 4, 6}, dtype, 19);
      DecoderOptions options;
      options.memory_lengths = {4, 2};
      const Tensor out = layer.forward(x, memory, options).out;
      EXPECT_TRUE(all_close(out, oracle_decoder(layer, x, memory, options),
                            layer_tolerance(layer.config), "decoder output"));
    }
}

TEST(TransformerDecoder, NonCausalAndTargetLengthsMatchComposition) {
  TransformerConfig config = small_config(NormPlacement::post);
  config.causal = false;
  DecoderLayer layer = DecoderLayer::create(config, 23);
  const Tensor x = random_tensor({2, 4, 8}, DType::f64, 29);
  const Tensor memory = random_tensor({2, 3, 8}, DType::f64, 31);
  DecoderOptions options;
  options.lengths = {2, 4};
  EXPECT_TRUE(all_close(layer.forward(x, memory, options).out,
                        oracle_decoder(layer, x, memory, options), layer_tolerance(config),
                        "non-causal decoder"));
}

// ---------------------------------------------------------------------------------------------
// Gradients by central finite differences, float64, every parameter.

struct GradCase {
  const char* name;
  NormPlacement norm;
  bool rope;
  int64_t kv_heads;
  bool dropout;  // training with every dropout site active (fixed seed: a fixed function)
};

const GradCase kGradCases[] = {
    {"post", NormPlacement::post, false, 0, false},
    {"pre", NormPlacement::pre, false, 0, false},
    {"post_rope_gqa", NormPlacement::post, true, 1, false},
    {"pre_rope", NormPlacement::pre, true, 0, false},
    {"pre_dropout", NormPlacement::pre, false, 1, true},
    {"post_rope_dropout", NormPlacement::post, true, 0, true},
};

TransformerConfig grad_config(const GradCase& g) {
  TransformerConfig c = small_config(g.norm);
  c.num_kv_heads = g.kv_heads;
  if (g.rope) {
    c.rope = RopeConfig{};
    c.rope->layout = RopeLayout::half;
  }
  if (g.dropout) {
    c.dropout = 0.2;
    c.attention_dropout = 0.25;
  }
  return c;
}

void check_all_parameters(const ParameterList& params, const std::function<double()>& loss) {
  for (const Parameter& p : params)
    EXPECT_TRUE(check_gradient(loss, p.value, p.grad, p.name, 24));
}

TEST(TransformerEncoder, GradientsMatchFiniteDifferences) {
  for (const GradCase& g : kGradCases) {
    SCOPED_TRACE(g.name);
    EncoderLayer layer = EncoderLayer::create(grad_config(g), 37);
    ParameterList params;
    layer.parameters("", params);
    randomize(params, 41);
    const Tensor x = random_tensor({2, 4, 8}, DType::f64, 43);
    const Tensor w = random_tensor({2, 4, 8}, DType::f64, 47);
    EncoderOptions options{{4, 3}, g.dropout, 1234};
    auto loss = [&] { return weighted_sum(layer.forward(x, options).out, w); };
    layer.zero_grad();
    const Tensor dx = layer.backward(layer.forward(x, options).cache, w);
    EXPECT_TRUE(check_gradient(loss, x, dx, "dx"));
    check_all_parameters(params, loss);
  }
}

TEST(TransformerDecoder, GradientsMatchFiniteDifferences) {
  for (const GradCase& g : kGradCases) {
    SCOPED_TRACE(g.name);
    TransformerConfig config = grad_config(g);
    config.memory_dim = 6;
    DecoderLayer layer = DecoderLayer::create(config, 53);
    ParameterList params;
    layer.parameters("", params);
    randomize(params, 59);
    const Tensor x = random_tensor({2, 4, 8}, DType::f64, 61);
    const Tensor memory = random_tensor({2, 3, 6}, DType::f64, 67);
    const Tensor w = random_tensor({2, 4, 8}, DType::f64, 71);
    DecoderOptions options;
    options.memory_lengths = {3, 2};
    options.training = g.dropout;
    options.seed = 99;
    auto loss = [&] { return weighted_sum(layer.forward(x, memory, options).out, w); };
    layer.zero_grad();
    const DecoderGrads grads = layer.backward(layer.forward(x, memory, options).cache, w);
    EXPECT_TRUE(check_gradient(loss, x, grads.dx, "dx"));
    EXPECT_TRUE(check_gradient(loss, memory, grads.dmemory, "dmemory"));
    check_all_parameters(params, loss);
  }
}

TEST(TransformerLayers, BackwardAccumulatesAndZeroGradClears) {
  EncoderLayer layer = EncoderLayer::create(small_config(NormPlacement::pre), 73);
  const Tensor x = random_tensor({1, 3, 8}, DType::f64, 79);
  const Tensor w = random_tensor({1, 3, 8}, DType::f64, 83);
  ParameterList params;
  layer.parameters("enc.", params);
  const EncoderForward f = layer.forward(x);
  layer.backward(f.cache, w);
  std::vector<Tensor> once;
  for (const Parameter& p : params) once.push_back(p.grad.clone());
  layer.backward(f.cache, w);
  for (std::size_t i = 0; i < params.size(); ++i) {
    const std::vector<double> a = once[i].to_vector();
    std::vector<double> doubled(a.size());
    for (std::size_t j = 0; j < a.size(); ++j) doubled[j] = 2.0 * a[j];
    EXPECT_TRUE(all_close(params[i].grad, Tensor::from(doubled, once[i].shape()),
                          tolerance_for(DType::f64, 8), params[i].name));
  }
  layer.zero_grad();
  for (const Parameter& p : params)
    for (double v : p.grad.to_vector()) ASSERT_EQ(v, 0.0) << p.name;
}

// Empty and single-position sequences, and an empty memory (every cross-attention row fully
// masked: attention output 0, so the sublayer adds only b_o).
TEST(TransformerLayers, EdgeLengths) {
  for (NormPlacement norm : {NormPlacement::pre, NormPlacement::post})
    for (int64_t T : {0, 1, 3})
      for (int64_t S : {0, 1, 4}) {
        SCOPED_TRACE(std::string(norm_placement_name(norm)) + " T=" + std::to_string(T) +
                     " S=" + std::to_string(S));
        TransformerConfig config = small_config(norm);
        config.rope = RopeConfig{};
        EncoderLayer encoder = EncoderLayer::create(config, 191);
        DecoderLayer decoder = DecoderLayer::create(config, 193);
        ParameterList params;
        encoder.parameters("enc.", params);
        decoder.parameters("dec.", params);
        randomize(params, 197);
        const Tensor x = random_tensor({2, T, 8}, DType::f64, 199);
        const Tensor memory = random_tensor({2, S, 8}, DType::f64, 211);
        const Tolerance tol = layer_tolerance(config);
        const EncoderForward ef = encoder.forward(x);
        EXPECT_TRUE(all_close(ef.out, oracle_encoder(encoder, x, {}), tol, "encoder"));
        EXPECT_EQ(encoder.backward(ef.cache, ef.out).shape(), x.shape());
        const DecoderForward df = decoder.forward(x, memory);
        EXPECT_TRUE(all_close(df.out, oracle_decoder(decoder, x, memory, {}), tol, "decoder"));
        const DecoderGrads dg = decoder.backward(df.cache, df.out);
        EXPECT_EQ(dg.dx.shape(), x.shape());
        EXPECT_EQ(dg.dmemory.shape(), memory.shape());
        DecoderState state = decoder.start_decoding(memory);
        EXPECT_TRUE(all_close(decoder.step(state, x).out, df.out, tol, "one step of T rows"));
      }
}

// ---------------------------------------------------------------------------------------------
// Pre- vs post-norm.

TEST(TransformerLayers, PreAndPostNormPlacement) {
  // With the attention and FFN output projections at zero every sublayer adds nothing: a pre-norm
  // layer is then the identity (the residual stream is never normalised), a post-norm layer
  // normalises each row twice (LN(LN(x)) with unit gain and zero shift).
  for (NormPlacement norm : {NormPlacement::pre, NormPlacement::post}) {
    SCOPED_TRACE(norm_placement_name(norm));
    EncoderLayer layer = EncoderLayer::create(small_config(norm), 89);
    for (Tensor* t : {&layer.self_attn.weights.w_o, &layer.self_attn.weights.b_o,
                      &layer.ffn.out.params.weight, &layer.ffn.out.params.bias})
      t->fill(0.0);
    const Tensor x = random_tensor({2, 3, 8}, DType::f64, 97, -3.0, 3.0);
    const Tensor out = layer.forward(x).out;
    if (norm == NormPlacement::pre) {
      EXPECT_TRUE(all_close(out, x, tolerance_for(DType::f64, 1), "pre-norm identity"));
    } else {
      const LayerNorm ln = LayerNorm::create({8, layer.config.norm_eps, true, DType::f64});
      EXPECT_TRUE(all_close(out, ln.forward(ln.forward(x).out).out, tolerance_for(DType::f64, 8),
                            "post-norm LN(LN(x))"));
    }
  }
  // With the same weights the two placements compute different functions.
  EncoderLayer pre = EncoderLayer::create(small_config(NormPlacement::pre), 101);
  EncoderLayer post = EncoderLayer::create(small_config(NormPlacement::post), 101);
  const Tensor x = random_tensor({1, 3, 8}, DType::f64, 103);
  const std::vector<double> a = pre.forward(x).out.to_vector(), b = post.forward(x).out.to_vector();
  double diff = 0.0;
  for (std::size_t i = 0; i < a.size(); ++i) diff = std::max(diff, std::abs(a[i] - b[i]));
  EXPECT_GT(diff, 0.1);
}

// ---------------------------------------------------------------------------------------------
// Padding.

// Each row of a padded batch gives, on its valid positions, what the layer gives for that row
// alone and unpadded; padded inputs (huge or NaN) change nothing there.
TEST(TransformerEncoder, PaddedPositionsDoNotChangeValidOutputs) {
  for (bool rope : {false, true}) {
    SCOPED_TRACE(rope ? "rope" : "no rope");
    TransformerConfig config = small_config(NormPlacement::post, DType::f32);
    if (rope) config.rope = RopeConfig{};
    EncoderLayer layer = EncoderLayer::create(config, 107);
    const std::vector<int64_t> lengths{6, 2, 4};
    Tensor x = random_tensor({3, 6, 8}, DType::f32, 109);
    const Tensor clean = layer.forward(x, {lengths}).out;
    for (int64_t b = 0; b < 3; ++b)
      for (int64_t t = lengths[b]; t < 6; ++t)
        for (int64_t c = 0; c < 8; ++c)
          x.set({b, t, c}, t % 2 ? std::numeric_limits<double>::quiet_NaN() : 1e4);
    const Tensor noisy = layer.forward(x, {lengths}).out;
    for (int64_t b = 0; b < 3; ++b) {
      const int64_t n = lengths[b];
      const Tensor alone = layer.forward(x.slice(0, b, b + 1).slice(1, 0, n).contiguous()).out;
      const Tensor valid_noisy = noisy.slice(0, b, b + 1).slice(1, 0, n).contiguous();
      const Tensor valid_clean = clean.slice(0, b, b + 1).slice(1, 0, n).contiguous();
      const Tolerance tol = tolerance_for(DType::f32, 24);
      EXPECT_TRUE(all_close(valid_noisy, alone, tol, "padded vs alone, row " + std::to_string(b)));
      EXPECT_TRUE(all_close(valid_noisy, valid_clean, tol, "noisy padding, row " + std::to_string(b)));
    }
  }
}

TEST(TransformerDecoder, PaddedMemoryDoesNotChangeOutputs) {
  DecoderLayer layer = DecoderLayer::create(small_config(NormPlacement::pre, DType::f32), 113);
  const Tensor x = random_tensor({2, 3, 8}, DType::f32, 127);
  Tensor memory = random_tensor({2, 5, 8}, DType::f32, 131);
  DecoderOptions options;
  options.memory_lengths = {5, 2};
  options.return_cross_weights = true;
  const DecoderForward clean = layer.forward(x, memory, options);
  for (int64_t s = 2; s < 5; ++s)
    for (int64_t c = 0; c < 8; ++c) memory.set({1, s, c}, s == 3 ? 1e4 : -7.0);
  const DecoderForward noisy = layer.forward(x, memory, options);
  EXPECT_TRUE(all_close(noisy.out, clean.out, tolerance_for(DType::f32, 24), "decoder output"));
  // The averaged cross-attention weights of row 1 put nothing on padded memory and sum to 1.
  ASSERT_EQ(noisy.cross_weights.shape(), (Shape{2, 3, 5}));
  for (int64_t t = 0; t < 3; ++t) {
    double sum = 0.0;
    for (int64_t s = 0; s < 5; ++s) {
      if (s >= 2) {
        EXPECT_EQ(noisy.cross_weights.get({1, t, s}), 0.0);
      }
      sum += noisy.cross_weights.get({1, t, s});
    }
    EXPECT_NEAR(sum, 1.0, 1e-5);
  }
  // Causal self-attention: changing a later target position leaves earlier rows unchanged.
  Tensor x2 = x.clone();
  for (int64_t c = 0; c < 8; ++c) x2.set({0, 2, c}, 5.0);
  const Tensor changed = layer.forward(x2, memory, options).out;
  EXPECT_TRUE(all_close(changed.slice(1, 0, 2).contiguous(), noisy.out.slice(1, 0, 2).contiguous(),
                        tolerance_for(DType::f32, 24), "rows before the changed position"));
}

// ---------------------------------------------------------------------------------------------
// Dropout.

TEST(TransformerLayers, DropoutOnlyWhenTrainingAndReproducible) {
  TransformerConfig config = small_config(NormPlacement::post, DType::f32);
  config.dropout = 0.3;
  config.attention_dropout = 0.3;
  EncoderLayer layer = EncoderLayer::create(config, 137);
  const Tensor x = random_tensor({2, 4, 8}, DType::f32, 139);
  const Tensor eval = layer.forward(x).out;
  TransformerConfig no_dropout = config;
  no_dropout.dropout = no_dropout.attention_dropout = 0.0;
  EncoderLayer plain = EncoderLayer::create(no_dropout, 137);
  EXPECT_TRUE(all_close(eval, plain.forward(x).out, Tolerance{}, "inference ignores dropout"));
  const Tensor a = layer.forward(x, {{}, true, 5}).out;
  const Tensor b = layer.forward(x, {{}, true, 5}).out;
  const Tensor c = layer.forward(x, {{}, true, 6}).out;
  EXPECT_TRUE(all_close(a, b, Tolerance{}, "same seed, same masks"));
  EXPECT_FALSE(all_close(a, c, tolerance_for(DType::f32, 8), "another seed"));
  EXPECT_FALSE(all_close(a, eval, tolerance_for(DType::f32, 8), "training vs inference"));
}

// ---------------------------------------------------------------------------------------------
// Incremental decoding.

struct StepCase {
  const char* name;
  NormPlacement norm;
  bool rope;
  int64_t kv_heads;
};

TEST(TransformerDecoder, StepWithKVCacheMatchesFullForward) {
  const StepCase cases[] = {{"post", NormPlacement::post, false, 0},
                            {"pre_gqa", NormPlacement::pre, false, 1},
                            {"post_rope", NormPlacement::post, true, 0},
                            {"pre_rope_gqa", NormPlacement::pre, true, 1}};
  for (const StepCase& sc : cases)
    for (DType dtype : {DType::f32, DType::f64}) {
      SCOPED_TRACE(std::string(sc.name) + " " + dtype_name(dtype));
      TransformerConfig config = small_config(sc.norm, dtype);
      config.num_kv_heads = sc.kv_heads;
      config.memory_dim = 6;
      if (sc.rope) config.rope = RopeConfig{};
      DecoderLayer layer = DecoderLayer::create(config, 149);
      ParameterList params;
      layer.parameters("", params);
      randomize(params, 151);
      const int64_t T = 6;
      const Tensor x = random_tensor({2, T, 8}, dtype, 157);
      const Tensor memory = random_tensor({2, 5, 6}, dtype, 163);
      DecoderOptions options;
      options.memory_lengths = {5, 3};
      options.return_cross_weights = true;
      const DecoderForward full = layer.forward(x, memory, options);
      const Tolerance tol = layer_tolerance(config);

      // Token by token; capacity 2 so the self cache reallocates along the way.
      DecoderState state = layer.start_decoding(memory, options.memory_lengths, 2);
      for (int64_t t = 0; t < T; ++t) {
        const DecoderStepOutput s = layer.step(state, x.slice(1, t, t + 1), true);
        const std::string at = "position " + std::to_string(t);
        EXPECT_TRUE(all_close(s.out, full.out.slice(1, t, t + 1), tol, at));
        EXPECT_TRUE(all_close(s.cross_weights, full.cross_weights.slice(1, t, t + 1), tol,
                              "cross weights " + at));
      }
      EXPECT_EQ(state.length(), T);

      // In chunks of 3, 1, 2 rows: causal rows within a chunk see only their prefix.
      DecoderState chunked = layer.start_decoding(memory, options.memory_lengths);
      int64_t at = 0;
      for (int64_t n : {3, 1, 2}) {
        const Tensor out = layer.step(chunked, x.slice(1, at, at + n)).out;
        EXPECT_TRUE(all_close(out, full.out.slice(1, at, at + n), tol,
                              "chunk at " + std::to_string(at)));
        at += n;
      }
    }
}

TEST(TransformerDecoder, SelectRowsReordersHypotheses) {
  TransformerConfig config = small_config(NormPlacement::pre);
  config.rope = RopeConfig{};
  DecoderLayer layer = DecoderLayer::create(config, 167);
  const Tensor x = random_tensor({2, 4, 8}, DType::f64, 173);
  const Tensor memory = random_tensor({2, 3, 8}, DType::f64, 179);
  const std::vector<int64_t> memory_lengths{3, 2};
  DecoderState state = layer.start_decoding(memory, memory_lengths);
  layer.step(state, x.slice(1, 0, 2));
  // Beam-style reorder: rows (1, 0, 1), then continue with the matching inputs.
  const std::vector<int64_t> rows{1, 0, 1};
  state.select_rows(rows);
  ASSERT_EQ(state.memory_lengths, (std::vector<int64_t>{2, 3, 2}));
  Tensor x3 = Tensor::empty({3, 4, 8}, DType::f64), memory3 = Tensor::empty({3, 3, 8}, DType::f64);
  for (int64_t r = 0; r < 3; ++r) {
    x3.select(0, r).copy_from(x.select(0, rows[r]));
    memory3.select(0, r).copy_from(memory.select(0, rows[r]));
  }
  DecoderOptions options;
  options.memory_lengths = {2, 3, 2};
  const Tensor full = layer.forward(x3, memory3, options).out;
  const Tensor out = layer.step(state, x3.slice(1, 2, 4)).out;
  EXPECT_TRUE(all_close(out, full.slice(1, 2, 4), layer_tolerance(config), "after reorder"));
}

// ---------------------------------------------------------------------------------------------
// Parameters and errors.

TEST(TransformerLayers, ParameterNames) {
  TransformerConfig config = small_config(NormPlacement::post, DType::f32);
  DecoderLayer decoder = DecoderLayer::create(config, 1);
  ParameterList list;
  decoder.parameters("decoder.layers.0.", list);
  std::vector<std::string> names;
  for (const Parameter& p : list) names.push_back(p.name);
  const std::vector<std::string> expected{
      "decoder.layers.0.self_attn.w_q",  "decoder.layers.0.self_attn.b_q",
      "decoder.layers.0.self_attn.w_k",  "decoder.layers.0.self_attn.b_k",
      "decoder.layers.0.self_attn.w_v",  "decoder.layers.0.self_attn.b_v",
      "decoder.layers.0.self_attn.w_o",  "decoder.layers.0.self_attn.b_o",
      "decoder.layers.0.cross_attn.w_q", "decoder.layers.0.cross_attn.b_q",
      "decoder.layers.0.cross_attn.w_k", "decoder.layers.0.cross_attn.b_k",
      "decoder.layers.0.cross_attn.w_v", "decoder.layers.0.cross_attn.b_v",
      "decoder.layers.0.cross_attn.w_o", "decoder.layers.0.cross_attn.b_o",
      "decoder.layers.0.norm1.weight",   "decoder.layers.0.norm1.bias",
      "decoder.layers.0.norm2.weight",   "decoder.layers.0.norm2.bias",
      "decoder.layers.0.norm3.weight",   "decoder.layers.0.norm3.bias",
      "decoder.layers.0.ffn.in.weight",  "decoder.layers.0.ffn.in.bias",
      "decoder.layers.0.ffn.out.weight", "decoder.layers.0.ffn.out.bias"};
  EXPECT_EQ(names, expected);
  // 2 attention blocks of 4 C^2 + 4 C, 3 norms of 2 C, FFN 2 C F + F + C.
  EXPECT_EQ(parameter_count(list), 2 * (4 * 64 + 32) + 3 * 16 + (2 * 8 * 12 + 12 + 8));

  config.bias = false;
  EncoderLayer encoder = EncoderLayer::create(config, 1);
  ParameterList no_bias;
  encoder.parameters("", no_bias);
  for (const Parameter& p : no_bias)
    EXPECT_TRUE(p.name.find("norm") != std::string::npos || p.name.find("b_") == std::string::npos)
        << p.name;
  EXPECT_EQ(no_bias.size(), 4u + 2u * 2u + 2u);  // w_q..w_o, two norms, two FFN weights
}

TEST(TransformerLayers, ErrorMessages) {
  TransformerConfig bad = small_config(NormPlacement::post);
  bad.num_heads = 3;
  expect_error([&] { EncoderLayer::create(bad, 0); },
               "[transformer_config] num_heads (3) must divide d_model (8)");
  bad = small_config(NormPlacement::post);
  bad.num_kv_heads = 3;
  expect_error([&] { DecoderLayer::create(bad, 0); }, "num_kv_heads (3) must divide num_heads (2)");
  bad = small_config(NormPlacement::post);
  bad.ffn_dim = 0;
  expect_error([&] { EncoderLayer::create(bad, 0); }, "ffn_dim must be > 0");
  bad = small_config(NormPlacement::post);
  bad.dropout = 1.0;
  expect_error([&] { EncoderLayer::create(bad, 0); }, "dropout must be in [0, 1), got 1");
  bad = small_config(NormPlacement::post);
  bad.d_model = 6;
  bad.num_heads = 2;
  bad.rope = RopeConfig{};
  expect_error([&] { EncoderLayer::create(bad, 0); }, "rope needs an even head_dim");
  bad.d_model = 8;
  bad.rope->offset = 3;
  expect_error([&] { EncoderLayer::create(bad, 0); }, "rope.offset and rope.offsets");
  bad = small_config(NormPlacement::post);
  bad.dtype = DType::b8;
  expect_error([&] { EncoderLayer::create(bad, 0); }, "dtype must be float32 or float64, got bool");

  EncoderLayer encoder = EncoderLayer::create(small_config(NormPlacement::post), 0);
  expect_error([&] { encoder.forward(Tensor::zeros({2, 3, 7}, DType::f64)); },
               "[transformer_encoder] input has 7 features, the layer expects 8");
  expect_error([&] { encoder.forward(Tensor::zeros({2, 3, 8}, DType::f32)); },
               "input is float32, the layer is float64");
  expect_error([&] { encoder.forward(Tensor::zeros({3, 8}, DType::f64)); },
               "input must be [B, T, 8], got [3, 8]");
  expect_error([&] { encoder.forward(Tensor::zeros({2, 3, 8}, DType::f64), {{3}}); },
               "lengths has 1 entries, the batch is 2");
  expect_error([&] { encoder.forward(Tensor::zeros({2, 3, 8}, DType::f64), {{3, 4}}); },
               "lengths[1] = 4 is outside [0, 3]");
  const EncoderForward f = encoder.forward(Tensor::zeros({2, 3, 8}, DType::f64));
  expect_error([&] { encoder.backward(f.cache, Tensor::zeros({2, 4, 8}, DType::f64)); },
               "[transformer_encoder] dout must be [2, 3, 8] float64, got [2, 4, 8]");
  expect_error([&] { encoder.backward(EncoderCache{}, Tensor::zeros({2, 3, 8}, DType::f64)); },
               "backward needs the cache of a forward call");

  TransformerConfig dc = small_config(NormPlacement::pre);
  dc.memory_dim = 5;
  DecoderLayer decoder = DecoderLayer::create(dc, 0);
  const Tensor x = Tensor::zeros({2, 3, 8}, DType::f64);
  expect_error([&] { decoder.forward(x, Tensor::zeros({2, 4, 8}, DType::f64)); },
               "[transformer_decoder] memory has 8 features, the layer expects 5");
  expect_error([&] { decoder.forward(x, Tensor::zeros({1, 4, 5}, DType::f64)); },
               "memory has batch 1, input has 2");
  DecoderOptions options;
  options.memory_lengths = {4, 5};
  expect_error([&] { decoder.forward(x, Tensor::zeros({2, 4, 5}, DType::f64), options); },
               "memory_lengths[1] = 5 is outside [0, 4]");

  DecoderState state = decoder.start_decoding(Tensor::zeros({2, 4, 5}, DType::f64));
  expect_error([&] { decoder.step(state, Tensor::zeros({3, 1, 8}, DType::f64)); },
               "[transformer_decoder_step] input has batch 3, the state's memory 2");
  DecoderState empty;
  expect_error([&] { decoder.step(empty, Tensor::zeros({2, 1, 8}, DType::f64)); },
               "state has no memory: create it with start_decoding");
  expect_error([&] { state.select_rows({0, 2}); },
               "[transformer_decoder_state] rows[1] = 2 is outside the batch [0, 2)");
  dc.causal = false;
  DecoderLayer non_causal = DecoderLayer::create(dc, 0);
  DecoderState nc_state = non_causal.start_decoding(Tensor::zeros({2, 4, 5}, DType::f64));
  expect_error([&] { non_causal.step(nc_state, Tensor::zeros({2, 1, 8}, DType::f64)); },
               "incremental decoding needs config.causal");
}

}  // namespace
}  // namespace attn::nn
