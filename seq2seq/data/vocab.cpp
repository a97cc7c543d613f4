#include "seq2seq/data/vocab.h"

#include <algorithm>

#include <nlohmann/json.hpp>

#include "attn/error.h"
#include "seq2seq/data/pairs_file.h"
#include "seq2seq/training/safetensors.h"

namespace attn::seq2seq {

namespace {

bool is_space(char c) {
  return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f';
}

bool is_punctuation(char c) {
  switch (c) {
    case '.': case ',': case '!': case '?': case ';': case ':': case '"':
    case '(': case ')': case '[': case ']':
      return true;
    default:
      return false;
  }
}

bool ends_sentence(const std::string& token) {
  return token == "." || token == "!" || token == "?";
}

// True when the word starts with an uppercase letter: ASCII A-Z, a Latin-1 capital (UTF-8
// C3 80..C3 9E except C3 97, the multiplication sign) or Œ (C5 92).
bool starts_uppercase(std::string_view word) {
  if (word.empty()) return false;
  const auto b0 = static_cast<unsigned char>(word[0]);
  if (b0 >= 'A' && b0 <= 'Z') return true;
  if (word.size() < 2) return false;
  const auto b1 = static_cast<unsigned char>(word[1]);
  if (b0 == 0xC3) return b1 >= 0x80 && b1 <= 0x9E && b1 != 0x97;
  return b0 == 0xC5 && b1 == 0x92;
}

}  // namespace

std::string lowercase(std::string_view text) {
  std::string out(text);
  for (std::size_t i = 0; i < out.size(); ++i) {
    auto& c = reinterpret_cast<unsigned char&>(out[i]);
    if (c >= 'A' && c <= 'Z') {
      c = static_cast<unsigned char>(c - 'A' + 'a');
    } else if (i + 1 < out.size()) {
      auto& next = reinterpret_cast<unsigned char&>(out[i + 1]);
      // Latin-1 capitals and their small letters differ by 0x20 in the second UTF-8 byte.
      if (c == 0xC3 && next >= 0x80 && next <= 0x9E && next != 0x97) next += 0x20;
      else if (c == 0xC5 && next == 0x92) next = 0x93;  // Œ -> œ
    }
  }
  return out;
}

Tokens tokenize(std::string_view text, const TokenizeOptions& options) {
  // Pass 1: split into raw pieces (whitespace, punctuation, apostrophes).
  Tokens pieces;
  std::string current;
  auto flush = [&] {
    if (!current.empty()) pieces.push_back(std::move(current));
    current.clear();
  };
  for (char c : text) {
    if (is_space(c)) {
      flush();
    } else if (is_punctuation(c)) {
      flush();
      pieces.emplace_back(1, c);
    } else if (c == '\'') {
      current.push_back(c);
      flush();
    } else {
      current.push_back(c);
    }
  }
  flush();

  // Pass 2: case. Capitalised words inside a sentence are names and keep their case.
  bool sentence_start = true;
  for (std::string& token : pieces) {
    const bool is_word = !(token.size() == 1 && is_punctuation(token[0]));
    if (is_word && token != "I") {
      bool keep = false;
      if (starts_uppercase(token)) {
        keep = !sentence_start || (options.is_name && options.is_name(token));
      }
      if (!keep) token = lowercase(token);
    }
    if (is_word) sentence_start = false;
    if (ends_sentence(token)) sentence_start = true;
  }
  return pieces;
}

std::string join_tokens(const Tokens& tokens) {
  std::string out;
  for (std::size_t i = 0; i < tokens.size(); ++i) {
    if (i) out += ' ';
    out += tokens[i];
  }
  return out;
}

Vocab::Vocab() : tokens_{pad_token, unk_token, bos_token, eos_token} { index_tokens("vocab"); }

void Vocab::index_tokens(const std::string& op) {
  ATTN_CHECK(tokens_.size() >= static_cast<std::size_t>(num_special), op, "a vocabulary needs the ",
             num_special, " special tokens, got ", tokens_.size(), " tokens");
  const char* specials[] = {pad_token, unk_token, bos_token, eos_token};
  for (int64_t i = 0; i < num_special; ++i) {
    ATTN_CHECK(tokens_[i] == specials[i], op, "token ", i, " must be ", specials[i], ", got \"",
               tokens_[i], "\"");
  }
  ids_.clear();
  ids_.reserve(tokens_.size());
  for (std::size_t i = 0; i < tokens_.size(); ++i) {
    ATTN_CHECK(!tokens_[i].empty(), op, "token ", i, " is empty");
    // The JSON file holds the tokens as strings: to_json could not write invalid UTF-8.
    ATTN_CHECK(is_valid_utf8(tokens_[i]), op, "token ", i, " is not valid UTF-8");
    const bool inserted = ids_.emplace(tokens_[i], static_cast<int64_t>(i)).second;
    ATTN_CHECK(inserted, op, "token \"", tokens_[i], "\" appears twice (ids ", ids_[tokens_[i]],
               " and ", i, ")");
  }
}

Vocab Vocab::build(const std::vector<Tokens>& sentences, const VocabConfig& config) {
  ATTN_CHECK(config.max_size == 0 || config.max_size >= num_special, "vocab", "max_size ",
             config.max_size, " leaves no room for the ", num_special, " special tokens (0 = no limit)");
  ATTN_CHECK(config.min_frequency >= 1, "vocab", "min_frequency must be >= 1, got ",
             config.min_frequency);
  std::unordered_map<std::string, int64_t> counts;
  for (const Tokens& sentence : sentences) {
    for (const std::string& token : sentence) {
      ATTN_CHECK(!token.empty(), "vocab", "empty token in the training data");
      ++counts[token];
    }
  }
  const char* specials[] = {pad_token, unk_token, bos_token, eos_token};
  for (const char* special : specials) {
    ATTN_CHECK(counts.find(special) == counts.end(), "vocab", "the training data contains the special token ",
               special);
  }
  std::vector<std::pair<std::string, int64_t>> kept;
  for (auto& [token, count] : counts) {
    if (count >= config.min_frequency) kept.emplace_back(token, count);
  }
  std::sort(kept.begin(), kept.end(), [](const auto& a, const auto& b) {
    return a.second != b.second ? a.second > b.second : a.first < b.first;
  });
  if (config.max_size > 0 && static_cast<int64_t>(kept.size()) > config.max_size - num_special) {
    kept.resize(static_cast<std::size_t>(config.max_size - num_special));
  }
  Vocab vocab;
  for (auto& entry : kept) vocab.tokens_.push_back(entry.first);
  vocab.index_tokens("vocab");
  return vocab;
}

Vocab Vocab::from_tokens(const std::vector<std::string>& tokens) {
  Vocab vocab;
  vocab.tokens_ = tokens;
  vocab.index_tokens("vocab");
  return vocab;
}

bool Vocab::contains(std::string_view token) const {
  return ids_.find(std::string(token)) != ids_.end();
}

int64_t Vocab::id(std::string_view token) const {
  auto it = ids_.find(std::string(token));
  return it == ids_.end() ? unk_id : it->second;
}

const std::string& Vocab::token(int64_t id) const {
  ATTN_CHECK(id >= 0 && id < size(), "vocab", "id ", id, " is outside the vocabulary of size ", size());
  return tokens_[static_cast<std::size_t>(id)];
}

std::vector<int64_t> Vocab::encode(const Tokens& tokens, const EncodeOptions& options) const {
  std::vector<int64_t> ids;
  ids.reserve(tokens.size() + 2);
  if (options.add_bos) ids.push_back(bos_id);
  for (const std::string& token : tokens) ids.push_back(id(token));
  if (options.add_eos) ids.push_back(eos_id);
  return ids;
}

Tokens Vocab::decode(const std::vector<int64_t>& ids, const DecodeOptions& options) const {
  Tokens out;
  for (int64_t id : ids) {
    if (id == eos_id && options.stop_at_eos) break;
    if (options.skip_special && (id == pad_id || id == bos_id || id == eos_id)) continue;
    out.push_back(token(id));
  }
  return out;
}

std::string Vocab::to_json() const {
  nlohmann::json j;
  j["format"] = "attn-vocab";
  j["version"] = 1;
  j["tokens"] = tokens_;
  return j.dump(1);
}

Vocab Vocab::from_json(std::string_view json, const std::string& source_name) {
  const std::string op = "vocab";
  nlohmann::json j = nlohmann::json::parse(json, nullptr, /*allow_exceptions=*/false);
  ATTN_CHECK(!j.is_discarded(), op, source_name, ": not valid JSON");
  ATTN_CHECK(j.is_object(), op, source_name, ": expected a JSON object");
  ATTN_CHECK(j.contains("format") && j["format"] == "attn-vocab", op, source_name,
             ": \"format\" must be \"attn-vocab\"");
  ATTN_CHECK(j.contains("version") && j["version"] == 1, op, source_name,
             ": unsupported \"version\" (this build reads version 1)");
  ATTN_CHECK(j.contains("tokens") && j["tokens"].is_array(), op, source_name,
             ": \"tokens\" must be an array of strings");
  std::vector<std::string> tokens;
  for (const auto& t : j["tokens"]) {
    ATTN_CHECK(t.is_string(), op, source_name, ": token ", tokens.size(), " is not a string");
    tokens.push_back(t.get<std::string>());
  }
  Vocab vocab;
  vocab.tokens_ = std::move(tokens);
  try {
    vocab.index_tokens(op);
  } catch (const Error& e) {
    throw Error(op, source_name + ": " + std::string(e.what()).substr(op.size() + 3));
  }
  return vocab;
}

void Vocab::save(const std::string& path) const {
  const std::string text = to_json() + "\n";
  write_file_atomically(path, std::as_bytes(std::span<const char>(text.data(), text.size())));
}

Vocab Vocab::load(const std::string& path) {
  const std::vector<std::byte> bytes = read_file_bytes(path, "vocab");
  return from_json(std::string_view(reinterpret_cast<const char*>(bytes.data()), bytes.size()), path);
}

}  // namespace attn::seq2seq
