#include "seq2seq/training/train.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <cstdio>
#include <filesystem>
#include <map>
#include <numeric>
#include <type_traits>
#include <unordered_map>

#include <cblas.h>
#include <omp.h>

#include "attn/error.h"
#include "attn/profile.h"
#include "attn/random.h"
#include "seq2seq/data/corpus.h"
#include "seq2seq/models/loss.h"
#include "seq2seq/training/safetensors.h"

namespace attn::seq2seq {
namespace {

constexpr const char* kOp = "train";
constexpr const char* kFormat = "attn-seq2seq";

std::string exact(double x) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.17g", x);
  return buf;
}

using Metadata = std::map<std::string, std::string>;

void put_config(Metadata& md, const TrainConfig& c) {
  const ModelConfig& m = c.model;
  md["format"] = kFormat;
  md["version"] = "1";
  md["config.arch"] = architecture_name(m.arch);
  md["config.rnn"] = nn::rnn_kind_name(m.rnn);
  md["config.decoder"] = decoder_kind_name(m.decoder);
  md["config.score"] = score_kind_name(m.score);
  md["config.local"] = m.local == LocalKind::none ? "none"
                       : m.local == LocalKind::monotonic ? "monotonic" : "predictive";
  md["config.local_half_width"] = std::to_string(m.local_half_width);
  md["config.source_vocab"] = std::to_string(m.source_vocab);
  md["config.target_vocab"] = std::to_string(m.target_vocab);
  md["config.embedding"] = std::to_string(m.embedding);
  md["config.hidden"] = std::to_string(m.hidden);
  md["config.encoder_layers"] = std::to_string(m.encoder_layers);
  md["config.bidirectional"] = m.bidirectional ? "true" : "false";
  md["config.attention_hidden"] = std::to_string(m.attention_hidden);
  md["config.max_source_steps"] = std::to_string(m.max_source_steps);
  md["config.copy"] = m.copy ? "true" : "false";
  if (m.copy) md["config.copy_kind"] = copy_kind_name(m.copy_kind);
  md["config.decoder_layers"] = std::to_string(m.decoder_layers);
  md["config.dropout"] = exact(m.dropout);
  if (m.arch == Architecture::transformer) {
    md["config.heads"] = std::to_string(m.heads);
    md["config.ffn"] = std::to_string(m.ffn);
    md["config.norm"] = nn::norm_placement_name(m.norm);
    md["config.positions"] = position_kind_name(m.positions);
  }
  md["train.vocab_max_size"] = std::to_string(c.vocab.max_size);
  md["train.vocab_min_frequency"] = std::to_string(c.vocab.min_frequency);
  md["train.epochs"] = std::to_string(c.epochs);
  md["train.batch_size"] = std::to_string(c.batch_size);
  md["train.lr"] = exact(c.lr);
  md["train.adam_beta1"] = exact(c.adam.beta1);
  md["train.adam_beta2"] = exact(c.adam.beta2);
  md["train.adam_eps"] = exact(c.adam.eps);
  md["train.weight_decay"] = exact(c.adam.weight_decay);
  md["train.decoupled"] = c.adam.decoupled ? "true" : "false";
  md["train.schedule"] = schedule_kind_name(c.schedule.kind);
  md["train.warmup_steps"] = std::to_string(c.schedule.warmup_steps);
  md["train.total_steps"] = std::to_string(c.schedule.total_steps);
  md["train.min_ratio"] = exact(c.schedule.min_ratio);
  md["train.clip_norm"] = exact(c.clip_norm);
  md["train.label_smoothing"] = exact(c.label_smoothing);
  md["train.seed"] = std::to_string(c.seed);
  md["train.subword"] = c.subword.enabled ? subword_kind_name(c.subword.kind) : "none";
  if (c.subword.enabled) {
    md["train.subword_vocab_size"] = std::to_string(c.subword.vocab_size);
    md["train.subword_joint"] = c.subword.joint ? "true" : "false";
  }
}

class MetadataReader {
 public:
  MetadataReader(const Metadata& md, std::string source) : md_(md), source_(std::move(source)) {}
  const std::string& str(const std::string& key) const {
    auto it = md_.find(key);
    ATTN_CHECK(it != md_.end(), "checkpoint", source_, ": metadata has no \"", key, "\"");
    return it->second;
  }
  int64_t i64(const std::string& key) const {
    const std::string& s = str(key);
    try {
      std::size_t used = 0;
      const long long v = std::stoll(s, &used);
      if (used == s.size()) return v;
    } catch (const std::exception&) {
    }
    throw Error("checkpoint", source_ + ": metadata \"" + key + "\" is not an integer: " + s);
  }
  double f64(const std::string& key) const {
    const std::string& s = str(key);
    try {
      std::size_t used = 0;
      const double v = std::stod(s, &used);
      if (used == s.size()) return v;
    } catch (const std::exception&) {
    }
    throw Error("checkpoint", source_ + ": metadata \"" + key + "\" is not a number: " + s);
  }
  bool boolean(const std::string& key) const {
    const std::string& s = str(key);
    ATTN_CHECK(s == "true" || s == "false", "checkpoint", source_, ": metadata \"", key,
               "\" must be true or false, got ", s);
    return s == "true";
  }

