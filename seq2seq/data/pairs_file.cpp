#include "seq2seq/data/pairs_file.h"

#include <algorithm>

#include "attn/error.h"
#include "seq2seq/training/safetensors.h"
#include "seq2seq/data/vocab.h"

namespace attn::seq2seq {

namespace {

constexpr const char* kOp = "pairs";
constexpr std::size_t kMaxExamples = 5;

std::string_view trim(std::string_view s) {
  const char* space = " \t\r\n\v\f";
  const auto first = s.find_first_not_of(space);
  if (first == std::string_view::npos) return {};
  const auto last = s.find_last_not_of(space);
  return s.substr(first, last - first + 1);
}

}  // namespace

const char* bad_line_reason_name(BadLineReason reason) {
  switch (reason) {
    case BadLineReason::malformed: return "malformed";
    case BadLineReason::empty_source: return "empty_source";
    case BadLineReason::empty_target: return "empty_target";
    case BadLineReason::invalid_utf8: return "invalid_utf8";
    case BadLineReason::too_long: return "too_long";
  }
  return "?";
}

bool is_valid_utf8(std::string_view text, std::size_t* error_offset) {
  const auto* s = reinterpret_cast<const unsigned char*>(text.data());
  const std::size_t n = text.size();
  std::size_t i = 0;
  while (i < n) {
    const unsigned char b = s[i];
    std::size_t length = 0;
    // Valid ranges of the second byte depend on the first (RFC 3629, section 4): they exclude
    // overlong encodings (E0 80..9F, F0 80..8F), surrogates (ED A0..BF) and > U+10FFFF (F4 90..).
    unsigned char lo = 0x80, hi = 0xBF;
    if (b < 0x80) length = 1;
    else if (b >= 0xC2 && b <= 0xDF) length = 2;
    else if (b == 0xE0) { length = 3; lo = 0xA0; }
    else if ((b >= 0xE1 && b <= 0xEC) || b == 0xEE || b == 0xEF) length = 3;
    else if (b == 0xED) { length = 3; hi = 0x9F; }
    else if (b == 0xF0) { length = 4; lo = 0x90; }
    else if (b >= 0xF1 && b <= 0xF3) length = 4;
    else if (b == 0xF4) { length = 4; hi = 0x8F; }
    bool ok = length != 0 && i + length <= n;
    if (ok && length >= 2) ok = s[i + 1] >= lo && s[i + 1] <= hi;
    for (std::size_t k = 2; ok && k < length; ++k) ok = s[i + k] >= 0x80 && s[i + k] <= 0xBF;
    if (!ok) {
      if (error_offset) *error_offset = i;
      return false;
    }
    i += length;
  }
  return true;
}

int64_t PairsReadReport::skipped_total() const {
  int64_t total = 0;
  for (int64_t count : skipped) total += count;
  return total;
}

std::string PairsReadReport::summary(const std::string& source_name) const {
  std::string out = source_name + ": " + std::to_string(lines) + " lines, " + std::to_string(kept) +
                    " pairs kept, " + std::to_string(skipped_total()) + " skipped";
  if (skipped_total() > 0) {
    out += " (";
    bool first = true;
    for (int r = 0; r < kNumBadLineReasons; ++r) {
      if (skipped[r] == 0) continue;
      if (!first) out += ", ";
      out += std::to_string(skipped[r]) + " " + bad_line_reason_name(static_cast<BadLineReason>(r));
      first = false;
    }
    out += ")";
  }
  return out;
}

PairsFile parse_pairs(std::string_view text, const std::string& source_name, const PairsReadOptions& options) {
  ATTN_CHECK(options.max_tokens >= 0, kOp, "max_tokens must be >= 0 (0 = no limit), got ", options.max_tokens);
  PairsFile result;
  PairsReadReport& report = result.report;

  std::size_t position = 0;
  int64_t line_number = 0;
  while (position < text.size()) {
    std::size_t end = text.find('\n', position);
    if (end == std::string_view::npos) end = text.size();
    std::string_view line = text.substr(position, end - position);
    position = end + 1;
    ++line_number;
    ++report.lines;
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    if (line_number == 1 && line.substr(0, 3) == "\xEF\xBB\xBF") line.remove_prefix(3);

    const std::string where = source_name + ":" + std::to_string(line_number) + ": ";
    auto bad = [&](BadLineReason reason, const std::string& message) {
      if (options.policy == BadLinePolicy::refuse) throw Error(kOp, where + message);
      ++report.skipped[static_cast<int>(reason)];
      if (report.examples.size() < kMaxExamples) report.examples.push_back(where + message);
    };

    std::size_t bad_byte = 0;
    if (!is_valid_utf8(line, &bad_byte)) {
      bad(BadLineReason::invalid_utf8,
          "invalid UTF-8 at byte " + std::to_string(bad_byte + 1) + " of the line");
      continue;
    }
    // A CR left inside the line: a file with CR-only line ends would otherwise read as one line
    // whose columns swallow the next lines (and write_pairs_file refuses such a column).
    if (line.find('\r') != std::string_view::npos) {
      bad(BadLineReason::malformed, "CR inside the line; expected lines ending in LF or CR LF");
      continue;
    }
    const std::size_t tab = line.find('\t');
    if (tab == std::string_view::npos) {
      bad(BadLineReason::malformed, line.empty() ? "empty line; expected \"source<TAB>target\""
                                                 : "no TAB; expected \"source<TAB>target\"");
      continue;
    }
    const std::string_view source = trim(line.substr(0, tab));
    std::string_view target = line.substr(tab + 1);
    target = trim(target.substr(0, target.find('\t')));  // extra columns (attribution) ignored
    const Tokens source_tokens = tokenize(source);
    const Tokens target_tokens = tokenize(target);
    if (source_tokens.empty()) {
      bad(BadLineReason::empty_source, "empty source sentence");
      continue;
    }
    if (target_tokens.empty()) {
      bad(BadLineReason::empty_target, "empty target sentence");
      continue;
    }
    if (options.max_tokens > 0) {
      const auto longest = static_cast<int64_t>(std::max(source_tokens.size(), target_tokens.size()));
      if (longest > options.max_tokens) {
        bad(BadLineReason::too_long,
            std::string(source_tokens.size() >= target_tokens.size() ? "source" : "target") + " has " +
                std::to_string(longest) + " tokens, more than the maximum of " +
                std::to_string(options.max_tokens));
        continue;
      }
    }
    result.pairs.push_back({std::string(source), std::string(target)});
    ++report.kept;
  }
  ATTN_CHECK(report.lines > 0, kOp, source_name, ": the file is empty");
  ATTN_CHECK(report.kept > 0, kOp, source_name, ": no usable sentence pairs (",
             report.summary(source_name), ")");
  return result;
}

PairsFile read_pairs_file(const std::string& path, const PairsReadOptions& options) {
  const std::vector<std::byte> bytes = read_file_bytes(path, kOp);
  return parse_pairs(std::string_view(reinterpret_cast<const char*>(bytes.data()), bytes.size()), path,
                     options);
}

void write_pairs_file(const std::string& path, const std::vector<SentencePair>& pairs) {
  std::string text;
  for (std::size_t i = 0; i < pairs.size(); ++i) {
    for (const std::string* column : {&pairs[i].source, &pairs[i].target}) {
      const char* side = column == &pairs[i].source ? "source" : "target";
      ATTN_CHECK(!trim(*column).empty(), kOp, "pair ", i, ": empty ", side);
      ATTN_CHECK(column->find_first_of("\t\r\n") == std::string::npos, kOp, "pair ", i, ": ", side,
                 " contains a TAB or line break");
      ATTN_CHECK(is_valid_utf8(*column), kOp, "pair ", i, ": ", side, " is not valid UTF-8");
    }
    text += pairs[i].source;
    text += '\t';
    text += pairs[i].target;
    text += '\n';
  }
  write_file_atomically(path, std::as_bytes(std::span<const char>(text.data(), text.size())), kOp);
}

}  // namespace attn::seq2seq
