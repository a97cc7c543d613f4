#include "seq2seq/decoding/decode.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "attn/error.h"
#include "seq2seq/models/tensor_ops.h"
#include "seq2seq/data/vocab.h"

namespace attn::seq2seq {
namespace {

std::vector<double> weight_row(const Tensor& weights, int64_t row, int64_t length) {
  std::vector<double> out(length);
  for (int64_t j = 0; j < length; ++j) out[j] = weights.get({row, j});
  return out;
}

int64_t max_steps_for(const DecodeConfig& config, int64_t source_length) {
  return config.max_length > 0 ? config.max_length : 2 * source_length + 10;
}

// Rows `rows` of an encoded source (beam search keeps, reorders and repeats hypotheses).
EncodedSource gather_source(const EncodedSource& src, const std::vector<int64_t>& rows) {
  EncodedSource out;
  out.memory = gather_rows(src.memory, rows);
  out.values = gather_rows(src.values, rows);
  for (int64_t r : rows) out.lengths.push_back(src.lengths[static_cast<std::size_t>(r)]);
  if (src.fixed_context.defined()) out.fixed_context = gather_rows(src.fixed_context, rows);
  out.extended_vocab = src.extended_vocab;
  if (src.pointer_keys.defined()) {  // pointer-sentinel
    out.pointer_keys = gather_rows(src.pointer_keys, rows);
    out.pointer_values = gather_rows(src.pointer_values, rows);
    for (int64_t r : rows) out.pointer_lengths.push_back(src.pointer_lengths[static_cast<std::size_t>(r)]);
  }
  return out;
}

// Every decoder layer's state moves with its hypothesis.
DecoderState gather_state(const DecoderState& s, const std::vector<int64_t>& rows) {
  DecoderState out;
  for (const Tensor& h : s.h) out.h.push_back(gather_rows(h, rows));
  for (const Tensor& c : s.c) out.c.push_back(gather_rows(c, rows));
  if (s.feed.defined()) out.feed = gather_rows(s.feed, rows);
  return out;
}

// What greedy and beam search need from a model: the next-token log-probabilities of its B
// rows given each row's previous token, and a way to keep, reorder and repeat rows.
class DecodingSession {
 public:
  virtual ~DecodingSession() = default;
  // log p [B][V] of the next token (V + X for a copying model: its extended ids, batching.h,
  // which the search handles like any token); fills `weights` [B, S] when the alignment is wanted.
  virtual std::vector<std::vector<double>> step(const std::vector<int32_t>& ids, Tensor* weights) = 0;
  virtual void select_rows(const std::vector<int64_t>& rows) = 0;
  virtual bool has_alignment() const = 0;
};

// The recurrent decoder: the state (and the encoded source, row for row) moves step to step.
class RecurrentSession final : public DecodingSession {
 public:
  RecurrentSession(const Seq2Seq& model, const Batch& batch)
      : model_(model), source_(model.encode(batch)), state_(source_.initial) {}
  std::vector<std::vector<double>> step(const std::vector<int32_t>& ids, Tensor* weights) override {
    StepResult r = model_.step(source_, state_, ids, t_++, false, weights != nullptr);
    if (weights) *weights = r.weights;
    state_ = r.state;
    return model_.log_probs(r);
  }
  void select_rows(const std::vector<int64_t>& rows) override {
    state_ = gather_state(state_, rows);
    source_ = gather_source(source_, rows);
  }
  bool has_alignment() const override { return model_.config.decoder != DecoderKind::none; }

 private:
  const Seq2Seq& model_;
  EncodedSource source_;
  DecoderState state_;
  int64_t t_ = 0;  // step index (local-m centres its window on it)
};

// The Transformer decoder: every layer's KV cache grows by one position per step.
class TransformerSession final : public DecodingSession {
 public:
  TransformerSession(const TransformerSeq2Seq& model, const Batch& batch, int64_t capacity)
      : model_(model), state_(model.start_decoding(model.encode(batch), capacity)) {}
  std::vector<std::vector<double>> step(const std::vector<int32_t>& ids, Tensor* weights) override {
    TransformerStep s = model_.step(state_, ids, weights != nullptr);
    if (weights) *weights = s.weights;
    return model_.log_probs(s);
  }
  void select_rows(const std::vector<int64_t>& rows) override { state_.select_rows(rows); }
  bool has_alignment() const override { return true; }

