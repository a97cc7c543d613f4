#include "seq2seq/models/model.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <span>
#include <utility>

#include "attn/activations.h"
#include "attn/error.h"
#include "attn/random.h"
#include "seq2seq/models/tensor_ops.h"
#include "seq2seq/data/vocab.h"

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

// Dropout sites of the recurrent model. Sites that draw once per run share the run's seed and
// differ by stream; the encoder's inter-layer dropout uses streams kEncoderStream + l (nn::Rnn),
// the decoder's kDecoderLayerStream + l with a seed per time step (step_dropout_seed).
constexpr uint64_t kSourceEmbeddingStream = 1;
constexpr uint64_t kTargetEmbeddingStream = 2;
constexpr uint64_t kOutputStream = 3;
constexpr uint64_t kEncoderStream = 16;
constexpr uint64_t kDecoderLayerStream = 1024;

// Between stacked decoder layers every time step draws its own mask: a pure function of the
// run's seed and t (the step's [B, H] rows would otherwise reuse one mask at every t).
uint64_t step_dropout_seed(uint64_t run_seed, int64_t t) {
  return mix64(run_seed ^ mix64(static_cast<uint64_t>(t) + 0x2545f4914f6cdd1dULL));
}

// Which encoder layer's final state decoder layer l starts from: layer l when the stacks are
// equally deep, else the top encoder layer (model.h).
int64_t source_layer(const ModelConfig& c, int64_t decoder_layer) {
  return c.encoder_layers == c.decoder_layers ? decoder_layer : c.encoder_layers - 1;
}

// An encoder layer's final state [B, H]: the two directions side by side when bidirectional.
Tensor layer_state(const Tensor& final_states, int64_t layer, int64_t directions) {
  if (directions == 1) return final_states.select(0, layer).clone();
  return concat_columns({final_states.select(0, layer * 2), final_states.select(0, layer * 2 + 1)});
}