 private:
  const Metadata& md_;
  std::string source_;
};

TrainConfig read_config(const Metadata& md, const std::string& source) {
  MetadataReader r(md, source);
  ATTN_CHECK(r.str("format") == kFormat, "checkpoint", source, ": not an ", kFormat,
             " checkpoint (format \"", r.str("format"), "\")");
  ATTN_CHECK(r.str("version") == "1", "checkpoint", source, ": unsupported version ", r.str("version"));
  TrainConfig c;
  ModelConfig& m = c.model;
  // Checkpoints written before the Transformer existed have no config.arch: recurrent.
  if (md.count("config.arch")) {
    auto arch = parse_architecture(r.str("config.arch"));
    ATTN_CHECK(arch.has_value(), "checkpoint", source, ": unknown architecture ", r.str("config.arch"));
    m.arch = *arch;
  }
  if (m.arch == Architecture::transformer || md.count("config.decoder_layers")) {
    // Recurrent checkpoints written before stacked decoders and dropout have neither key: one
    // decoder cell, no dropout (ModelConfig's defaults).
    m.decoder_layers = r.i64("config.decoder_layers");
    m.dropout = r.f64("config.dropout");
  }
  if (m.arch == Architecture::transformer) {
    m.heads = r.i64("config.heads");
    m.ffn = r.i64("config.ffn");
    const std::string norm = r.str("config.norm");
    ATTN_CHECK(norm == "pre" || norm == "post", "checkpoint", source, ": unknown norm placement ", norm);
    m.norm = norm == "pre" ? nn::NormPlacement::pre : nn::NormPlacement::post;
    auto positions = parse_position_kind(r.str("config.positions"));
    ATTN_CHECK(positions.has_value(), "checkpoint", source, ": unknown positions ",
               r.str("config.positions"));
    m.positions = *positions;
  }
  const std::string rnn = r.str("config.rnn");
  ATTN_CHECK(rnn == "gru" || rnn == "lstm", "checkpoint", source, ": unknown rnn ", rnn);
  m.rnn = rnn == "gru" ? nn::RnnKind::gru : nn::RnnKind::lstm;
  auto decoder = parse_decoder_kind(r.str("config.decoder"));
  ATTN_CHECK(decoder.has_value(), "checkpoint", source, ": unknown decoder ", r.str("config.decoder"));
  m.decoder = *decoder;
  auto score = parse_score_kind(r.str("config.score"));
  ATTN_CHECK(score.has_value(), "checkpoint", source, ": unknown score ", r.str("config.score"));
  m.score = *score;
  const std::string local = r.str("config.local");
  ATTN_CHECK(local == "none" || local == "monotonic" || local == "predictive", "checkpoint",
             source, ": unknown local attention ", local);
  m.local = local == "none" ? LocalKind::none
            : local == "monotonic" ? LocalKind::monotonic : LocalKind::predictive;
  m.local_half_width = r.i64("config.local_half_width");
  m.source_vocab = r.i64("config.source_vocab");
  m.target_vocab = r.i64("config.target_vocab");
  m.embedding = r.i64("config.embedding");
  m.hidden = r.i64("config.hidden");
  m.encoder_layers = r.i64("config.encoder_layers");
  m.bidirectional = r.boolean("config.bidirectional");
  m.attention_hidden = r.i64("config.attention_hidden");
  m.max_source_steps = r.i64("config.max_source_steps");
  m.copy = r.boolean("config.copy");
  if (m.copy && md.count("config.copy_kind")) {  // checkpoints from before the sentinel lack it
    auto kind = parse_copy_kind(r.str("config.copy_kind"));
    ATTN_CHECK(kind.has_value(), "checkpoint", source, ": unknown copy kind ", r.str("config.copy_kind"));
    m.copy_kind = *kind;
  }
  c.vocab.max_size = r.i64("train.vocab_max_size");
  c.vocab.min_frequency = r.i64("train.vocab_min_frequency");
  c.epochs = r.i64("train.epochs");
  c.batch_size = r.i64("train.batch_size");
  c.lr = r.f64("train.lr");
  c.adam.beta1 = r.f64("train.adam_beta1");
  c.adam.beta2 = r.f64("train.adam_beta2");
  c.adam.eps = r.f64("train.adam_eps");
  c.adam.weight_decay = r.f64("train.weight_decay");
  c.adam.decoupled = r.boolean("train.decoupled");
  const std::string sched = r.str("train.schedule");
  bool known = false;
  for (ScheduleKind k : {ScheduleKind::constant, ScheduleKind::linear, ScheduleKind::cosine,
                         ScheduleKind::inverse_sqrt})
    if (sched == schedule_kind_name(k)) c.schedule.kind = k, known = true;
  ATTN_CHECK(known, "checkpoint", source, ": unknown schedule ", sched);
  c.schedule.warmup_steps = r.i64("train.warmup_steps");
  c.schedule.total_steps = r.i64("train.total_steps");
  c.schedule.min_ratio = r.f64("train.min_ratio");
  c.clip_norm = r.f64("train.clip_norm");
  c.label_smoothing = r.f64("train.label_smoothing");
  c.seed = static_cast<uint64_t>(r.i64("train.seed"));
  // Checkpoints written before subword vocabularies have no train.subword: word-level.
  if (md.count("train.subword") && r.str("train.subword") != "none") {
    const std::string kind = r.str("train.subword");
    ATTN_CHECK(kind == "bpe" || kind == "unigram", "checkpoint", source, ": unknown subword kind ", kind);
    c.subword.enabled = true;
    c.subword.kind = kind == "bpe" ? SubwordKind::bpe : SubwordKind::unigram;
    c.subword.vocab_size = r.i64("train.subword_vocab_size");
    c.subword.joint = r.boolean("train.subword_joint");
  }
  return c;
}

// Loads model.<name> tensors into the model's parameters (shapes must match).
void load_weights(const SafetensorsFile& file, const nn::ParameterList& params,
                  const std::string& source) {
  for (const nn::Parameter& p : params) {
    const std::string name = "model." + p.name;
    ATTN_CHECK(file.contains(name), "checkpoint", source, ": no tensor ", name);
    Tensor t = file.tensor(name);
    ATTN_CHECK(t.shape() == p.value.shape(), "checkpoint", source, ": ", name, " is ",
               t.shape_str(), ", the configuration needs ", p.value.shape_str());
    Tensor(p.value).copy_from(t);
  }
}

uint64_t fingerprint(const std::vector<SentencePair>& pairs) {
  uint64_t h = mix64(pairs.size());
  for (const SentencePair& p : pairs) {
    for (unsigned char ch : p.source) h = mix64(h ^ ch);
    h = mix64(h ^ 0x1f);
    for (unsigned char ch : p.target) h = mix64(h ^ ch);
    h = mix64(h ^ 0x1e);
  }
  return h;
}

std::string hex(uint64_t x) {
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(x));
  return buf;
}

