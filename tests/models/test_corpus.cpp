// The embedded English -> French corpus: determinism, split properties, the held-out
// combinations, and French grammar checked against hand-written expectations.
#include <gtest/gtest.h>

#include <algorithm>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "attn/error.h"
#include "seq2seq/data/corpus.h"
#include "seq2seq/data/vocab.h"

namespace attn::seq2seq {
namespace {

// One corpus for the read-only tests (generating it takes a fraction of a second).
const Corpus& default_corpus() {
  static const Corpus corpus = generate_corpus(CorpusConfig{});
  return corpus;
}

std::vector<const SentencePair*> all_pairs(const Corpus& c) {
  std::vector<const SentencePair*> out;
  for (const auto* split : {&c.train, &c.valid, &c.test, &c.test_long}) {
    for (const SentencePair& p : *split) out.push_back(&p);
  }
  return out;
}

// Whether `needle` occurs as a run of consecutive tokens in `hay`.
bool contains_tokens(const Tokens& hay, const Tokens& needle) {
  return std::search(hay.begin(), hay.end(), needle.begin(), needle.end()) != hay.end();
}

int64_t count_token(const Tokens& tokens, const std::string& token) {
  return std::count(tokens.begin(), tokens.end(), token);
}

TEST(Corpus, IsDeterministicFromTheSeed) {
  CorpusConfig config;
  config.train_pairs = 500;
  config.valid_pairs = 50;
  config.test_pairs = 50;
  config.long_test_pairs = 50;
  const Corpus a = generate_corpus(config);
  const Corpus b = generate_corpus(config);
  EXPECT_EQ(a.train, b.train);
  EXPECT_EQ(a.valid, b.valid);
  EXPECT_EQ(a.test, b.test);
  EXPECT_EQ(a.test_long, b.test_long);
  config.seed = 2;
  const Corpus c = generate_corpus(config);
  EXPECT_NE(a.train, c.train);
}

TEST(Corpus, SplitsHaveTheRequestedSizesLengthsAndNoSharedSentence) {
  const Corpus& c = default_corpus();
  const CorpusConfig config;
  ASSERT_EQ(static_cast<int64_t>(c.train.size()), config.train_pairs);
  ASSERT_EQ(static_cast<int64_t>(c.valid.size()), config.valid_pairs);
  ASSERT_EQ(static_cast<int64_t>(c.test.size()), config.test_pairs);
  ASSERT_EQ(static_cast<int64_t>(c.test_long.size()), config.long_test_pairs);

  std::set<std::string> sources;
  for (const SentencePair* p : all_pairs(c)) {
    EXPECT_TRUE(sources.insert(p->source).second) << "sentence in two places: " << p->source;
  }
  int64_t longest_train = 0;
  int64_t shortest = 1000;
  for (const auto* split : {&c.train, &c.valid, &c.test}) {
    for (const SentencePair& p : *split) {
      const auto n = static_cast<int64_t>(tokenize(p.source).size());
      longest_train = std::max(longest_train, n);
      shortest = std::min(shortest, n);
    }
  }
  EXPECT_EQ(longest_train, config.max_train_tokens);
  EXPECT_EQ(shortest, config.min_tokens);
  int64_t longest = 0;
  for (const SentencePair& p : c.test_long) {
    const auto n = static_cast<int64_t>(tokenize(p.source).size());
    EXPECT_GT(n, longest_train) << p.source;
    longest = std::max(longest, n);
  }
  EXPECT_GE(longest, 24) << "the long split should reach well past the training lengths";
}

TEST(Corpus, TextFollowsTheTokeniserConvention) {
  // tokenize() of a corpus sentence gives back exactly its space-separated tokens: the corpus
  // is already lowercase except names and "I", with punctuation split off.
  TokenizeOptions options;
  options.is_name = is_corpus_name;
  int64_t initial_names = 0;
  for (const SentencePair* p : all_pairs(default_corpus())) {
    EXPECT_EQ(join_tokens(tokenize(p->source, options)), p->source);
    EXPECT_EQ(join_tokens(tokenize(p->target, options)), p->target);
    initial_names += is_corpus_name(tokenize(p->source, options).front());
  }
  EXPECT_GT(initial_names, 100) << "sentence-initial names exercise is_name";
  EXPECT_TRUE(is_corpus_name("Marie"));
  EXPECT_FALSE(is_corpus_name("marie"));
}

TEST(Corpus, VocabulariesAreModest) {
  std::vector<Tokens> en, fr;
  for (const SentencePair& p : default_corpus().train) {
    en.push_back(tokenize(p.source));
    fr.push_back(tokenize(p.target));
  }
  const Vocab en_vocab = Vocab::build(en);
  const Vocab fr_vocab = Vocab::build(fr);
  EXPECT_GE(en_vocab.size(), 150);
  EXPECT_LE(en_vocab.size(), 300);
  EXPECT_GE(fr_vocab.size(), 200);
  EXPECT_LE(fr_vocab.size(), 350);
}

// True when the English tokens use `adjective` on `noun` attributively: "red horse(s)" or,
// with a second adjective between them, "small red horse(s)" / "red ... horse" in one phrase.
bool has_attributive(const Tokens& t, const HeldOutCombination& h) {
  for (std::size_t i = 0; i < t.size(); ++i) {
    if (t[i] != h.adjective) continue;
    for (std::size_t k = i + 1; k <= i + 2 && k < t.size(); ++k) {
      if (t[k] == h.noun || t[k] == h.noun_plural) return true;
    }
  }
  return false;
}

// Attributive, or predicative "horse(s) [that ...] is/are [not] red": the noun anywhere before
// the copula (a relative clause may stand between them).
bool has_any_use(const Tokens& t, const HeldOutCombination& h) {
  if (has_attributive(t, h)) return true;
  bool noun_seen = false;
  for (std::size_t i = 0; i + 1 < t.size(); ++i) {
    noun_seen = noun_seen || t[i] == h.noun || t[i] == h.noun_plural;
    if (noun_seen && (t[i] == "is" || t[i] == "are")) {
      const std::size_t a = t[i + 1] == "not" ? i + 2 : i + 1;
      if (a < t.size() && t[a] == h.adjective) return true;
    }
  }
  return false;
}

TEST(Corpus, TestSplitHoldsOnlyUnseenNounAdjectiveCombinations) {
  const Corpus& c = default_corpus();
  ASSERT_GE(c.held_out_combinations.size(), 20u);
  // Every word of a held-out combination is still seen in training, just never together.
  std::set<std::string> train_words;
  for (const SentencePair& p : c.train) {
    for (const std::string& w : tokenize(p.source)) train_words.insert(w);
  }
  for (const HeldOutCombination& h : c.held_out_combinations) {
    EXPECT_TRUE(train_words.count(h.adjective)) << h.adjective;
    EXPECT_TRUE(train_words.count(h.noun) || train_words.count(h.noun_plural)) << h.noun;
  }
  for (const auto* split : {&c.train, &c.valid, &c.test_long}) {
    for (const SentencePair& p : *split) {
      const Tokens t = tokenize(p.source);
      for (const HeldOutCombination& h : c.held_out_combinations) {
        ASSERT_FALSE(has_attributive(t, h)) << "\"" << h.adjective << " " << h.noun << "\" in " << p.source;
      }
    }
  }
  for (const SentencePair& p : c.test) {
    const Tokens t = tokenize(p.source);
    const bool found = std::any_of(c.held_out_combinations.begin(), c.held_out_combinations.end(),
                                   [&](const HeldOutCombination& h) { return has_any_use(t, h); });
    EXPECT_TRUE(found) << "no held-out combination in test sentence: " << p.source;
  }
}

// English phrase -> the French phrase it must produce, wherever the English appears.
struct PhraseRule {
  const char* english;
  const char* french;
};

TEST(Corpus, AdjectivesFollowTheNounAndAgree) {
  const PhraseRule rules[] = {
      {"the black cat", "le chat noir"},
      {"the black cats", "les chats noirs"},
      {"white goat", "chèvre blanche"},
      {"red car", "voiture rouge"},
      {"small black cat", "petit chat noir"},
      {"big white goat", "grande chèvre blanche"},
      {"old goats", "vieilles chèvres"},
      {"the happy girls", "les filles heureuses"},
      {"the horses", "les chevaux"},
  };
  std::map<std::string, int> fired;
  for (const SentencePair* p : all_pairs(default_corpus())) {
    const Tokens en = tokenize(p->source);
    const Tokens fr = tokenize(p->target);
    for (const PhraseRule& rule : rules) {
      const Tokens e = tokenize(rule.english);
      // Token sequences: "the black cat" does not fire on "the black cats".
      if (!contains_tokens(en, e)) continue;
      ++fired[rule.english];
      EXPECT_TRUE(contains_tokens(fr, tokenize(rule.french)))
          << rule.english << " -> expected " << rule.french << "\n  " << p->source << "\n  " << p->target;
    }
  }
  for (const PhraseRule& rule : rules) EXPECT_GT(fired[rule.english], 0) << "never seen: " << rule.english;
}

// A few French nouns and adjectives with their gender and number, written out by hand: every
// article directly before, and every adjective directly after, such a noun must agree with it.
TEST(Corpus, ArticlesAndAdjectivesAgreeWithFrenchNouns) {
  struct Form {
    char gender;  // 'm' or 'f'
    bool plural;
  };
  const std::map<std::string, Form> nouns = {
      {"chat", {'m', false}},    {"chats", {'m', true}},     {"voiture", {'f', false}},
      {"voitures", {'f', true}}, {"maison", {'f', false}},   {"maisons", {'f', true}},
      {"chèvre", {'f', false}},  {"chèvres", {'f', true}},   {"gâteau", {'m', false}},
      {"gâteaux", {'m', true}},  {"souris", {'f', false}},  // souris: number from the article
      {"cheval", {'m', false}},  {"chevaux", {'m', true}},
  };
  const std::map<std::string, Form> adjectives = {
      {"noir", {'m', false}},    {"noire", {'f', false}},     {"noirs", {'m', true}},
      {"noires", {'f', true}},   {"blanc", {'m', false}},     {"blanche", {'f', false}},
      {"blancs", {'m', true}},   {"blanches", {'f', true}},   {"heureux", {'m', false}},
      {"heureuse", {'f', false}}, {"heureuses", {'f', true}}, {"vert", {'m', false}},
      {"verte", {'f', false}},   {"verts", {'m', true}},      {"vertes", {'f', true}},
  };
  const std::map<std::string, Form> articles = {
      {"le", {'m', false}}, {"un", {'m', false}}, {"la", {'f', false}}, {"une", {'f', false}},
  };
  int64_t checked = 0;
  for (const SentencePair* p : all_pairs(default_corpus())) {
    const Tokens fr = tokenize(p->target);
    for (std::size_t i = 0; i < fr.size(); ++i) {
      auto noun = nouns.find(fr[i]);
      if (noun == nouns.end()) continue;
      Form form = noun->second;
      if (i > 0 && fr[i - 1] == "les") {
        EXPECT_TRUE(form.plural || fr[i] == "souris") << p->target;
        form.plural = true;
      }
      if (i > 0) {
        auto article = articles.find(fr[i - 1]);
        if (article != articles.end()) {
          ++checked;
          EXPECT_EQ(article->second.gender, form.gender) << fr[i - 1] << " " << fr[i] << " in " << p->target;
          EXPECT_FALSE(form.plural && fr[i] != "souris") << p->target;
        }
      }
      if (i + 1 < fr.size() && fr[i] != "souris") {
        auto adjective = adjectives.find(fr[i + 1]);
        // heureux is both masculine singular and plural.
        if (adjective != adjectives.end() && fr[i + 1] != "heureux") {
          ++checked;
          EXPECT_EQ(adjective->second.gender, form.gender) << p->target;
          EXPECT_EQ(adjective->second.plural, form.plural) << p->target;
        }
      }
    }
  }
  EXPECT_GT(checked, 1000);
}

TEST(Corpus, VerbsAgreeWithTheirSubjects) {
  // Third person plural subjects: the verb (after ne and an object pronoun) ends in -nt.
  int64_t checked = 0;
  for (const SentencePair* p : all_pairs(default_corpus())) {
    const Tokens fr = tokenize(p->target);
    for (std::size_t i = 0; i + 1 < fr.size(); ++i) {
      if (fr[i] != "ils") continue;
      std::size_t v = i + 1;
      while (v < fr.size() && (fr[v] == "ne" || fr[v] == "n'" || fr[v] == "me" || fr[v] == "le" ||
                               fr[v] == "la" || fr[v] == "les" || fr[v] == "nous" || fr[v] == "vous")) {
        ++v;
      }
      ASSERT_LT(v, fr.size());
      EXPECT_TRUE(fr[v].size() > 2 && fr[v].compare(fr[v].size() - 2, 2, "nt") == 0) << p->target;
      ++checked;
    }
  }
  EXPECT_GT(checked, 500);
  // Subject relatives agree with their head: "les chats qui voient", "le chat qui voit". The
  // head is the nearest determiner before "qui" (heads of relatives are definite).
  int64_t relatives = 0;
  for (const SentencePair* p : all_pairs(default_corpus())) {
    const Tokens fr = tokenize(p->target);
    for (std::size_t i = 1; i + 1 < fr.size(); ++i) {
      if (fr[i] != "qui") continue;
      std::size_t d = i;
      while (d-- > 0 && fr[d] != "le" && fr[d] != "la" && fr[d] != "les") {
      }
      const std::size_t v = fr[i + 1] == "ne" ? i + 2 : i + 1;
      const bool plural_verb = fr[v].size() > 2 && fr[v].compare(fr[v].size() - 2, 2, "nt") == 0;
      EXPECT_EQ(plural_verb, fr[d] == "les") << p->target;
      ++relatives;
    }
  }
  EXPECT_GT(relatives, 100);
  const PhraseRule rules[] = {
      {"we see the", "nous voyons"},
      {"you see the", "vous voyez"},
      {"he does not see the", "il ne voit pas"},
      {"they are not", "ils ne sont pas"},
  };
  for (const PhraseRule& rule : rules) {
    int fired = 0;
    for (const SentencePair* p : all_pairs(default_corpus())) {
      if (!contains_tokens(tokenize(p->source), tokenize(rule.english))) continue;
      ++fired;
      EXPECT_TRUE(contains_tokens(tokenize(p->target), tokenize(rule.french)))
          << rule.english << " -> " << rule.french << "\n  " << p->source << "\n  " << p->target;
    }
    EXPECT_GT(fired, 0) << "never seen: " << rule.english;
  }
}

TEST(Corpus, NegationWrapsTheVerb) {
  for (const SentencePair* p : all_pairs(default_corpus())) {
    const Tokens en = tokenize(p->source);
    const Tokens fr = tokenize(p->target);
    const int64_t nots = count_token(en, "not");
    EXPECT_EQ(count_token(fr, "pas"), nots) << p->source << "\n" << p->target;
    EXPECT_EQ(count_token(fr, "ne") + count_token(fr, "n'"), nots) << p->target;
    // An indefinite object of a negated verb: "not see a cat" -> "pas de chat".
    int64_t negated_indefinites = 0;
    for (std::size_t i = 0; i < en.size(); ++i) {
      if (en[i] != "not") continue;
      const std::size_t object = i + (i + 2 < en.size() && en[i + 2] == "for" ? 3 : 2);
      if (object < en.size() && (en[object] == "a" || en[object] == "an")) ++negated_indefinites;
    }
    int64_t pas_de = 0;
    for (std::size_t i = 0; i + 1 < fr.size(); ++i) pas_de += fr[i] == "pas" && (fr[i + 1] == "de" || fr[i + 1] == "d'");
    EXPECT_EQ(pas_de, negated_indefinites) << p->source << "\n" << p->target;
  }
}

TEST(Corpus, ObjectPronounsGoBeforeTheVerbWithTheAntecedentsGender) {
  int stand_alone = 0;
  int anaphoric = 0;
  for (const SentencePair* p : all_pairs(default_corpus())) {
    const Tokens en = tokenize(p->source);
    const Tokens fr = tokenize(p->target);
    if (contains_tokens(en, {"I", "see", "him", "."})) {
      ++stand_alone;
      EXPECT_TRUE(contains_tokens(fr, {"je", "le", "vois", "."})) << p->target;
    }
    if (contains_tokens(en, {"she", "does", "not", "see", "us"})) {
      ++stand_alone;
      EXPECT_TRUE(contains_tokens(fr, {"elle", "ne", "nous", "voit", "pas"})) << p->target;
    }
    // "... the car and he takes it": the pronoun is la, from voiture.
    const auto it = std::find(en.begin(), en.end(), "it");
    if (it != en.end()) {
      const bool car = contains_tokens(en, {"the", "car"}) || contains_tokens(en, {"a", "car"});
      const bool no_other_noun_object = std::count(en.begin(), en.end(), "the") + std::count(en.begin(), en.end(), "a") == 1;
      if (car && no_other_noun_object) {
        ++anaphoric;
        EXPECT_EQ(count_token(fr, "la") + count_token(fr, "une"), 2) << p->source << "\n" << p->target;
      }
    }
  }
  EXPECT_GT(stand_alone, 0);
  EXPECT_GT(anaphoric, 0);
}

TEST(Corpus, NumbersAndNamesAreCopiedUnchanged) {
  int64_t copies = 0;
  for (const SentencePair* p : all_pairs(default_corpus())) {
    auto copied = [](const Tokens& tokens) {
      std::multiset<std::string> out;
      for (const std::string& t : tokens) {
        const bool digits = std::all_of(t.begin(), t.end(), [](char ch) { return ch >= '0' && ch <= '9'; });
        const bool name = t[0] >= 'A' && t[0] <= 'Z' && t != "I";
        if (digits || name) out.insert(t);
      }
      return out;
    };
    const auto en = copied(tokenize(p->source));
    EXPECT_EQ(en, copied(tokenize(p->target))) << p->source << "\n" << p->target;
    copies += static_cast<int64_t>(en.size());
  }
  EXPECT_GT(copies, 5000);
}

TEST(Corpus, ElisionAndContraction) {
  const PhraseRule rules[] = {
      {"is not", "n' est pas"},
      {"near the garden", "près du jardin"},
      {"near the house", "près de la maison"},
      {"near the gardens", "près des jardins"},
      {"because he", "parce qu' il"},
  };
  for (const PhraseRule& rule : rules) {
    int fired = 0;
    for (const SentencePair* p : all_pairs(default_corpus())) {
      if (!contains_tokens(tokenize(p->source), tokenize(rule.english))) continue;
      ++fired;
      EXPECT_TRUE(contains_tokens(tokenize(p->target), tokenize(rule.french)))
          << rule.english << " -> " << rule.french << "\n  " << p->source << "\n  " << p->target;
    }
    EXPECT_GT(fired, 0) << "never seen: " << rule.english;
  }
  // No unelided pair survives: "ne est", "que il", "de le".
  for (const SentencePair* p : all_pairs(default_corpus())) {
    const Tokens fr = tokenize(p->target);
    EXPECT_FALSE(contains_tokens(fr, {"ne", "est"}) || contains_tokens(fr, {"que", "il"}) ||
                 contains_tokens(fr, {"que", "elle"}) || contains_tokens(fr, {"de", "le"}) ||
                 contains_tokens(fr, {"de", "les"}) || contains_tokens(fr, {"que", "une"}))
        << p->target;
  }
}

TEST(Corpus, RejectsImpossibleConfigurations) {
  CorpusConfig config;
  config.min_tokens = 10;
  config.max_train_tokens = 8;
  EXPECT_THROW(generate_corpus(config), Error);
  config = CorpusConfig{};
  config.held_out_fraction = 1.0;
  EXPECT_THROW(generate_corpus(config), Error);
  config = CorpusConfig{};
  config.train_pairs = -1;
  EXPECT_THROW(generate_corpus(config), Error);
  // No sentence is longer than 60 tokens, so the long split can never fill: the generator
  // stalls and says so instead of looping forever.
  config = CorpusConfig{};
  config.train_pairs = 200;
  config.valid_pairs = 20;
  config.test_pairs = 20;
  config.max_train_tokens = 60;
  try {
    generate_corpus(config);
    FAIL() << "expected attn::Error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("could not fill the splits"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace attn::seq2seq