// The gradient of layer_state, added into d [L D, B, Hd].
void layer_state_backward(Tensor& d, const Tensor& dstate, int64_t layer, int64_t directions) {
  const int64_t hd = d.size(2);
  for (int64_t dir = 0; dir < directions; ++dir) {
    Tensor rows = d.select(0, layer * directions + dir);
    accumulate(rows, dstate.slice(1, dir * hd, (dir + 1) * hd));
  }
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

const char* copy_kind_name(CopyKind kind) {
  return kind == CopyKind::sentinel ? "sentinel" : "generator";
}

std::optional<CopyKind> parse_copy_kind(std::string_view name) {
  if (name == "generator") return CopyKind::generator;
  if (name == "sentinel") return CopyKind::sentinel;
  return std::nullopt;
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
  ATTN_CHECK(c.encoder_layers >= 1 && c.decoder_layers >= 1, kOp,
             "layers must be >= 1, got encoder ", c.encoder_layers, ", decoder ", c.decoder_layers);
  ATTN_CHECK(c.dropout >= 0.0 && c.dropout < 1.0, kOp, "dropout must be in [0, 1), got ", c.dropout);
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
  // The bottom cell reads [e; H-wide vector]: the context (Bahdanau, baseline) or o_{t-1}
  // (Luong); the cells above read the state below. Layer 0 keeps the seed of the single-cell
  // model, so a one-layer model starts from the same weights as before stacking existed.
  for (int64_t l = 0; l < config.decoder_layers; ++l) {
    const uint64_t cell_seed = l == 0 ? mix64(seed + 4) : mix64(seed + 300 + static_cast<uint64_t>(l));
    m.cells.push_back(nn::rnn_cell_init(config.rnn, l == 0 ? E + H : H, H, true, dt, cell_seed));
    m.cells_grad.push_back(nn::rnn_cell_zeros_like(m.cells.back()));
  }

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
  if (config.copy && config.copy_kind == CopyKind::generator)
    m.gate = nn::Linear::create({2 * H + E, 1, true, dt}, mix64(seed + 8));
  if (config.copy && config.copy_kind == CopyKind::sentinel) {
    m.pointer_query = nn::Linear::create({H, H, true, dt}, mix64(seed + 9));
    m.sentinel = uniform_tensor({H}, bH, dt, mix64(seed + 10), 0);
    m.sentinel_grad = nn::zeros_like(m.sentinel);
  }
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
  for (std::size_t l = 0; l < cells.size(); ++l) {
    // Layer 0 keeps the single-cell name, so checkpoints from before stacking still load.
    const std::string prefix = l == 0 ? "decoder.cell." : "decoder.cell_l" + std::to_string(l) + ".";
    const nn::RnnCellParams& v = cells[l];
    const nn::RnnCellParams& g = cells_grad[l];
    nn::add_parameter(list, prefix, "weight_ih", v.weight_ih, g.weight_ih);
    nn::add_parameter(list, prefix, "weight_hh", v.weight_hh, g.weight_hh);
    nn::add_parameter(list, prefix, "bias_ih", v.bias_ih, g.bias_ih);
    nn::add_parameter(list, prefix, "bias_hh", v.bias_hh, g.bias_hh);
  }
  Score value = score, grad = score_grad;  // copies alias the same storage
  auto values = score_fields(value);
  auto grads = score_fields(grad);
  for (std::size_t i = 0; i < values.size(); ++i)
    nn::add_parameter(list, "attention.", values[i].first, *values[i].second, *grads[i].second);
  nn::add_parameter(list, "attention.local.", "w_p", local.w_p, local_grad.w_p);
  nn::add_parameter(list, "attention.local.", "v_p", local.v_p, local_grad.v_p);
  readout.parameters("readout.", list);
  generator.parameters("generator.", list);
  if (config.copy && config.copy_kind == CopyKind::generator) gate.parameters("gate.", list);
  if (config.copy && config.copy_kind == CopyKind::sentinel) {
    pointer_query.parameters("pointer.query.", list);
    nn::add_parameter(list, "pointer.", "sentinel", sentinel, sentinel_grad);
  }
  return list;
}

void Seq2Seq::zero_grad() const { nn::zero_grads(parameters()); }

namespace {

// The one-hot copy id of each source token [B, S, V + X] over the extended vocabulary of
// batching.h (padding rows zero). The ids come from the batch (Batch::source_copy) or, for a
// batch built from ids alone, from copy_map, sentence by sentence.
Tensor copy_onehot(const Seq2Seq& m, const Batch& batch) {
  const int64_t B = batch.batch, S = batch.source_steps, V = m.config.target_vocab;
  std::vector<int32_t> copy_ids = batch.source_copy;
  if (copy_ids.empty()) {
    copy_ids.assign(B * S, static_cast<int32_t>(Vocab::pad_id));
    for (int64_t b = 0; b < B; ++b) {
      const std::span<const int32_t> row(batch.source.data() + b * S, batch.source_lengths[b]);
      const ExtendedSource e = extend_source(row, m.copy_map, V);
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
  Tensor onehot = Tensor::zeros({B, S, Vx}, m.config.dtype);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j < batch.source_lengths[b]; ++j) onehot.set({b, j, copy_ids[b * S + j]}, 1.0);
  return onehot;
}

}  // namespace

EncodedSource Seq2Seq::encode(const Batch& batch, const Seq2SeqRunOptions& options) const {
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
  const double p = options.training ? config.dropout : 0.0;
  const uint64_t run_seed = mix64(options.seed);
  src.embedding_dropout = {p, run_seed, kSourceEmbeddingStream};
  nn::RnnForward rnn = encoder.forward(nn::dropout_forward(emb.out, src.embedding_dropout),
                                       batch.source_lengths, {}, {p, run_seed, kEncoderStream});
  src.memory = rnn.out.contiguous();
  src.lengths = batch.source_lengths;
  const int64_t D = encoder.num_directions();
  for (int64_t l = 0; l < config.decoder_layers; ++l) {
    const int64_t from = source_layer(config, l);
    src.initial.h.push_back(layer_state(rnn.final.h, from, D));
    if (config.rnn == nn::RnnKind::lstm) src.initial.c.push_back(layer_state(rnn.final.c, from, D));
  }
  if (config.decoder == DecoderKind::luong)
    src.initial.feed = Tensor::zeros({B, config.hidden}, config.dtype);
  // The baseline's fixed context is the top encoder layer's state (the top decoder layer's
  // initial state under either rule).
  if (config.decoder == DecoderKind::none) src.fixed_context = src.initial.h.back();
  const int64_t H = config.hidden;
  if (config.copy) {
    const Tensor onehot = copy_onehot(*this, batch);  // [B, S, V + X]
    const int64_t Vx = onehot.size(2);
    src.extended_vocab = Vx;
    if (config.copy_kind == CopyKind::generator) {
      // values = [memory | one-hot copy id of each source token]; padding rows stay zero.
      src.values = concat_columns({src.memory.reshape({B * S, H}), onehot.reshape({B * S, Vx})})
                       .reshape({B, 1, S, H + Vx});
    } else {
      // The pointer's keys [x; memory] and values [1, 0 | 0, one-hot]: out = [g | pointer mass].
      src.values = src.memory.reshape({B, 1, S, H});
      Tensor keys = Tensor::empty({B, S + 1, H}, config.dtype);
      Tensor values = Tensor::zeros({B, S + 1, 1 + Vx}, config.dtype);
      for (int64_t b = 0; b < B; ++b) {
        keys.select(0, b).slice(0, 0, 1).copy_from(sentinel.reshape({1, H}));
        keys.select(0, b).slice(0, 1, S + 1).copy_from(src.memory.select(0, b));
        values.set({b, 0, 0}, 1.0);
        values.select(0, b).slice(0, 1, S + 1).slice(1, 1, 1 + Vx).copy_from(onehot.select(0, b));
      }
      src.pointer_keys = keys.reshape({B, 1, S + 1, H});
      src.pointer_values = values.reshape({B, 1, S + 1, 1 + Vx});
      for (const int64_t n : batch.source_lengths) src.pointer_lengths.push_back(n + 1);
    }
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
  if (m.config.copy && m.config.copy_kind == CopyKind::generator) *copy = columns(flat, H, flat.size(1));
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

// Dropout between stacked decoder layers at one time step: rate and that step's seed.
struct StepDropout {
  double p = 0.0;
  uint64_t seed = 0;
};

// The decoder cells, bottom to top, on the bottom layer's input x: layer l > 0 reads
// drop(layer l - 1's new state). Fills r.state.h / .c and the per-layer caches.
void run_stack(const Seq2Seq& m, const Tensor& x, const DecoderState& state,
               const StepDropout& dropout, StepResult& r) {
  const bool lstm = m.config.rnn == nn::RnnKind::lstm;
  const int64_t L = static_cast<int64_t>(m.cells.size());
  StepCache& cache = r.cache;
  Tensor input = x;
  for (int64_t l = 0; l < L; ++l) {
    if (l > 0) {
      cache.between.push_back({dropout.p, dropout.seed, kDecoderLayerStream + static_cast<uint64_t>(l - 1)});
      input = nn::dropout_forward(r.state.h.back(), cache.between.back());
    }
    if (lstm) {
      nn::LstmCellForward f = nn::lstm_cell_forward(m.cells[l], input, state.h[l], state.c[l]);
      r.state.h.push_back(f.h);
      r.state.c.push_back(f.c);
      cache.lstm.push_back(std::move(f.cache));
    } else {
      nn::GruCellForward f = nn::gru_cell_forward(m.cells[l], input, state.h[l]);
      r.state.h.push_back(f.h);
      cache.gru.push_back(std::move(f.cache));
    }
  }
}

// The pointer-sentinel step (model.h): fills r.gate [B, 1] = g_t and r.copy [B, V + X] = the
// pointer's mass on the source scattered to the extended ids, divided by its sum (zero when the
// sentinel holds all of it: then g_t = 1 and the copy term vanishes).
void point(const Seq2Seq& m, const EncodedSource& src, StepResult& r) {
  StepCache& cache = r.cache;
  const int64_t B = r.state.h.back().size(0), H = m.config.hidden, S1 = src.pointer_keys.size(2);
  const int64_t Vx = src.extended_vocab;
  nn::LinearForward lin = m.pointer_query.forward(r.state.h.back());
  cache.pointer_q = tanh_forward(lin.out).reshape({B, 1, 1, H});
  cache.pointer_query = std::move(lin.cache);
  cache.pointer_params.score = DotScore{};
  cache.pointer_params.mask.key_lengths = src.pointer_lengths;
  cache.pointer = attention(cache.pointer_q, src.pointer_keys, src.pointer_values, cache.pointer_params);
  const Tensor flat = cache.pointer.out.reshape({B, 1 + Vx});
  r.gate = columns(flat, 0, 1);
  r.copy = columns(flat, 1, 1 + Vx);  // contiguous copy, normalised below
  cache.pointer_mass.assign(B, 0.0);
  nn::visit_float(r.copy.dtype(), kOp, "pointer", [&](auto tag) {
    using T = decltype(tag);
    T* p = r.copy.data<T>();
    for (int64_t b = 0; b < B; ++b) {
      double mass = 0.0;
      for (int64_t v = 0; v < Vx; ++v) mass += p[b * Vx + v];
      cache.pointer_mass[b] = mass;
      for (int64_t v = 0; v < Vx; ++v) p[b * Vx + v] = mass > 0.0 ? static_cast<T>(p[b * Vx + v] / mass) : T(0);
    }
  });
}

// The pointer-sentinel step's backward from dgate [B, 1] and dcopy [B, V + X] (the gradients
// with respect to g_t and the normalised copy c = P / m, m = sum_v P_v): dP_v = (dcopy_v -
// sum_u dcopy_u c_u) / m (0 when m = 0). Adds the sentinel's and the memory's key gradients;
// returns dL/ds_t [B, H] through q_t.
Tensor point_backward(Seq2Seq& m, const EncodedSource& src, const StepCache& cache,
                      const Tensor& copy, const Tensor& dgate, const Tensor& dcopy, Tensor& dmemory) {
  const int64_t B = dcopy.size(0), Vx = dcopy.size(1), H = m.config.hidden;
  const int64_t S = src.memory.size(1);
  const std::vector<double> c = copy.to_vector(), dc = dcopy.to_vector(), dg = dgate.to_vector();
  std::vector<double> dout(static_cast<size_t>(B * (1 + Vx)), 0.0);
  for (int64_t b = 0; b < B; ++b) {
    double* row = dout.data() + b * (1 + Vx);
    row[0] = dg[b];
    const double mass = cache.pointer_mass[b];
    if (mass <= 0.0) continue;
    double dot = 0.0;
    for (int64_t v = 0; v < Vx; ++v) dot += dc[b * Vx + v] * c[b * Vx + v];
    for (int64_t v = 0; v < Vx; ++v) row[1 + v] = (dc[b * Vx + v] - dot) / mass;
  }
  const Tensor dpointer = Tensor::from(dout, {B, 1, 1, 1 + Vx}).to(m.config.dtype);
  AttentionGrads g = attention_backward(cache.pointer_q, src.pointer_keys, src.pointer_values,
                                        cache.pointer_params, cache.pointer, dpointer);
  const Tensor dk = g.dk.reshape({B, S + 1, H});
  for (int64_t b = 0; b < B; ++b) {
    accumulate(m.sentinel_grad, dk.select(0, b).select(0, 0));
    Tensor rows = dmemory.select(0, b);
    accumulate(rows, dk.select(0, b).slice(0, 1, S + 1));
  }
  const Tensor dq = tanh_backward(cache.pointer_q.reshape({B, H}), g.dq.reshape({B, H}));
  return m.pointer_query.backward(cache.pointer_query, dq);
}

StepResult step_embedded(const Seq2Seq& m, const EncodedSource& src, const DecoderState& state,
                         const Tensor& e, int64_t t, bool keep_cache, bool return_weights,
                         const StepDropout& dropout) {
  const int64_t L = static_cast<int64_t>(m.cells.size());
  ATTN_CHECK(static_cast<int64_t>(state.h.size()) == L &&
                 (m.config.rnn != nn::RnnKind::lstm || static_cast<int64_t>(state.c.size()) == L),
             kOp, "decoder state has ", state.h.size(), " layers, the model has ", L);
  StepResult r;
  StepCache& cache = r.cache;
  Tensor readout_in;
  if (m.config.decoder == DecoderKind::luong) {
    // 1. s_t = stack([e_t; o_{t-1}], s_{t-1})   2. c_t = attend(s_t)   3. o_t = tanh(W_c [c_t; s_t])
    cache.input = concat_columns({e, state.feed});
    run_stack(m, cache.input, state, dropout, r);
    const Tensor& top = r.state.h.back();
    cache.context = attend(m, src, top, t, return_weights, cache, &r.weights, &r.copy);
    readout_in = concat_columns({cache.context, top});
  } else {
    // 1. c_t = attend(s_{t-1}) (or the fixed context)   2. s_t = stack([e_t; c_t], s_{t-1})
    // 3. o_t = tanh(W_o [s_t; c_t; e_t])
    if (m.config.decoder == DecoderKind::bahdanau)
      cache.context = attend(m, src, state.h.back(), t, return_weights, cache, &r.weights, &r.copy);
    else
      cache.context = src.fixed_context;
    cache.input = concat_columns({e, cache.context});
    run_stack(m, cache.input, state, dropout, r);
    readout_in = concat_columns({r.state.h.back(), cache.context, e});
  }
  nn::LinearForward lin = m.readout.forward(readout_in);
  r.output = tanh_forward(lin.out);
  cache.readout = std::move(lin.cache);
  cache.output = r.output;
  if (m.config.decoder == DecoderKind::luong) r.state.feed = r.output;
  if (m.config.copy && m.config.copy_kind == CopyKind::sentinel) {
    // 4. The pointer over [x; memory] from q_t = tanh(W_q s_t + b_q): g_t and the copy mass.
    point(m, src, r);
  } else if (m.config.copy) {
    // 4. g_t = sigmoid(w_g [c_t; s_t; e_t] + b_g)
    nn::LinearForward g = m.gate.forward(concat_columns({cache.context, r.state.h.back(), e}));
    r.gate = g.out;
    nn::visit_float(r.gate.dtype(), kOp, "gate", [&](auto tag) {
      using T = decltype(tag);
      sigmoid_array(r.gate.data<T>(), r.gate.data<T>(), r.gate.numel());
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
  return step_embedded(*this, source, state, e.out, t, keep_cache, return_weights, {});
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

ForwardResult Seq2Seq::forward(const Batch& batch, const Seq2SeqRunOptions& options) const {
  const int64_t B = batch.batch, T = batch.target_steps, H = config.hidden;
  ATTN_CHECK(T >= 1 && static_cast<int64_t>(batch.target_input.size()) == T * B, kOp,
             "forward needs a batch with targets");
  const double p = options.training ? config.dropout : 0.0;
  const uint64_t run_seed = mix64(options.seed);
  ForwardResult f;
  f.source = encode(batch, options);
  nn::EmbeddingForward emb = target_embedding.forward({batch.target_input, {T, B}});
  f.target_dropout = {p, run_seed, kTargetEmbeddingStream};
  f.target_embedded = nn::dropout_forward(emb.out, f.target_dropout);
  f.target_embedding_cache = std::move(emb.cache);
  Tensor outputs = Tensor::empty({T, B, H}, config.dtype);
  if (config.copy) {
    f.copy = Tensor::empty({T, B, f.source.extended_vocab}, config.dtype);  // V + X
    f.gate = Tensor::empty({T, B, 1}, config.dtype);
  }
  DecoderState state = f.source.initial;
  f.steps.reserve(T);
  for (int64_t t = 0; t < T; ++t) {
    StepResult r = step_embedded(*this, f.source, state, f.target_embedded.select(0, t), t, true,
                                 false, {p, step_dropout_seed(run_seed, t)});
    outputs.select(0, t).copy_from(r.output);
    if (config.copy) {
      f.copy.select(0, t).copy_from(r.copy);
      f.gate.select(0, t).copy_from(r.gate);
    }
    state = r.state;
    f.steps.push_back(std::move(r.cache));
  }
  // One [T B, H] x [H, V] GEMM for every step's output layer, on drop(o_t).
  f.output_dropout = {p, run_seed, kOutputStream};
  nn::LinearForward gen = generator.forward(nn::dropout_forward(outputs, f.output_dropout));
  f.logits = gen.out;
  f.generator = std::move(gen.cache);
  return f;
}

void Seq2Seq::backward(const Batch& batch, const ForwardResult& f, const Tensor& dlogits,
                       const Tensor& dcopy, const Tensor& dgate) {
  const int64_t B = batch.batch, T = batch.target_steps, S = batch.source_steps;
  const int64_t H = config.hidden, E = config.embedding;
  const int64_t L = static_cast<int64_t>(cells.size());
  const bool luong = config.decoder == DecoderKind::luong;
  const bool lstm = config.rnn == nn::RnnKind::lstm;
  const bool generator_copy = config.copy && config.copy_kind == CopyKind::generator;
  const bool sentinel = config.copy && config.copy_kind == CopyKind::sentinel;
  ATTN_CHECK(dlogits.shape() == f.logits.shape(), kOp, "dlogits is ", dlogits.shape_str(),
             ", logits are ", f.logits.shape_str());
  ATTN_CHECK(!config.copy || (dcopy.defined() && dcopy.shape() == f.copy.shape() &&
                              dgate.defined() && dgate.shape() == f.gate.shape()),
             kOp, "a copying model's backward needs dcopy ", f.copy.shape_str(), " and dgate ",
             f.gate.shape_str());
  // Output layer of every step at once, then its dropout.
  const Tensor doutputs =
      nn::dropout_backward(generator.backward(f.generator, dlogits), f.output_dropout).contiguous();  // [T, B, H]
  Tensor dembedded = Tensor::zeros({T, B, E}, config.dtype);
  Tensor dmemory = Tensor::zeros({B, S, H}, config.dtype);
  Tensor dfixed;                                            // baseline's context
  // dL/ds^l_t (and the LSTM cell states') of every layer, from step t + 1.
  std::vector<Tensor> ds(L), dc(L);
  for (Tensor& d : ds) d = Tensor::zeros({B, H}, config.dtype);
  Tensor dfeed = Tensor::zeros({B, H}, config.dtype);       // dL/do_t from step t + 1 (Luong)
  for (int64_t t = T - 1; t >= 0; --t) {
    const StepCache& c = f.steps[t];
    // 3. o_t = tanh(W [..]): the output layer's gradient plus, with input feeding, step t + 1's.
    Tensor dout = doutputs.select(0, t).clone();
    if (luong) accumulate(dout, dfeed);
    const Tensor dreadout_in = readout.backward(c.readout, tanh_backward(c.output, dout));
    // The stack, top to bottom, from dL/ds_t of the top layer (which already holds step
    // t + 1's share): each layer adds its state gradient from step t + 1, and the gradient of
    // its input goes through the dropout into the layer below. Returns dx of the bottom cell.
    auto stack_backward = [&](Tensor dh_top) {
      Tensor dh = std::move(dh_top), dx;
      for (int64_t l = L - 1; l >= 0; --l) {
        if (l < L - 1) {
          dh = ds[l];
          accumulate(dh, nn::dropout_backward(dx, c.between[l]));
        }
        if (lstm) {
          nn::LstmCellGrads g = nn::lstm_cell_backward(cells[l], cells_grad[l], c.lstm[l], dh, dc[l]);
          dc[l] = g.dc_prev;
          ds[l] = g.dh_prev;
          dx = g.dx;
        } else {
          nn::GruCellGrads g = nn::gru_cell_backward(cells[l], cells_grad[l], c.gru[l], dh);
          ds[l] = g.dh_prev;
          dx = g.dx;
        }
      }
      return dx;
    };
    // 4. g_t = sigmoid(w_g [c_t; s_t; e_t] + b_g): its share of dc_t, ds_t, de_t.
    Tensor dgate_in, dcopy_t, dpointer_state;
    if (sentinel) {
      dpointer_state = point_backward(*this, f.source, c, f.copy.select(0, t).contiguous(),
                                      dgate.select(0, t).contiguous(), dcopy.select(0, t).contiguous(),
                                      dmemory);
    } else if (config.copy) {
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
      accumulate(dh, ds[L - 1]);
      if (generator_copy) {
        accumulate(dcontext, dgate_in.slice(1, 0, H));
        accumulate(dh, dgate_in.slice(1, H, 2 * H));
      }
      if (sentinel) accumulate(dh, dpointer_state);
      // 2. c_t = attend(s_t)
      accumulate(dh, attend_backward(*this, f.source, c, dcontext, dcopy_t, dmemory));
      // 1. s_t = stack([e_t; o_{t-1}], s_{t-1})
      const Tensor dx = stack_backward(std::move(dh));
      de = columns(dx, 0, E);
      dfeed = columns(dx, E, E + H);
      if (generator_copy) accumulate(de, dgate_in.slice(1, 2 * H, 2 * H + E));
    } else {
      Tensor dh = columns(dreadout_in, 0, H);
      Tensor dcontext = columns(dreadout_in, H, 2 * H);
      de = columns(dreadout_in, 2 * H, 2 * H + E);
      accumulate(dh, ds[L - 1]);
      if (generator_copy) {
        accumulate(dcontext, dgate_in.slice(1, 0, H));
        accumulate(dh, dgate_in.slice(1, H, 2 * H));
        accumulate(de, dgate_in.slice(1, 2 * H, 2 * H + E));
      }
      if (sentinel) accumulate(dh, dpointer_state);
      // 2. s_t = stack([e_t; c_t], s_{t-1})
      const Tensor dx = stack_backward(std::move(dh));
      accumulate(de, dx.slice(1, 0, E));
      accumulate(dcontext, dx.slice(1, E, E + H));
      // 1. c_t = attend(s_{t-1}) (the top layer's), or the fixed context
      if (config.decoder == DecoderKind::bahdanau)
        accumulate(ds[L - 1], attend_backward(*this, f.source, c, dcontext, dcopy_t, dmemory));
      else
        accumulate(dfixed, dcontext);
    }
    dembedded.select(0, t).copy_from(de);
  }
  target_embedding.backward(f.target_embedding_cache, nn::dropout_backward(dembedded, f.target_dropout));
  // Encoder: the decoder's initial states (and the baseline's context, the top encoder
  // layer's state) are its final states.
  if (dfixed.defined()) accumulate(ds[L - 1], dfixed);
  const int64_t Le = config.encoder_layers, D = encoder.num_directions(), Hd = H / D;
  nn::RnnState dfinal;
  dfinal.h = Tensor::zeros({Le * D, B, Hd}, config.dtype);
  if (lstm) dfinal.c = Tensor::zeros({Le * D, B, Hd}, config.dtype);
  for (int64_t l = 0; l < L; ++l) {
    layer_state_backward(dfinal.h, ds[l], source_layer(config, l), D);
    if (lstm && dc[l].defined()) layer_state_backward(dfinal.c, dc[l], source_layer(config, l), D);
  }
  nn::RnnBackward enc = encoder.backward(f.source.rnn_cache, dmemory, dfinal);
  source_embedding.backward(f.source.embedding_cache,
                            nn::dropout_backward(enc.dx, f.source.embedding_dropout));
}

}  // namespace attn::seq2seq
