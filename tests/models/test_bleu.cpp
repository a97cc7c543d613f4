// Corpus BLEU-4 and exact match on cases worked out by hand.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "attn/error.h"
#include "seq2seq/metrics/bleu.h"
#include "support/test_support.h"

namespace attn::seq2seq {
namespace {

// BLEU is a handful of float64 logs, products and one exp: a few roundings of relative size u.
::testing::AssertionResult close(double actual, double expected) {
  const testing::Tolerance tol = testing::tolerance_for(DType::f64, 8);
  const double error = std::abs(actual - expected);
  if (error <= tol.atol + tol.rtol * std::abs(expected)) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "actual " << actual << ", expected " << expected << ", error "
                                       << error;
}

std::vector<Tokens> corpus(std::initializer_list<const char*> sentences) {
  std::vector<Tokens> out;
  for (const char* s : sentences) out.push_back(tokenize(s));
  return out;
}

TEST(Bleu, PerfectMatchIs100) {
  const auto refs = corpus({"the cat sat on the mat .", "le chat noir dort ."});
  const BleuScore s = corpus_bleu(refs, refs);
  EXPECT_TRUE(close(s.bleu, 100.0));
  for (int n = 0; n < 4; ++n) EXPECT_TRUE(close(s.precisions[n], 100.0)) << "order " << n + 1;
  EXPECT_EQ(s.brevity_penalty, 1.0);
  // 7 + 5 tokens: 12 unigrams, 10 bigrams, 8 trigrams, 6 four-grams.
  EXPECT_EQ(s.totals, (std::array<int64_t, 4>{12, 10, 8, 6}));
  EXPECT_EQ(s.matches, s.totals);
}

TEST(Bleu, NoMatchingFourGramIsZero) {
  // hyp a b c d e / ref a b c x e: unigrams 4/5, bigrams ab bc = 2/4, trigram abc = 1/3,
  // four-grams abcd bcde against abcx bcxe = 0/2. One zero precision makes the geometric mean 0.
  const BleuScore s = corpus_bleu(corpus({"a b c d e"}), corpus({"a b c x e"}));
  EXPECT_EQ(s.bleu, 0.0);
  EXPECT_EQ(s.matches, (std::array<int64_t, 4>{4, 2, 1, 0}));
  EXPECT_EQ(s.totals, (std::array<int64_t, 4>{5, 4, 3, 2}));
  EXPECT_TRUE(close(s.precisions[0], 80.0));
  EXPECT_TRUE(close(s.precisions[1], 50.0));
  EXPECT_TRUE(close(s.precisions[2], 100.0 / 3.0));
  EXPECT_EQ(s.precisions[3], 0.0);
  EXPECT_EQ(s.brevity_penalty, 1.0);
}

TEST(Bleu, BrevityPenaltyForShortHypotheses) {
  // hyp "the cat sat on" is a prefix of the 6-token reference: every precision is 1, and
  // BP = exp(1 - r/c) = exp(1 - 6/4) = exp(-0.5).
  const BleuScore s = corpus_bleu(corpus({"the cat sat on"}), corpus({"the cat sat on the mat"}));
  EXPECT_EQ(s.hypothesis_length, 4);
  EXPECT_EQ(s.reference_length, 6);
  EXPECT_TRUE(close(s.brevity_penalty, std::exp(-0.5)));
  EXPECT_TRUE(close(s.bleu, 100.0 * std::exp(-0.5)));  // 60.65...
  // A longer hypothesis is not penalised for length (its precision pays instead).
  const BleuScore longer = corpus_bleu(corpus({"the cat sat on the mat today"}), corpus({"the cat sat on the mat"}));
  EXPECT_EQ(longer.brevity_penalty, 1.0);
  // hyp 6/7 unigrams, 5/6 bigrams, 4/5 trigrams, 3/4 four-grams.
  EXPECT_TRUE(close(longer.bleu, 100.0 * std::pow(6.0 / 7 * 5.0 / 6 * 4.0 / 5 * 3.0 / 4, 0.25)));
}

TEST(Bleu, CountsAreClippedByTheReference) {
  // Papineni et al.'s example: "the" x 7 against a reference with two "the": p1 = 2/7.
  const BleuScore s = corpus_bleu(corpus({"the the the the the the the"}), corpus({"the cat is on the mat"}));
  EXPECT_EQ(s.matches[0], 2);
  EXPECT_EQ(s.totals[0], 7);
  EXPECT_TRUE(close(s.precisions[0], 200.0 / 7.0));
  EXPECT_EQ(s.bleu, 0.0);
}

TEST(Bleu, SumsCountsOverTheCorpusBeforeTheMean) {
  // Sentence 1 matches fully (4, 3, 2, 1 of 4, 3, 2, 1). Sentence 2, hyp a b c e f / ref
  // a b c d f: 4/5, 2/4, 1/3, 0/2, so its own BLEU is 0. The corpus precisions are
  // 8/9, 5/7, 3/5, 1/3 and c = r = 9.
  const BleuScore s = corpus_bleu(corpus({"a b c d", "a b c e f"}), corpus({"a b c d", "a b c d f"}));
  EXPECT_EQ(s.matches, (std::array<int64_t, 4>{8, 5, 3, 1}));
  EXPECT_EQ(s.totals, (std::array<int64_t, 4>{9, 7, 5, 3}));
  EXPECT_EQ(s.brevity_penalty, 1.0);
  EXPECT_TRUE(close(s.bleu, 100.0 * std::pow(8.0 / 9 * 5.0 / 7 * 3.0 / 5 * 1.0 / 3, 0.25)));
  EXPECT_EQ(corpus_bleu(corpus({"a b c e f"}), corpus({"a b c d f"})).bleu, 0.0);
}

TEST(Bleu, EmptyHypothesesAndBadInput) {
  const BleuScore s = corpus_bleu({Tokens{}}, corpus({"a b c d"}));
  EXPECT_EQ(s.bleu, 0.0);
  EXPECT_EQ(s.brevity_penalty, 0.0);
  EXPECT_THROW(corpus_bleu(corpus({"a"}), corpus({"a", "b"})), Error);
  EXPECT_THROW(corpus_bleu({}, {}), Error);
  EXPECT_THROW(exact_match(corpus({"a"}), {}), Error);
}

TEST(Bleu, ExactMatchAndFormatting) {
  const auto refs = corpus({"le chat dort .", "il le voit .", "Marie court .", "je ne sais pas ."});
  const auto hyps = corpus({"le chat dort .", "il la voit .", "Marie court .", "je ne sais pas ."});
  EXPECT_TRUE(close(exact_match(hyps, refs), 75.0));
  EXPECT_TRUE(close(exact_match(refs, refs), 100.0));
  const std::string text = format_bleu(corpus_bleu(refs, refs));
  EXPECT_EQ(text.rfind("BLEU 100.00 (p 100.0/100.0/100.0/100.0, BP 1.000", 0), 0u) << text;
}

}  // namespace
}  // namespace attn::seq2seq
