#include "seq2seq/metrics/bleu.h"

#include <cmath>
#include <cstdio>
#include <map>

#include "attn/error.h"

namespace attn::seq2seq {

namespace {

void check_corpus(const char* op, const std::vector<Tokens>& hypotheses, const std::vector<Tokens>& references) {
  ATTN_CHECK(hypotheses.size() == references.size(), op, "hypotheses has ", hypotheses.size(),
             " sentences, references has ", references.size());
  ATTN_CHECK(!hypotheses.empty(), op, "the corpus is empty");
}

// Counts of every n-gram of `tokens` (n-grams as token vectors; corpora here are small).
std::map<std::vector<std::string>, int64_t> ngram_counts(const Tokens& tokens, std::size_t n) {
  std::map<std::vector<std::string>, int64_t> counts;
  for (std::size_t i = 0; i + n <= tokens.size(); ++i) {
    ++counts[std::vector<std::string>(tokens.begin() + static_cast<std::ptrdiff_t>(i),
                                      tokens.begin() + static_cast<std::ptrdiff_t>(i + n))];
  }
  return counts;
}

}  // namespace

BleuScore corpus_bleu(const std::vector<Tokens>& hypotheses, const std::vector<Tokens>& references) {
  check_corpus("bleu", hypotheses, references);
  BleuScore score;
  for (std::size_t s = 0; s < hypotheses.size(); ++s) {
    const Tokens& hyp = hypotheses[s];
    const Tokens& ref = references[s];
    score.hypothesis_length += static_cast<int64_t>(hyp.size());
    score.reference_length += static_cast<int64_t>(ref.size());
    for (std::size_t n = 1; n <= 4; ++n) {
      if (hyp.size() < n) continue;
      score.totals[n - 1] += static_cast<int64_t>(hyp.size() - n + 1);
      const auto ref_counts = ngram_counts(ref, n);
      for (const auto& [gram, count] : ngram_counts(hyp, n)) {
        auto it = ref_counts.find(gram);
        // Clipping: a hypothesis n-gram earns at most as many matches as the reference has.
        if (it != ref_counts.end()) score.matches[n - 1] += std::min(count, it->second);
      }
    }
  }
  double log_precision_sum = 0.0;
  bool any_zero = false;
  for (int n = 0; n < 4; ++n) {
    const double p = score.totals[n] > 0
                         ? static_cast<double>(score.matches[n]) / static_cast<double>(score.totals[n])
                         : 0.0;
    score.precisions[n] = 100.0 * p;
    if (p == 0.0) any_zero = true;
    else log_precision_sum += std::log(p);
  }
  const double c = static_cast<double>(score.hypothesis_length);
  const double r = static_cast<double>(score.reference_length);
  if (c == 0.0) score.brevity_penalty = 0.0;
  else score.brevity_penalty = c > r ? 1.0 : std::exp(1.0 - r / c);
  score.bleu = any_zero ? 0.0 : 100.0 * score.brevity_penalty * std::exp(log_precision_sum / 4.0);
  return score;
}

double exact_match(const std::vector<Tokens>& hypotheses, const std::vector<Tokens>& references) {
  check_corpus("exact_match", hypotheses, references);
  int64_t equal = 0;
  for (std::size_t s = 0; s < hypotheses.size(); ++s) equal += hypotheses[s] == references[s];
  return 100.0 * static_cast<double>(equal) / static_cast<double>(hypotheses.size());
}

std::string format_bleu(const BleuScore& score) {
  char buffer[160];
  std::snprintf(buffer, sizeof(buffer), "BLEU %.2f (p %.1f/%.1f/%.1f/%.1f, BP %.3f, c %lld r %lld)",
                score.bleu, score.precisions[0], score.precisions[1], score.precisions[2],
                score.precisions[3], score.brevity_penalty,
                static_cast<long long>(score.hypothesis_length),
                static_cast<long long>(score.reference_length));
  return buffer;
}

}  // namespace attn::seq2seq