struct BatchLoss {
  double loss = 0.0;
  double nll = 0.0;
  int64_t count = 0;
};

// The loss of a forward pass (cross-entropy, or the copy mixture's), and with `backward` its
// gradients through the model.
BatchLoss batch_loss(Seq2Seq& model, const Batch& batch, const ForwardResult& f,
                     const CrossEntropyConfig& ce, bool backward) {
  CrossEntropyConfig c = ce;
  c.compute_grad = backward;
  if (model.config.copy) {
    // Targets over the extended vocabulary: copyable unknown words as their extended ids.
    const CopyMixtureResult r = copy_mixture_loss(f.logits, f.copy, f.gate, batch.target_copy, c);
    if (backward) model.backward(batch, f, r.dlogits, r.dcopy, r.dgate);
    return {r.loss, r.nll, r.count};
  }
  const CrossEntropyResult r = cross_entropy(f.logits, batch.target_output, c);
  if (backward) {
    ATTN_PROFILE_SCOPE("model.backward");
    model.backward(batch, f, r.dlogits);
  }
  return {r.loss, r.nll, r.count};
}

// The dropout seed of global step `step` (both architectures): a pure function of (seed, step),
// so a resumed run draws the masks the uninterrupted run drew.
uint64_t step_seed(uint64_t seed, int64_t step) {
  return mix64(seed ^ mix64(static_cast<uint64_t>(step) + 0x7f4a7c15ULL));
}

// Forward and loss of one batch under either architecture; with `backward`, the gradients too
// (and dropout, seeded by `seed`: training and backward go together).
BatchLoss model_batch_loss(TranslationModel& model, const Batch& batch, const CrossEntropyConfig& ce,
                           bool backward, uint64_t seed) {
  return std::visit(
      [&](auto& m) -> BatchLoss {
        using M = std::decay_t<decltype(m)>;
        if constexpr (std::is_same_v<M, Seq2Seq>) {
          const ForwardResult f = [&] {
            ATTN_PROFILE_SCOPE("model.forward");
            return m.forward(batch, {backward, seed});
          }();
          return batch_loss(m, batch, f, ce, backward);
        } else {
          const TransformerForward f = [&] {
            ATTN_PROFILE_SCOPE("model.forward");
            return m.forward(batch, {backward, seed});
          }();
          CrossEntropyConfig c = ce;
          c.compute_grad = backward;
          const CrossEntropyResult r = cross_entropy(f.logits, batch.target_output, c);
          if (backward) {
            ATTN_PROFILE_SCOPE("model.backward");
            m.backward(batch, f, r.dlogits);
          }
          return {r.loss, r.nll, r.count};
        }
      },
      model);
}

// The rows of shard `s` of `shards` of a batch of `rows` rows: contiguous, sizes within one.
std::pair<int64_t, int64_t> shard_rows(int64_t rows, int64_t shards, int64_t s) {
  return {rows * s / shards, rows * (s + 1) / shards};
}

// One step's gradient under GradientSharding (train.h): this process's shards of `rows`, each
// computed whole with its loss divided by the whole batch's token count, their gradients and
// losses summed with the other processes' in shard order (slot n - 1 of a buffer: the loss).
// Leaves the sum in the parameters' gradients; returns the loss and the batch's token count.
BatchLoss sharded_gradient(TranslationModel& model, const nn::ParameterList& params,
                           const std::vector<EncodedPair>& encoded, const std::vector<int64_t>& rows,
                           const GradientSharding& sharding, CrossEntropyConfig ce, uint64_t seed) {
  const int64_t shards = sharding.shards;
  const int64_t count = sharding.count < 0 ? shards : sharding.count;
  int64_t n = 1;
  for (const nn::Parameter& p : params) {
    ATTN_CHECK(p.grad.dtype() == DType::f32 && p.grad.is_contiguous(), kOp,
               "sharded gradients need contiguous float32 gradients; ", p.name, " is not");
    n += p.grad.numel();
  }
  const int64_t batch_rows = static_cast<int64_t>(rows.size());
  ce.normalizer = make_batch(encoded, rows).target_tokens;
  BatchLoss total;
  total.count = ce.normalizer;
  std::vector<float> mine(static_cast<size_t>(count * n), 0.0f);
  for (int64_t k = 0; k < count; ++k) {
    const int64_t s = sharding.first + k;
    const auto [begin, end] = shard_rows(batch_rows, shards, s);
    if (begin == end) continue;  // more shards than rows: this one adds zeros
    nn::zero_grads(params);
    const std::vector<int64_t> part(rows.begin() + begin, rows.begin() + end);
    // Each shard draws its own dropout masks; shards = 1 keeps the plain loop's seed.
    const uint64_t shard_seed = shards == 1 ? seed : mix64(seed ^ mix64(static_cast<uint64_t>(s) + 1));
    const BatchLoss r = model_batch_loss(model, make_batch(encoded, part), ce, true, shard_seed);
    float* out = mine.data() + k * n;
    for (const nn::Parameter& p : params) {
      std::memcpy(out, p.grad.data<float>(), static_cast<size_t>(p.grad.numel()) * sizeof(float));
      out += p.grad.numel();
    }
    *out = static_cast<float>(r.loss);
  }
  std::vector<float> sum(static_cast<size_t>(n));
  if (count < shards) {
    sharding.sum_shards(mine.data(), n, sum.data());
  } else {
    // Left to right, as attn/dist/data_parallel.h sums the shards of several processes.
    std::copy(mine.begin(), mine.begin() + n, sum.begin());
    for (int64_t k = 1; k < shards; ++k) {
      const float* g = mine.data() + k * n;
      for (int64_t i = 0; i < n; ++i) sum[i] += g[i];
    }
  }
  const float* in = sum.data();
  for (const nn::Parameter& p : params) {
    Tensor grad = p.grad;  // a handle on the parameter's gradient storage
    std::memcpy(grad.data<float>(), in, static_cast<size_t>(grad.numel()) * sizeof(float));
    in += p.grad.numel();
  }
  total.loss = *in;
  return total;
}

