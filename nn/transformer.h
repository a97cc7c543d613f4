// Transformer encoder and decoder layers (Vaswani et al. 2017, section 3.1), forward, backward
// and incremental decoding, built on attn::multihead_attention and its KV cache.
//
// Letters: B batch, T target (or source, for the encoder) length, S memory (encoder output)
// length, C d_model, M memory width (memory_dim, C unless given), n rows of one decoding step.
//
// Post-norm (the paper, PyTorch norm_first = false), with drop() the residual dropout:
//   encoder:  h = LN1(x + drop(SelfAttn(x)))            y = LN2(h + drop(FFN(h)))
//   decoder:  h1 = LN1(x + drop(SelfAttn(x)))           h2 = LN2(h1 + drop(CrossAttn(h1, mem)))
//             y = LN3(h2 + drop(FFN(h2)))
// Pre-norm (Xiong et al. 2020; GPT-2): the residual stream itself is never normalised, which keeps
// gradients well scaled without warm-up. A stack of pre-norm layers needs one final LayerNorm
// after its last layer; that belongs to the model, not to a layer.
//   encoder:  h = x + drop(SelfAttn(LN1(x)))            y = h + drop(FFN(LN2(h)))
//   decoder:  h1 = x + drop(SelfAttn(LN1(x)))           h2 = h1 + drop(CrossAttn(LN2(h1), mem))
//             y = h2 + drop(FFN(LN3(h2)))
//
//   encoder:  x [B, T, C] (+ lengths)                        ->  y [B, T, C]
//   decoder:  x [B, T, C], memory [B, S, M] (+ memory_lengths) ->  y [B, T, C]
//
// Attention scores are scaled dot products (1/sqrt(head_dim)); num_kv_heads < num_heads gives
// grouped-query attention. Masks follow attention.h (true = may attend): `lengths` hides padded
// keys (padded query rows still compute, and their outputs are junk the caller ignores), the
// decoder's self-attention is causal, `memory_lengths` hides padded memory positions.
//
// RoPE (Su et al. 2021), when configured, rotates the queries and keys of SELF-attention only, by
// their position 0, 1, ... in the sequence (the position in the KV cache when decoding): source
// and target positions are not comparable, so cross-attention is never rotated. multihead.h has
// no hook between its projections and the attention, so rotated self-attention composes the same
// steps here (projections as GEMMs, rope_forward, attn::attention); without RoPE every attention
// call goes through multihead_attention / multihead_attention_backward / multihead_attention_step.
//
// Dropout (only when training) uses counter-based masks (attn/random.h), regenerated in the
// backward: attention weights (attention_dropout), each sublayer output before the residual add,
// and the FFN hidden activation (dropout). Each site has its own stream; give every layer and
// every training step its own seed.
//
// Layers compute in config.dtype (float32 for training; float64 so tests run finite differences
// through the same code). Every input must have that dtype.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "attn/multihead.h"
#include "attn/tensor.h"
#include "nn/feed_forward.h"
#include "nn/layer_norm.h"
#include "nn/parameters.h"
#include "nn/positions.h"

namespace attn::nn {

enum class NormPlacement { pre, post };

// "pre", "post"
const char* norm_placement_name(NormPlacement placement);

struct TransformerConfig {
  int64_t d_model = 0;       // C
  int64_t num_heads = 0;     // Hq; must divide d_model
  int64_t num_kv_heads = 0;  // Hkv; 0 means num_heads; must divide num_heads
  int64_t ffn_dim = 0;       // hidden width of the feed-forward block (4 C in the paper)
  Activation activation = Activation::relu;
  NormPlacement norm = NormPlacement::post;
  double dropout = 0.0;            // residual and FFN-hidden dropout, in [0, 1)
  double attention_dropout = 0.0;  // dropout on the attention weights, in [0, 1)
  bool causal = true;              // decoder self-attention (the encoder ignores it)
  std::optional<RopeConfig> rope;  // rotary self-attention; offset(s) must be left at 0
  int64_t memory_dim = 0;          // M, width of the decoder's memory; 0 means d_model
  double norm_eps = 1e-5;
  bool bias = true;  // attention projections and FFN linears carry biases
  DType dtype = DType::f32;
};

// One multi-head attention sublayer's weights and their gradients (same shapes).
struct AttentionSublayer {
  MultiHeadConfig config;
  MultiHeadWeights weights;
  MultiHeadWeights grads;

