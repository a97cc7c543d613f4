// BLEU and chrF as sacreBLEU (github.com/mjpost/sacrebleu, 2.x) computes them, so a score from
// `attn eval` can be compared with published numbers. Inputs are detokenised text, one string
// per segment, exactly as a translation would be written to a file; references come as streams
// (references[k][i] is the k-th reference of segment i), as sacreBLEU's corpus_bleu takes them.
//
// BLEU (sacreBLEU's defaults: `sacrebleu -m bleu`):
//   - each segment is right-stripped of (Unicode) whitespace, optionally lowercased, and
//     tokenised by 13a, the mteval-v13a.pl rules: "<skipped>" removed, "-\n" joined, "\n" made a
//     space, &quot; &amp; &lt; &gt; unescaped; then ASCII punctuation and symbols
//     ({|}~[\]^_` !"#$%& ()*+ :;<=>?@ /) are split off; "." and "," are split off unless both
//     neighbours are digits ("3.14" and "1,000" stay whole); "-" is split off after a digit;
//     whitespace runs collapse. Case-sensitive by default ("case:mixed").
//   - n-grams (n = 1..4) are counted over whitespace-separated tokens; a hypothesis n-gram
//     matches at most as often as it occurs in the reference (with several references, the most
//     often in any one of them); matches and totals are summed over the corpus.
//   - brevity penalty: BP = exp(1 - r / c) when c < r (0 when c = 0), else 1, with c the total
//     hypothesis length and r the sum over segments of the reference length closest to the
//     hypothesis length (the shorter on a tie).
//   - smoothing "exp" (mteval's): the k-th order with no match counts as 1 / (2^k total)
//     instead of 0. A corpus without any matching n-gram scores 0.
//   - BLEU = BP exp(mean_n log p_n), reported in 0..100; a zero precision's log is -9999999999.
// chrF (sacreBLEU's defaults: chrF2, character n-grams 1..6, whitespace removed, no word
// n-grams, effective-order averaging): per order the character n-gram statistics (hypothesis
// count, reference count, clipped matches; the hypothesis count is 0 when the reference has no
// n-gram of that order) of the best-scoring reference are summed over the corpus; precision
// and recall are averaged over the orders both sides have, and combined as
// F_beta = (1 + beta^2) P R / (beta^2 P + R). Characters are Unicode code points.
// chrF++ (word_order 2, Popovic 2017) adds word unigram and bigram orders to the character
// ones, words split at whitespace with one ASCII punctuation mark split off a word's end (or
// else its start), as sacreBLEU does.
//
// Proven against the values sacreBLEU's own test suite expects (tests/models/test_sacrebleu.cpp).
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "seq2seq/metrics/bleu.h"

namespace attn::seq2seq {

enum class BleuTokenizer { thirteen_a, none };
enum class BleuSmoothing { none, floor, add_k, exp };

struct SacreBleuOptions {
  BleuTokenizer tokenizer = BleuTokenizer::thirteen_a;
  bool lowercase = false;
  BleuSmoothing smoothing = BleuSmoothing::exp;
  double smooth_value = -1.0;    // < 0: sacreBLEU's default (floor 0.1, add-k 1)
  bool effective_order = false;  // average only over the orders the hypotheses have
};

// The 13a tokenisation of one segment, tokens joined by single spaces.
std::string tokenize_13a(std::string_view text);

// Throws attn::Error when there are no reference streams or a stream's length differs from the
// hypotheses', or when a segment is not valid UTF-8 (naming the segment).
BleuScore sacre_bleu(const std::vector<std::string>& hypotheses,
                     const std::vector<std::vector<std::string>>& references,
                     const SacreBleuOptions& options = {});

// BLEU from its sufficient statistics (sacreBLEU's BLEU.compute_bleu).
BleuScore bleu_from_statistics(const std::array<int64_t, 4>& matches,
                               const std::array<int64_t, 4>& totals, int64_t hypothesis_length,
                               int64_t reference_length, const SacreBleuOptions& options = {});

// "BLEU|nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp = 20.8 54.4/26.6/14.9/8.7 (BP = 1.000
// ratio = 1.026 hyp_len = 62880 ref_len = 61287)", sacreBLEU's line without its version field.
std::string format_sacre_bleu(const BleuScore& score, int64_t references = 1,
                              const SacreBleuOptions& options = {});

struct ChrfOptions {
  int char_order = 6;
  int word_order = 0;          // 2: chrF++ (word unigrams and bigrams beside the characters)
  double beta = 2.0;
  bool lowercase = false;      // ASCII and Latin-1 capitals (seq2seq::lowercase)
  bool whitespace = false;     // keep whitespace inside the character n-grams
  bool eps_smoothing = false;  // chrF++.py / NLTK style: average the per-order F scores
};

struct ChrfScore {
  double score = 0.0;  // 0..100
  // Per order (characters 1..char_order, then words 1..word_order): hypothesis n-grams,
  // reference n-grams, matches (corpus sums).
  std::vector<std::array<int64_t, 3>> statistics;
};

ChrfScore corpus_chrf(const std::vector<std::string>& hypotheses,
                      const std::vector<std::vector<std::string>>& references,
                      const ChrfOptions& options = {});

// "chrF2|nrefs:1|case:mixed|eff:yes|nc:6|nw:0|space:no = 52.0" ("chrF2++|...|nw:2|..." for chrF++)
std::string format_chrf(const ChrfScore& score, int64_t references = 1,
                        const ChrfOptions& options = {});

}  // namespace attn::seq2seq