std::string resolve_checkpoint(const std::string& path) {
  namespace fs = std::filesystem;
  if (fs::is_directory(path)) {
    const fs::path file = fs::path(path) / "checkpoint.safetensors";
    ATTN_CHECK(fs::exists(file), "checkpoint", "no checkpoint in ", path, ": ", file.string(),
               " does not exist (no checkpoint has been written there yet)");
    return file.string();
  }
  ATTN_CHECK(fs::exists(path), "checkpoint", "no checkpoint at ", path,
             ": no such file or directory");
  return path;
}

// Every element of n bytes of little-endian `dtype` data is finite (integers always are).
bool all_finite(StDType dtype, const std::byte* p, std::size_t n) {
  switch (dtype) {
    case StDType::F32:
      for (std::size_t i = 0; i < n; i += 4) {
        float x;
        std::memcpy(&x, p + i, 4);
        if (!std::isfinite(x)) return false;
      }
      return true;
    case StDType::F64:
      for (std::size_t i = 0; i < n; i += 8) {
        double x;
        std::memcpy(&x, p + i, 8);
        if (!std::isfinite(x)) return false;
      }
      return true;
    case StDType::BF16:
    case StDType::F16: {
      // An exponent field of all ones (bits 14..7 in BF16, 14..10 in F16) is inf or NaN.
      const uint16_t exp = dtype == StDType::BF16 ? 0x7F80 : 0x7C00;
      for (std::size_t i = 0; i < n; i += 2) {
        uint16_t x;
        std::memcpy(&x, p + i, 2);
        if ((x & exp) == exp) return false;
      }
      return true;
    }
    default:
      return true;
  }
}

bool all_finite(const nn::ParameterList& params) {
  for (const nn::Parameter& p : params) {
    const Tensor dense = p.value.contiguous();
    const StDType dtype = dense.dtype() == DType::f64    ? StDType::F64
                          : dense.dtype() == DType::bf16 ? StDType::BF16
                          : dense.dtype() == DType::f32  ? StDType::F32 : StDType::BOOL;
    const std::size_t bytes = static_cast<std::size_t>(dense.numel()) * dtype_size(dense.dtype());
    if (!all_finite(dtype, static_cast<const std::byte*>(dense.raw_data()), bytes)) return false;
  }
  return true;
}

}  // namespace

Tokens tokenize_training_text(std::string_view text) {
  TokenizeOptions options;
  options.is_name = is_corpus_name;
  return tokenize(text, options);
}

TranslationModel create_model(const ModelConfig& config, uint64_t seed) {
  if (config.arch == Architecture::transformer) return TransformerSeq2Seq::create(config, seed);
  return Seq2Seq::create(config, seed);
}

void set_thread_count(int threads) {
  ATTN_CHECK(threads >= 1, "threads", "thread count must be >= 1, got ", threads);
  omp_set_num_threads(threads);
  openblas_set_num_threads(threads);
}

// ---------------------------------------------------------------------------------------------
// Translator

const ModelConfig& Translator::config() const {
  return std::visit([](const auto& m) -> const ModelConfig& { return m.config; }, model);
}

nn::ParameterList Translator::parameters() const {
  return std::visit([](const auto& m) { return m.parameters(); }, model);
}

std::vector<Translation> Translator::translate(const std::vector<std::string>& sentences,
                                               const DecodeConfig& config,
                                               std::vector<Tokens>* source_tokens) const {
  std::vector<std::vector<int32_t>> ids;
  std::vector<Tokens> tokenised;
  const ModelConfig& mc = this->config();
  for (std::size_t i = 0; i < sentences.size(); ++i) {
    Tokens tokens = this->source_tokens(sentences[i]);
    ATTN_CHECK(!tokens.empty(), "translate", "sentence ", i + 1, " of ", sentences.size(),
               " is empty");
    ATTN_CHECK(static_cast<int64_t>(tokens.size()) <= max_source_tokens(), "translate",
               "sentence ", i + 1, " of ", sentences.size(), " has ", tokens.size(),
               " tokens; the model takes at most ", max_source_tokens(),
               " (trained with --max-source ", mc.max_source_steps, ", <eos> included)");
    std::vector<int32_t> row;
    if (mc.copy)  // each unknown word its own id, so that it gets its own extended id to copy
      row = encode_source_words(source_vocab, tokens);
    else
      for (const std::string& t : tokens) row.push_back(static_cast<int32_t>(source_vocab.id(t)));
    ids.push_back(std::move(row));
    tokenised.push_back(std::move(tokens));
  }
  std::vector<Translation> out =
      std::visit([&](const auto& m) { return translate_ids(m, ids, config); }, model);
  // The source words behind a copying model's extended ids (batching.h's extend_source, as the
  // model derived them from the ids).
  if (const auto* rnn = std::get_if<Seq2Seq>(&model); rnn && rnn->config.copy)
    for (std::size_t i = 0; i < out.size(); ++i) {
      out[i].copied_words =
          copy_words(tokenised[i], extend_source(ids[i], rnn->copy_map, rnn->config.target_vocab));
      for (Translation& alternative : out[i].nbest) alternative.copied_words = out[i].copied_words;
    }
  if (source_tokens) *source_tokens = std::move(tokenised);
  return out;
}

