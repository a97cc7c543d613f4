// Recurrent encoder-decoder translators with attention (and a no-attention baseline).
//
// Letters: B batch, S source steps, T target steps, E embedding width, H hidden width (the
// encoder's output width and the decoder's state width), V target vocabulary, A attention
// hidden width (additive / concat / local-p scoring).
//
// Encoder: Embedding + GRU or LSTM (nn::Rnn, lengths respected). Bidirectional: each direction
// has H/2 units so that the concatenated outputs (the "memory", [B, S, H]) and the concatenated
// final states (the decoder's initial state) are H wide.
//
// Decoders (a stack of L = decoder_layers GRU or LSTM cells, one step at a time; e_t is the
// embedding of the previous target token, attention is attn::attention with the B decoder rows
// as queries, Tq = 1, over the memory, keys = values = memory, mask.key_lengths = source
// lengths). stack(x, s_{t-1}) runs the cells bottom to top: layer 0 reads x, layer l > 0 reads
// drop(s^{l-1}_t); s_t is the top layer's state:
//   Bahdanau et al. 2015:  c_t = attend(s_{t-1});  s_t = stack([e_t; c_t], s_{t-1});
//                          o_t = tanh(W_o [s_t; c_t; e_t])   (the readout of section A.2.2 with
//                          tanh in place of maxout)
//   Luong et al. 2015:     s_t = stack([e_t; o_{t-1}], s_{t-1})   (input feeding into the bottom
//                          layer, o_0 = 0);  c_t = attend(s_t);  o_t = tanh(W_c [c_t; s_t]) (eq. 5)
//   none (baseline):       as Bahdanau with c_t = the encoder's final state for every t
//                          (Cho et al. 2014's fixed context).
//   p(y_t) = softmax(W_s drop(o_t) + b_s).
// The decoder's initial state: decoder layer l starts from encoder layer l's final state (both
// directions side by side) when the encoder has as many layers as the decoder, else every
// decoder layer starts from the encoder's top layer (with one decoder layer: always the top).
//
// Dropout (training only, ModelConfig::dropout = p; Zaremba et al. 2014, Luong et al. 2015,
// OpenNMT): on the source and target embeddings, between stacked encoder layers (nn::Rnn),
// between stacked decoder layers, and on o_t before the output layer (input feeding gets o_t
// undropped). The masks are counter-based (nn/dropout.h): a pure function of the run's seed
// (Seq2SeqRunOptions::seed, which the trainer derives from the training seed and the global
// step), the site and, between decoder layers, the time step; so the backward regenerates them
// and a resumed run draws the same ones. Decoding (step) never drops.
// Copy (pointer-generator, See et al. 2017; optional, attention decoders only):
//   g_t = sigmoid(w_g [c_t; s_t; e_t] + b_g)
//   p(w) = g_t softmax(W_s o_t + b_s)(w) + (1 - g_t) sum_{j: source_j maps to w} a_tj
// over the extended vocabulary of batching.h: w ranges over the V target words and X extended
// ids, and a source token maps to the target token spelt the same (names, numbers) when the
// target vocabulary has it, else to its sentence's extended id, so a word never seen in the
// target training data (a new name, a number) can still be copied. The copy ids come from the
// batch (Batch::source_copy) or, for batches built from ids alone, from copy_map and the ids
// (batching.h's extend_source; source ids >= the source vocabulary size are unknown words,
// embedded as <unk>). An extended id fed back as the previous target token is embedded as <unk>.
// The copy distribution comes out of the same attention call: the values are [memory | one-hot
// copy id of each source token] ([B, 1, S, H + V + X]), so its gradient flows through
// attention_backward like the context's.
// Copy (pointer-sentinel mixture, Merity et al. 2016; ModelConfig::copy_kind = sentinel): a
// pointer of its own over the source with one more entry, a learned sentinel vector x:
//   q_t = tanh(W_q s_t + b_q),  [a_t0 a_t1 .. a_tS] = softmax(q_t . [x; h_1 .. h_S])
// (unscaled dot products as in the paper: scaled by 1/sqrt(H), the sentinel learnt to take the
// mass far more slowly, and the translator with it, in experiment 7's quick run)
//   g_t = a_t0,  p(w) = g_t softmax(W_s o_t + b_s)(w) + sum_{j: source_j maps to w} a_tj
// (the sentinel's probability is the gate; the pointer's mass on the source is 1 - g_t). It is
// one more attn::attention call with keys [x; memory] (the sentinel first, so key_lengths + 1
// always allows it) and values [1, 0 | 0, one-hot copy id]: out = [g_t | pointer mass scattered
// to the extended ids]. StepResult::copy holds that mass divided by its sum (and gate g_t), so
// the mixture has the pointer-generator's form g s + (1 - g) copy and loss.h's
// copy_mixture_loss and log_probs serve both. The decoder's own attention keeps values = memory.
// Any scoring function of attn can drive either attention decoder; local-m (p_t = t, window
// |j - t| <= D, through Mask::allowed since each call sees one query) and local-p
// (LocalAttention::predictive) restrict the window as in Luong section 3.2.
//
// Everything runs in the dtype of the parameters (float32 to train, float64 for the
// finite-difference tests). Backward passes mirror the forward step by step (llm.c style).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "attn/attention.h"
#include "nn/dropout.h"
#include "nn/embedding.h"
#include "nn/linear.h"
#include "nn/parameters.h"
#include "nn/recurrent.h"
#include "nn/transformer.h"
#include "seq2seq/data/batching.h"

