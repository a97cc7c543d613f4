// Subword vocabularies (seq2seq/data/subword.h): SentencePiece BPE and unigram learnt in-process,
// round trips of cased, accented text with numbers, URLs and placeholders, byte fallback for
// characters never seen, the serialized model, base64.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "attn/error.h"
#include "seq2seq/data/subword.h"

namespace s2s = attn::seq2seq;

namespace {

std::vector<std::string> training_text() {
  const std::vector<std::string> base = {
      "Could not open file '%s': %s",
      "Impossible d'ouvrir le fichier « %s » : %s",
      "Saved %d files in %.2f seconds",
      "%d fichiers enregistrés en %.2f secondes",
      "See https://www.debian.org/doc/ for details, e.g. the FAQ.",
      "Voir https://www.debian.org/doc/ pour les détails, p. ex. la FAQ.",
      "Can't connect to {0} on port 8080",
      "Impossible de se connecter à {0} sur le port 8080",
      "Élément supprimé. Œuvre complète ? Ça marche !",
      "Version 3.14 released; 1,000 users upgraded.",
  };
  std::vector<std::string> out;
  for (int r = 0; r < 20; ++r)
    for (const std::string& s : base) out.push_back(s);
  return out;
}

class SubwordKinds : public ::testing::TestWithParam<s2s::SubwordKind> {};

TEST_P(SubwordKinds, RoundTripsTrainingTextExactly) {
  s2s::SubwordConfig config;
  config.kind = GetParam();
  config.vocab_size = 400;
  const s2s::SubwordModel model = s2s::SubwordModel::train(training_text(), config);
  for (const std::string& s : training_text()) {
    const s2s::Tokens pieces = model.encode(s);
    EXPECT_EQ(model.decode(pieces), s);
  }
  // Placeholders are single pieces.
  const s2s::Tokens pieces = model.encode("Saved %d of %s in {0}");
  for (const char* p : {"%d", "%s", "{0}"})
    EXPECT_NE(std::find(pieces.begin(), pieces.end(), p), pieces.end()) << p;
}

TEST_P(SubwordKinds, ByteFallbackForUnseenCharacters) {
  s2s::SubwordConfig config;
  config.kind = GetParam();
  config.vocab_size = 400;
  const s2s::SubwordModel model = s2s::SubwordModel::train(training_text(), config);
  const s2s::Vocab vocab = s2s::subword_vocab(model);
  const std::string text = "Ünïcödé ✓ 東京 Preah Vihear 42";
  const s2s::Tokens pieces = model.encode(text);
  for (const std::string& p : pieces) EXPECT_TRUE(vocab.contains(p)) << p;  // no <unk>
  EXPECT_EQ(model.decode(pieces), text);
}

INSTANTIATE_TEST_SUITE_P(Subword, SubwordKinds,
                         ::testing::Values(s2s::SubwordKind::bpe, s2s::SubwordKind::unigram),
                         [](const auto& info) { return std::string(s2s::subword_kind_name(info.param)); });

TEST(Subword, SerializedModelReloadsAndVocabIsDeterministic) {
  s2s::SubwordConfig config;
  config.vocab_size = 380;
  const s2s::SubwordModel a = s2s::SubwordModel::train(training_text(), config);
  const s2s::SubwordModel b = s2s::SubwordModel::train(training_text(), config);
  EXPECT_EQ(s2s::subword_vocab(a), s2s::subword_vocab(b));
  const s2s::SubwordModel c = s2s::SubwordModel::from_serialized(
      s2s::base64_decode(s2s::base64_encode(a.serialized()), "test"), "test");
  EXPECT_EQ(s2s::subword_vocab(c), s2s::subword_vocab(a));
  const s2s::Vocab v = s2s::subword_vocab(a);
  EXPECT_EQ(v.token(0), "<pad>");
  EXPECT_EQ(v.token(3), "<eos>");
  EXPECT_LE(v.size(), 380 + 4);
}

TEST(Subword, Errors) {
  EXPECT_THROW(s2s::SubwordModel::train({}, {}), attn::Error);
  EXPECT_THROW(s2s::SubwordModel::train({"", ""}, {}), attn::Error);
  EXPECT_THROW(s2s::SubwordModel::train({"\xff\xfe"}, {}), attn::Error);
  EXPECT_THROW(s2s::SubwordModel::from_serialized("not a model", "x.model"), attn::Error);
  // Byte fallback needs 256 byte pieces besides the characters: SentencePiece says so.
  s2s::SubwordConfig small;
  small.vocab_size = 100;
  EXPECT_THROW(s2s::SubwordModel::train(training_text(), small), attn::Error);
  EXPECT_THROW(s2s::base64_decode("abc", "m"), attn::Error);
  EXPECT_THROW(s2s::base64_decode("ab!d", "m"), attn::Error);
}

TEST(Subword, Base64) {
  for (const std::string& s : std::vector<std::string>{"", "f", "fo", "foo", "foob", "fooba", "foobar", std::string("\0\xff", 2)})
    EXPECT_EQ(s2s::base64_decode(s2s::base64_encode(s), "t"), s);
  EXPECT_EQ(s2s::base64_encode("foobar"), "Zm9vYmFy");
  EXPECT_EQ(s2s::base64_encode("fo"), "Zm8=");
}

}  // namespace