std::vector<Translation> Translator::translate_all(const std::vector<std::string>& sentences,
                                                  const DecodeConfig& config,
                                                  std::vector<Tokens>* source_tokens,
                                                  int64_t batch) const {
  // Greedy decoding batches sentences; sorting by length keeps padding small.
  std::vector<std::size_t> order(sentences.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
    return sentences[a].size() < sentences[b].size();
  });
  std::vector<Translation> out(sentences.size());
  if (source_tokens) source_tokens->assign(sentences.size(), {});
  const std::size_t chunk_size = static_cast<std::size_t>(std::max<int64_t>(1, batch));
  for (std::size_t start = 0; start < order.size(); start += chunk_size) {
    const std::size_t end = std::min(order.size(), start + chunk_size);
    std::vector<std::string> chunk;
    for (std::size_t i = start; i < end; ++i) chunk.push_back(sentences[order[i]]);
    std::vector<Tokens> tokens;
    std::vector<Translation> done = translate(chunk, config, source_tokens ? &tokens : nullptr);
    for (std::size_t i = start; i < end; ++i) {
      out[order[i]] = std::move(done[i - start]);
      if (source_tokens) (*source_tokens)[order[i]] = std::move(tokens[i - start]);
    }
  }
  return out;
}

int64_t Translator::max_source_tokens() const { return config().max_source_steps - 1; }

Tokens Translator::source_tokens(std::string_view sentence) const {
  if (source_subword) return source_subword->encode(sentence);
  TokenizeOptions options;
  options.is_name = [this](std::string_view w) {
    return source_vocab.contains(w) || is_corpus_name(w);
  };
  return tokenize(sentence, options);
}

Tokens Translator::target_tokens(const Translation& t) const {
  // Vocab::decode's defaults (stop at <eos>, drop <pad> and <bos>), plus the extended ids of a
  // copying model, which stand for t.copied_words.
  Tokens out;
  for (int32_t id : t.tokens) {
    if (id == Vocab::eos_id) break;
    if (id == Vocab::pad_id || id == Vocab::bos_id) continue;
    if (id < target_vocab.size()) {
      out.push_back(target_vocab.token(id));
      continue;
    }
    const int64_t k = id - target_vocab.size();
    ATTN_CHECK(k < static_cast<int64_t>(t.copied_words.size()), "translate", "token id ", id,
               " is extended id ", k, " but the translation has ", t.copied_words.size(),
               " copied words");
    out.push_back(t.copied_words[k]);
  }
  return out;
}

std::string Translator::target_text(const Translation& t) const {
  const Tokens tokens = target_tokens(t);
  if (!target_subword) return join_tokens(tokens);
  // Byte pieces can spell any byte: a line break or tab in the output would break the one
  // line per sentence of every file format, so they become spaces.
  std::string text = target_subword->decode(tokens);
  for (char& c : text)
    if (c == '\n' || c == '\r' || c == '\t') c = ' ';
  return text;
}

Tokens Translator::training_source_tokens(std::string_view text) const {
  return source_subword ? source_subword->encode(text) : tokenize_training_text(text);
}

Tokens Translator::training_target_tokens(std::string_view text) const {
  return target_subword ? target_subword->encode(text) : tokenize_training_text(text);
}

Translator Translator::load(const std::string& path) {
  const std::string file_path = resolve_checkpoint(path);
  const SafetensorsFile file = SafetensorsFile::load(file_path);
  const TrainConfig config = read_config(file.metadata, file_path);
  Translator t;
  MetadataReader r(file.metadata, file_path);
  t.source_vocab = Vocab::from_json(r.str("source_vocab"), file_path + " source_vocab");
  t.target_vocab = Vocab::from_json(r.str("target_vocab"), file_path + " target_vocab");
  if (config.subword.enabled) {
    const auto model = [&](const std::string& key) {
      return std::make_shared<const SubwordModel>(SubwordModel::from_serialized(
          base64_decode(r.str(key), file_path + " " + key), file_path + " " + key));
    };
    t.source_subword = model("source_subword");
    t.target_subword = config.subword.joint ? t.source_subword : model("target_subword");
  }
  ATTN_CHECK(t.source_vocab.size() == config.model.source_vocab &&
                 t.target_vocab.size() == config.model.target_vocab,
             "checkpoint", file_path, ": vocabulary sizes disagree with the configuration");
  t.model = create_model(config.model, config.seed);
  if (auto* rnn = std::get_if<Seq2Seq>(&t.model))
    rnn->set_copy_map(t.source_vocab.tokens(), t.target_vocab.tokens());
  load_weights(file, t.parameters(), file_path);
  return t;
}

EvalResult evaluate(const Translator& translator, const std::vector<SentencePair>& pairs,
                    const DecodeConfig& config) {
  EvalResult r;
  if (pairs.empty()) return r;
  std::vector<std::string> sources;
  for (const SentencePair& p : pairs) sources.push_back(p.source);
  DecodeConfig c = config;
  c.alignment = false;
  const std::vector<Translation> out = translator.translate_all(sources, c);
  for (std::size_t i = 0; i < pairs.size(); ++i) {
    r.hypotheses.push_back(translator.target_tokens(out[i]));
    r.hypothesis_texts.push_back(translator.target_text(out[i]));
    r.references.push_back(translator.training_target_tokens(pairs[i].target));
  }
  r.bleu = corpus_bleu(r.hypotheses, r.references);
  std::vector<std::vector<std::string>> reference_texts(1);
  for (const SentencePair& p : pairs) reference_texts[0].push_back(p.target);
  r.sacre_bleu = sacre_bleu(r.hypothesis_texts, reference_texts);
  r.chrf = corpus_chrf(r.hypothesis_texts, reference_texts);
  ChrfOptions plus_plus;
  plus_plus.word_order = 2;
  r.chrf_plus_plus = corpus_chrf(r.hypothesis_texts, reference_texts, plus_plus);
  r.exact_match = exact_match(r.hypotheses, r.references);
  return r;
}

// ---------------------------------------------------------------------------------------------
// Trainer