namespace attn::seq2seq {

enum class DecoderKind { bahdanau, luong, none };
// How a copying model mixes copying with the vocabulary: the pointer-generator's sigmoid gate
// (See et al. 2017) or the pointer-sentinel mixture (Merity et al. 2016).
enum class CopyKind { generator, sentinel };
const char* copy_kind_name(CopyKind kind);  // "generator", "sentinel"
std::optional<CopyKind> parse_copy_kind(std::string_view name);
enum class ScoreKind { dot, scaled_dot, general, additive, concat, cosine, location };

// The presets of `attn train --attention`: a decoder, a scoring function and a window.
enum class AttentionPreset {
  bahdanau, luong_dot, luong_general, luong_concat, location, local_m, local_p, scaled_dot,
  cosine, none
};
const char* attention_preset_name(AttentionPreset preset);  // "luong-general", ...
std::optional<AttentionPreset> parse_attention_preset(std::string_view name);
const char* decoder_kind_name(DecoderKind kind);
const char* score_kind_name(ScoreKind kind);
std::optional<DecoderKind> parse_decoder_kind(std::string_view name);
std::optional<ScoreKind> parse_score_kind(std::string_view name);

// Which translator a ModelConfig describes: the recurrent encoder-decoder of this file (Seq2Seq)
// or the Transformer (TransformerSeq2Seq, seq2seq/models/transformer_model.h).
enum class Architecture { rnn, transformer };
const char* architecture_name(Architecture arch);  // "rnn", "transformer"
std::optional<Architecture> parse_architecture(std::string_view name);
// How the Transformer sees positions: a sinusoidal table added to the embeddings, or rotary
// self-attention (RoPE; cross-attention is never rotated).
enum class PositionKind { sinusoidal, rope };
const char* position_kind_name(PositionKind kind);  // "sinusoidal", "rope"
std::optional<PositionKind> parse_position_kind(std::string_view name);

struct ModelConfig {
  Architecture arch = Architecture::rnn;
  nn::RnnKind rnn = nn::RnnKind::gru;
  DecoderKind decoder = DecoderKind::luong;
  ScoreKind score = ScoreKind::general;
  LocalKind local = LocalKind::none;
  int64_t local_half_width = 4;   // D of local-m / local-p
  int64_t source_vocab = 0;
  int64_t target_vocab = 0;
  int64_t embedding = 64;         // E
  int64_t hidden = 128;           // H (even when bidirectional)
  int64_t encoder_layers = 1;
  bool bidirectional = true;
  int64_t attention_hidden = 0;   // A; 0 means H
  int64_t max_source_steps = 64;  // longest source (with <eos>); sizes the location score
  bool copy = false;              // copying output (attention decoders only)
  CopyKind copy_kind = CopyKind::generator;  // its mixture, when copy
  // Both architectures. The defaults are the original recurrent translator's (one decoder cell,
  // no dropout); Transformer callers set both (the CLI's Transformer default is dropout 0.1).
  int64_t decoder_layers = 1;     // recurrent: stacked decoder cells; transformer: decoder layers
  double dropout = 0.0;           // training only, in [0, 1). Recurrent: embeddings, between
                                  // stacked layers, o_t; transformer: residual, FFN, embedding
                                  // and attention-weight dropout
  // Transformer only (arch == transformer). d_model is `hidden`, and `embedding` must equal it;
  // the encoder has encoder_layers layers. rnn, decoder, score, local, bidirectional,
  // attention_hidden and copy do not apply.
  int64_t heads = 4;              // must divide hidden
  int64_t ffn = 0;                // feed-forward hidden width; 0 means 4 x hidden
  nn::NormPlacement norm = nn::NormPlacement::pre;
  PositionKind positions = PositionKind::sinusoidal;
  DType dtype = DType::f32;
};

// Fills decoder, score and local from a preset.
void apply_attention_preset(ModelConfig& config, AttentionPreset preset);

// Throws attn::Error "[seq2seq] ..." for an inconsistent configuration.
void validate(const ModelConfig& config);

struct DecoderState {
  std::vector<Tensor> h;  // per decoder layer, bottom first: [B, H] each
  std::vector<Tensor> c;  // per decoder layer, LSTM only
  Tensor feed;            // [B, H], Luong's o_{t-1} (input feeding)
};

// How a forward pass runs: dropout only when training, with masks drawn from `seed`.
struct Seq2SeqRunOptions {
  bool training = false;
  uint64_t seed = 0;  // dropout seed of this run (the trainer derives one per step)
};

// What the encoder leaves for the decoder.
struct EncodedSource {
  Tensor memory;                 // [B, S, H]: keys and values of the attention
  std::vector<int64_t> lengths;  // size B
  DecoderState initial;
  Tensor fixed_context;          // [B, H], the baseline's context (the encoder's final state)
  Tensor values;                 // [B, 1, S, H (+ V + X)]: attention values (memory, and the
                                 // one-hot copy ids when the pointer-generator copies)
  int64_t extended_vocab = 0;    // V + X when copying
  // Pointer-sentinel only: keys [x; memory] [B, 1, S + 1, H], values [B, 1, S + 1, 1 + V + X]
  // and key lengths (source lengths + 1).
  Tensor pointer_keys;
  Tensor pointer_values;
  std::vector<int64_t> pointer_lengths;
  // For the backward.
  nn::EmbeddingCache embedding_cache;
  nn::DropoutSpec embedding_dropout;
  nn::RnnCache rnn_cache;
};

struct StepCache {
  Tensor input;                  // the bottom cell's input [e; c] or [e; o_{t-1}]
  std::vector<nn::GruCellCache> gru;    // per decoder layer (GRU)
  std::vector<nn::LstmCellCache> lstm;  // per decoder layer (LSTM)
  std::vector<nn::DropoutSpec> between; // dropout of layer l's output into layer l + 1 (L - 1)
  Tensor query;                  // [B, 1, 1, H]
  AttentionParams attention_params;
  AttentionOutput attention;
  Tensor context;                // [B, H]
  nn::LinearCache gate;          // copy gate input [c; s; e]
  // Pointer-sentinel: q_t's projection, q_t [B, 1, 1, H], the pointer's attention and the sum
  // of its mass on the source [B] (1 - g_t up to rounding).
  nn::LinearCache pointer_query;
  Tensor pointer_q;
  AttentionParams pointer_params;
  AttentionOutput pointer;
  std::vector<double> pointer_mass;
  nn::LinearCache readout;
  Tensor output;                 // o_t [B, H]
};

struct StepResult {
  DecoderState state;
  Tensor output;   // o_t [B, H]
  Tensor weights;  // [B, S] attention weights (undefined for the baseline)
  Tensor copy;     // [B, V + X] copy distribution over the extended vocabulary, when copying
  Tensor gate;     // [B, 1] g_t, when copying
  StepCache cache;
};

struct ForwardResult {
  Tensor logits;  // [T, B, V]
  Tensor copy;    // [T, B, V + X], when copying
  Tensor gate;    // [T, B, 1], when copying
  EncodedSource source;
  std::vector<StepCache> steps;
  nn::EmbeddingCache target_embedding_cache;
  Tensor target_embedded;  // [T, B, E], after dropout
  nn::DropoutSpec target_dropout;
  nn::DropoutSpec output_dropout;  // on o_t before the output layer
  nn::LinearCache generator;
};

struct Seq2Seq {
  ModelConfig config;
  nn::Embedding source_embedding;
  nn::Embedding target_embedding;
  nn::Rnn encoder;
  std::vector<nn::RnnCellParams> cells;       // decoder cells, bottom first (decoder_layers)
  std::vector<nn::RnnCellParams> cells_grad;
  Score score;                  // the scoring function's parameters
  Score score_grad;
  LocalAttention local;         // w_p, v_p for local-p
  LocalAttention local_grad;
  nn::Linear readout;           // W_o / W_c: [H, readout inputs]
  nn::Linear generator;         // W_s: [V, H]
  nn::Linear gate;              // w_g: [1, 2H + E], pointer-generator
  nn::Linear pointer_query;     // W_q: [H, H], pointer-sentinel
  Tensor sentinel;              // x: [H], pointer-sentinel
  Tensor sentinel_grad;
  // Source id -> target id of the same token (<unk> when the target vocabulary lacks it, which
  // makes the token an extended id); set with set_copy_map before a copying model runs. Used
  // for batches without Batch::source_copy (decoding from ids).
  std::vector<int32_t> copy_map;

