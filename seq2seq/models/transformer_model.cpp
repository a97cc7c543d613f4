// The Transformer translator: embedding and position plumbing around the nn:: layer stacks.
// The backward mirrors the forward's numbered steps (transformer_model.h) in reverse.
#include "seq2seq/models/transformer_model.h"

#include <algorithm>
#include <cmath>
#include <utility>

#include "attn/error.h"
#include "attn/random.h"
#include "nn/positions.h"
#include "seq2seq/models/tensor_ops.h"
#include "seq2seq/data/vocab.h"

namespace attn::seq2seq {
namespace {

constexpr const char* kOp = "transformer_seq2seq";

// Dropout streams of the embedding sites (the layers use their own seeds, see layer_seed).
constexpr uint64_t kSourceEmbeddingStream = 1;
constexpr uint64_t kTargetEmbeddingStream = 2;

// Every layer draws its dropout masks from its own seed: a pure function of the step's seed and
// the layer's index (encoder layers first, then decoder layers).
uint64_t layer_seed(uint64_t step_seed, int64_t index) {
  return mix64(step_seed ^ mix64(static_cast<uint64_t>(index) + 0x51ed27ULL));
}

void scale_in_place(Tensor t, double factor) {
  nn::visit_float(t.dtype(), kOp, "tensor", [&](auto tag) {
    using T = decltype(tag);
    T* p = t.data<T>();
    for (int64_t i = 0, n = t.numel(); i < n; ++i) p[i] = static_cast<T>(p[i] * factor);
  });
}

// out[b, t, :] = scale * e[b, t, :] + P[offset + t, :] (P left out when `positions` is false).
Tensor scale_and_position(const Tensor& e, double scale, bool positions, int64_t offset) {
  const int64_t B = e.size(0), T = e.size(1), C = e.size(2);
  const Tensor ec = e.contiguous();
  Tensor out = Tensor::empty({B, T, C}, e.dtype());
  const Tensor table = positions ? nn::sinusoidal_positions(T, C, e.dtype(), offset) : Tensor();
  nn::visit_float(e.dtype(), kOp, "embedding", [&](auto tag) {
    using F = decltype(tag);
    const F* pe = ec.data<F>();
    const F* pp = positions ? table.data<F>() : nullptr;
    F* po = out.data<F>();
    const F s = static_cast<F>(scale);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i = 0; i < T * C; ++i)
        po[b * T * C + i] = s * pe[b * T * C + i] + (pp ? pp[i] : F(0));
  });
  return out;
}

// [T, B] time-major ids (Batch::target_input) -> [B, T] row-major.
std::vector<int32_t> batch_major(const std::vector<int32_t>& ids, int64_t T, int64_t B) {
  std::vector<int32_t> out(ids.size());
  for (int64_t t = 0; t < T; ++t)
    for (int64_t b = 0; b < B; ++b) out[b * T + t] = ids[t * B + b];
  return out;
}

}  // namespace

void TransformerDecoding::select_rows(const std::vector<int64_t>& rows) {
  for (nn::DecoderState& layer : layers) layer.select_rows(rows);
}

nn::TransformerConfig TransformerSeq2Seq::layer_config() const {
  nn::TransformerConfig c;
  c.d_model = config.hidden;
  c.num_heads = config.heads;
  c.ffn_dim = config.ffn > 0 ? config.ffn : 4 * config.hidden;
  c.activation = nn::Activation::relu;
  c.norm = config.norm;
  c.dropout = config.dropout;
  c.attention_dropout = config.dropout;
  c.causal = true;
  if (config.positions == PositionKind::rope) c.rope = nn::RopeConfig{};
  c.dtype = config.dtype;
  return c;
}

