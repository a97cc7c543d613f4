// Word-level tokenisation and the vocabulary that maps tokens to ids.
//
// Tokenisation (one rule set for the embedded corpus, pairs files and user input):
//   1. Split on ASCII whitespace (space, tab, CR, LF, VT, FF).
//   2. Punctuation . , ! ? ; : " ( ) [ ] becomes a token of its own: "cat." -> "cat" ".".
//   3. An apostrophe ends a token and stays on its left, the French elision style:
//      "l'homme" -> "l'" "homme", "n'est" -> "n'" "est".
//   4. Case: everything is lowercased except names. A word that starts with an uppercase
//      letter keeps its case when it is not the first word of a sentence (a name: "Paul",
//      "Marie"); the first word of a sentence (start of text, or after . ! ?) is lowercased
//      unless TokenizeOptions::is_name says it is a name. The English pronoun "I" is always kept
//      as "I". Lowercasing covers ASCII and the accented Latin-1 capitals (É -> é) and Œ.
// Text made of tokens joined by single spaces (what the corpus generator writes) tokenises to
// exactly those tokens, so tokenize(join_tokens(t)) == t for every corpus sentence.
//
// Vocabulary ids: <pad> = 0, <unk> = 1, <bos> = 2, <eos> = 3, then the training tokens by
// descending frequency, ties broken by byte order, so a vocabulary is a pure function of its data.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace attn::seq2seq {

using Tokens = std::vector<std::string>;

struct TokenizeOptions {
  // Decides whether a capitalised sentence-initial word is a name (keeps its case). Empty: no
  // sentence-initial word is a name. A translator passes "is this capitalised word in my
  // source vocabulary", so "Marie sees the cat" keeps "Marie".
  std::function<bool(std::string_view word)> is_name;
};

Tokens tokenize(std::string_view text, const TokenizeOptions& options = {});

// Tokens joined by single spaces.
std::string join_tokens(const Tokens& tokens);

// Lowercases ASCII letters, the Latin-1 capitals U+00C0..U+00DE (except U+00D7) and U+0152 (Œ).
std::string lowercase(std::string_view text);

struct VocabConfig {
  int64_t max_size = 0;       // total size including the 4 special tokens; 0 = no limit
  int64_t min_frequency = 1;  // tokens seen fewer times in the training data map to <unk>
};

struct EncodeOptions {
  bool add_bos = false;
  bool add_eos = true;
};

struct DecodeOptions {
  bool stop_at_eos = true;     // drop <eos> and everything after it
  bool skip_special = true;    // drop <pad> and <bos>; <unk> is kept (it is content)
};

class Vocab {
 public:
  static constexpr int64_t pad_id = 0;
  static constexpr int64_t unk_id = 1;
  static constexpr int64_t bos_id = 2;
  static constexpr int64_t eos_id = 3;
  static constexpr int64_t num_special = 4;
  static constexpr const char* pad_token = "<pad>";
  static constexpr const char* unk_token = "<unk>";
  static constexpr const char* bos_token = "<bos>";
  static constexpr const char* eos_token = "<eos>";

  // A vocabulary holding only the special tokens.
  Vocab();
  // Counts tokens over `sentences` and keeps those with count >= min_frequency, most frequent
  // first, until max_size. Tokens may not be empty, spell a special token or be invalid UTF-8.
  static Vocab build(const std::vector<Tokens>& sentences, const VocabConfig& config = {});
  // From an explicit id order: tokens[0..3] must be the special tokens.
  static Vocab from_tokens(const std::vector<std::string>& tokens);

  int64_t size() const { return static_cast<int64_t>(tokens_.size()); }
  bool contains(std::string_view token) const;
  int64_t id(std::string_view token) const;  // unk_id when absent
  const std::string& token(int64_t id) const;  // throws attn::Error when out of range
  const std::vector<std::string>& tokens() const { return tokens_; }

  std::vector<int64_t> encode(const Tokens& tokens, const EncodeOptions& options = {}) const;
  Tokens decode(const std::vector<int64_t>& ids, const DecodeOptions& options = {}) const;

  // JSON: {"format": "attn-vocab", "version": 1, "tokens": [...]}. save() writes atomically;
  // load() names the file in every error.
  std::string to_json() const;
  static Vocab from_json(std::string_view json, const std::string& source_name = "<string>");
  void save(const std::string& path) const;
  static Vocab load(const std::string& path);

  bool operator==(const Vocab& other) const { return tokens_ == other.tokens_; }

 private:
  void index_tokens(const std::string& op);

  std::vector<std::string> tokens_;
  std::unordered_map<std::string, int64_t> ids_;
};

}  // namespace attn::seq2seq