  void set_copy_map(const std::vector<std::string>& source_tokens,
                    const std::vector<std::string>& target_tokens);

  static Seq2Seq create(const ModelConfig& config, uint64_t seed);

  // Names: source_embedding.weight, target_embedding.weight, encoder.weight_ih_l0, ...,
  // decoder.cell.weight_ih, ... (layer 0; layer l > 0: decoder.cell_l<l>.weight_ih, ...),
  // attention.<score field>, attention.local.w_p / v_p,
  // readout.weight / bias, generator.weight / bias, gate.weight / bias (pointer-generator),
  // pointer.query.weight / bias and pointer.sentinel (pointer-sentinel).
  nn::ParameterList parameters() const;
  void zero_grad() const;

  // Encoder on a batch's sources (dropout when options.training).
  EncodedSource encode(const Batch& batch, const Seq2SeqRunOptions& options = {}) const;
  // One decoder step: `ids` are the previous target tokens (size B), `t` the step index (for
  // local-m). Keeps the cache for a backward when `keep_cache`.
  StepResult step(const EncodedSource& source, const DecoderState& state,
                  const std::vector<int32_t>& ids, int64_t t, bool keep_cache,
                  bool return_weights = false) const;
  // Output layer: o [N, H] -> logits [N, V].
  Tensor logits(const Tensor& output) const;
  // log p(w) of a step's output [B][V] in float64: log-softmax of the logits, or the log of the
  // copy mixture over [B][V + X] (-inf for the extended ids a sentence does not have).
  std::vector<std::vector<double>> log_probs(const StepResult& step) const;

  // Teacher-forced forward over a whole batch (target_input as decoder inputs); dropout when
  // options.training.
  ForwardResult forward(const Batch& batch, const Seq2SeqRunOptions& options = {}) const;
  // dlogits [T, B, V]: accumulates every parameter's gradient. Copying models also take
  // dcopy [T, B, V + X] and dgate [T, B, 1] (loss.h's copy_mixture_loss, with
  // Batch::target_copy as the targets).
  void backward(const Batch& batch, const ForwardResult& forward, const Tensor& dlogits,
                const Tensor& dcopy = {}, const Tensor& dgate = {});
};

}  // namespace attn::seq2seq