Trainer::Trainer(const TrainConfig& config, std::vector<SentencePair> train,
                 std::vector<SentencePair> valid)
    : config_(config), train_(std::move(train)), valid_(std::move(valid)) {
  ATTN_CHECK(!train_.empty(), kOp, "no training pairs");
  ATTN_CHECK(config_.epochs >= 1 && config_.batch_size >= 1, kOp, "epochs (", config_.epochs,
             ") and batch size (", config_.batch_size, ") must be >= 1");
  if (config_.subword.enabled) {
    SubwordConfig sc;
    sc.kind = config_.subword.kind;
    sc.vocab_size = config_.subword.vocab_size;
    sc.seed = config_.seed;
    std::vector<std::string> sources, targets;
    for (const SentencePair& p : train_) {
      sources.push_back(p.source);
      targets.push_back(p.target);
    }
    if (config_.subword.joint) {
      sources.insert(sources.end(), targets.begin(), targets.end());
      translator_.source_subword = std::make_shared<const SubwordModel>(SubwordModel::train(sources, sc));
      translator_.target_subword = translator_.source_subword;
    } else {
      translator_.source_subword = std::make_shared<const SubwordModel>(SubwordModel::train(sources, sc));
      translator_.target_subword = std::make_shared<const SubwordModel>(SubwordModel::train(targets, sc));
    }
    translator_.source_vocab = subword_vocab(*translator_.source_subword);
    translator_.target_vocab = subword_vocab(*translator_.target_subword);
  } else {
    std::vector<Tokens> src, tgt;
    for (const SentencePair& p : train_) {
      src.push_back(tokenize_training_text(p.source));
      tgt.push_back(tokenize_training_text(p.target));
    }
    translator_.source_vocab = Vocab::build(src, config_.vocab);
    translator_.target_vocab = Vocab::build(tgt, config_.vocab);
  }
  config_.model.source_vocab = translator_.source_vocab.size();
  config_.model.target_vocab = translator_.target_vocab.size();
  translator_.model = create_model(config_.model, config_.seed);
  if (auto* rnn = std::get_if<Seq2Seq>(&translator_.model))
    rnn->set_copy_map(translator_.source_vocab.tokens(), translator_.target_vocab.tokens());
  prepare_data();
  optimizer_ = std::make_unique<Adam>(translator_.parameters(), config_.adam);
}

void Trainer::prepare_data() {
  encoded_.clear();
  dropped_long_pairs_ = 0;
  int64_t line = 0;
  for (const SentencePair& p : train_) {
    ++line;
    EncodedPair e = encode_pair(translator_.source_vocab, translator_.target_vocab,
                                translator_.training_source_tokens(p.source),
                                translator_.training_target_tokens(p.target));
    // A subword run cannot check lengths when reading the file (pieces are not words).
    if (translator_.source_subword &&
        static_cast<int64_t>(e.source.size()) + 1 > config_.model.max_source_steps) {
      ++dropped_long_pairs_;
      continue;
    }
    ATTN_CHECK(static_cast<int64_t>(e.source.size()) + 1 <= config_.model.max_source_steps, kOp,
               "training pair ", line, " has ", e.source.size(),
               " source tokens; the model allows ", config_.model.max_source_steps - 1);
    encoded_.push_back(std::move(e));
  }
  ATTN_CHECK(!encoded_.empty(), kOp, "every training pair has more than ",
             config_.model.max_source_steps - 1, " source pieces (raise --max-source)");
  batches_ = bucket_batches(encoded_, config_.batch_size, config_.seed);
  total_steps_ = config_.epochs * static_cast<int64_t>(batches_.size());
  if (config_.schedule.total_steps <= 0) config_.schedule.total_steps = total_steps_;
  fingerprint_ = fingerprint(train_);
}

std::string Trainer::checkpoint_file(const std::string& out_dir) {
  return (std::filesystem::path(out_dir) / "checkpoint.safetensors").string();
}

std::string Trainer::best_checkpoint_file(const std::string& out_dir) {
  return (std::filesystem::path(out_dir) / "best.safetensors").string();
}

void Trainer::save_checkpoint(const std::string& path) const {
  SafetensorsFile file;
  // A non-finite value would make every later step NaN; refusing keeps the previous checkpoint.
  auto check_finite = [&](const std::string& name) {
    const SafetensorsEntry& e = file.entry(name);
    ATTN_CHECK(all_finite(e.dtype, e.data.data(), e.data.size()), "checkpoint", "not saving ",
               path, ": \"", name, "\" holds a non-finite value at step ", step_,
               " (the previous checkpoint is kept)");
  };
  put_config(file.metadata, config_);
  file.metadata["source_vocab"] = translator_.source_vocab.to_json();
  file.metadata["target_vocab"] = translator_.target_vocab.to_json();
  file.metadata["data_fingerprint"] = hex(fingerprint_);
  if (translator_.source_subword) {
    file.metadata["source_subword"] = base64_encode(translator_.source_subword->serialized());
    if (!config_.subword.joint)
      file.metadata["target_subword"] = base64_encode(translator_.target_subword->serialized());
  }
  file.metadata["run.best_bleu"] = exact(best_bleu_);
  file.metadata["run.evals_since_best"] = std::to_string(evals_since_best_);
  const nn::ParameterList params = translator_.parameters();
  for (const nn::Parameter& p : params) file.add("model." + p.name, p.value);
  optimizer_->save(file, params);
  file.add_i64("train.position", {epoch_, batch_in_epoch_, step_});
  file.add_i64("train.seed", {static_cast<int64_t>(config_.seed)});
  for (const std::string& name : file.names()) check_finite(name);
  file.save(path);
}

