#include "seq2seq/decoding/length_penalty.h"

#include <algorithm>
#include <cmath>

#include "attn/error.h"

namespace attn::seq2seq {

std::vector<LengthPenaltyScore> score_length_penalties(const Translator& translator,
                                                       const std::vector<SentencePair>& pairs,
                                                       const DecodeConfig& config,
                                                       const std::vector<double>& length_penalties) {
  constexpr const char* kOp = "length penalty";
  ATTN_CHECK(config.beam >= 2, kOp, "tuning the length penalty needs beam search (beam >= 2), got beam ",
             config.beam);
  ATTN_CHECK(!length_penalties.empty(), kOp, "no length penalties to score");
  for (double alpha : length_penalties)
    ATTN_CHECK(std::isfinite(alpha), kOp, "length penalties must be finite, got ", alpha);
  std::vector<std::string> sources;
  std::vector<std::vector<std::string>> references(1);
  for (const SentencePair& p : pairs) {
    sources.push_back(p.source);
    references[0].push_back(p.target);
  }
  DecodeConfig search = config;
  search.alignment = false;
  search.nbest = config.beam;  // every finished hypothesis (the search stops at beam of them)
  const std::vector<Translation> found = translator.translate_all(sources, search);
  std::vector<LengthPenaltyScore> scores;
  for (double alpha : length_penalties) {
    LengthPenaltyScore s;
    s.length_penalty = alpha;
    for (const Translation& t : found) {
      const std::vector<Translation>& list = t.nbest.empty() ? std::vector<Translation>{t} : t.nbest;
      // The list is in the search's order (best first at its alpha); a stable choice keeps that
      // order among equal scores, so the search's own alpha picks what the search picked.
      std::size_t best = 0;
      double best_score = -INFINITY;
      for (std::size_t i = 0; i < list.size(); ++i) {
        const int64_t length = static_cast<int64_t>(list[i].tokens.size()) + (list[i].finished ? 1 : 0);
        const double score = length_normalised_score(list[i].log_prob, length, alpha);
        if (score > best_score) best = i, best_score = score;
      }
      s.hypothesis_texts.push_back(translator.target_text(list[best]));
    }
    s.bleu = sacre_bleu(s.hypothesis_texts, references);
    s.chrf = corpus_chrf(s.hypothesis_texts, references);
    scores.push_back(std::move(s));
  }
  return scores;
}

const LengthPenaltyScore& best_length_penalty(const std::vector<LengthPenaltyScore>& scores) {
  ATTN_CHECK(!scores.empty(), "length penalty", "no scores to choose from");
  const LengthPenaltyScore* best = &scores[0];
  for (const LengthPenaltyScore& s : scores)
    if (s.bleu.bleu > best->bleu.bleu ||
        (s.bleu.bleu == best->bleu.bleu && s.length_penalty < best->length_penalty))
      best = &s;
  return *best;
}

}  // namespace attn::seq2seq
