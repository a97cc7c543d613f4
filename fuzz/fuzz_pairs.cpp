// libFuzzer target: parse_pairs on arbitrary bytes (seq2seq/data/pairs_file.h), under both bad-line
// policies and a token limit taken from the first input byte.
//
// Contract: attn::Error or a result; a result keeps only pairs that are valid UTF-8 with both
// columns non-empty and free of TAB, CR and LF, and its report adds up.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>

#include "attn/error.h"
#include "seq2seq/data/pairs_file.h"

namespace s2s = attn::seq2seq;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, std::size_t size) {
  if (size == 0) return 0;
  // Byte 0: bit 0 the policy, bits 1..7 max_tokens (0 = no limit).
  s2s::PairsReadOptions options;
  options.policy = (data[0] & 1) ? s2s::BadLinePolicy::skip : s2s::BadLinePolicy::refuse;
  options.max_tokens = data[0] >> 1;
  const std::string_view text(reinterpret_cast<const char*>(data + 1), size - 1);
  s2s::PairsFile file;
  try {
    file = s2s::parse_pairs(text, "fuzz.tsv", options);
  } catch (const attn::Error&) {
    return 0;
  }
  const s2s::PairsReadReport& r = file.report;
  if (r.kept != static_cast<int64_t>(file.pairs.size()) || r.kept + r.skipped_total() != r.lines ||
      r.kept == 0)
    std::abort();
  for (const s2s::SentencePair& p : file.pairs) {
    for (const std::string* column : {&p.source, &p.target}) {
      if (column->empty() || column->find_first_of("\t\r\n") != std::string::npos ||
          !s2s::is_valid_utf8(*column))
        std::abort();
    }
  }
  (void)r.summary("fuzz.tsv");
  return 0;
}
