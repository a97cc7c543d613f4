// Transformer layers: the residual wiring (pre- or post-norm) around nn::LayerNorm,
// nn::FeedForward and multi-head attention sublayers, each backward numbered to mirror its
// forward. Without RoPE the attention is attn::multihead_attention (and its backward and KV-cache
// step); with RoPE the same six steps are composed here with the rotation in between.
#include "nn/transformer.h"

#include <optional>
#include <utility>
#include <vector>

#include "attn/profile.h"
#include "attn/random.h"
#include "nn/dropout.h"
#include "nn/linear.h"

namespace attn::nn {

namespace {

constexpr const char* kConfigOp = "transformer_config";
constexpr const char* kEncoderOp = "transformer_encoder";
constexpr const char* kDecoderOp = "transformer_decoder";
constexpr const char* kStepOp = "transformer_decoder_step";
constexpr const char* kStateOp = "transformer_decoder_state";

// Dropout sites of a layer: the DropoutSpec stream of residual and FFN-hidden dropout, and the
// value mixed into the seed of attention-weight dropout.
enum Site : uint64_t {
  kSelfAttentionWeights = 1,
  kSelfResidual = 2,
  kCrossAttentionWeights = 3,
  kCrossResidual = 4,
  kFfnHidden = 5,
  kFfnResidual = 6,
};

DropoutSpec dropout_site(double p, bool training, uint64_t seed, Site site) {
  return {training ? p : 0.0, seed, site};
}

Dropout attention_dropout_site(double p, bool training, uint64_t seed, Site site) {
  // attention() draws from (seed, b, h, i, j): a different seed per site keeps the self- and
  // cross-attention masks independent.
  return {training ? p : 0.0, mix64(seed ^ (static_cast<uint64_t>(site) * 0x9e3779b97f4a7c15ULL))};
}

// --------------------------------------------------------------------------------------------
// Validation.

void validate_config(const TransformerConfig& c) {
  ATTN_CHECK(c.d_model > 0 && c.num_heads > 0 && c.ffn_dim > 0, kConfigOp,
             "d_model, num_heads and ffn_dim must be > 0, got d_model ", c.d_model,
             ", num_heads ", c.num_heads, ", ffn_dim ", c.ffn_dim);
  ATTN_CHECK(c.d_model % c.num_heads == 0, kConfigOp, "num_heads (", c.num_heads,
             ") must divide d_model (", c.d_model, ")");
  ATTN_CHECK(c.num_kv_heads >= 0, kConfigOp, "num_kv_heads must be >= 0 (0 = num_heads), got ",
             c.num_kv_heads);
  ATTN_CHECK(c.num_kv_heads == 0 || c.num_heads % c.num_kv_heads == 0, kConfigOp,
             "num_kv_heads (", c.num_kv_heads, ") must divide num_heads (", c.num_heads, ")");
  ATTN_CHECK(c.dropout >= 0.0 && c.dropout < 1.0, kConfigOp, "dropout must be in [0, 1), got ",
             c.dropout);
  ATTN_CHECK(c.attention_dropout >= 0.0 && c.attention_dropout < 1.0, kConfigOp,
             "attention_dropout must be in [0, 1), got ", c.attention_dropout);
  ATTN_CHECK(c.memory_dim >= 0, kConfigOp, "memory_dim must be >= 0 (0 = d_model), got ",
             c.memory_dim);
  ATTN_CHECK(c.norm_eps > 0.0, kConfigOp, "norm_eps must be > 0, got ", c.norm_eps);
  ATTN_CHECK(c.dtype == DType::f32 || c.dtype == DType::f64, kConfigOp,
             "dtype must be float32 or float64, got ", dtype_name(c.dtype));
  if (c.rope) {
    const int64_t head_dim = c.d_model / c.num_heads;
    ATTN_CHECK(head_dim % 2 == 0, kConfigOp, "rope needs an even head_dim, got d_model ",
               c.d_model, " / num_heads ", c.num_heads, " = ", head_dim);
    ATTN_CHECK(c.rope->offset == 0 && c.rope->offsets.empty(), kConfigOp,
               "rope.offset and rope.offsets must be left at 0: the layer sets positions itself");
    ATTN_CHECK(c.rope->base > 1.0, kConfigOp, "rope.base must be > 1, got ", c.rope->base);
  }
}

MultiHeadConfig attention_config(const TransformerConfig& c, int64_t key_value_dim) {
  MultiHeadConfig m;
  m.d_model = c.d_model;
  m.num_heads = c.num_heads;
  m.num_kv_heads = c.num_kv_heads;
  m.key_input_dim = key_value_dim;
  m.value_input_dim = key_value_dim;
  m.bias = c.bias;
  return m;
}

AttentionSublayer make_attention(const MultiHeadConfig& config, DType dtype, uint64_t seed) {
  AttentionSublayer s;
  s.config = config;
  s.weights = MultiHeadWeights::init(config, dtype, seed);
  const MultiHeadWeights& w = s.weights;
  s.grads = {zeros_like(w.w_q), zeros_like(w.b_q), zeros_like(w.w_k), zeros_like(w.b_k),
             zeros_like(w.w_v), zeros_like(w.b_v), zeros_like(w.w_o), zeros_like(w.b_o)};
  return s;
}

LayerNorm make_norm(const TransformerConfig& c) {
  return LayerNorm::create({c.d_model, c.norm_eps, true, c.dtype});
}

FeedForward make_ffn(const TransformerConfig& c, uint64_t seed) {
  return FeedForward::create({c.d_model, c.ffn_dim, c.activation, c.bias, c.dtype}, seed);
}

// x must be [B, T, width] in the layer's dtype; returns T.
int64_t check_sequence(const char* op, const char* what, const Tensor& x, int64_t width,
                       DType dtype) {
  ATTN_CHECK(x.defined(), op, what, " is undefined");
  ATTN_CHECK(x.dim() == 3, op, what, " must be [B, T, ", width, "], got ", x.shape_str());
  ATTN_CHECK(x.size(2) == width, op, what, " has ", x.size(2), " features, the layer expects ",
             width, " (", what, " ", x.shape_str(), ")");
  ATTN_CHECK(x.dtype() == dtype, op, what, " is ", dtype_name(x.dtype()), ", the layer is ",
             dtype_name(dtype));
  return x.size(1);
}

void check_lengths(const char* op, const char* what, const std::vector<int64_t>& lengths,
                   int64_t batch, int64_t max_length) {
  if (lengths.empty()) return;
  ATTN_CHECK(static_cast<int64_t>(lengths.size()) == batch, op, what, " has ", lengths.size(),
             " entries, the batch is ", batch);
  for (std::size_t b = 0; b < lengths.size(); ++b)
    ATTN_CHECK(lengths[b] >= 0 && lengths[b] <= max_length, op, what, "[", b, "] = ", lengths[b],
               " is outside [0, ", max_length, "]");
}

// --------------------------------------------------------------------------------------------
// Small tensor helpers.

// a + b, same shape and dtype, as a new contiguous tensor.
Tensor add(const Tensor& a, const Tensor& b) {
  const Tensor ac = a.contiguous(), bc = b.contiguous();
  Tensor y = Tensor::empty(ac.shape(), ac.dtype());
  visit_float(ac.dtype(), "transformer", "tensor", [&](auto tag) {
    using T = decltype(tag);
    const T* pa = ac.data<T>();
    const T* pb = bc.data<T>();
    T* py = y.data<T>();
    for (int64_t i = 0, n = ac.numel(); i < n; ++i) py[i] = pa[i] + pb[i];
  });
  return y;
}

// acc += g for a contiguous gradient accumulator (undefined stays undefined).
void accumulate(Tensor acc, const Tensor& g) {
  if (!acc.defined()) return;
  const Tensor gc = g.to(acc.dtype()).contiguous();
  visit_float(acc.dtype(), "transformer", "gradient", [&](auto tag) {
    using T = decltype(tag);
    T* pa = acc.data<T>();
    const T* pg = gc.data<T>();
    for (int64_t i = 0, n = acc.numel(); i < n; ++i) pa[i] += pg[i];
  });
}

// The multihead front-end returns fresh gradient tensors; the layer keeps running sums.
void accumulate_weights(AttentionSublayer& s, const MultiHeadWeights& d) {
  accumulate(s.grads.w_q, d.w_q);
  accumulate(s.grads.b_q, d.b_q);
  accumulate(s.grads.w_k, d.w_k);
  accumulate(s.grads.b_k, d.b_k);
  accumulate(s.grads.w_v, d.w_v);
  accumulate(s.grads.b_v, d.b_v);
  accumulate(s.grads.w_o, d.w_o);
  accumulate(s.grads.b_o, d.b_o);
}

// [B, T, H * D] -> [B, H, T, D] contiguous, and back.
Tensor split_heads(const Tensor& x, int64_t heads) {
  const int64_t B = x.size(0), Tn = x.size(1), D = x.size(2) / heads;
  return x.reshape({B, Tn, heads, D}).transpose(1, 2).contiguous();
}
Tensor merge_heads(const Tensor& x) {
  const int64_t B = x.size(0), H = x.size(1), Tn = x.size(2), D = x.size(3);
  return x.transpose(1, 2).contiguous().reshape({B, Tn, H * D});
}

// --------------------------------------------------------------------------------------------
// Rotary self-attention: multihead.h's steps 1-6 with RoPE between the projections and the
// attention. Projections reuse nn::Linear on the sublayer's weight tensors (shared storage), so
// the backward accumulates straight into the sublayer's gradient tensors.

Linear projection(const Tensor& w, const Tensor& b) {
  Linear l;
  l.params = {w, b};
  return l;
}
Linear projection_with_grads(const Tensor& w, const Tensor& b, const Tensor& dw, const Tensor& db) {
  Linear l;
  l.params = {w, b};
  l.grads = {dw, db};
  return l;
}

struct HeadCounts {
  int64_t q = 0, kv = 0;
};
HeadCounts head_counts(const MultiHeadConfig& c) {
  return {c.num_heads, c.num_kv_heads > 0 ? c.num_kv_heads : c.num_heads};
}

// Steps 1-3: rotated queries and keys, plain values, for positions offset, offset + 1, ...
struct Projected {
  Tensor q, k, v;
};
Projected project_rotary(const AttentionSublayer& s, const Tensor& x, const RopeConfig& rope) {
  const HeadCounts h = head_counts(s.config);
  const MultiHeadWeights& w = s.weights;
  Projected p;
  p.q = rope_forward(split_heads(projection(w.w_q, w.b_q).forward(x).out, h.q), rope);   // 1
  p.k = rope_forward(split_heads(projection(w.w_k, w.b_k).forward(x).out, h.kv), rope);  // 2
  p.v = split_heads(projection(w.w_v, w.b_v).forward(x).out, h.kv);                      // 3
  return p;
}

// Steps 5-6.
Tensor output_projection(const AttentionSublayer& s, const Tensor& heads) {
  return projection(s.weights.w_o, s.weights.b_o).forward(merge_heads(heads)).out;
}

MultiHeadOutput rotary_forward(const AttentionSublayer& s, const Tensor& x,
                               const AttentionParams& params, const RopeConfig& rope) {
  const Projected p = project_rotary(s, x, rope);
  MultiHeadOutput out;
  out.q = p.q;
  out.k = p.k;
  out.v = p.v;
  out.attention = attn::attention(p.q, p.k, p.v, params);  // 4
  out.output = output_projection(s, out.attention.out);    // 5, 6
  return out;
}

// Returns dx; adds the weight gradients into s.grads.
Tensor rotary_backward(AttentionSublayer& s, const AttentionSublayerCache& cache,
                       const Tensor& dout, const RopeConfig& rope) {
  const MultiHeadWeights& w = s.weights;
  MultiHeadWeights& g = s.grads;
  const MultiHeadOutput& saved = cache.saved;
  const HeadCounts h = head_counts(s.config);
  const Tensor x = cache.query_input.contiguous();
  // 6. output = c W_o^T + b_o
  Linear lo = projection_with_grads(w.w_o, w.b_o, g.w_o, g.b_o);
  const Tensor dc = lo.backward({merge_heads(saved.attention.out)}, dout);
  // 5. c = merge_heads(a)
  const Tensor da = split_heads(dc, h.q);
  // 4. a = attention(q, k, v)
  const AttentionGrads ag =
      attn::attention_backward(saved.q, saved.k, saved.v, cache.params, saved.attention, da);
  // 3. v = split_heads(x W_v^T + b_v)
  Linear lv = projection_with_grads(w.w_v, w.b_v, g.w_v, g.b_v);
  Tensor dx = lv.backward({x}, merge_heads(ag.dv));
  // 2. k = rope(split_heads(x W_k^T + b_k)); the rotation's backward is its inverse
  Linear lk = projection_with_grads(w.w_k, w.b_k, g.w_k, g.b_k);
  dx = add(dx, lk.backward({x}, merge_heads(rope_backward(ag.dk, rope))));
  // 1. q = rope(split_heads(x W_q^T + b_q))
  Linear lq = projection_with_grads(w.w_q, w.b_q, g.w_q, g.b_q);
  return add(dx, lq.backward({x}, merge_heads(rope_backward(ag.dq, rope))));
}

// --------------------------------------------------------------------------------------------
// Attention sublayers.

AttentionSublayerCache self_attention_forward(const AttentionSublayer& s, const Tensor& x,
                                              const AttentionParams& params,
                                              const std::optional<RopeConfig>& rope) {
  AttentionSublayerCache cache{x, x, params, {}};
  cache.saved = rope ? rotary_forward(s, x, params, *rope)
                     : multihead_attention(s.config, s.weights, x, x, x, params);
  return cache;
}

// Self-attention reads its input three times, so dx = dquery + dkey + dvalue.
Tensor self_attention_backward(AttentionSublayer& s, const AttentionSublayerCache& cache,
                               const Tensor& dout, const std::optional<RopeConfig>& rope) {
  if (rope) return rotary_backward(s, cache, dout, *rope);
  const Tensor& x = cache.query_input;
  const MultiHeadGrads g = multihead_attention_backward(s.config, s.weights, x, x, x,
                                                        cache.params, cache.saved, dout);
  accumulate_weights(s, g.dweights);
  return add(add(g.dquery, g.dkey), g.dvalue);
}

AttentionSublayerCache cross_attention_forward(const AttentionSublayer& s, const Tensor& x,
                                               const Tensor& memory,
                                               const AttentionParams& params) {
  AttentionSublayerCache cache{x, memory, params, {}};
  cache.saved = multihead_attention(s.config, s.weights, x, memory, memory, params);
  return cache;
}

// Returns {dx, dmemory}; memory feeds both keys and values.
std::pair<Tensor, Tensor> cross_attention_backward(AttentionSublayer& s,
                                                   const AttentionSublayerCache& cache,
                                                   const Tensor& dout) {
  const Tensor& m = cache.key_value_input;
  const MultiHeadGrads g = multihead_attention_backward(s.config, s.weights, cache.query_input, m,
                                                        m, cache.params, cache.saved, dout);
  accumulate_weights(s, g.dweights);
  return {g.dquery, add(g.dkey, g.dvalue)};
}

// --------------------------------------------------------------------------------------------
// Residual connections around a sublayer, with the norm before (pre) or after (post).
//   pre:  u = LN(x), y = x + drop(f(u))          post:  u = x, y = LN(x + drop(f(u)))

Tensor sublayer_input(const LayerNorm& ln, NormPlacement placement, const Tensor& x,
                      LayerNormCache& cache) {
  if (placement == NormPlacement::post) return x;
  LayerNormForward f = ln.forward(x);
  cache = std::move(f.cache);
  return f.out;
}

Tensor residual_output(const LayerNorm& ln, NormPlacement placement, const Tensor& x,
                       const Tensor& sublayer_out, const DropoutSpec& drop, LayerNormCache& cache) {
  const Tensor sum = add(x, dropout_forward(sublayer_out, drop));
  if (placement == NormPlacement::pre) return sum;
  LayerNormForward f = ln.forward(sum);
  cache = std::move(f.cache);
  return f.out;
}

// Backward of residual_output: the gradient of the skip path (dx so far) and of f's output.
struct ResidualGrads {
  Tensor dskip;
  Tensor dsublayer;
};
ResidualGrads residual_output_backward(LayerNorm& ln, NormPlacement placement,
                                       const LayerNormCache& cache, const Tensor& dy,
                                       const DropoutSpec& drop) {
  const Tensor dsum = placement == NormPlacement::post ? ln.backward(cache, dy) : dy;
  return {dsum, dropout_backward(dsum, drop)};
}

// Backward of sublayer_input: adds the gradient through u to the skip path's.
Tensor sublayer_input_backward(LayerNorm& ln, NormPlacement placement,
                               const LayerNormCache& cache, const Tensor& dskip,
                               const Tensor& du) {
  return add(dskip, placement == NormPlacement::pre ? ln.backward(cache, du) : du);
}

}  // namespace

const char* norm_placement_name(NormPlacement placement) {
  return placement == NormPlacement::pre ? "pre" : "post";
}

// ---------------------------------------------------------------------------------------------
// AttentionSublayer.

void AttentionSublayer::parameters(const std::string& prefix, ParameterList& list) const {
  add_parameter(list, prefix, "w_q", weights.w_q, grads.w_q);
  add_parameter(list, prefix, "b_q", weights.b_q, grads.b_q);
  add_parameter(list, prefix, "w_k", weights.w_k, grads.w_k);
  add_parameter(list, prefix, "b_k", weights.b_k, grads.b_k);
  add_parameter(list, prefix, "w_v", weights.w_v, grads.w_v);
  add_parameter(list, prefix, "b_v", weights.b_v, grads.b_v);
  add_parameter(list, prefix, "w_o", weights.w_o, grads.w_o);
  add_parameter(list, prefix, "b_o", weights.b_o, grads.b_o);
}

void AttentionSublayer::zero_grad() {
  for (Tensor* t : {&grads.w_q, &grads.b_q, &grads.w_k, &grads.b_k, &grads.w_v, &grads.b_v,
                    &grads.w_o, &grads.b_o})
    if (t->defined()) t->fill(0.0);
}

// ---------------------------------------------------------------------------------------------
// EncoderLayer.

EncoderLayer EncoderLayer::create(const TransformerConfig& config, uint64_t seed) {
  validate_config(config);
  EncoderLayer layer;
  layer.config = config;
  layer.self_attn = make_attention(attention_config(config, 0), config.dtype, seed);
  layer.norm1 = make_norm(config);
  layer.norm2 = make_norm(config);
  layer.ffn = make_ffn(config, seed + 1);  // FeedForward uses seed + 1 and seed + 2
  return layer;
}

EncoderForward EncoderLayer::forward(const Tensor& x, const EncoderOptions& options) const {
  ATTN_PROFILE_SCOPE("transformer.encoder_layer.forward");
  const TransformerConfig& c = config;
  const int64_t T = check_sequence(kEncoderOp, "input", x, c.d_model, c.dtype);
  check_lengths(kEncoderOp, "lengths", options.lengths, x.size(0), T);
  EncoderForward f;
  EncoderCache& cache = f.cache;
  cache.attn_dropout = dropout_site(c.dropout, options.training, options.seed, kSelfResidual);
  cache.ffn_dropout = dropout_site(c.dropout, options.training, options.seed, kFfnResidual);
  AttentionParams params;
  params.mask.key_lengths = options.lengths;
  params.dropout = attention_dropout_site(c.attention_dropout, options.training, options.seed,
                                          kSelfAttentionWeights);
  // 1. u1 = LN1(x) (pre) or x (post)
  const Tensor u1 = sublayer_input(norm1, c.norm, x, cache.norm1);
  // 2. a = SelfAttn(u1)
  cache.self_attn = self_attention_forward(self_attn, u1, params, c.rope);
  // 3. h = x + drop(a) (pre) or LN1(x + drop(a)) (post)
  const Tensor h = residual_output(norm1, c.norm, x, cache.self_attn.saved.output,
                                   cache.attn_dropout, cache.norm1);
  // 4. u2 = LN2(h) (pre) or h (post)
  const Tensor u2 = sublayer_input(norm2, c.norm, h, cache.norm2);
  // 5. f = FFN(u2)
  FeedForwardForward ff = ffn.forward(
      u2, dropout_site(c.dropout, options.training, options.seed, kFfnHidden));
  cache.ffn = std::move(ff.cache);
  // 6. y = h + drop(f) (pre) or LN2(h + drop(f)) (post)
  f.out = residual_output(norm2, c.norm, h, ff.out, cache.ffn_dropout, cache.norm2);
  return f;
}

Tensor EncoderLayer::backward(const EncoderCache& cache, const Tensor& dout) {
  ATTN_PROFILE_SCOPE("transformer.encoder_layer.backward");
  const TransformerConfig& c = config;
  ATTN_CHECK(cache.self_attn.saved.output.defined(), kEncoderOp,
             "backward needs the cache of a forward call");
  const Tensor& out_like = cache.self_attn.saved.output;
  ATTN_CHECK(dout.defined() && dout.shape() == out_like.shape() && dout.dtype() == c.dtype,
             kEncoderOp, "dout must be ", out_like.shape_str(), " ", dtype_name(c.dtype), ", got ",
             dout.defined() ? dout.shape_str() : "undefined", " ",
             dout.defined() ? dtype_name(dout.dtype()) : "");
  // 6. y = h + drop(f) / LN2(h + drop(f))
  const ResidualGrads g6 =
      residual_output_backward(norm2, c.norm, cache.norm2, dout, cache.ffn_dropout);
  // 5. f = FFN(u2)
  const Tensor du2 = ffn.backward(cache.ffn, g6.dsublayer);
  // 4. u2 = LN2(h) / h
  const Tensor dh = sublayer_input_backward(norm2, c.norm, cache.norm2, g6.dskip, du2);
  // 3. h = x + drop(a) / LN1(x + drop(a))
  const ResidualGrads g3 =
      residual_output_backward(norm1, c.norm, cache.norm1, dh, cache.attn_dropout);
  // 2. a = SelfAttn(u1)
  const Tensor du1 = self_attention_backward(self_attn, cache.self_attn, g3.dsublayer, c.rope);
  // 1. u1 = LN1(x) / x
  return sublayer_input_backward(norm1, c.norm, cache.norm1, g3.dskip, du1);
}

void EncoderLayer::parameters(const std::string& prefix, ParameterList& list) const {
  self_attn.parameters(prefix + "self_attn.", list);
  norm1.parameters(prefix + "norm1.", list);
  norm2.parameters(prefix + "norm2.", list);
  ffn.parameters(prefix + "ffn.", list);
}

void EncoderLayer::zero_grad() {
  self_attn.zero_grad();
  norm1.zero_grad();
  norm2.zero_grad();
  ffn.zero_grad();
}

// ---------------------------------------------------------------------------------------------
// DecoderLayer.

DecoderLayer DecoderLayer::create(const TransformerConfig& config, uint64_t seed) {
  validate_config(config);
  DecoderLayer layer;
  layer.config = config;
  layer.self_attn = make_attention(attention_config(config, 0), config.dtype, seed);
  layer.cross_attn =
      make_attention(attention_config(config, config.memory_dim), config.dtype, seed + 1);
  layer.norm1 = make_norm(config);
  layer.norm2 = make_norm(config);
  layer.norm3 = make_norm(config);
  layer.ffn = make_ffn(config, seed + 2);  // seed + 2 and seed + 3
  return layer;
}

namespace {
int64_t memory_width(const TransformerConfig& c) {
  return c.memory_dim > 0 ? c.memory_dim : c.d_model;
}
}  // namespace

DecoderForward DecoderLayer::forward(const Tensor& x, const Tensor& memory,
                                     const DecoderOptions& options) const {
  ATTN_PROFILE_SCOPE("transformer.decoder_layer.forward");
  const TransformerConfig& c = config;
  const int64_t T = check_sequence(kDecoderOp, "input", x, c.d_model, c.dtype);
  const int64_t S = check_sequence(kDecoderOp, "memory", memory, memory_width(c), c.dtype);
  ATTN_CHECK(memory.size(0) == x.size(0), kDecoderOp, "memory has batch ", memory.size(0),
             ", input has ", x.size(0), " (memory ", memory.shape_str(), ", input ", x.shape_str(),
             ")");
  check_lengths(kDecoderOp, "lengths", options.lengths, x.size(0), T);
  check_lengths(kDecoderOp, "memory_lengths", options.memory_lengths, x.size(0), S);
  DecoderForward f;
  DecoderCache& cache = f.cache;
  cache.self_dropout = dropout_site(c.dropout, options.training, options.seed, kSelfResidual);
  cache.cross_dropout = dropout_site(c.dropout, options.training, options.seed, kCrossResidual);
  cache.ffn_dropout = dropout_site(c.dropout, options.training, options.seed, kFfnResidual);
  AttentionParams self_params;
  self_params.mask.key_lengths = options.lengths;
  self_params.mask.causal = c.causal;
  self_params.dropout = attention_dropout_site(c.attention_dropout, options.training,
                                               options.seed, kSelfAttentionWeights);
  AttentionParams cross_params;
  cross_params.mask.key_lengths = options.memory_lengths;
  cross_params.dropout = attention_dropout_site(c.attention_dropout, options.training,
                                                options.seed, kCrossAttentionWeights);
  cross_params.return_weights = options.return_cross_weights;

  // 1. u1 = LN1(x) / x
  const Tensor u1 = sublayer_input(norm1, c.norm, x, cache.norm1);
  // 2. a = SelfAttn(u1), causal
  cache.self_attn = self_attention_forward(self_attn, u1, self_params, c.rope);
  // 3. h1 = x + drop(a) / LN1(x + drop(a))
  const Tensor h1 = residual_output(norm1, c.norm, x, cache.self_attn.saved.output,
                                    cache.self_dropout, cache.norm1);
  // 4. u2 = LN2(h1) / h1
  const Tensor u2 = sublayer_input(norm2, c.norm, h1, cache.norm2);
  // 5. e = CrossAttn(u2, memory)
  cache.cross_attn = cross_attention_forward(cross_attn, u2, memory, cross_params);
  // 6. h2 = h1 + drop(e) / LN2(h1 + drop(e))
  const Tensor h2 = residual_output(norm2, c.norm, h1, cache.cross_attn.saved.output,
                                    cache.cross_dropout, cache.norm2);
  // 7. u3 = LN3(h2) / h2
  const Tensor u3 = sublayer_input(norm3, c.norm, h2, cache.norm3);
  // 8. g = FFN(u3)
  FeedForwardForward ff = ffn.forward(
      u3, dropout_site(c.dropout, options.training, options.seed, kFfnHidden));
  cache.ffn = std::move(ff.cache);
  // 9. y = h2 + drop(g) / LN3(h2 + drop(g))
  f.out = residual_output(norm3, c.norm, h2, ff.out, cache.ffn_dropout, cache.norm3);
  if (options.return_cross_weights) f.cross_weights = cache.cross_attn.saved.attention.mean_weights;
  return f;
}

DecoderGrads DecoderLayer::backward(const DecoderCache& cache, const Tensor& dout) {
  ATTN_PROFILE_SCOPE("transformer.decoder_layer.backward");
  const TransformerConfig& c = config;
  ATTN_CHECK(cache.self_attn.saved.output.defined() && cache.cross_attn.saved.output.defined(),
             kDecoderOp, "backward needs the cache of a forward call");
  const Tensor& out_like = cache.self_attn.saved.output;
  ATTN_CHECK(dout.defined() && dout.shape() == out_like.shape() && dout.dtype() == c.dtype,
             kDecoderOp, "dout must be ", out_like.shape_str(), " ", dtype_name(c.dtype), ", got ",
             dout.defined() ? dout.shape_str() : "undefined", " ",
             dout.defined() ? dtype_name(dout.dtype()) : "");
  // 9. y = h2 + drop(g) / LN3(...)
  const ResidualGrads g9 =
      residual_output_backward(norm3, c.norm, cache.norm3, dout, cache.ffn_dropout);
  // 8. g = FFN(u3)
  const Tensor du3 = ffn.backward(cache.ffn, g9.dsublayer);
  // 7. u3 = LN3(h2) / h2
  const Tensor dh2 = sublayer_input_backward(norm3, c.norm, cache.norm3, g9.dskip, du3);
  // 6. h2 = h1 + drop(e) / LN2(...)
  const ResidualGrads g6 =
      residual_output_backward(norm2, c.norm, cache.norm2, dh2, cache.cross_dropout);
  // 5. e = CrossAttn(u2, memory)
  auto [du2, dmemory] = cross_attention_backward(cross_attn, cache.cross_attn, g6.dsublayer);
  // 4. u2 = LN2(h1) / h1
  const Tensor dh1 = sublayer_input_backward(norm2, c.norm, cache.norm2, g6.dskip, du2);
  // 3. h1 = x + drop(a) / LN1(...)
  const ResidualGrads g3 =
      residual_output_backward(norm1, c.norm, cache.norm1, dh1, cache.self_dropout);
  // 2. a = SelfAttn(u1)
  const Tensor du1 = self_attention_backward(self_attn, cache.self_attn, g3.dsublayer, c.rope);
  // 1. u1 = LN1(x) / x
  return {sublayer_input_backward(norm1, c.norm, cache.norm1, g3.dskip, du1), dmemory};
}

DecoderState DecoderLayer::start_decoding(const Tensor& memory,
                                          const std::vector<int64_t>& memory_lengths,
                                          int64_t capacity) const {
  const TransformerConfig& c = config;
  const int64_t S = check_sequence(kStepOp, "memory", memory, memory_width(c), c.dtype);
  const int64_t B = memory.size(0);
  check_lengths(kStepOp, "memory_lengths", memory_lengths, B, S);
  ATTN_CHECK(capacity >= 0, kStepOp, "capacity must be >= 0, got ", capacity);
  DecoderState state;
  state.memory_lengths = memory_lengths;
  state.self_cache = KVCache::create(self_attn.config, {B, capacity, c.dtype});
  // A step with no query rows projects the memory into the cross cache and attends nothing:
  // the keys and values of the memory are computed once per sentence, not once per token.
  AttentionParams params;
  params.mask.key_lengths = memory_lengths;
  const Tensor no_queries = Tensor::zeros({B, 0, c.d_model}, c.dtype);
  multihead_attention_step(cross_attn.config, cross_attn.weights, state.memory_cache, no_queries,
                           memory, memory, params);
  return state;
}

DecoderStepOutput DecoderLayer::step(DecoderState& state, const Tensor& x_step,
                                     bool return_cross_weights) const {
  const TransformerConfig& c = config;
  ATTN_CHECK(c.causal, kStepOp,
             "incremental decoding needs config.causal (a non-causal decoder row sees later "
             "positions, which a step has not fed yet)");
  check_sequence(kStepOp, "input", x_step, c.d_model, c.dtype);
  ATTN_CHECK(state.memory_cache.k.defined(), kStepOp,
             "state has no memory: create it with start_decoding");
  const int64_t B = x_step.size(0);
  ATTN_CHECK(state.memory_cache.k.size(0) == B, kStepOp, "input has batch ", B,
             ", the state's memory ", state.memory_cache.k.size(0), " (input ", x_step.shape_str(),
             ")");
  // Inference: no dropout anywhere, so the residual and FFN sites use an identity spec.
  const DropoutSpec none{};
  LayerNormCache unused;

  // 1-3. causal self-attention over the cache plus the n new rows
  const Tensor u1 = sublayer_input(norm1, c.norm, x_step, unused);
  Tensor a;
  if (c.rope) {
    RopeConfig rope = *c.rope;
    rope.offset = state.self_cache.length;  // new row i sits at position length + i
    const Projected p = project_rotary(self_attn, u1, rope);
    state.self_cache.append(p.k, p.v);
    AttentionParams params;
    params.mask.causal = true;
    params.mask.alignment = Alignment::bottom_right;
    const AttentionOutput att = attn::attention(p.q, state.self_cache.keys().contiguous(),
                                                state.self_cache.values().contiguous(), params);
    a = output_projection(self_attn, att.out);
  } else {
    AttentionParams params;
    params.mask.causal = true;  // multihead_attention_step aligns the rows bottom-right
    a = multihead_attention_step(self_attn.config, self_attn.weights, state.self_cache, u1, u1,
                                 u1, params)
            .output;
  }
  const Tensor h1 = residual_output(norm1, c.norm, x_step, a, none, unused);

  // 4-6. cross-attention over the projected memory (no keys appended)
  const Tensor u2 = sublayer_input(norm2, c.norm, h1, unused);
  AttentionParams cross_params;
  cross_params.mask.key_lengths = state.memory_lengths;
  cross_params.return_weights = return_cross_weights;
  const Tensor no_keys = Tensor::zeros({B, 0, memory_width(c)}, c.dtype);
  const MultiHeadOutput e = multihead_attention_step(cross_attn.config, cross_attn.weights,
                                                     state.memory_cache, u2, no_keys, no_keys,
                                                     cross_params);
  const Tensor h2 = residual_output(norm2, c.norm, h1, e.output, none, unused);

  // 7-9. feed-forward
  const Tensor u3 = sublayer_input(norm3, c.norm, h2, unused);
  DecoderStepOutput out;
  out.out = residual_output(norm3, c.norm, h2, ffn.forward(u3).out, none, unused);
  if (return_cross_weights) out.cross_weights = e.attention.mean_weights;
  return out;
}

void DecoderLayer::parameters(const std::string& prefix, ParameterList& list) const {
  self_attn.parameters(prefix + "self_attn.", list);
  cross_attn.parameters(prefix + "cross_attn.", list);
  norm1.parameters(prefix + "norm1.", list);
  norm2.parameters(prefix + "norm2.", list);
  norm3.parameters(prefix + "norm3.", list);
  ffn.parameters(prefix + "ffn.", list);
}

void DecoderLayer::zero_grad() {
  self_attn.zero_grad();
  cross_attn.zero_grad();
  norm1.zero_grad();
  norm2.zero_grad();
  norm3.zero_grad();
  ffn.zero_grad();
}

// ---------------------------------------------------------------------------------------------
// DecoderState.

namespace {
// Gathers batch rows of a cache [B, Hkv, capacity, D], copying only the `length` valid
// positions: beam search gathers every step, and copying the whole capacity (sized for the
// longest output) would move several times the bytes and touch every page of the new buffer.
Tensor gather_cache_rows(const Tensor& t, const std::vector<int64_t>& rows, int64_t length) {
  Shape shape = t.shape();
  shape[0] = static_cast<int64_t>(rows.size());
  Tensor out = Tensor::empty(shape, t.dtype());
  if (length == 0) return out;
  for (std::size_t r = 0; r < rows.size(); ++r)
    out.select(0, static_cast<int64_t>(r)).slice(1, 0, length)
        .copy_from(t.select(0, rows[r]).slice(1, 0, length));
  return out;
}
}  // namespace

void DecoderState::select_rows(const std::vector<int64_t>& rows) {
  ATTN_CHECK(memory_cache.k.defined(), kStateOp, "state has no memory: create it with start_decoding");
  const int64_t B = memory_cache.k.size(0);
  for (std::size_t r = 0; r < rows.size(); ++r)
    ATTN_CHECK(rows[r] >= 0 && rows[r] < B, kStateOp, "rows[", r, "] = ", rows[r],
               " is outside the batch [0, ", B, ")");
  for (KVCache* cache : {&self_cache, &memory_cache}) {
    if (!cache->k.defined()) continue;
    cache->k = gather_cache_rows(cache->k, rows, cache->length);
    cache->v = gather_cache_rows(cache->v, rows, cache->length);
  }
  if (!memory_lengths.empty()) {
    std::vector<int64_t> picked;
    picked.reserve(rows.size());
    for (int64_t r : rows) picked.push_back(memory_lengths[static_cast<std::size_t>(r)]);
    memory_lengths = std::move(picked);
  }
}

}  // namespace attn::nn
