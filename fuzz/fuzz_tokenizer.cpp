// libFuzzer target: the tokeniser and the vocabulary (seq2seq/data/vocab.h) on arbitrary bytes.
//
// tokenize() must never fail; its tokens are non-empty, hold no whitespace, and a punctuation
// character only as a token of its own; tokenising the tokens joined by spaces gives the same
// tokens back (the rule the corpus relies on). The tokens then build a vocabulary whose
// encode/decode round-trips and whose JSON reads back equal. The same bytes also go to
// Vocab::from_json, which may only refuse with attn::Error.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>
#include <vector>

#include "attn/error.h"
#include "seq2seq/data/corpus.h"
#include "seq2seq/data/vocab.h"

namespace s2s = attn::seq2seq;

namespace {

bool is_space_or_punctuation(char c) {
  return std::string_view(" \t\n\r\v\f.,!?;:\"()[]").find(c) != std::string_view::npos;
}

void check_tokens(const s2s::Tokens& tokens) {
  for (const std::string& t : tokens) {
    if (t.empty()) std::abort();
    if (t.size() > 1)
      for (char c : t)
        if (is_space_or_punctuation(c)) std::abort();
    if (t.size() == 1 && std::string_view(" \t\n\r\v\f").find(t[0]) != std::string_view::npos)
      std::abort();
    const auto apostrophe = t.find('\'');
    if (apostrophe != std::string::npos && apostrophe + 1 != t.size()) std::abort();
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, std::size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  s2s::TokenizeOptions options;
  options.is_name = s2s::is_corpus_name;
  for (const s2s::TokenizeOptions& opts : {s2s::TokenizeOptions{}, options}) {
    const s2s::Tokens tokens = s2s::tokenize(text, opts);
    check_tokens(tokens);
    if (s2s::tokenize(s2s::join_tokens(tokens), opts) != tokens) std::abort();
  }

  // A vocabulary from the tokens (when they spell no special token).
  const s2s::Tokens tokens = s2s::tokenize(text);
  try {
    const s2s::Vocab vocab = s2s::Vocab::build({tokens});
    const auto ids = vocab.encode(tokens, {.add_bos = true, .add_eos = true});
    if (vocab.decode(ids) != tokens) std::abort();
    if (!(s2s::Vocab::from_json(vocab.to_json()) == vocab)) std::abort();
  } catch (const attn::Error&) {
  }

  try {
    (void)s2s::Vocab::from_json(text, "fuzz.json");
  } catch (const attn::Error&) {
  }
  return 0;
}
