// sacreBLEU-compatible BLEU and chrF (seq2seq/metrics/sacrebleu.h) against the numbers sacreBLEU's own
// test suite expects, github.com/mjpost/sacrebleu (commit f615c72):
//   test/test_bleu.py  test_corpus_bleu_cases, test_case_scoring, test_case_statistics,
//                      test_case_effective_order, test_case_offset, test_raw_bleu_cases
//   test/test_chrf.py  test_cases (eps smoothing, beta 3), test_cases_effective_order (beta 3),
//                      test_sentence_level_chrf (chrF2, eps smoothing)
// chrF++ (word_order 1 and 2): sacreBLEU 2.6.0's CHRF run on the inputs below (its test suite has
// no chrF++ case; the values were printed by sacrebleu/metrics/chrf.py of that commit).
// sacreBLEU's raw_corpus_bleu is corpus_bleu with tokenize none, floor smoothing and effective
// order; its tests compare with EPSILON 1e-8 (BLEU, as a fraction) and 1e-4 (chrF).
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "attn/error.h"
#include "seq2seq/metrics/sacrebleu.h"

namespace s2s = attn::seq2seq;

namespace {

using Streams = std::vector<std::vector<std::string>>;

const std::vector<std::string> kReadmeHyps = {
    "The dog bit the man.", "It wasn't surprising.", "The man had just bitten him."};
const Streams kReadmeRefs = {
    {"The dog bit the man.", "It was not unexpected.", "The man bit him first."},
    {"The dog had bit the man.", "No one was surprised.", "The man had bitten the dog."}};

s2s::SacreBleuOptions raw(double floor_value) {
  s2s::SacreBleuOptions o;
  o.tokenizer = s2s::BleuTokenizer::none;
  o.smoothing = s2s::BleuSmoothing::floor;
  o.smooth_value = floor_value;
  o.effective_order = true;
  return o;
}

TEST(SacreBleu, CorpusBleuDefaults) {
  EXPECT_NEAR(s2s::sacre_bleu(kReadmeHyps, kReadmeRefs).bleu, 48.530827, 1e-6);
  s2s::SacreBleuOptions none;
  none.tokenizer = s2s::BleuTokenizer::none;
  EXPECT_NEAR(s2s::sacre_bleu(kReadmeHyps, kReadmeRefs, none).bleu, 49.1919566, 1e-6);
  s2s::SacreBleuOptions no_smooth;
  no_smooth.smoothing = s2s::BleuSmoothing::none;
  EXPECT_NEAR(s2s::sacre_bleu(kReadmeHyps, kReadmeRefs, no_smooth).bleu, 48.530827, 1e-6);
  // Empty hypotheses are scored, not removed.
  EXPECT_EQ(s2s::sacre_bleu({"", "", ""}, kReadmeRefs).bleu, 0.0);
}

TEST(SacreBleu, ScoringFromStatistics) {
  s2s::SacreBleuOptions o;
  o.smoothing = s2s::BleuSmoothing::none;
  EXPECT_NEAR(s2s::bleu_from_statistics({9, 7, 5, 3}, {10, 8, 6, 4}, 11, 11, o).bleu / 100,
              0.8375922397, 1e-8);
}

TEST(SacreBleu, RawCorpusBleu) {
  const auto r = s2s::sacre_bleu({"am I am a character sequence"},
                                 {{"I am a symbol string sequence a a"}}, raw(0.01));
  EXPECT_EQ(r.matches, (std::array<int64_t, 4>{4, 2, 1, 0}));
  EXPECT_EQ(r.totals, (std::array<int64_t, 4>{6, 5, 4, 3}));
  EXPECT_NEAR(s2s::sacre_bleu({"am I am a character sequence"},
                              {{"I am a symbol string sequence a a"}}, raw(0.1)).bleu / 100,
              0.1555722182, 1e-8);
  EXPECT_NEAR(s2s::sacre_bleu({"am I am a character sequence"},
                              {{"I am a symbol string sequence a a"}}, raw(0.0)).bleu, 0.0, 1e-8);
  EXPECT_EQ(s2s::sacre_bleu({"this is a test", "another test"}, {{"ref1", "ref2"}}, raw(0.01)).bleu, 0.0);
  EXPECT_NEAR(s2s::sacre_bleu({"this is a test"}, {{"this is a test"}}, raw(0.01)).bleu / 100, 1.0, 1e-8);
  EXPECT_NEAR(s2s::sacre_bleu({"this is a fest"}, {{"this is a test"}}, raw(0.01)).bleu / 100,
              0.223606797749979, 1e-8);
  EXPECT_NEAR(s2s::sacre_bleu({"test"}, {{"a test"}}, raw(0.01)).bleu / 100, 0.3678794411714425, 1e-8);
  EXPECT_NEAR(s2s::sacre_bleu({"a test"}, {{"a test"}}, raw(0.01)).bleu / 100, 1.0, 1e-8);
  EXPECT_NEAR(s2s::sacre_bleu({"a little test"}, {{"a test"}}, raw(0.01)).bleu / 100,
              0.03218297948685433, 1e-8);
}

TEST(SacreBleu, Tokenizer13a) {
  // What sacreBLEU's tokenizer_13a makes of these (checked with its regular expressions in
  // Python; the apostrophe is not in the symbol class, "e.g." is split).
  EXPECT_EQ(s2s::tokenize_13a("The dog bit the man."), "The dog bit the man .");
  EXPECT_EQ(s2s::tokenize_13a("It wasn't 3.14, 1,000 or e.g. 5-6!"),
            "It wasn't 3.14 , 1,000 or e . g . 5 - 6 !");
  EXPECT_EQ(s2s::tokenize_13a("a.. b,,c 1.,2 3-4-5 x.5"), "a . . b , , c 1 . , 2 3 - 4 - 5 x . 5");
  EXPECT_EQ(s2s::tokenize_13a("a &amp; b &lt;x&gt; &quot;q&quot;"), "a & b < x > \" q \"");
  EXPECT_EQ(s2s::tokenize_13a("  Fichier « %s » introuvable :  "),
            "Fichier « % s » introuvable :");
  EXPECT_EQ(s2s::tokenize_13a("http://x.org/a_b"), "http : / / x . org / a _ b");
  EXPECT_EQ(s2s::tokenize_13a(""), "");
}

TEST(SacreBleu, CaseSensitiveAndLowercase) {
  EXPECT_LT(s2s::sacre_bleu({"the dog bit the man ."}, {{"The dog bit the man."}}).bleu, 100.0);
  s2s::SacreBleuOptions lc;
  lc.lowercase = true;
  EXPECT_NEAR(s2s::sacre_bleu({"the dog bit the man ."}, {{"The dog bit the man."}}, lc).bleu, 100.0, 1e-9);
}

TEST(SacreBleu, Errors) {
  EXPECT_THROW(s2s::sacre_bleu({"a"}, {}), attn::Error);
  EXPECT_THROW(s2s::sacre_bleu({"a", "b"}, {{"a"}}), attn::Error);
  EXPECT_THROW(s2s::sacre_bleu({"\xff"}, {{"a"}}), attn::Error);
  EXPECT_THROW(s2s::corpus_chrf({"a"}, {{"a"}, {}}), attn::Error);
}

TEST(SacreChrf, EpsSmoothingBeta3) {
  s2s::ChrfOptions o;
  o.beta = 3;
  o.eps_smoothing = true;
  struct Case { std::vector<std::string> hyp, ref; double expected; };
  const std::vector<Case> cases = {
      {{"abcdefg"}, {"hijklmnop"}, 0.0},
      {{"a"}, {"b"}, 0.0},
      {{""}, {"b"}, 0.0},
      {{""}, {"ref"}, 0.0},
      {{""}, {"reference"}, 0.0},
      {{"aa"}, {"ab"}, 8.3333},
      {{"a", "b"}, {"a", "c"}, 8.3333},
      {{"a"}, {"a"}, 16.6667},
      {{"a b c"}, {"a b c"}, 50.0},
      {{"a b c"}, {"abc"}, 50.0},
      {{" risk assessment must be made of those who are qualified and expertise in the sector - "
        "these are the scientists ."},
       {"risk assessment has to be undertaken by those who are qualified and expert in that area "
        "- that is the scientists ."},
       63.361730},
      {{" Die    Beziehung zwischen  Obama und Netanjahu ist nicht gerade  freundlich. "},
       {"Das Verhältnis zwischen Obama und Netanyahu ist nicht gerade freundschaftlich."},
       64.1302698},
      {{"Niemand hat die Absicht, eine Mauer zu errichten"},
       {"Niemand hat die Absicht, eine Mauer zu errichten"},
       100.0},
  };
  for (const Case& c : cases)
    EXPECT_NEAR(s2s::corpus_chrf(c.hyp, {c.ref}, o).score, c.expected, 1e-4) << c.hyp[0];
}

TEST(SacreChrf, EffectiveOrderBeta3) {
  s2s::ChrfOptions o;
  o.beta = 3;
  struct Case { std::vector<std::string> hyp, ref; double expected; };
  const std::vector<Case> cases = {
      {{"a"}, {"a"}, 100.0},      {{""}, {"reference"}, 0.0},       {{"a b c"}, {"a b c"}, 100.0},
      {{"a b c"}, {"abc"}, 100.0}, {{""}, {"c"}, 0.0},             {{"a", "b"}, {"a", "c"}, 50.0},
      {{"aa"}, {"ab"}, 25.0},
  };
  for (const Case& c : cases)
    EXPECT_NEAR(s2s::corpus_chrf(c.hyp, {c.ref}, o).score, c.expected, 1e-4) << c.hyp[0];
}

TEST(SacreChrf, SentenceLevelChrf2CodePoints) {
  // Czech: accented letters are one character each (code points, not bytes).
  s2s::ChrfOptions o;
  o.eps_smoothing = true;
  EXPECT_NEAR(s2s::corpus_chrf({"Co nás nejvíc trápí, protože lékaři si vybírají, kdo bude žít a kdo zemře."},
                               {{"Nejvíce smutní jsme z toho, že musíme rozhodovat o tom, kdo bude žít a kdo zemře."}}, o).score,
              39.14078509, 1e-4);
  EXPECT_NEAR(s2s::corpus_chrf({"Nebo prostě nemají vybavení, které by jim pomohlo, uvedli lékaři."},
                               {{"A někdy nemáme ani potřebný materiál, abychom jim pomohli, popsali lékaři."}}, o).score,
              31.22557079, 1e-4);
  EXPECT_NEAR(s2s::corpus_chrf({"Lapali po dechu, jejich životy skončily dřív, než skutečně začaly."},
                               {{"Lapali po dechu a pak jejich život skončil - dřív, než skutečně mohl začít, připomněli."}}, o).score,
              57.15704367, 1e-4);
}

TEST(SacreChrf, ChrfPlusPlusAsSacreBleuComputesIt) {
  struct Case {
    int word_order;
    double beta;
    bool lowercase, eps_smoothing;
    std::vector<std::string> hyps;
    std::vector<std::vector<std::string>> refs;
    double expected;
  };
  const std::vector<Case> cases = {
      {2, 2, false, false, {"The cat sat on the mat.", "Hello, world!"},
       {{"The cat is on the mat.", "Hello world !"}}, 68.19184123571235},
      // Accented letters, guillemets, placeholders, an empty hypothesis.
      {2, 2, false, false,
       {"L'ordinateur a été éteint (hier).", "Fichier « %s » introuvable : %d erreurs", ""},
       {{"L'ordinateur est éteint (depuis hier).", "Le fichier « %s » est introuvable : %d erreurs",
         "Rien"}},
       62.99571170301343},
      // Two references (the better one per segment), lowercased.
      {2, 2, true, false, {"Open The FILE, please", "a b c d"},
       {{"open the file please", "a b c e"}, {"Open a file, please.", "a c b d"}}, 76.52572624902795},
      // "(hi)" splits as "(hi" ")"; ".x" as "." "x"; chrF3+.
      {1, 3, false, false, {"(hi) there!", ".x y."}, {{"hi there !", "x y"}}, 65.18365067731627},
      {2, 2, false, true, {"a", "short one", "this is a longer sentence with words"},
       {{"a b", "a short one", "this is a long sentence, with some words"}}, 60.27144368552533},
  };
  for (const Case& c : cases) {
    s2s::ChrfOptions o;
    o.word_order = c.word_order;
    o.beta = c.beta;
    o.lowercase = c.lowercase;
    o.eps_smoothing = c.eps_smoothing;
    const s2s::ChrfScore score = s2s::corpus_chrf(c.hyps, c.refs, o);
    EXPECT_NEAR(score.score, c.expected, 1e-8) << c.hyps[0];
    EXPECT_EQ(score.statistics.size(), static_cast<std::size_t>(6 + c.word_order));
  }
  s2s::ChrfOptions plus_plus;
  plus_plus.word_order = 2;
  EXPECT_EQ(s2s::format_chrf(s2s::corpus_chrf({"a b c"}, {{"a b c"}}, plus_plus), 1, plus_plus),
            "chrF2++|nrefs:1|case:mixed|eff:yes|nc:6|nw:2|space:no = 100.0");
  plus_plus.word_order = -1;
  EXPECT_THROW(s2s::corpus_chrf({"a"}, {{"a"}}, plus_plus), attn::Error);
}

TEST(SacreChrf, FormatsLikeSacreBleu) {
  const s2s::ChrfScore s = s2s::corpus_chrf({"a b c"}, {{"a b c"}});
  EXPECT_EQ(s2s::format_chrf(s), "chrF2|nrefs:1|case:mixed|eff:yes|nc:6|nw:0|space:no = 100.0");
  const s2s::BleuScore b = s2s::sacre_bleu(kReadmeHyps, kReadmeRefs);
  EXPECT_EQ(s2s::format_sacre_bleu(b, 2).substr(0, 55),
            "BLEU|nrefs:2|case:mixed|eff:no|tok:13a|smooth:exp = 48.");
}

}  // namespace
