// Corpus-level BLEU-4 and exact-match accuracy over tokenised sentences (one reference each).
//
// BLEU (Papineni et al., 2002): for n = 1..4, the clipped n-gram matches of every sentence
// (each hypothesis n-gram counts at most as often as it occurs in its reference) are summed over
// the corpus and divided by the corpus's total hypothesis n-grams: p_n = sum matches / sum
// totals. BLEU = BP * exp(mean_n log p_n), with the brevity penalty BP = exp(1 - r / c) when the
// total hypothesis length c is at most the total reference length r, else 1. No smoothing: a
// corpus without a single matching 4-gram scores 0, as in the paper and multi-bleu.perl.
//
// Tokenisation is the caller's: pass the tokens of seq2seq::tokenize (see vocab.h), so scores
// are over lowercased words with punctuation as separate tokens.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "seq2seq/data/vocab.h"

namespace attn::seq2seq {

struct BleuScore {
  double bleu = 0.0;                        // 0..100
  std::array<double, 4> precisions{};       // p_1..p_4 in 0..100
  std::array<int64_t, 4> matches{};         // clipped matching n-grams, summed over the corpus
  std::array<int64_t, 4> totals{};          // hypothesis n-grams, summed over the corpus
  double brevity_penalty = 0.0;             // 0..1
  int64_t hypothesis_length = 0;            // c
  int64_t reference_length = 0;             // r
};

// Throws attn::Error when the two lists differ in length or are empty.
BleuScore corpus_bleu(const std::vector<Tokens>& hypotheses, const std::vector<Tokens>& references);

// Percentage (0..100) of hypotheses equal to their reference token for token.
double exact_match(const std::vector<Tokens>& hypotheses, const std::vector<Tokens>& references);

// "BLEU 87.31 (p 95.1/89.0/84.2/80.3, BP 0.998, c 1204 r 1206)"
std::string format_bleu(const BleuScore& score);

}  // namespace attn::seq2seq