TransformerSeq2Seq TransformerSeq2Seq::create(const ModelConfig& config, uint64_t seed) {
  ATTN_CHECK(config.arch == Architecture::transformer, kOp,
             "the configuration describes a ", architecture_name(config.arch), " model");
  validate(config);
  TransformerSeq2Seq m;
  m.config = config;
  const int64_t C = config.hidden;
  const DType dt = config.dtype;
  const int32_t pad = static_cast<int32_t>(Vocab::pad_id);
  m.source_embedding = nn::Embedding::create({config.source_vocab, C, pad, dt}, mix64(seed + 1));
  m.target_embedding = nn::Embedding::create({config.target_vocab, C, pad, dt}, mix64(seed + 2));
  // N(0, 1) -> N(0, 1/C): times sqrt(C) in the forward, token vectors start with unit entries.
  scale_in_place(m.source_embedding.weight, 1.0 / std::sqrt(static_cast<double>(C)));
  scale_in_place(m.target_embedding.weight, 1.0 / std::sqrt(static_cast<double>(C)));
  const nn::TransformerConfig lc = m.layer_config();
  for (int64_t l = 0; l < config.encoder_layers; ++l)
    m.encoder.push_back(nn::EncoderLayer::create(lc, mix64(seed + 100 + static_cast<uint64_t>(l))));
  for (int64_t l = 0; l < config.decoder_layers; ++l)
    m.decoder.push_back(nn::DecoderLayer::create(lc, mix64(seed + 200 + static_cast<uint64_t>(l))));
  if (config.norm == nn::NormPlacement::pre) {
    m.encoder_norm = nn::LayerNorm::create({C, lc.norm_eps, true, dt});
    m.decoder_norm = nn::LayerNorm::create({C, lc.norm_eps, true, dt});
  }
  m.generator = nn::Linear::create({C, config.target_vocab, true, dt}, mix64(seed + 7));
  return m;
}

nn::ParameterList TransformerSeq2Seq::parameters() const {
  nn::ParameterList list;
  source_embedding.parameters("source_embedding.", list);
  target_embedding.parameters("target_embedding.", list);
  for (std::size_t l = 0; l < encoder.size(); ++l)
    encoder[l].parameters("encoder." + std::to_string(l) + ".", list);
  if (config.norm == nn::NormPlacement::pre) encoder_norm.parameters("encoder_norm.", list);
  for (std::size_t l = 0; l < decoder.size(); ++l)
    decoder[l].parameters("decoder." + std::to_string(l) + ".", list);
  if (config.norm == nn::NormPlacement::pre) decoder_norm.parameters("decoder_norm.", list);
  generator.parameters("generator.", list);
  return list;
}

void TransformerSeq2Seq::zero_grad() const { nn::zero_grads(parameters()); }

TransformerEncoded TransformerSeq2Seq::encode(const Batch& batch,
                                              const TransformerRunOptions& options) const {
  const int64_t B = batch.batch, S = batch.source_steps, C = config.hidden;
  ATTN_CHECK(B >= 1 && S >= 1 && static_cast<int64_t>(batch.source.size()) == B * S &&
                 static_cast<int64_t>(batch.source_lengths.size()) == B,
             kOp, "encode needs a batch of sources, got ", batch.source.size(), " ids for B ", B,
             " x S ", S);
  TransformerEncoded enc;
  enc.lengths = batch.source_lengths;
  // 1. x = drop(sqrt(C) E_src[source] + P). Ids past the source vocabulary (unknown words kept
  // apart for copying, batching.h) read as <unk>: this model does not copy.
  std::vector<int32_t> ids = batch.source;
  for (int32_t& id : ids)
    if (id >= config.source_vocab) id = static_cast<int32_t>(Vocab::unk_id);
  nn::EmbeddingForward emb = source_embedding.forward({std::move(ids), {B, S}});
  enc.embedding_cache = std::move(emb.cache);
  enc.embedding_dropout = {options.training ? config.dropout : 0.0, mix64(options.seed),
                           kSourceEmbeddingStream};
  Tensor x = nn::dropout_forward(
      scale_and_position(emb.out, std::sqrt(static_cast<double>(C)),
                         config.positions == PositionKind::sinusoidal, 0),
      enc.embedding_dropout);
  // 2. x = Encoder_l(x)
  for (std::size_t l = 0; l < encoder.size(); ++l) {
    nn::EncoderOptions o;
    o.lengths = batch.source_lengths;
    o.training = options.training;
    o.seed = layer_seed(options.seed, static_cast<int64_t>(l));
    nn::EncoderForward f = encoder[l].forward(x, o);
    x = f.out;
    enc.layers.push_back(std::move(f.cache));
  }
  // 3. memory = LN_e(x) / x
  if (config.norm == nn::NormPlacement::pre) {
    nn::LayerNormForward n = encoder_norm.forward(x);
    enc.norm = std::move(n.cache);
    x = n.out;
  }
  enc.memory = x;
  return enc;
}

