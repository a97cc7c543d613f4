// Tokenisation, the vocabulary, and sentence-pair files with every kind of bad line.
#include <gtest/gtest.h>

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "attn/error.h"
#include "seq2seq/data/pairs_file.h"
#include "seq2seq/data/vocab.h"

namespace attn::seq2seq {
namespace {

namespace fs = std::filesystem;

// A fresh directory per test under the system temp dir, removed afterwards.
class TempDir {
 public:
  TempDir() {
    path_ = fs::temp_directory_path() /
            ("attn_vocab_pairs_" + std::to_string(::getpid()) + "_" + std::to_string(counter_++));
    fs::create_directories(path_);
  }
  ~TempDir() { fs::remove_all(path_); }
  std::string file(const std::string& name) const { return (path_ / name).string(); }

 private:
  static inline int counter_ = 0;
  fs::path path_;
};

void write_raw(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary);
  out << bytes;
}

// The attn::Error message of `f`, or "" when it does not throw.
template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

#define EXPECT_ERROR_CONTAINS(expr, ...)                                                  \
  do {                                                                                    \
    const std::string message_ = error_of([&] { (void)(expr); });                        \
    for (const char* part_ : {__VA_ARGS__}) {                                             \
      EXPECT_NE(message_.find(part_), std::string::npos) << "message: \"" << message_     \
                                                         << "\" lacks \"" << part_ << "\""; \
    }                                                                                     \
  } while (0)

// ---------------------------------------------------------------------------------------------
// Tokenisation

TEST(Tokenize, SplitsPunctuationAndElisionAndLowercasesExceptNames) {
  EXPECT_EQ(tokenize("The black cat sees Marie."),
            (Tokens{"the", "black", "cat", "sees", "Marie", "."}));
  EXPECT_EQ(tokenize("  l'homme n'est pas là ,  dit-il!\t"),
            (Tokens{"l'", "homme", "n'", "est", "pas", "là", ",", "dit-il", "!"}));
  EXPECT_EQ(tokenize("\"Où?\" (Oui) [non]; fin:"),
            (Tokens{"\"", "où", "?", "\"", "(", "oui", ")", "[", "non", "]", ";", "fin", ":"}));
  // Sentence-initial capitals are lowercased after . ! ? too; "I" stays.
  EXPECT_EQ(tokenize("I run. He sleeps! Paul sings"),
            (Tokens{"I", "run", ".", "he", "sleeps", "!", "paul", "sings"}));
  // Accented capitals.
  EXPECT_EQ(tokenize("ÉTÉ Œuvre"), (Tokens{"été", "Œuvre"}));
  EXPECT_EQ(lowercase("ÀÉÎÕÜ Œ×"), "àéîõü œ×");
  EXPECT_TRUE(tokenize(" \t\r\n").empty());
}

TEST(Tokenize, IsNameKeepsSentenceInitialNames) {
  TokenizeOptions options;
  options.is_name = [](std::string_view w) { return w == "Marie"; };
  EXPECT_EQ(tokenize("Marie sees The cat. Marie runs", options),
            (Tokens{"Marie", "sees", "The", "cat", ".", "Marie", "runs"}));
  EXPECT_EQ(tokenize("The cat", options), (Tokens{"the", "cat"}));
}

TEST(Tokenize, JoinedTokensTokeniseToThemselves) {
  const Tokens tokens = {"le", "chat", "n'", "est", "pas", "noir", ",", "dit", "Paul", "."};
  EXPECT_EQ(tokenize(join_tokens(tokens)), tokens);
}

// ---------------------------------------------------------------------------------------------
// Vocabulary

TEST(Vocab, SpecialTokensComeFirst) {
  const Vocab v;
  EXPECT_EQ(v.size(), 4);
  EXPECT_EQ(v.token(Vocab::pad_id), "<pad>");
  EXPECT_EQ(v.token(Vocab::unk_id), "<unk>");
  EXPECT_EQ(v.token(Vocab::bos_id), "<bos>");
  EXPECT_EQ(v.token(Vocab::eos_id), "<eos>");
  EXPECT_EQ(Vocab::pad_id, 0);
}

TEST(Vocab, BuildOrdersByFrequencyThenBytesAndAppliesLimits) {
  const std::vector<Tokens> data = {{"b", "a", "c", "a"}, {"a", "b", "d"}, {"e"}};
  // Counts: a 3, b 2, c 1, d 1, e 1.
  const Vocab all = Vocab::build(data);
  EXPECT_EQ(all.tokens(), (std::vector<std::string>{"<pad>", "<unk>", "<bos>", "<eos>", "a", "b", "c", "d", "e"}));
  VocabConfig frequent;
  frequent.min_frequency = 2;
  EXPECT_EQ(Vocab::build(data, frequent).tokens(),
            (std::vector<std::string>{"<pad>", "<unk>", "<bos>", "<eos>", "a", "b"}));
  VocabConfig small;
  small.max_size = 6;
  const Vocab capped = Vocab::build(data, small);
  EXPECT_EQ(capped.size(), 6);
  EXPECT_EQ(capped.id("c"), Vocab::unk_id);
  EXPECT_EQ(capped.id("a"), 4);

  VocabConfig bad;
  bad.max_size = 3;
  EXPECT_ERROR_CONTAINS(Vocab::build(data, bad), "[vocab]", "max_size 3");
  bad = VocabConfig{};
  bad.min_frequency = 0;
  EXPECT_THROW(Vocab::build(data, bad), Error);
  EXPECT_ERROR_CONTAINS(Vocab::build({{"a", "<eos>"}}), "special token <eos>");
  // Tokens are saved as JSON strings, so they must be UTF-8 (found by fuzz/fuzz_tokenizer).
  EXPECT_ERROR_CONTAINS(Vocab::build({{"a", "caf\xC3"}}), "[vocab]", "not valid UTF-8");
  EXPECT_ERROR_CONTAINS(Vocab::from_tokens({"<pad>", "<unk>", "<bos>", "<eos>", "\xFF"}),
                        "token 4 is not valid UTF-8");
}

TEST(Vocab, EncodeDecodeRoundTrip) {
  const Vocab v = Vocab::build({tokenize("le chat noir dort .")});
  const Tokens sentence = tokenize("le chien noir dort .");
  const std::vector<int64_t> ids = v.encode(sentence, {.add_bos = true, .add_eos = true});
  ASSERT_EQ(ids.size(), sentence.size() + 2);
  EXPECT_EQ(ids.front(), Vocab::bos_id);
  EXPECT_EQ(ids.back(), Vocab::eos_id);
  EXPECT_EQ(ids[2], Vocab::unk_id);  // "chien" was not in the data
  EXPECT_EQ(v.decode(ids), tokenize("le <unk> noir dort ."));
  // Decoding stops at <eos> and drops padding; with the options off everything is kept.
  std::vector<int64_t> padded = ids;
  padded.push_back(v.id("chat"));
  padded.push_back(Vocab::pad_id);
  EXPECT_EQ(v.decode(padded), tokenize("le <unk> noir dort ."));
  const Tokens raw = v.decode(padded, {.stop_at_eos = false, .skip_special = false});
  EXPECT_EQ(raw.front(), "<bos>");
  EXPECT_EQ(raw.back(), "<pad>");
  EXPECT_ERROR_CONTAINS(v.decode({99}), "[vocab]", "id 99", "size 9");
}

TEST(Vocab, SaveLoadRoundTripAndBadFiles) {
  TempDir dir;
  const Vocab v = Vocab::build({tokenize("Marie voit le chat noir .")});
  v.save(dir.file("vocab.json"));
  EXPECT_EQ(Vocab::load(dir.file("vocab.json")), v);

  const std::string path = dir.file("bad.json");
  write_raw(path, "{not json");
  EXPECT_ERROR_CONTAINS(Vocab::load(path), "[vocab]", path.c_str(), "not valid JSON");
  write_raw(path, R"({"format": "attn-vocab", "version": 1, "tokens": ["<pad>", "<unk>", "<bos>"]})");
  EXPECT_ERROR_CONTAINS(Vocab::load(path), path.c_str(), "special tokens");
  write_raw(path, R"({"format": "attn-vocab", "version": 1, "tokens": ["<pad>", "<unk>", "<bos>", "<eos>", "a", "a"]})");
  EXPECT_ERROR_CONTAINS(Vocab::load(path), path.c_str(), "\"a\" appears twice");
  write_raw(path, R"({"format": 1, "version": 1, "tokens": []})");  // found by fuzz_tokenizer
  EXPECT_ERROR_CONTAINS(Vocab::load(path), "\"format\" must be \"attn-vocab\"");
  write_raw(path, R"({"format": "attn-vocab", "version": 2, "tokens": []})");
  EXPECT_ERROR_CONTAINS(Vocab::load(path), "version");
  write_raw(path, R"({"format": "attn-vocab", "version": 1, "tokens": ["<pad>", "<unk>", "<bos>", "<eos>", 5]})");
  EXPECT_ERROR_CONTAINS(Vocab::load(path), "token 4 is not a string");
  EXPECT_ERROR_CONTAINS(Vocab::load(dir.file("missing.json")), "cannot open");
}

// ---------------------------------------------------------------------------------------------
// UTF-8

TEST(Utf8, AcceptsValidAndRejectsEveryInvalidForm) {
  EXPECT_TRUE(is_valid_utf8(""));
  EXPECT_TRUE(is_valid_utf8("plain ascii"));
  EXPECT_TRUE(is_valid_utf8("été œuf 日本 \xF0\x9F\x98\x80"));  // 2-, 3- and 4-byte forms
  EXPECT_TRUE(is_valid_utf8("\xED\x9F\xBF"));                    // U+D7FF, last before surrogates
  EXPECT_TRUE(is_valid_utf8("\xF4\x8F\xBF\xBF"));                // U+10FFFF
  struct Bad {
    const char* bytes;
    std::size_t offset;
    const char* why;
  };
  const Bad bad[] = {
      {"a\x80", 1, "lone continuation byte"},
      {"\xC0\xAF", 0, "overlong 2-byte (C0)"},
      {"\xC1\xBF", 0, "overlong 2-byte (C1)"},
      {"\xE0\x80\xAF", 0, "overlong 3-byte"},
      {"\xF0\x80\x80\xAF", 0, "overlong 4-byte"},
      {"\xED\xA0\x80", 0, "UTF-16 surrogate U+D800"},
      {"\xF4\x90\x80\x80", 0, "above U+10FFFF"},
      {"\xF5\x80\x80\x80", 0, "F5 lead byte"},
      {"\xFF", 0, "FF byte"},
      {"ab\xC3", 2, "truncated 2-byte sequence"},
      {"\xE2\x82", 0, "truncated 3-byte sequence"},
      {"\xE2\x28\xA1", 0, "bad continuation"},
  };
  for (const Bad& b : bad) {
    std::size_t offset = 99;
    EXPECT_FALSE(is_valid_utf8(b.bytes, &offset)) << b.why;
    EXPECT_EQ(offset, b.offset) << b.why;
  }
}

// ---------------------------------------------------------------------------------------------
// Pairs files

TEST(PairsFile, ReadsPairsIgnoresExtraColumnsAndAcceptsBomAndCrlf) {
  const std::string text =
      "\xEF\xBB\xBFGo.\tVa !\tCC-BY 2.0 (France) Attribution: tatoeba.org\r\n"
      "  The black cat sleeps.  \t  Le chat noir dort.\n"
      "I see it.\tJe le vois.";  // no final newline
  const PairsFile f = parse_pairs(text, "mem.tsv");
  ASSERT_EQ(f.pairs.size(), 3u);
  EXPECT_EQ(f.pairs[0], (SentencePair{"Go.", "Va !"}));
  EXPECT_EQ(f.pairs[1], (SentencePair{"The black cat sleeps.", "Le chat noir dort."}));
  EXPECT_EQ(f.pairs[2], (SentencePair{"I see it.", "Je le vois."}));
  EXPECT_EQ(f.report.lines, 3);
  EXPECT_EQ(f.report.kept, 3);
  EXPECT_EQ(f.report.skipped_total(), 0);
}

TEST(PairsFile, EachBadLineIsRefusedWithFileAndLine) {
  struct Case {
    std::string line;
    const char* message;
  };
  const Case cases[] = {
      {"no tab here", "no TAB"},
      {"", "empty line"},
      {" \t le chat", "empty source"},
      {"the cat\t  ", "empty target"},
      {"the cat\t\tle chat", "empty target"},  // the target is the (empty) second column
      {"caf\xC3\t caf\xC3\xA9", "invalid UTF-8 at byte 4"},
      {"one two three four five six\tun deux", "source has 6 tokens, more than the maximum of 5"},
      {"one\tun deux trois quatre cinq six sept", "target has 7 tokens"},
      // CR-only line ends: one line whose target would swallow the next pair.
      {"Go.\tVa !\rHi.\tSalut !", "CR inside the line"},
  };
  PairsReadOptions options;
  options.max_tokens = 5;
  for (const Case& c : cases) {
    const std::string text = "good\tbon\n" + c.line + "\nalso good\taussi bon\n";
    EXPECT_ERROR_CONTAINS(parse_pairs(text, "data.tsv", options), "[pairs] data.tsv:2: ", c.message);
  }
}

TEST(PairsFile, SkipPolicyCountsEveryReasonAndNeverDropsSilently) {
  const std::string text =
      "good\tbon\n"
      "no tab\n"
      "\n"
      "\tvide\n"
      "empty\t\n"
      "bad \xFF byte\tmauvais\n"
      "a b c d\te f\n"
      "fine\tbien\n";
  PairsReadOptions options;
  options.policy = BadLinePolicy::skip;
  options.max_tokens = 3;
  const PairsFile f = parse_pairs(text, "data.tsv", options);
  EXPECT_EQ(f.pairs.size(), 2u);
  EXPECT_EQ(f.report.lines, 8);
  EXPECT_EQ(f.report.kept, 2);
  EXPECT_EQ(f.report.skipped_for(BadLineReason::malformed), 2);
  EXPECT_EQ(f.report.skipped_for(BadLineReason::empty_source), 1);
  EXPECT_EQ(f.report.skipped_for(BadLineReason::empty_target), 1);
  EXPECT_EQ(f.report.skipped_for(BadLineReason::invalid_utf8), 1);
  EXPECT_EQ(f.report.skipped_for(BadLineReason::too_long), 1);
  EXPECT_EQ(f.report.lines, f.report.kept + f.report.skipped_total());
  EXPECT_EQ(f.report.summary("data.tsv"),
            "data.tsv: 8 lines, 2 pairs kept, 6 skipped (2 malformed, 1 empty_source, 1 empty_target, "
            "1 invalid_utf8, 1 too_long)");
  ASSERT_EQ(f.report.examples.size(), 5u);  // the first few, with their line numbers
  EXPECT_EQ(f.report.examples[0], "data.tsv:2: no TAB; expected \"source<TAB>target\"");
}

TEST(PairsFile, EmptyFileAndAllBadFileAreErrors) {
  TempDir dir;
  const std::string empty = dir.file("empty.tsv");
  write_raw(empty, "");
  EXPECT_ERROR_CONTAINS(read_pairs_file(empty), "[pairs]", empty.c_str(), "the file is empty");
  PairsReadOptions skip;
  skip.policy = BadLinePolicy::skip;
  EXPECT_ERROR_CONTAINS(read_pairs_file(empty, skip), "the file is empty");
  const std::string all_bad = dir.file("bad.tsv");
  write_raw(all_bad, "x\ny\n");
  EXPECT_ERROR_CONTAINS(read_pairs_file(all_bad, skip), "no usable sentence pairs", "2 malformed");
  EXPECT_ERROR_CONTAINS(read_pairs_file(dir.file("missing.tsv")), "[pairs]", "cannot open");
  EXPECT_THROW(parse_pairs("a\tb\n", "x", {.max_tokens = -1}), Error);
}

TEST(PairsFile, WriteReadRoundTripAndRefusesUnwritablePairs) {
  TempDir dir;
  const std::vector<SentencePair> pairs = {
      {"the black cat sleeps .", "le chat noir dort ."},
      {"Marie is not happy .", "Marie n' est pas heureuse ."},
  };
  const std::string path = dir.file("pairs.tsv");
  write_pairs_file(path, pairs);
  const PairsFile f = read_pairs_file(path);
  EXPECT_EQ(f.pairs, pairs);
  EXPECT_ERROR_CONTAINS(write_pairs_file(path, {{"a\tb", "c"}}), "pair 0: source contains a TAB");
  EXPECT_ERROR_CONTAINS(write_pairs_file(path, {{"a", "b"}, {"a", "b\nc"}}), "pair 1: target");
  EXPECT_ERROR_CONTAINS(write_pairs_file(path, {{"a", " "}}), "pair 0: empty target");
  EXPECT_ERROR_CONTAINS(write_pairs_file(path, {{"\xC3", "b"}}), "not valid UTF-8");
  EXPECT_EQ(read_pairs_file(path).pairs, pairs) << "a refused write leaves the old file";
}

}  // namespace
}  // namespace attn::seq2seq
