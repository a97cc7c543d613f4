#include "seq2seq/model.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <span>
#include <utility>

#include "attn/error.h"
#include "attn/random.h"
#include "seq2seq/tensor_ops.h"
#include "seq2seq/vocab.h"

namespace attn::seq2seq {
namespace {

constexpr const char* kOp = "seq2seq";

struct PresetInfo {
  AttentionPreset preset;
  const char* name;
  DecoderKind decoder;
  ScoreKind score;
  LocalKind local;
};
constexpr PresetInfo kPresets[] = {
    {AttentionPreset::bahdanau, "bahdanau", DecoderKind::bahdanau, ScoreKind::additive, LocalKind::none},
    {AttentionPreset::luong_dot, "luong-dot", DecoderKind::luong, ScoreKind::dot, LocalKind::none},
    {AttentionPreset::luong_general, "luong-general", DecoderKind::luong, ScoreKind::general, LocalKind::none},
    {AttentionPreset::luong_concat, "luong-concat", DecoderKind::luong, ScoreKind::concat, LocalKind::none},
    {AttentionPreset::location, "location", DecoderKind::luong, ScoreKind::location, LocalKind::none},
    {AttentionPreset::local_m, "local-m", DecoderKind::luong, ScoreKind::general, LocalKind::monotonic},
    {AttentionPreset::local_p, "local-p", DecoderKind::luong, ScoreKind::general, LocalKind::predictive},
    {AttentionPreset::scaled_dot, "scaled-dot", DecoderKind::luong, ScoreKind::scaled_dot, LocalKind::none},
    {AttentionPreset::cosine, "cosine", DecoderKind::luong, ScoreKind::cosine, LocalKind::none},
    {AttentionPreset::none, "none", DecoderKind::none, ScoreKind::dot, LocalKind::none},
};

const PresetInfo& preset_info(AttentionPreset preset) {
  for (const PresetInfo& p : kPresets)
    if (p.preset == preset) return p;
  throw Error(kOp, "unknown attention preset");
}

// The learnable tensors of a scoring function, in a fixed order, with their names.
std::vector<std::pair<std::string, Tensor*>> score_fields(Score& score) {
  std::vector<std::pair<std::string, Tensor*>> out;
  std::visit(
      [&](auto& s) {
        using S = std::decay_t<decltype(s)>;
        if constexpr (std::is_same_v<S, GeneralScore>) {
          out = {{"weight", &s.weight}};
        } else if constexpr (std::is_same_v<S, AdditiveScore>) {
          out = {{"w_query", &s.w_query}, {"w_key", &s.w_key}, {"bias", &s.bias}, {"v", &s.v}};
        } else if constexpr (std::is_same_v<S, ConcatScore>) {
          out = {{"weight", &s.weight}, {"v", &s.v}};
        } else if constexpr (std::is_same_v<S, CosineScore>) {
          out = {{"tau", &s.tau}};
        } else if constexpr (std::is_same_v<S, LocationScore>) {
          out = {{"weight", &s.weight}};
        }
      },
      score);
  return out;
}

Tensor uniform_tensor(const Shape& shape, double bound, DType dtype, uint64_t seed, uint64_t stream) {
  Tensor t = Tensor::empty(shape, dtype);
  nn::init_uniform(t, -bound, bound, seed, stream);
  return t;
}

// The decoder's initial state from the encoder's final states of its top layer: the two
// directions side by side when bidirectional.
Tensor top_layer_state(const Tensor& final_states, int64_t layers, int64_t directions) {
  if (directions == 1) return final_states.select(0, layers - 1).clone();
  return concat_columns({final_states.select(0, (layers - 1) * 2),
                         final_states.select(0, (layers - 1) * 2 + 1)});
}

// The gradient of top_layer_state into a [L D, B, Hd] tensor of zeros elsewhere.
Tensor top_layer_state_backward(const Tensor& dstate, int64_t layers, int64_t directions,
                                int64_t batch, int64_t hd) {
  Tensor d = Tensor::zeros({layers * directions, batch, hd}, dstate.dtype());
  for (int64_t dir = 0; dir < directions; ++dir)
    d.select(0, (layers - 1) * directions + dir).copy_from(dstate.slice(1, dir * hd, (dir + 1) * hd));
  return d;
}

}  // namespace

const char* attention_preset_name(AttentionPreset preset) { return preset_info(preset).name; }

std::optional<AttentionPreset> parse_attention_preset(std::string_view name) {
  for (const PresetInfo& p : kPresets)
    if (name == p.name) return p.preset;
  return std::nullopt;
}

const char* decoder_kind_name(DecoderKind kind) {
  switch (kind) {
    case DecoderKind::bahdanau: return "bahdanau";
    case DecoderKind::luong: return "luong";
    case DecoderKind::none: return "none";
  }
  return "?";
}

const char* architecture_name(Architecture arch) {
  return arch == Architecture::transformer ? "transformer" : "rnn";
}

std::optional<Architecture> parse_architecture(std::string_view name) {
  for (Architecture a : {Architecture::rnn, Architecture::transformer})
    if (name == architecture_name(a)) return a;
  return std::nullopt;
}

const char* position_kind_name(PositionKind kind) {
  return kind == PositionKind::rope ? "rope" : "sinusoidal";
}

std::optional<PositionKind> parse_position_kind(std::string_view name) {
  for (PositionKind k : {PositionKind::sinusoidal, PositionKind::rope})
    if (name == position_kind_name(k)) return k;
  return std::nullopt;
}

const char* score_kind_name(ScoreKind kind) {
  switch (kind) {
    case ScoreKind::dot: return "dot";
    case ScoreKind::scaled_dot: return "scaled_dot";
    case ScoreKind::general: return "general";
    case ScoreKind::additive: return "additive";
    case ScoreKind::concat: return "concat";
    case ScoreKind::cosine: return "cosine";
    case ScoreKind::location: return "location";
  }
  return "?";
}

std::optional<DecoderKind> parse_decoder_kind(std::string_view name) {
  for (DecoderKind k : {DecoderKind::bahdanau, DecoderKind::luong, DecoderKind::none})
    if (name == decoder_kind_name(k)) return k;
  return std::nullopt;
}

std::optional<ScoreKind> parse_score_kind(std::string_view name) {
  for (ScoreKind k : {ScoreKind::dot, ScoreKind::scaled_dot, ScoreKind::general,
                      ScoreKind::additive, ScoreKind::concat, ScoreKind::cosine,
                      ScoreKind::location})
    if (name == score_kind_name(k)) return k;
  return std::nullopt;
}

void apply_attention_preset(ModelConfig& config, AttentionPreset preset) {
  const PresetInfo& p = preset_info(preset);
  config.decoder = p.decoder;
  config.score = p.score;
  config.local = p.local;
}

void validate(const ModelConfig& c) {
  ATTN_CHECK(c.source_vocab > Vocab::num_special && c.target_vocab > Vocab::num_special, kOp,
             "vocabularies must hold more than the ", Vocab::num_special,
             " special tokens, got source ", c.source_vocab, ", target ", c.target_vocab);
  if (c.arch == Architecture::transformer) {
    // The recurrent fields (bidirectional, scoring, copy) do not apply; the Transformer's do.
    ATTN_CHECK(c.hidden >= 1 && c.heads >= 1 && c.hidden % c.heads == 0, kOp,
               "transformer heads (", c.heads, ") must be >= 1 and divide hidden = d_model (",
               c.hidden, ")");
    ATTN_CHECK(c.embedding == c.hidden, kOp, "transformer embeddings are d_model wide: embedding (",
               c.embedding, ") must equal hidden (", c.hidden, ")");
    ATTN_CHECK(c.encoder_layers >= 1 && c.decoder_layers >= 1, kOp,
               "transformer layers must be >= 1, got encoder ", c.encoder_layers, ", decoder ",
               c.decoder_layers);
    ATTN_CHECK(c.ffn >= 0, kOp, "transformer ffn width must be >= 0 (0 = 4 x hidden), got ", c.ffn);
    ATTN_CHECK(c.dropout >= 0.0 && c.dropout < 1.0, kOp, "dropout must be in [0, 1), got ",
               c.dropout);
    ATTN_CHECK(c.positions != PositionKind::rope || (c.hidden / c.heads) % 2 == 0, kOp,
               "rope rotates feature pairs: hidden / heads = ", c.hidden / c.heads,
               " must be even");
    ATTN_CHECK(!c.copy, kOp, "the transformer has no copy mechanism");
    ATTN_CHECK(c.max_source_steps >= 2, kOp, "max source steps must be >= 2, got ",
               c.max_source_steps);
    ATTN_CHECK(c.dtype == DType::f32 || c.dtype == DType::f64, kOp,
               "dtype must be float32 or float64");
    return;
  }
  ATTN_CHECK(c.embedding >= 1 && c.hidden >= 1, kOp, "embedding (", c.embedding, ") and hidden (",
             c.hidden, ") sizes must be >= 1");
  ATTN_CHECK(!c.bidirectional || c.hidden % 2 == 0, kOp,
             "a bidirectional encoder splits hidden into two directions: hidden must be even, got ",
             c.hidden);
  ATTN_CHECK(c.encoder_layers >= 1, kOp, "encoder layers must be >= 1, got ", c.encoder_layers);
  ATTN_CHECK(c.attention_hidden >= 0, kOp, "attention hidden must be >= 0, got ", c.attention_hidden);
  ATTN_CHECK(c.max_source_steps >= 2, kOp, "max source steps must be >= 2, got ", c.max_source_steps);
  ATTN_CHECK(c.local == LocalKind::none || c.local_half_width >= 1, kOp,
             "local attention needs a half width >= 1, got ", c.local_half_width);
  ATTN_CHECK(c.dtype == DType::f32 || c.dtype == DType::f64, kOp, "dtype must be float32 or float64");
  ATTN_CHECK(!c.copy || c.decoder != DecoderKind::none, kOp,
             "copying needs attention weights: the no-attention baseline cannot copy");
}

Seq2Seq Seq2Seq::create(const ModelConfig& config, uint64_t seed) {
  validate(config);
  Seq2Seq m;
  m.config = config;
  const int64_t E = config.embedding, H = config.hidden;
  const int64_t A = config.attention_hidden > 0 ? config.attention_hidden : H;
  const DType dt = config.dtype;
  const int32_t pad = static_cast<int32_t>(Vocab::pad_id);
  m.source_embedding = nn::Embedding::create({config.source_vocab, E, pad, dt}, mix64(seed + 1));
  m.target_embedding = nn::Embedding::create({config.target_vocab, E, pad, dt}, mix64(seed + 2));
  const int64_t D = config.bidirectional ? 2 : 1;
  m.encoder = nn::Rnn::create({config.rnn, E, H / D, config.encoder_layers, config.bidirectional,
                               true, dt},
                              mix64(seed + 3));
  // Both decoders read [e; H-wide vector]: the context (Bahdanau, baseline) or o_{t-1} (Luong).
  m.cell = nn::rnn_cell_init(config.rnn, E + H, H, true, dt, mix64(seed + 4));
  m.cell_grad = nn::rnn_cell_zeros_like(m.cell);

  const uint64_t s5 = mix64(seed + 5);
  const double bH = 1.0 / std::sqrt(static_cast<double>(H));
  const double bA = 1.0 / std::sqrt(static_cast<double>(A));
  switch (config.score) {
    case ScoreKind::dot: m.score = DotScore{}; break;
    case ScoreKind::scaled_dot: m.score = ScaledDotScore{}; break;
    case ScoreKind::general: m.score = GeneralScore{uniform_tensor({H, H}, bH, dt, s5, 0), {}, {}}; break;
    case ScoreKind::additive:
      m.score = AdditiveScore{uniform_tensor({A, H}, bH, dt, s5, 1), uniform_tensor({A, H}, bH, dt, s5, 2),
                              uniform_tensor({A}, bH, dt, s5, 3), uniform_tensor({A}, bA, dt, s5, 4)};
      break;
    case ScoreKind::concat:
      m.score = ConcatScore{uniform_tensor({A, 2 * H}, bH / std::sqrt(2.0), dt, s5, 5),
                            uniform_tensor({A}, bA, dt, s5, 6)};
      break;
    case ScoreKind::cosine:
      // tau starts where a softmax over cosines in [-1, 1] can already be fairly peaked.
      m.score = CosineScore{Tensor::full({1}, 5.0, dt)};
      break;
    case ScoreKind::location:
      m.score = LocationScore{uniform_tensor({config.max_source_steps, H}, bH, dt, s5, 7)};
      break;
  }
  m.score_grad = m.score;
  for (auto& [name, field] : score_fields(m.score_grad)) *field = nn::zeros_like(*field);
  if (config.local != LocalKind::none) {
    m.local.kind = config.local;
    m.local.half_width = config.local_half_width;
    if (config.local == LocalKind::predictive) {
      m.local.w_p = uniform_tensor({A, H}, bH, dt, s5, 8);
      m.local.v_p = uniform_tensor({A}, bA, dt, s5, 9);
      m.local_grad.w_p = nn::zeros_like(m.local.w_p);
      m.local_grad.v_p = nn::zeros_like(m.local.v_p);
    }
  }
  const int64_t readout_in = config.decoder == DecoderKind::luong ? 2 * H : 2 * H + E;
  m.readout = nn::Linear::create({readout_in, H, true, dt}, mix64(seed + 6));
  m.generator = nn::Linear::create({H, config.target_vocab, true, dt}, mix64(seed + 7));
  if (config.copy) m.gate = nn::Linear::create({2 * H + E, 1, true, dt}, mix64(seed + 8));
  // Until set_copy_map: the special tokens map to themselves, every word to <unk> (which makes
  // it an extended id).
  m.copy_map.assign(config.source_vocab, static_cast<int32_t>(Vocab::unk_id));
  for (int32_t id = 0; id < Vocab::num_special; ++id) m.copy_map[id] = id;
  return m;
}

void Seq2Seq::set_copy_map(const std::vector<std::string>& source_tokens,
                           const std::vector<std::string>& target_tokens) {
  ATTN_CHECK(static_cast<int64_t>(source_tokens.size()) == config.source_vocab &&
                 static_cast<int64_t>(target_tokens.size()) == config.target_vocab,
             kOp, "copy map: vocabularies of ", source_tokens.size(), " and ", target_tokens.size(),
             " tokens, the model has ", config.source_vocab, " and ", config.target_vocab);
  const Vocab target = Vocab::from_tokens(target_tokens);
  copy_map.resize(source_tokens.size());
  for (std::size_t i = 0; i < source_tokens.size(); ++i)
    copy_map[i] = static_cast<int32_t>(target.id(source_tokens[i]));
}

nn::ParameterList Seq2Seq::parameters() const {
  nn::ParameterList list;
  source_embedding.parameters("source_embedding.", list);
  target_embedding.parameters("target_embedding.", list);
  encoder.parameters("encoder.", list);
  nn::add_parameter(list, "decoder.cell.", "weight_ih", cell.weight_ih, cell_grad.weight_ih);
  nn::add_parameter(list, "decoder.cell.", "weight_hh", cell.weight_hh, cell_grad.weight_hh);
  nn::add_parameter(list, "decoder.cell.", "bias_ih", cell.bias_ih, cell_grad.bias_ih);
  nn::add_parameter(list, "decoder.cell.", "bias_hh", cell.bias_hh, cell_grad.bias_hh);
  Score value = score, grad = score_grad;  // copies alias the same storage
  auto values = score_fields(value);
  auto grads = score_fields(grad);
  for (std::size_t i = 0; i < values.size(); ++i)
    nn::add_parameter(list, "attention.", values[i].first, *values[i].second, *grads[i].second);
  nn::add_parameter(list, "attention.local.", "w_p", local.w_p, local_grad.w_p);
  nn::add_parameter(list, "attention.local.", "v_p", local.v_p, local_grad.v_p);
  readout.parameters("readout.", list);
  generator.parameters("generator.", list);
  if (config.copy) gate.parameters("gate.", list);
  return list;
}

void Seq2Seq::zero_grad() const { nn::zero_grads(parameters()); }

EncodedSource Seq2Seq::encode(const Batch& batch) const {
  const int64_t B = batch.batch, S = batch.source_steps;
  ATTN_CHECK(S <= config.max_source_steps || config.score != ScoreKind::location, kOp,
             "source of ", S, " steps is longer than the model's maximum of ",
             config.max_source_steps);
  EncodedSource src;
  // Unknown source words may come as ids >= the source vocabulary (batching.h's
  // encode_source_words, for copying): their embedding is <unk>'s.
  std::vector<int32_t> embedded_ids = batch.source;
  for (int32_t& id : embedded_ids)
    if (id >= config.source_vocab) id = static_cast<int32_t>(Vocab::unk_id);
  nn::EmbeddingForward emb = source_embedding.forward({std::move(embedded_ids), {B, S}});
  nn::RnnForward rnn = encoder.forward(emb.out, batch.source_lengths);
  src.memory = rnn.out.contiguous();
  src.lengths = batch.source_lengths;
  const int64_t L = config.encoder_layers, D = encoder.num_directions();
  src.initial.h = top_layer_state(rnn.final.h, L, D);
  if (config.rnn == nn::RnnKind::lstm) src.initial.c = top_layer_state(rnn.final.c, L, D);
  if (config.decoder == DecoderKind::luong)
    src.initial.feed = Tensor::zeros({B, config.hidden}, config.dtype);
  if (config.decoder == DecoderKind::none) src.fixed_context = src.initial.h;
  const int64_t H = config.hidden;
  if (config.copy) {
    // values = [memory | one-hot copy id of each source token] over the extended vocabulary of
    // V + X ids (batching.h); padding rows stay zero.
    const int64_t V = config.target_vocab;
    std::vector<int32_t> copy_ids = batch.source_copy;
    if (copy_ids.empty()) {
      // A batch built from ids: the copy ids follow from copy_map, sentence by sentence.
      copy_ids.assign(B * S, static_cast<int32_t>(Vocab::pad_id));
      for (int64_t b = 0; b < B; ++b) {
        const std::span<const int32_t> row(batch.source.data() + b * S, batch.source_lengths[b]);
        const ExtendedSource e = extend_source(row, copy_map, V);
        std::copy(e.copy_ids.begin(), e.copy_ids.end(), copy_ids.begin() + b * S);
      }
    }
    ATTN_CHECK(static_cast<int64_t>(copy_ids.size()) == B * S, kOp, "batch has ",
               copy_ids.size(), " source copy ids for ", B, " x ", S, " source tokens");
    int64_t Vx = V;
    for (int64_t b = 0; b < B; ++b)
      for (int64_t j = 0; j < batch.source_lengths[b]; ++j) {
        const int32_t id = copy_ids[b * S + j];
        ATTN_CHECK(id >= 0, kOp, "negative copy id ", id, " at source row ", b, ", position ", j);
        Vx = std::max<int64_t>(Vx, int64_t{id} + 1);
      }
    Tensor onehot = Tensor::zeros({B, S, Vx}, config.dtype);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t j = 0; j < batch.source_lengths[b]; ++j) onehot.set({b, j, copy_ids[b * S + j]}, 1.0);
    src.values = concat_columns({src.memory.reshape({B * S, H}), onehot.reshape({B * S, Vx})})
                     .reshape({B, 1, S, H + Vx});
  } else {
    src.values = src.memory.reshape({B, 1, S, H});
  }
  src.embedding_cache = std::move(emb.cache);
  src.rnn_cache = std::move(rnn.cache);
  return src;
}