  // Names "w_q", "b_q", "w_k", "b_k", "w_v", "b_v", "w_o", "b_o" after the prefix.
  void parameters(const std::string& prefix, ParameterList& list) const;
  void zero_grad();
};

// What an attention sublayer's backward needs from its forward.
struct AttentionSublayerCache {
  Tensor query_input;      // [B, T, C], the (normalised) input of the query projection
  Tensor key_value_input;  // [B, S, M] (the same tensor as query_input for self-attention)
  AttentionParams params;  // masks and dropout of this call
  MultiHeadOutput saved;   // projections (rotated when RoPE), attention out and lse, output
};

// Per-call settings.
struct EncoderOptions {
  std::vector<int64_t> lengths;  // valid positions per batch row (size B), or empty for all T
  bool training = false;         // dropout only when training
  uint64_t seed = 0;             // dropout seed of this layer for this step
};

struct DecoderOptions {
  std::vector<int64_t> lengths;         // valid target positions (size B), or empty for all T
  std::vector<int64_t> memory_lengths;  // valid memory positions (size B), or empty for all S
  bool training = false;
  uint64_t seed = 0;
  bool return_cross_weights = false;  // fill DecoderForward::cross_weights
};

struct EncoderCache {
  LayerNormCache norm1, norm2;
  AttentionSublayerCache self_attn;
  FeedForwardCache ffn;
  DropoutSpec attn_dropout, ffn_dropout;  // residual dropout after each sublayer
};

struct EncoderForward {
  Tensor out;  // [B, T, C]
  EncoderCache cache;
};

struct DecoderCache {
  LayerNormCache norm1, norm2, norm3;
  AttentionSublayerCache self_attn, cross_attn;
  FeedForwardCache ffn;
  DropoutSpec self_dropout, cross_dropout, ffn_dropout;
};

struct DecoderForward {
  Tensor out;            // [B, T, C]
  Tensor cross_weights;  // [B, T, S], cross-attention weights averaged over heads, on request
  DecoderCache cache;
};

struct DecoderGrads {
  Tensor dx;       // [B, T, C]
  Tensor dmemory;  // [B, S, M]
};

struct EncoderLayer {
  TransformerConfig config;
  AttentionSublayer self_attn;
  LayerNorm norm1, norm2;
  FeedForward ffn;

  // Xavier-uniform attention projections (MultiHeadWeights::init), nn.Linear-initialised FFN,
  // unit LayerNorms; a pure function of (config, seed).
  static EncoderLayer create(const TransformerConfig& config, uint64_t seed);

  EncoderForward forward(const Tensor& x, const EncoderOptions& options = {}) const;
  // dout [B, T, C] -> dx [B, T, C]; adds every parameter gradient into the grads.
  Tensor backward(const EncoderCache& cache, const Tensor& dout);

  // Names "self_attn.*", "norm1.*", "norm2.*", "ffn.*" after the prefix.
  void parameters(const std::string& prefix, ParameterList& list) const;
  void zero_grad();
};

// Incremental decoding state of one decoder layer: the self-attention KV cache (keys and values
// of every target position fed so far) and the cross-attention keys and values of the memory,
// projected once by start_decoding.
struct DecoderState {
  KVCache self_cache;
  KVCache memory_cache;
  std::vector<int64_t> memory_lengths;

  int64_t length() const { return self_cache.length; }  // target positions fed so far
  // Keeps batch rows rows[0], rows[1], ... in that order (beam search reorders hypotheses);
  // entries may repeat. Throws attn::Error for an index outside [0, B).
  void select_rows(const std::vector<int64_t>& rows);
};

struct DecoderStepOutput {
  Tensor out;            // [B, n, C]
  Tensor cross_weights;  // [B, n, S] on request
};

struct DecoderLayer {
  TransformerConfig config;
  AttentionSublayer self_attn, cross_attn;
  LayerNorm norm1, norm2, norm3;
  FeedForward ffn;

  static DecoderLayer create(const TransformerConfig& config, uint64_t seed);

  DecoderForward forward(const Tensor& x, const Tensor& memory,
                         const DecoderOptions& options = {}) const;
  // dout [B, T, C] -> dx and dmemory; adds every parameter gradient into the grads.
  DecoderGrads backward(const DecoderCache& cache, const Tensor& dout);

  // Projects memory [B, S, M] into the cross-attention keys and values once. `capacity` reserves
  // that many target positions in the self-attention cache (it grows on demand).
  DecoderState start_decoding(const Tensor& memory, const std::vector<int64_t>& memory_lengths = {},
                              int64_t capacity = 0) const;
  // Feeds the next n target positions x_step [B, n, C] (usually n = 1) and returns their
  // outputs: row i equals row state.length() + i of forward() over the whole prefix. Inference
  // only (no dropout, no backward); requires config.causal.
  DecoderStepOutput step(DecoderState& state, const Tensor& x_step,
                         bool return_cross_weights = false) const;

  // Names "self_attn.*", "cross_attn.*", "norm1.*", "norm2.*", "norm3.*", "ffn.*".
  void parameters(const std::string& prefix, ParameterList& list) const;
  void zero_grad();
};

}  // namespace attn::nn