TransformerForward TransformerSeq2Seq::forward(const Batch& batch,
                                               const TransformerRunOptions& options) const {
  const int64_t B = batch.batch, T = batch.target_steps, C = config.hidden;
  ATTN_CHECK(T >= 1 && static_cast<int64_t>(batch.target_input.size()) == T * B &&
                 static_cast<int64_t>(batch.target_lengths.size()) == B,
             kOp, "forward needs a batch with targets");
  TransformerForward f;
  // 1-3.
  f.source = encode(batch, options);
  // 4. y = drop(sqrt(C) E_tgt[target_input] + P)
  nn::EmbeddingForward emb = target_embedding.forward({batch_major(batch.target_input, T, B), {B, T}});
  f.target_embedding_cache = std::move(emb.cache);
  f.target_dropout = {options.training ? config.dropout : 0.0, mix64(options.seed),
                      kTargetEmbeddingStream};
  Tensor y = nn::dropout_forward(
      scale_and_position(emb.out, std::sqrt(static_cast<double>(C)),
                         config.positions == PositionKind::sinusoidal, 0),
      f.target_dropout);
  // 5. y = Decoder_l(y, memory)
  const int64_t first_decoder_index = static_cast<int64_t>(encoder.size());
  for (std::size_t l = 0; l < decoder.size(); ++l) {
    nn::DecoderOptions o;
    o.lengths = batch.target_lengths;
    o.memory_lengths = batch.source_lengths;
    o.training = options.training;
    o.seed = layer_seed(options.seed, first_decoder_index + static_cast<int64_t>(l));
    nn::DecoderForward d = decoder[l].forward(y, f.source.memory, o);
    y = d.out;
    f.layers.push_back(std::move(d.cache));
  }
  // 6. z = LN_d(y) / y
  if (config.norm == nn::NormPlacement::pre) {
    nn::LayerNormForward n = decoder_norm.forward(y);
    f.norm = std::move(n.cache);
    y = n.out;
  }
  // 7. logits [T, B, V]: one [T B, C] x [C, V] GEMM, time-major like Seq2Seq::forward.
  nn::LinearForward g = generator.forward(y.transpose(0, 1).contiguous());
  f.logits = g.out;
  f.generator = std::move(g.cache);
  return f;
}