namespace {

// attend(query) over the memory; fills the cache fields the backward needs. Returns the context
// [B, H]; `copy` receives the copy distribution [B, V] when the model copies.
Tensor attend(const Seq2Seq& m, const EncodedSource& src, const Tensor& query, int64_t t,
              bool return_weights, StepCache& cache, Tensor* weights, Tensor* copy) {
  const int64_t B = query.size(0), H = query.size(1), S = src.memory.size(1);
  AttentionParams params;
  params.score = m.score;
  params.mask.key_lengths = src.lengths;
  params.return_weights = return_weights;
  if (m.config.local == LocalKind::monotonic) {
    // local-m: p_t = t. Each call holds one query row, so the window goes in as an explicit
    // [B, 1, 1, S] mask rather than Mask::local (whose p_i is the row index).
    Tensor allowed = Tensor::zeros({B, 1, 1, S}, DType::b8);
    bool* a = allowed.data<bool>();
    for (int64_t b = 0; b < B; ++b)
      for (int64_t j = 0; j < S; ++j) a[b * S + j] = std::llabs(j - t) <= m.config.local_half_width;
    params.mask.allowed = allowed;
  } else if (m.config.local == LocalKind::predictive) {
    params.mask.local = m.local;
  }
  const Tensor q = query.contiguous().reshape({B, 1, 1, H});
  const Tensor k = src.memory.reshape({B, 1, S, H});
  AttentionOutput out = attention(q, k, src.values, params);
  if (weights && return_weights) *weights = out.weights.reshape({B, S});
  const Tensor flat = out.out.reshape({B, out.out.size(-1)});
  Tensor context = columns(flat, 0, H);
  if (m.config.copy) *copy = columns(flat, H, flat.size(1));
  cache.query = q;
  cache.attention_params = std::move(params);
  cache.attention = std::move(out);
  return context;
}

void accumulate_score_grads(Seq2Seq& m, AttentionGrads& g) {
  auto dst = score_fields(m.score_grad);
  auto src = score_fields(g.dscore);
  ATTN_CHECK(dst.size() == src.size(), kOp, "attention returned gradients for ", src.size(),
             " score tensors, the model has ", dst.size());
  for (std::size_t i = 0; i < dst.size(); ++i)
    if (src[i].second->defined()) accumulate(*dst[i].second, *src[i].second);
  if (m.config.local == LocalKind::predictive) {
    if (g.dlocal.w_p.defined()) accumulate(m.local_grad.w_p, g.dlocal.w_p);
    if (g.dlocal.v_p.defined()) accumulate(m.local_grad.v_p, g.dlocal.v_p);
  }
}

// dcontext (and dcopy when copying) -> dquery (returned, [B, H]); adds dk + dv into dmemory
// and the score gradients. The one-hot copy values are constants: their gradient is dropped.
Tensor attend_backward(Seq2Seq& m, const EncodedSource& src, const StepCache& cache,
                       const Tensor& dcontext, const Tensor& dcopy, Tensor& dmemory) {
  const int64_t B = dcontext.size(0), H = dcontext.size(1), S = src.memory.size(1);
  const int64_t Dv = src.values.size(-1);
  const Tensor k = src.memory.reshape({B, 1, S, H});
  const Tensor dout = dcopy.defined() ? concat_columns({dcontext, dcopy}) : dcontext.contiguous();
  AttentionGrads g = attention_backward(cache.query, k, src.values, cache.attention_params,
                                        cache.attention, dout.reshape({B, 1, 1, Dv}));
  accumulate(dmemory, g.dk.reshape({B, S, H}));
  if (Dv == H)
    accumulate(dmemory, g.dv.reshape({B, S, H}));
  else
    accumulate(dmemory, g.dv.reshape({B * S, Dv}).slice(1, 0, H).reshape({B, S, H}));
  accumulate_score_grads(m, g);
  return g.dq.reshape({B, H}).contiguous();
}

StepResult step_embedded(const Seq2Seq& m, const EncodedSource& src, const DecoderState& state,
                         const Tensor& e, int64_t t, bool keep_cache, bool return_weights) {
  StepResult r;
  StepCache& cache = r.cache;
  const bool lstm = m.config.rnn == nn::RnnKind::lstm;
  auto run_cell = [&](const Tensor& x, const Tensor& h_prev, const Tensor& c_prev) {
    if (lstm) {
      nn::LstmCellForward f = nn::lstm_cell_forward(m.cell, x, h_prev, c_prev);
      r.state.h = f.h;
      r.state.c = f.c;
      cache.lstm = std::move(f.cache);
    } else {
      nn::GruCellForward f = nn::gru_cell_forward(m.cell, x, h_prev);
      r.state.h = f.h;
      cache.gru = std::move(f.cache);
    }
  };
  Tensor readout_in;
  if (m.config.decoder == DecoderKind::luong) {
    // 1. s_t = cell([e_t; o_{t-1}], s_{t-1})   2. c_t = attend(s_t)   3. o_t = tanh(W_c [c_t; s_t])
    cache.input = concat_columns({e, state.feed});
    run_cell(cache.input, state.h, state.c);
    cache.context = attend(m, src, r.state.h, t, return_weights, cache, &r.weights, &r.copy);
    readout_in = concat_columns({cache.context, r.state.h});
  } else {
    // 1. c_t = attend(s_{t-1}) (or the fixed context)   2. s_t = cell([e_t; c_t], s_{t-1})
    // 3. o_t = tanh(W_o [s_t; c_t; e_t])
    if (m.config.decoder == DecoderKind::bahdanau)
      cache.context = attend(m, src, state.h, t, return_weights, cache, &r.weights, &r.copy);
    else
      cache.context = src.fixed_context;
    cache.input = concat_columns({e, cache.context});
    run_cell(cache.input, state.h, state.c);
    readout_in = concat_columns({r.state.h, cache.context, e});
  }
  nn::LinearForward lin = m.readout.forward(readout_in);
  r.output = tanh_forward(lin.out);
  cache.readout = std::move(lin.cache);
  cache.output = r.output;
  if (m.config.decoder == DecoderKind::luong) r.state.feed = r.output;
  if (m.config.copy) {
    // 4. g_t = sigmoid(w_g [c_t; s_t; e_t] + b_g)
    nn::LinearForward g = m.gate.forward(concat_columns({cache.context, r.state.h, e}));
    r.gate = g.out;
    nn::visit_float(r.gate.dtype(), kOp, "gate", [&](auto tag) {
      using T = decltype(tag);
      T* p = r.gate.data<T>();
      for (int64_t i = 0; i < r.gate.numel(); ++i) p[i] = T(1) / (T(1) + std::exp(-p[i]));
    });
    cache.gate = std::move(g.cache);
  }
  if (!keep_cache) r.cache = StepCache{};
  return r;
}

}  // namespace