 private:
  const TransformerSeq2Seq& model_;
  TransformerDecoding state_;
};

int64_t longest(const std::vector<int64_t>& lengths) {
  return lengths.empty() ? 0 : *std::max_element(lengths.begin(), lengths.end());
}

std::vector<Translation> greedy_search(DecodingSession& session,
                                       const std::vector<int64_t>& source_lengths,
                                       const DecodeConfig& config) {
  const int64_t B = static_cast<int64_t>(source_lengths.size());
  const bool weights_wanted = config.alignment && session.has_alignment();
  std::vector<Translation> out(B);
  std::vector<int32_t> ids(B, static_cast<int32_t>(Vocab::bos_id));
  const int64_t max_steps = max_steps_for(config, longest(source_lengths));
  Tensor weights;
  for (int64_t t = 0; t < max_steps; ++t) {
    const auto logp = session.step(ids, weights_wanted ? &weights : nullptr);
    bool all_done = true;
    for (int64_t b = 0; b < B; ++b) {
      Translation& tr = out[b];
      if (tr.finished) continue;
      if (static_cast<int64_t>(tr.tokens.size()) >= max_steps_for(config, source_lengths[b])) continue;
      const auto& row = logp[b];
      const int32_t best = static_cast<int32_t>(std::max_element(row.begin(), row.end()) - row.begin());
      tr.log_prob += row[best];
      if (weights_wanted) tr.alignment.push_back(weight_row(weights, b, source_lengths[b]));
      if (best == Vocab::eos_id)
        tr.finished = true;
      else
        tr.tokens.push_back(best);
      ids[b] = best;
      all_done = all_done && tr.finished;
    }
    if (all_done) break;
  }
  for (Translation& tr : out)
    tr.score = length_normalised_score(tr.log_prob, static_cast<int64_t>(tr.tokens.size()) + (tr.finished ? 1 : 0),
                          config.length_penalty);
  return out;
}

// Beam search over B sentences at once. The session's rows are the live hypotheses of every
// sentence still searching, sentence by sentence and in beam order, so each step is one batched
// model call however many sentences share it; each sentence's search is exactly the one it
// would have alone (its candidates, ranking, ties and stopping rule never look at another's).
// Initially the session holds one row per sentence: the sentences, encoded once.
std::vector<Translation> beam_search(DecodingSession& session,
                                     const std::vector<int64_t>& source_lengths,
                                     const DecodeConfig& config) {
  const int64_t K = config.beam;
  const bool weights_wanted = config.alignment && session.has_alignment();
  const int64_t B = static_cast<int64_t>(source_lengths.size());
  struct Search {
    std::vector<Translation> live = std::vector<Translation>(1), finished;
    int64_t max_steps = 0;
    bool searching = true;
  };
  std::vector<Search> searches(B);
  for (int64_t b = 0; b < B; ++b) searches[b].max_steps = max_steps_for(config, source_lengths[b]);
  struct Candidate {
    double log_prob;
    int64_t beam;
    int32_t token;
  };
  std::vector<Candidate> cands;
  Tensor weights;
  for (int64_t t = 0;; ++t) {
    std::vector<int32_t> ids;
    for (const Search& s : searches)
      if (s.searching)
        for (const Translation& h : s.live)
          ids.push_back(h.tokens.empty() ? static_cast<int32_t>(Vocab::bos_id) : h.tokens.back());
    if (ids.empty()) break;
    const auto logp = session.step(ids, weights_wanted ? &weights : nullptr);
    const int64_t V = static_cast<int64_t>(logp[0].size());
    std::vector<int64_t> parents;  // the session rows the next step continues
    int64_t first_row = 0;         // this sentence's first row in the step just taken
    for (int64_t b = 0; b < B; ++b) {
      Search& s = searches[b];
      if (!s.searching) continue;
      const int64_t k = static_cast<int64_t>(s.live.size());
      const int64_t S = source_lengths[b];
      cands.clear();
      cands.reserve(k * V);
      for (int64_t i = 0; i < k; ++i)
        for (int64_t v = 0; v < V; ++v)
          cands.push_back({s.live[i].log_prob + logp[first_row + i][v], i, static_cast<int32_t>(v)});
      const int64_t keep = std::min<int64_t>(2 * K, static_cast<int64_t>(cands.size()));
      std::partial_sort(cands.begin(), cands.begin() + keep, cands.end(),
                        [](const Candidate& a, const Candidate& c) {
                          if (a.log_prob != c.log_prob) return a.log_prob > c.log_prob;
                          if (a.beam != c.beam) return a.beam < c.beam;
                          return a.token < c.token;
                        });
      std::vector<Translation> next;
      std::vector<int64_t> local_parents;
      for (int64_t c = 0; c < keep && static_cast<int64_t>(next.size()) < K; ++c) {
        const Candidate& cand = cands[c];
        Translation h = s.live[cand.beam];
        h.log_prob = cand.log_prob;
        if (weights_wanted) h.alignment.push_back(weight_row(weights, first_row + cand.beam, S));
        if (cand.token == Vocab::eos_id) {
          h.finished = true;
          h.score = length_normalised_score(h.log_prob, static_cast<int64_t>(h.tokens.size()) + 1, config.length_penalty);
          s.finished.push_back(std::move(h));
          if (static_cast<int64_t>(s.finished.size()) >= K) break;
        } else {
          h.tokens.push_back(cand.token);
          next.push_back(std::move(h));
          local_parents.push_back(cand.beam);
        }
      }
      first_row += k;
      if (static_cast<int64_t>(s.finished.size()) >= K) {
        s.searching = false;
        continue;
      }
      s.live = std::move(next);
      s.searching = !s.live.empty() && t + 1 < s.max_steps;
      // The surviving hypotheses' states: rows of their parents, repeated when one parent
      // spawned several (the Transformer copies its KV caches row by row).
      if (s.searching)
        for (int64_t p : local_parents) parents.push_back(first_row - k + p);
    }
    if (parents.empty()) break;
    session.select_rows(parents);
  }
  std::vector<Translation> out;
  out.reserve(B);
  for (Search& s : searches) {
    std::vector<Translation>& finished = s.finished;
    if (finished.empty()) {
      for (Translation& h : s.live) {
        h.score = length_normalised_score(h.log_prob, static_cast<int64_t>(h.tokens.size()), config.length_penalty);
        finished.push_back(std::move(h));
      }
    }
    ATTN_CHECK(!finished.empty(), "beam_search", "no hypothesis survived (max_length ", s.max_steps, ")");
    // Best by normalised score; the earliest finished wins ties (stable).
    std::stable_sort(finished.begin(), finished.end(),
                     [](const Translation& a, const Translation& c) { return a.score > c.score; });
    Translation best = finished[0];
    if (config.nbest > 1) {
      const std::size_t n = std::min<std::size_t>(static_cast<std::size_t>(config.nbest), finished.size());
      best.nbest.assign(finished.begin(), finished.begin() + static_cast<std::ptrdiff_t>(n));
    }
    out.push_back(std::move(best));
  }
  return out;
}

void check_beam(const DecodeConfig& config) {
  ATTN_CHECK(config.beam >= 1, "beam_search", "beam size must be >= 1, got ", config.beam);
}

}  // namespace

double length_normalised_score(double log_prob, int64_t length, double alpha) {
  return alpha == 0.0 ? log_prob : log_prob / std::pow(static_cast<double>(length), alpha);
}

std::vector<Translation> greedy_decode(const Seq2Seq& model,
                                       const std::vector<std::vector<int32_t>>& sources,
                                       const DecodeConfig& config) {
  if (sources.empty()) return {};
  const Batch batch = make_source_batch(sources);
  RecurrentSession session(model, batch);
  return greedy_search(session, batch.source_lengths, config);
}

std::vector<Translation> beam_decode(const Seq2Seq& model,
                                     const std::vector<std::vector<int32_t>>& sources,
                                     const DecodeConfig& config) {
  check_beam(config);
  if (sources.empty()) return {};
  const Batch batch = make_source_batch(sources);
  RecurrentSession session(model, batch);
  return beam_search(session, batch.source_lengths, config);
}

Translation beam_decode(const Seq2Seq& model, const std::vector<int32_t>& source,
                        const DecodeConfig& config) {
  return beam_decode(model, std::vector<std::vector<int32_t>>{source}, config)[0];
}

std::vector<Translation> translate_ids(const Seq2Seq& model,
                                       const std::vector<std::vector<int32_t>>& sources,
                                       const DecodeConfig& config) {
  return config.beam <= 1 ? greedy_decode(model, sources, config) : beam_decode(model, sources, config);
}

std::vector<Translation> greedy_decode(const TransformerSeq2Seq& model,
                                       const std::vector<std::vector<int32_t>>& sources,
                                       const DecodeConfig& config) {
  if (sources.empty()) return {};
  const Batch batch = make_source_batch(sources);
  TransformerSession session(model, batch, max_steps_for(config, longest(batch.source_lengths)));
  return greedy_search(session, batch.source_lengths, config);
}

std::vector<Translation> beam_decode(const TransformerSeq2Seq& model,
                                     const std::vector<std::vector<int32_t>>& sources,
                                     const DecodeConfig& config) {
  check_beam(config);
  if (sources.empty()) return {};
  const Batch batch = make_source_batch(sources);
  TransformerSession session(model, batch, max_steps_for(config, longest(batch.source_lengths)));
  return beam_search(session, batch.source_lengths, config);
}

Translation beam_decode(const TransformerSeq2Seq& model, const std::vector<int32_t>& source,
                        const DecodeConfig& config) {
  return beam_decode(model, std::vector<std::vector<int32_t>>{source}, config)[0];
}

std::vector<Translation> translate_ids(const TransformerSeq2Seq& model,
                                       const std::vector<std::vector<int32_t>>& sources,
                                       const DecodeConfig& config) {
  return config.beam <= 1 ? greedy_decode(model, sources, config) : beam_decode(model, sources, config);
}

}  // namespace attn::seq2seq