void TransformerSeq2Seq::backward(const Batch& batch, const TransformerForward& f,
                                  const Tensor& dlogits) {
  const int64_t B = batch.batch, S = batch.source_steps, C = config.hidden;
  ATTN_CHECK(dlogits.defined() && dlogits.shape() == f.logits.shape() &&
                 dlogits.dtype() == f.logits.dtype(),
             kOp, "dlogits is ", dlogits.defined() ? dlogits.shape_str() : "undefined",
             ", logits are ", f.logits.shape_str());
  ATTN_CHECK(f.layers.size() == decoder.size() && f.source.layers.size() == encoder.size(), kOp,
             "backward needs the forward of this model");
  const double scale = std::sqrt(static_cast<double>(C));
  // 7. logits = z W_g^T + b_g
  Tensor dy = generator.backward(f.generator, dlogits).transpose(0, 1).contiguous();  // [B, T, C]
  // 6. z = LN_d(y)
  if (config.norm == nn::NormPlacement::pre) dy = decoder_norm.backward(f.norm, dy);
  // 5. y = Decoder_l(y, memory): the memory feeds every layer, so its gradients add up.
  Tensor dmemory = Tensor::zeros({B, S, C}, config.dtype);
  for (std::size_t l = decoder.size(); l-- > 0;) {
    const nn::DecoderGrads g = decoder[l].backward(f.layers[l], dy);
    dy = g.dx;
    accumulate(dmemory, g.dmemory);
  }
  // 4. y = drop(sqrt(C) E_tgt + P): positions are constants.
  Tensor demb = nn::dropout_backward(dy, f.target_dropout).clone();
  scale_in_place(demb, scale);
  target_embedding.backward(f.target_embedding_cache, demb);
  // 3. memory = LN_e(x)
  Tensor dx = dmemory;
  if (config.norm == nn::NormPlacement::pre) dx = encoder_norm.backward(f.source.norm, dx);
  // 2. x = Encoder_l(x)
  for (std::size_t l = encoder.size(); l-- > 0;) dx = encoder[l].backward(f.source.layers[l], dx);
  // 1. x = drop(sqrt(C) E_src + P)
  Tensor dsrc = nn::dropout_backward(dx, f.source.embedding_dropout).clone();
  scale_in_place(dsrc, scale);
  source_embedding.backward(f.source.embedding_cache, dsrc);
}

TransformerDecoding TransformerSeq2Seq::start_decoding(const TransformerEncoded& source,
                                                       int64_t capacity) const {
  TransformerDecoding state;
  for (const nn::DecoderLayer& layer : decoder)
    state.layers.push_back(layer.start_decoding(source.memory, source.lengths, capacity));
  return state;
}

TransformerStep TransformerSeq2Seq::step(TransformerDecoding& state,
                                         const std::vector<int32_t>& ids,
                                         bool return_weights) const {
  ATTN_CHECK(state.layers.size() == decoder.size(), kOp, "decoding state has ",
             state.layers.size(), " layers, the model ", decoder.size(),
             ": create it with start_decoding");
  const int64_t B = static_cast<int64_t>(ids.size()), C = config.hidden;
  const Tensor& memory_keys = state.layers.front().memory_cache.k;
  ATTN_CHECK(memory_keys.defined() && memory_keys.size(0) == B, kOp, "step got ", B,
             " token ids for a decoding state of ",
             memory_keys.defined() ? memory_keys.size(0) : 0, " rows");
  TransformerStep out;
  // 4. for one position: the new token sits at position state.length()
  const nn::EmbeddingForward emb = target_embedding.forward({ids, {B, 1}});
  Tensor y = scale_and_position(emb.out, std::sqrt(static_cast<double>(C)),
                                config.positions == PositionKind::sinusoidal, state.length());
  // 5. each layer attends over its own cache
  for (std::size_t l = 0; l < decoder.size(); ++l) {
    const bool last = l + 1 == decoder.size();
    nn::DecoderStepOutput s = decoder[l].step(state.layers[l], y, return_weights && last);
    y = s.out;
    if (return_weights && last) out.weights = s.cross_weights.reshape({B, s.cross_weights.size(2)});
  }
  // 6-7.
  if (config.norm == nn::NormPlacement::pre) y = decoder_norm.forward(y).out;
  out.logits = generator.forward(y.reshape({B, C})).out;
  return out;
}

std::vector<std::vector<double>> TransformerSeq2Seq::log_probs(const TransformerStep& step) const {
  const int64_t N = step.logits.size(0), V = step.logits.size(1);
  const std::vector<double> x = step.logits.to_vector();
  std::vector<std::vector<double>> out(N, std::vector<double>(V));
  for (int64_t n = 0; n < N; ++n) {
    const double* row = x.data() + n * V;
    const double mx = *std::max_element(row, row + V);
    double sum = 0.0;
    for (int64_t v = 0; v < V; ++v) sum += std::exp(row[v] - mx);
    const double log_z = mx + std::log(sum);
    for (int64_t v = 0; v < V; ++v) out[n][v] = row[v] - log_z;
  }
  return out;
}

}  // namespace attn::seq2seq