StepResult Seq2Seq::step(const EncodedSource& source, const DecoderState& state,
                         const std::vector<int32_t>& ids, int64_t t, bool keep_cache,
                         bool return_weights) const {
  ATTN_CHECK(static_cast<int64_t>(ids.size()) == source.memory.size(0), kOp, "step got ",
             ids.size(), " token ids for a batch of ", source.memory.size(0));
  // An extended id (a copied unknown word) goes back into the decoder as <unk>.
  std::vector<int32_t> embedded_ids = ids;
  for (int32_t& id : embedded_ids)
    if (id >= config.target_vocab) id = static_cast<int32_t>(Vocab::unk_id);
  nn::EmbeddingForward e = target_embedding.forward({std::move(embedded_ids), {static_cast<int64_t>(ids.size())}});
  return step_embedded(*this, source, state, e.out, t, keep_cache, return_weights);
}

Tensor Seq2Seq::logits(const Tensor& output) const { return generator.forward(output).out; }

std::vector<std::vector<double>> Seq2Seq::log_probs(const StepResult& step) const {
  const Tensor lg = logits(step.output);
  const int64_t N = lg.size(0), V = lg.size(1);
  const std::vector<double> x = lg.to_vector();
  const std::vector<double> copy = config.copy ? step.copy.to_vector() : std::vector<double>();
  const std::vector<double> gate = config.copy ? step.gate.to_vector() : std::vector<double>();
  const int64_t Vx = config.copy ? step.copy.size(1) : V;  // V + X extended ids
  std::vector<std::vector<double>> out(N, std::vector<double>(Vx));
  for (int64_t n = 0; n < N; ++n) {
    const double* row = x.data() + n * V;
    double mx = row[0];
    for (int64_t v = 1; v < V; ++v) mx = std::max(mx, row[v]);
    double sum = 0.0;
    for (int64_t v = 0; v < V; ++v) sum += std::exp(row[v] - mx);
    const double log_z = mx + std::log(sum);
    for (int64_t v = 0; v < V; ++v) {
      const double logp = row[v] - log_z;
      out[n][v] = config.copy ? std::log(gate[n] * std::exp(logp) + (1.0 - gate[n]) * copy[n * Vx + v])
                              : logp;
    }
    // Extended ids: copying is the only way to them (log 0 = -inf for ids the sentence lacks).
    for (int64_t v = V; v < Vx; ++v) out[n][v] = std::log((1.0 - gate[n]) * copy[n * Vx + v]);
  }
  return out;
}