Trainer Trainer::resume(const std::string& checkpoint_path, std::vector<SentencePair> train,
                        std::vector<SentencePair> valid) {
  const std::string path = resolve_checkpoint(checkpoint_path);
  const SafetensorsFile file = SafetensorsFile::load(path);
  Trainer t;
  t.config_ = read_config(file.metadata, path);
  t.translator_ = Translator::load(path);
  t.train_ = std::move(train);
  t.valid_ = std::move(valid);
  t.prepare_data();
  MetadataReader r(file.metadata, path);
  ATTN_CHECK(r.str("data_fingerprint") == hex(t.fingerprint_), "checkpoint", path,
             ": the training data differs from the data this run started with");
  const nn::ParameterList params = t.translator_.parameters();
  t.optimizer_ = std::make_unique<Adam>(params, t.config_.adam);
  t.optimizer_->load(file, params);
  const std::vector<int64_t> pos = file.i64("train.position");
  ATTN_CHECK(pos.size() == 3 && pos[0] >= 0 && pos[1] >= 0 && pos[2] >= 0 &&
                 pos[1] <= static_cast<int64_t>(t.batches_.size()),
             "checkpoint", path, ": train.position must be [epoch, batch, step] within the data");
  t.epoch_ = pos[0];
  t.batch_in_epoch_ = pos[1];
  t.step_ = pos[2];
  if (file.metadata.count("run.best_bleu")) {
    t.best_bleu_ = r.f64("run.best_bleu");
    t.evals_since_best_ = r.i64("run.evals_since_best");
  }
  return t;
}

EvalReport Trainer::evaluate_now(int64_t sentences) {
  EvalReport report;
  report.step = step_;
  // Only validation pairs: scores on the training data would say nothing about translation.
  const int64_t n = std::min<int64_t>(sentences, static_cast<int64_t>(valid_.size()));
  std::vector<SentencePair> subset;
  for (const SentencePair& p : valid_) {
    if (static_cast<int64_t>(subset.size()) >= n) break;
    // A source longer than the model takes cannot be translated; skip it.
    if (static_cast<int64_t>(translator_.source_tokens(p.source).size()) <= translator_.max_source_tokens())
      subset.push_back(p);
  }
  report.sentences = static_cast<int64_t>(subset.size());
  if (subset.empty()) return report;
  // Teacher-forced NLL over the subset.
  std::vector<EncodedPair> enc;
  for (const SentencePair& p : subset)
    enc.push_back(encode_pair(translator_.source_vocab, translator_.target_vocab,
                              translator_.training_source_tokens(p.source),
                              translator_.training_target_tokens(p.target)));
  double nll_sum = 0.0;
  int64_t tokens = 0;
  for (const auto& idx : bucket_batches(enc, config_.batch_size, config_.seed)) {
    const Batch batch = make_batch(enc, idx);
    const BatchLoss r = model_batch_loss(translator_.model, batch, {}, false, 0);
    nll_sum += r.nll * static_cast<double>(r.count);
    tokens += r.count;
  }
  report.valid_loss = tokens ? nll_sum / static_cast<double>(tokens) : 0.0;
  const EvalResult e = evaluate(translator_, subset);
  report.bleu = e.sacre_bleu;
  report.chrf = e.chrf;
  report.exact_match = e.exact_match;
  return report;
}

