// Sentence-pair files: one pair per line, "source TAB target", further TAB columns ignored
// (the layout of the Tatoeba / ManyThings exports people already use), UTF-8.
//
// Every line is checked, and a bad line is never silently dropped. The reasons:
//   malformed     no TAB on the line (blank lines included), or a CR inside it (CR-only line ends)
//   empty_source  the source column has no tokens
//   empty_target  the target column has no tokens
//   invalid_utf8  a byte sequence that is not UTF-8 (overlong forms, surrogates, code points
//                 above U+10FFFF and truncated sequences included)
//   too_long      source or target has more than max_tokens tokens (seq2seq::tokenize)
// BadLinePolicy::refuse (the default) throws attn::Error "[pairs] FILE:LINE: reason" at the first
// bad line; BadLinePolicy::skip keeps going and counts the skipped lines per reason in the
// report, whose summary() a trainer prints before training. A file with no pairs left is an
// error under both policies. A UTF-8 byte-order mark on line 1 and a CR before each LF are
// accepted. Columns are stored trimmed of surrounding whitespace, untokenised.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace attn::seq2seq {

struct SentencePair {
  std::string source;
  std::string target;
  bool operator==(const SentencePair&) const = default;
};

enum class BadLinePolicy { refuse, skip };

enum class BadLineReason { malformed, empty_source, empty_target, invalid_utf8, too_long };
constexpr int kNumBadLineReasons = 5;
const char* bad_line_reason_name(BadLineReason reason);

struct PairsReadOptions {
  int64_t max_tokens = 0;  // longest sentence (either side) in tokens; 0 = no limit
  BadLinePolicy policy = BadLinePolicy::refuse;
};

struct PairsReadReport {
  int64_t lines = 0;  // lines read, bad ones included
  int64_t kept = 0;
  std::array<int64_t, kNumBadLineReasons> skipped{};  // indexed by BadLineReason
  // The first few skip messages ("FILE:LINE: reason"), to show the user where to look.
  std::vector<std::string> examples;

  int64_t skipped_total() const;
  int64_t skipped_for(BadLineReason reason) const { return skipped[static_cast<int>(reason)]; }
  // "data.tsv: 1000 lines, 997 pairs kept, 3 skipped (2 too_long, 1 malformed)"
  std::string summary(const std::string& source_name) const;
};

struct PairsFile {
  std::vector<SentencePair> pairs;
  PairsReadReport report;
};

// Reads `path`; attn::Error names the file and line.
PairsFile read_pairs_file(const std::string& path, const PairsReadOptions& options = {});
// Parses text already in memory; `source_name` stands in for the file name in messages.
PairsFile parse_pairs(std::string_view text, const std::string& source_name,
                      const PairsReadOptions& options = {});

// Writes "source TAB target" lines atomically. A column holding a TAB, CR or LF, an empty column
// or invalid UTF-8 is an attn::Error (it could not be read back as the same pair).
void write_pairs_file(const std::string& path, const std::vector<SentencePair>& pairs);

// Strict UTF-8 validation (RFC 3629): shortest form only, no surrogates, at most U+10FFFF.
// On failure `error_offset` (when given) receives the offset of the first bad byte.
bool is_valid_utf8(std::string_view text, std::size_t* error_offset = nullptr);

}  // namespace attn::seq2seq