ForwardResult Seq2Seq::forward(const Batch& batch) const {
  const int64_t B = batch.batch, T = batch.target_steps, H = config.hidden;
  ATTN_CHECK(T >= 1 && static_cast<int64_t>(batch.target_input.size()) == T * B, kOp,
             "forward needs a batch with targets");
  ForwardResult f;
  f.source = encode(batch);
  nn::EmbeddingForward emb = target_embedding.forward({batch.target_input, {T, B}});
  f.target_embedded = emb.out;
  f.target_embedding_cache = std::move(emb.cache);
  Tensor outputs = Tensor::empty({T, B, H}, config.dtype);
  if (config.copy) {
    f.copy = Tensor::empty({T, B, f.source.values.size(-1) - H}, config.dtype);  // V + X
    f.gate = Tensor::empty({T, B, 1}, config.dtype);
  }
  DecoderState state = f.source.initial;
  f.steps.reserve(T);
  for (int64_t t = 0; t < T; ++t) {
    StepResult r = step_embedded(*this, f.source, state, f.target_embedded.select(0, t), t, true, false);
    outputs.select(0, t).copy_from(r.output);
    if (config.copy) {
      f.copy.select(0, t).copy_from(r.copy);
      f.gate.select(0, t).copy_from(r.gate);
    }
    state = r.state;
    f.steps.push_back(std::move(r.cache));
  }
  // One [T B, H] x [H, V] GEMM for every step's output layer.
  nn::LinearForward gen = generator.forward(outputs);
  f.logits = gen.out;
  f.generator = std::move(gen.cache);
  return f;
}

