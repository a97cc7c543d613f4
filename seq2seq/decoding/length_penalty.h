// Choosing beam search's length penalty on held-out pairs, as translators tune it (Wu et al.
// 2016 tuned alpha on a development set).
//
// The search itself never looks at alpha: live hypotheses are ranked by their summed
// log-probability, and it stops when `beam` hypotheses have finished; alpha only ranks the
// finished ones (decode.h). So one search whose n-best list keeps every finished hypothesis
// answers for every alpha at once: each alpha re-ranks the list. At the alpha the search was
// run with, the choice is exactly the search's own.
#pragma once

#include <string>
#include <vector>

#include "seq2seq/metrics/sacrebleu.h"
#include "seq2seq/training/train.h"

namespace attn::seq2seq {

struct LengthPenaltyScore {
  double length_penalty = 0.0;
  BleuScore bleu;  // sacreBLEU-style, detokenised, against the pairs' targets
  ChrfScore chrf;
  std::vector<std::string> hypothesis_texts;
};

// Scores each of `length_penalties` on `pairs` with beam search of width config.beam (>= 2),
// from one search at config.length_penalty. Throws attn::Error for a beam below 2, no length
// penalties, or a non-finite one.
std::vector<LengthPenaltyScore> score_length_penalties(const Translator& translator,
                                                       const std::vector<SentencePair>& pairs,
                                                       const DecodeConfig& config,
                                                       const std::vector<double>& length_penalties);

// The best of `scores` by BLEU; the smaller penalty wins ties. `scores` must not be empty.
const LengthPenaltyScore& best_length_penalty(const std::vector<LengthPenaltyScore>& scores);

}  // namespace attn::seq2seq
