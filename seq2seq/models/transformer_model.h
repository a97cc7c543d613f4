// The Transformer translator (Vaswani et al. 2017): an encoder-decoder of nn::EncoderLayer and
// nn::DecoderLayer stacks, trained by the same Trainer and decoded by the same greedy and beam
// search as the recurrent Seq2Seq (model.h).
//
// Letters: B batch, S source steps, T target steps, C d_model (ModelConfig::hidden), V target
// vocabulary, L_e / L_d encoder / decoder layers.
//
//   1. x = drop(sqrt(C) E_src[source] + P[0..S))                  [B, S, C]
//   2. x = Encoder_l(x, source lengths), l = 1 .. L_e
//   3. memory = LN_e(x) (pre-norm) or x (post-norm)               [B, S, C]
//   4. y = drop(sqrt(C) E_tgt[target_input] + P[0..T))            [B, T, C]
//   5. y = Decoder_l(y, memory, target lengths, source lengths), l = 1 .. L_d  (causal)
//   6. z = LN_d(y) (pre-norm) or y
//   7. logits = z W_g^T + b_g, laid out [T, B, V] like Seq2Seq::forward (loss.h)
// P is the sinusoidal table (section 3.5); with PositionKind::rope it is left out and the layers
// rotate their self-attention instead. Embeddings start as N(0, 1/C) and are scaled by sqrt(C)
// (section 3.4), so token vectors and positions start on the same O(1) scale. A pre-norm stack
// leaves its residual stream unnormalised, hence the final LayerNorms LN_e and LN_d.
//
// Padding: source lengths hide padded memory positions from the encoder's self-attention and
// the decoder's cross-attention; target lengths hide padded target positions. Padded rows still
// compute (their outputs are junk) and get no gradient: the loss ignores <pad> targets.
//
// Dropout (training only) is counter-based (nn/dropout.h, attn/random.h): every site draws from
// a pure function of (step seed, layer, site, position), so a resumed run regenerates the same
// masks and the backward regenerates them instead of storing them.
//
// Incremental decoding keeps each decoder layer's KV cache (nn::DecoderState): one step per
// output token, the memory's cross-attention keys and values projected once. The alignment of a
// step is the last decoder layer's cross-attention weights averaged over heads.
#pragma once

#include <cstdint>
#include <vector>

#include "nn/dropout.h"
#include "nn/embedding.h"
#include "nn/layer_norm.h"
#include "nn/linear.h"
#include "nn/parameters.h"
#include "nn/transformer.h"
#include "seq2seq/data/batching.h"
#include "seq2seq/models/model.h"

namespace attn::seq2seq {

struct TransformerRunOptions {
  bool training = false;  // dropout only when training
  uint64_t seed = 0;      // dropout seed of this step (the trainer derives one per step)
};

// The encoder's output (steps 1-3) and what its backward needs.
struct TransformerEncoded {
  Tensor memory;                 // [B, S, C]
  std::vector<int64_t> lengths;  // size B, <eos> included
  nn::EmbeddingCache embedding_cache;
  nn::DropoutSpec embedding_dropout;
  std::vector<nn::EncoderCache> layers;
  nn::LayerNormCache norm;  // pre-norm only
};

struct TransformerForward {
  Tensor logits;  // [T, B, V]
  TransformerEncoded source;
  nn::EmbeddingCache target_embedding_cache;
  nn::DropoutSpec target_dropout;
  std::vector<nn::DecoderCache> layers;
  nn::LayerNormCache norm;  // pre-norm only
  nn::LinearCache generator;
};

// Incremental decoding state of B rows: every decoder layer's self-attention KV cache and the
// projected memory.
struct TransformerDecoding {
  std::vector<nn::DecoderState> layers;

  int64_t length() const { return layers.empty() ? 0 : layers.front().length(); }
  // Keeps rows rows[0], rows[1], ... (beam search); entries may repeat.
  void select_rows(const std::vector<int64_t>& rows);
};

struct TransformerStep {
  Tensor logits;   // [B, V]
  Tensor weights;  // [B, S], last decoder layer's cross-attention averaged over heads, on request
};

struct TransformerSeq2Seq {
  ModelConfig config;
  nn::Embedding source_embedding;
  nn::Embedding target_embedding;
  std::vector<nn::EncoderLayer> encoder;
  std::vector<nn::DecoderLayer> decoder;
  nn::LayerNorm encoder_norm;  // pre-norm only
  nn::LayerNorm decoder_norm;  // pre-norm only
  nn::Linear generator;        // W_g [V, C]

  // Deterministic from (config, seed). Throws "[seq2seq] ..." for an inconsistent config.
  static TransformerSeq2Seq create(const ModelConfig& config, uint64_t seed);

  nn::TransformerConfig layer_config() const;

  // Names: source_embedding.weight, target_embedding.weight, encoder.<l>.<layer names>,
  // encoder_norm.weight / bias (pre-norm), decoder.<l>.<layer names>, decoder_norm.*,
  // generator.weight / bias.
  nn::ParameterList parameters() const;
  void zero_grad() const;

  // Steps 1-3 on a batch's sources.
  TransformerEncoded encode(const Batch& batch, const TransformerRunOptions& options = {}) const;
  // Teacher-forced forward over a whole batch (target_input as decoder inputs).
  TransformerForward forward(const Batch& batch, const TransformerRunOptions& options = {}) const;
  // dlogits [T, B, V]: accumulates every parameter's gradient.
  void backward(const Batch& batch, const TransformerForward& forward, const Tensor& dlogits);

  // Projects the memory into every decoder layer's cross-attention keys and values.
  // `capacity` reserves target positions in the self-attention caches (they grow on demand).
  TransformerDecoding start_decoding(const TransformerEncoded& source, int64_t capacity = 0) const;
  // Feeds the previous target token of each row (size B) at position state.length().
  TransformerStep step(TransformerDecoding& state, const std::vector<int32_t>& ids,
                       bool return_weights = false) const;
  // log-softmax of a step's logits in float64, [B][V].
  std::vector<std::vector<double>> log_probs(const TransformerStep& step) const;
};

}  // namespace attn::seq2seq