void Seq2Seq::backward(const Batch& batch, const ForwardResult& f, const Tensor& dlogits,
                       const Tensor& dcopy, const Tensor& dgate) {
  const int64_t B = batch.batch, T = batch.target_steps, S = batch.source_steps;
  const int64_t H = config.hidden, E = config.embedding;
  const bool luong = config.decoder == DecoderKind::luong;
  const bool lstm = config.rnn == nn::RnnKind::lstm;
  ATTN_CHECK(dlogits.shape() == f.logits.shape(), kOp, "dlogits is ", dlogits.shape_str(),
             ", logits are ", f.logits.shape_str());
  ATTN_CHECK(!config.copy || (dcopy.defined() && dcopy.shape() == f.copy.shape() &&
                              dgate.defined() && dgate.shape() == f.gate.shape()),
             kOp, "a copying model's backward needs dcopy ", f.copy.shape_str(), " and dgate ",
             f.gate.shape_str());
  // Output layer of every step at once.
  const Tensor doutputs = generator.backward(f.generator, dlogits).contiguous();  // [T, B, H]
  Tensor dembedded = Tensor::zeros({T, B, E}, config.dtype);
  Tensor dmemory = Tensor::zeros({B, S, H}, config.dtype);
  Tensor dfixed;                                            // baseline's context
  Tensor ds = Tensor::zeros({B, H}, config.dtype);          // dL/ds_t from step t + 1
  Tensor dc;                                                // LSTM cell state, same
  Tensor dfeed = Tensor::zeros({B, H}, config.dtype);       // dL/do_t from step t + 1 (Luong)
  for (int64_t t = T - 1; t >= 0; --t) {
    const StepCache& c = f.steps[t];
    // 3. o_t = tanh(W [..]): the output layer's gradient plus, with input feeding, step t + 1's.
    Tensor dout = doutputs.select(0, t).clone();
    if (luong) accumulate(dout, dfeed);
    const Tensor dreadout_in = readout.backward(c.readout, tanh_backward(c.output, dout));
    auto cell_backward = [&](const Tensor& dh) {
      if (lstm) {
        nn::LstmCellGrads g = nn::lstm_cell_backward(cell, cell_grad, c.lstm, dh, dc);
        dc = g.dc_prev;
        return std::make_pair(g.dx, g.dh_prev);
      }
      nn::GruCellGrads g = nn::gru_cell_backward(cell, cell_grad, c.gru, dh);
      return std::make_pair(g.dx, g.dh_prev);
    };
    // 4. g_t = sigmoid(w_g [c_t; s_t; e_t] + b_g): its share of dc_t, ds_t, de_t.
    Tensor dgate_in, dcopy_t;
    if (config.copy) {
      Tensor dz = dgate.select(0, t).clone();  // [B, 1]
      const Tensor g = f.gate.select(0, t).contiguous();
      nn::visit_float(dz.dtype(), kOp, "dgate", [&](auto tag) {
        using T = decltype(tag);
        T* d = dz.data<T>();
        const T* gp = g.data<T>();
        for (int64_t i = 0; i < dz.numel(); ++i) d[i] *= gp[i] * (T(1) - gp[i]);
      });
      dgate_in = gate.backward(c.gate, dz);
      dcopy_t = dcopy.select(0, t).contiguous();
    }
    Tensor de;
    if (luong) {
      Tensor dcontext = columns(dreadout_in, 0, H);
      Tensor dh = columns(dreadout_in, H, 2 * H);
      accumulate(dh, ds);
      if (config.copy) {
        accumulate(dcontext, dgate_in.slice(1, 0, H));
        accumulate(dh, dgate_in.slice(1, H, 2 * H));
      }
      // 2. c_t = attend(s_t)
      accumulate(dh, attend_backward(*this, f.source, c, dcontext, dcopy_t, dmemory));
      // 1. s_t = cell([e_t; o_{t-1}], s_{t-1})
      auto [dx, dh_prev] = cell_backward(dh);
      de = columns(dx, 0, E);
      dfeed = columns(dx, E, E + H);
      if (config.copy) accumulate(de, dgate_in.slice(1, 2 * H, 2 * H + E));
      ds = dh_prev;
    } else {
      Tensor dh = columns(dreadout_in, 0, H);
      Tensor dcontext = columns(dreadout_in, H, 2 * H);
      de = columns(dreadout_in, 2 * H, 2 * H + E);
      accumulate(dh, ds);
      if (config.copy) {
        accumulate(dcontext, dgate_in.slice(1, 0, H));
        accumulate(dh, dgate_in.slice(1, H, 2 * H));
        accumulate(de, dgate_in.slice(1, 2 * H, 2 * H + E));
      }
      // 2. s_t = cell([e_t; c_t], s_{t-1})
      auto [dx, dh_prev] = cell_backward(dh);
      accumulate(de, dx.slice(1, 0, E));
      accumulate(dcontext, dx.slice(1, E, E + H));
      // 1. c_t = attend(s_{t-1}), or the fixed context
      if (config.decoder == DecoderKind::bahdanau)
        accumulate(dh_prev, attend_backward(*this, f.source, c, dcontext, dcopy_t, dmemory));
      else
        accumulate(dfixed, dcontext);
      ds = dh_prev;
    }
    dembedded.select(0, t).copy_from(de);
  }
  target_embedding.backward(f.target_embedding_cache, dembedded);
  // Encoder: the decoder's initial state (and the baseline's context) are its final states.
  if (dfixed.defined()) accumulate(ds, dfixed);
  const int64_t L = config.encoder_layers, D = encoder.num_directions(), Hd = H / D;
  nn::RnnState dfinal;
  dfinal.h = top_layer_state_backward(ds, L, D, B, Hd);
  if (lstm && dc.defined()) dfinal.c = top_layer_state_backward(dc, L, D, B, Hd);
  nn::RnnBackward enc = encoder.backward(f.source.rnn_cache, dmemory, dfinal);
  source_embedding.backward(f.source.embedding_cache, enc.dx);
}

}  // namespace attn::seq2seq