bool Trainer::run(const RunControl& control, const TrainCallbacks& callbacks) {
  using Clock = std::chrono::steady_clock;
  const auto start = Clock::now();
  auto elapsed = [&] { return std::chrono::duration<double>(Clock::now() - start).count(); };
  const nn::ParameterList params = translator_.parameters();
  const int64_t num_batches = static_cast<int64_t>(batches_.size());
  const int64_t first_step = step_;
  double loss_sum = 0.0;
  int64_t loss_steps = 0, tokens_since = 0;
  double last_report = 0.0;
  constexpr int64_t kMaxConsecutiveSkips = 100;
  int64_t consecutive_skips = 0;
  auto checkpoint = [&] {
    if (control.out_dir.empty()) return;
    std::filesystem::create_directories(control.out_dir);
    const std::string path = checkpoint_file(control.out_dir);
    save_checkpoint(path);
    if (callbacks.on_checkpoint) callbacks.on_checkpoint(path);
  };
  // Evaluates on the validation pairs (none: nothing to do); a better BLEU than any before is
  // saved as best.safetensors. Returns true when the patience has run out.
  int64_t last_eval_step = -1;
  auto eval = [&]() -> bool {
    const profile::Paused not_a_training_step;
    if (valid_.empty() || control.eval_sentences <= 0) return false;
    if (!callbacks.on_eval && control.out_dir.empty() && control.patience <= 0) return false;
    last_eval_step = step_;
    EvalReport report = evaluate_now(control.eval_sentences);
    if (report.sentences == 0) return false;
    if (report.bleu.bleu > best_bleu_) {
      best_bleu_ = report.bleu.bleu;
      evals_since_best_ = 0;
      report.best = true;
      if (!control.out_dir.empty()) {
        std::filesystem::create_directories(control.out_dir);
        save_checkpoint(best_checkpoint_file(control.out_dir));
      }
    } else {
      ++evals_since_best_;
    }
    report.evals_since_best = evals_since_best_;
    if (callbacks.on_eval) callbacks.on_eval(report);
    return control.patience > 0 && evals_since_best_ >= control.patience;
  };
  CrossEntropyConfig ce;
  ce.label_smoothing = config_.label_smoothing;
  ce.ignore_id = Vocab::pad_id;
  const GradientSharding& sharding = control.sharding;
  const int64_t own_shards = sharding.count < 0 ? sharding.shards : sharding.count;
  ATTN_CHECK(sharding.shards >= 1 && sharding.first >= 0 && own_shards >= 0 &&
                 sharding.first + own_shards <= sharding.shards,
             kOp, "gradient shards [", sharding.first, ", ", sharding.first + own_shards,
             ") must lie in [0, ", sharding.shards, ")");
  ATTN_CHECK(own_shards == sharding.shards || sharding.sum_shards, kOp, "this process computes ",
             own_shards, " of ", sharding.shards, " gradient shards but has no sum_shards to add the others'");
  const bool plain_step = sharding.shards == 1 && own_shards == 1;
  while (epoch_ < config_.epochs) {
    const std::vector<int64_t> order = epoch_order(num_batches, config_.seed, epoch_);
    while (batch_in_epoch_ < num_batches) {
      bool out_of_time = control.time_limit_s > 0 && elapsed() >= control.time_limit_s;
      if (control.time_limit_s > 0 && sharding.any) out_of_time = sharding.any(out_of_time);
      if ((control.max_steps > 0 && step_ >= control.max_steps) || out_of_time) {
        // The steps since the last evaluation may hold the best weights: evaluate them too.
        if (step_ > first_step && last_eval_step != step_) eval();
        checkpoint();
        return false;
      }
      const std::vector<int64_t>& rows = batches_[order[batch_in_epoch_]];
      BatchLoss r;
      if (plain_step) {
        ATTN_PROFILE_SCOPE("train.step");
        const Batch batch = make_batch(encoded_, rows);
        if (callbacks.on_batch) callbacks.on_batch(step_, batch);
        nn::zero_grads(params);
        r = model_batch_loss(translator_.model, batch, ce, true, step_seed(config_.seed, step_));
        r.count = batch.target_tokens;
      } else {
        r = sharded_gradient(translator_.model, params, encoded_, rows, sharding, ce,
                             step_seed(config_.seed, step_));
      }
      if (callbacks.on_gradients) callbacks.on_gradients(step_, params);
      const double norm = clip_grad_norm(params, config_.clip_norm);
      const double lr = learning_rate(config_.schedule, config_.lr, step_);
      const bool finite = std::isfinite(r.loss) && std::isfinite(norm);
      if (finite) {
        optimizer_->step(params, lr);
        consecutive_skips = 0;
        // Adam moves each weight by about lr at most, so only an absurd lr overflows; then no
        // later checkpoint could be good, and the run stops with the last good one on disk.
        ATTN_CHECK(all_finite(params), kOp, "step ", step_ + 1, " (lr ", lr,
                   ") made the weights non-finite; stopped",
                   control.out_dir.empty() ? "" : " (the last good checkpoint in " +
                                                      control.out_dir + " is kept)");
      } else {
        ++skipped_steps_;
        if (callbacks.on_skipped_step) callbacks.on_skipped_step(step_ + 1, r.loss, norm);
        ATTN_CHECK(++consecutive_skips < kMaxConsecutiveSkips, kOp, kMaxConsecutiveSkips,
                   " steps in a row had a non-finite loss or gradient (last: step ", step_ + 1,
                   ", loss ", r.loss, ", gradient norm ", norm, "); stopped",
                   control.out_dir.empty() ? "" : " (the last good checkpoint in " +
                                                      control.out_dir + " is kept)");
      }
      ++step_;
      ++batch_in_epoch_;
      losses_.push_back(r.loss);
      if (finite) {
        loss_sum += r.loss;
        ++loss_steps;
      }
      tokens_since += r.count;
      const bool last = step_ == total_steps_;
      if (callbacks.on_progress && (step_ % std::max<int64_t>(1, control.progress_every) == 0 || last)) {
        const double now = elapsed();
        Progress p;
        p.epoch = epoch_;
        p.epochs = config_.epochs;
        p.step = step_;
        p.total_steps = total_steps_;
        p.loss = loss_sum / static_cast<double>(std::max<int64_t>(1, loss_steps));
        p.lr = lr;
        p.tokens_per_s = now > last_report ? static_cast<double>(tokens_since) / (now - last_report) : 0.0;
        p.elapsed_s = now;
        const double per_step = now / static_cast<double>(step_ - first_step);
        p.eta_s = per_step * static_cast<double>(total_steps_ - step_);
        if (control.time_limit_s > 0) p.eta_s = std::min(p.eta_s, control.time_limit_s - now);
        callbacks.on_progress(p);
        loss_sum = 0.0;
        loss_steps = 0;
        tokens_since = 0;
        last_report = now;
      }
      const bool stop = control.eval_every > 0 && step_ % control.eval_every == 0 && eval();
      if (stop || (control.checkpoint_every > 0 && step_ % control.checkpoint_every == 0)) checkpoint();
      if (stop) return false;
    }
    ++epoch_;
    batch_in_epoch_ = 0;
    const bool stop = control.eval_every == 0 && eval();
    if (stop || (control.checkpoint_every == 0 && epoch_ < config_.epochs)) checkpoint();
    if (stop) return false;
  }
  checkpoint();
  return true;
}

}  // namespace attn::seq2seq

namespace attn::seq2seq {

std::vector<SentencePair> hold_out_validation(std::vector<SentencePair>& train, int64_t count,
                                              uint64_t seed) {
  ATTN_CHECK(count >= 0, kOp, "validation size must be >= 0, got ", count);
  if (count == 0) return {};
  std::unordered_map<std::string, int64_t> source_count;
  for (const SentencePair& p : train) ++source_count[p.source];
  // Candidates: pairs whose source occurs once, in an order drawn from the seed.
  std::vector<std::pair<uint64_t, std::size_t>> keyed;
  for (std::size_t i = 0; i < train.size(); ++i)
    if (source_count[train[i].source] == 1) keyed.push_back({mix64(seed ^ mix64(i + 1)), i});
  ATTN_CHECK(static_cast<int64_t>(keyed.size()) >= 2 * count, kOp, "cannot hold out ", count,
             " validation pairs: only ", keyed.size(), " of the ", train.size(),
             " training pairs have a source that occurs once (give --valid FILE or a smaller "
             "--valid-size)");
  std::sort(keyed.begin(), keyed.end());
  std::vector<bool> held(train.size(), false);
  for (int64_t k = 0; k < count; ++k) held[keyed[k].second] = true;
  std::vector<SentencePair> valid, rest;
  for (std::size_t i = 0; i < train.size(); ++i)
    (held[i] ? valid : rest).push_back(std::move(train[i]));
  train = std::move(rest);
  return valid;
}

}  // namespace attn::seq2seq
