#include "seq2seq/decode.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "attn/error.h"
#include "seq2seq/tensor_ops.h"
#include "seq2seq/vocab.h"

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

double normalised(double log_prob, int64_t length, double alpha) {
  return alpha == 0.0 ? log_prob : log_prob / std::pow(static_cast<double>(length), alpha);
}

// The first `k` rows of an encoded source (all rows hold the same sentence in beam search).
EncodedSource first_rows(const EncodedSource& src, int64_t k) {
  EncodedSource out;
  out.memory = src.memory.slice(0, 0, k);
  out.values = src.values.slice(0, 0, k);
  out.lengths.assign(src.lengths.begin(), src.lengths.begin() + k);
  if (src.fixed_context.defined()) out.fixed_context = src.fixed_context.slice(0, 0, k);
  return out;
}

DecoderState gather_state(const DecoderState& s, const std::vector<int64_t>& rows) {
  DecoderState out;
  out.h = gather_rows(s.h, rows);
  if (s.c.defined()) out.c = gather_rows(s.c, rows);
  if (s.feed.defined()) out.feed = gather_rows(s.feed, rows);
  return out;
}

}  // namespace

std::vector<Translation> greedy_decode(const Seq2Seq& model,
                                       const std::vector<std::vector<int32_t>>& sources,
                                       const DecodeConfig& config) {
  if (sources.empty()) return {};
  const Batch batch = make_source_batch(sources);
  const int64_t B = batch.batch;
  const EncodedSource src = model.encode(batch);
  const bool weights_wanted = config.alignment && model.config.decoder != DecoderKind::none;
  std::vector<Translation> out(B);
  std::vector<int32_t> ids(B, static_cast<int32_t>(Vocab::bos_id));
  DecoderState state = src.initial;
  int64_t longest = 0;
  for (int64_t len : batch.source_lengths) longest = std::max(longest, len);
  const int64_t max_steps = max_steps_for(config, longest);
  for (int64_t t = 0; t < max_steps; ++t) {
    StepResult r = model.step(src, state, ids, t, false, weights_wanted);
    const auto logp = model.log_probs(r);
    bool all_done = true;
    for (int64_t b = 0; b < B; ++b) {
      Translation& tr = out[b];
      if (tr.finished) continue;
      if (static_cast<int64_t>(tr.tokens.size()) >= max_steps_for(config, batch.source_lengths[b])) continue;
      const auto& row = logp[b];
      const int32_t best = static_cast<int32_t>(std::max_element(row.begin(), row.end()) - row.begin());
      tr.log_prob += row[best];
      if (weights_wanted) tr.alignment.push_back(weight_row(r.weights, b, batch.source_lengths[b]));
      if (best == Vocab::eos_id)
        tr.finished = true;
      else
        tr.tokens.push_back(best);
      ids[b] = best;
      all_done = all_done && tr.finished;
    }
    state = r.state;
    if (all_done) break;
  }
  for (Translation& tr : out)
    tr.score = normalised(tr.log_prob, static_cast<int64_t>(tr.tokens.size()) + (tr.finished ? 1 : 0),
                          config.length_penalty);
  return out;
}

Translation beam_decode(const Seq2Seq& model, const std::vector<int32_t>& source,
                        const DecodeConfig& config) {
  const int64_t K = config.beam;
  ATTN_CHECK(K >= 1, "beam_search", "beam size must be >= 1, got ", K);
  const Batch one = make_source_batch({source});
  const EncodedSource src1 = model.encode(one);
  // Replicate the sentence K times once; each step uses the first k rows.
  const std::vector<int64_t> zeros(K, 0);
  EncodedSource srcK;
  srcK.memory = gather_rows(src1.memory, zeros);
  srcK.values = gather_rows(src1.values, zeros);
  srcK.lengths.assign(K, one.source_lengths[0]);
  if (src1.fixed_context.defined()) srcK.fixed_context = gather_rows(src1.fixed_context, zeros);
  const bool weights_wanted = config.alignment && model.config.decoder != DecoderKind::none;
  const int64_t S = one.source_lengths[0];
  const int64_t max_steps = max_steps_for(config, S);

  std::vector<Translation> live(1), finished;
  DecoderState state = src1.initial;
  for (int64_t t = 0; t < max_steps && !live.empty(); ++t) {
    const int64_t k = static_cast<int64_t>(live.size());
    std::vector<int32_t> ids(k);
    for (int64_t i = 0; i < k; ++i)
      ids[i] = live[i].tokens.empty() ? static_cast<int32_t>(Vocab::bos_id) : live[i].tokens.back();
    StepResult r = model.step(first_rows(srcK, k), state, ids, t, false, weights_wanted);
    const auto logp = model.log_probs(r);
    const int64_t V = static_cast<int64_t>(logp[0].size());
    struct Candidate {
      double log_prob;
      int64_t beam;
      int32_t token;
    };
    std::vector<Candidate> cands;
    cands.reserve(k * V);
    for (int64_t i = 0; i < k; ++i)
      for (int64_t v = 0; v < V; ++v)
        cands.push_back({live[i].log_prob + logp[i][v], i, static_cast<int32_t>(v)});
    const int64_t keep = std::min<int64_t>(2 * K, static_cast<int64_t>(cands.size()));
    std::partial_sort(cands.begin(), cands.begin() + keep, cands.end(),
                      [](const Candidate& a, const Candidate& b) {
                        if (a.log_prob != b.log_prob) return a.log_prob > b.log_prob;
                        if (a.beam != b.beam) return a.beam < b.beam;
                        return a.token < b.token;
                      });
    std::vector<Translation> next;
    std::vector<int64_t> parents;
    for (int64_t c = 0; c < keep && static_cast<int64_t>(next.size()) < K; ++c) {
      const Candidate& cand = cands[c];
      Translation h = live[cand.beam];
      h.log_prob = cand.log_prob;
      if (weights_wanted) h.alignment.push_back(weight_row(r.weights, cand.beam, S));
      if (cand.token == Vocab::eos_id) {
        h.finished = true;
        h.score = normalised(h.log_prob, static_cast<int64_t>(h.tokens.size()) + 1, config.length_penalty);
        finished.push_back(std::move(h));
        if (static_cast<int64_t>(finished.size()) >= K) break;
      } else {
        h.tokens.push_back(cand.token);
        next.push_back(std::move(h));
        parents.push_back(cand.beam);
      }
    }
    if (static_cast<int64_t>(finished.size()) >= K) break;
    live = std::move(next);
    if (!live.empty()) state = gather_state(r.state, parents);
  }
  if (finished.empty()) {
    for (Translation& h : live) {
      h.score = normalised(h.log_prob, static_cast<int64_t>(h.tokens.size()), config.length_penalty);
      finished.push_back(std::move(h));
    }
  }
  ATTN_CHECK(!finished.empty(), "beam_search", "no hypothesis survived (max_length ", max_steps, ")");
  // Best by normalised score; the earliest finished wins ties (stable).
  std::size_t best = 0;
  for (std::size_t i = 1; i < finished.size(); ++i)
    if (finished[i].score > finished[best].score) best = i;
  return finished[best];
}

std::vector<Translation> translate_ids(const Seq2Seq& model,
                                       const std::vector<std::vector<int32_t>>& sources,
                                       const DecodeConfig& config) {
  if (config.beam <= 1) return greedy_decode(model, sources, config);
  std::vector<Translation> out;
  out.reserve(sources.size());
  for (const auto& s : sources) out.push_back(beam_decode(model, s, config));
  return out;
}

}  // namespace attn::seq2seq
