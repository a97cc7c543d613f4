#include "seq2seq/metrics/sacrebleu.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <unordered_map>

#include "attn/error.h"
#include "seq2seq/data/pairs_file.h"
#include "seq2seq/data/vocab.h"

namespace attn::seq2seq {
namespace {

constexpr const char* kOp = "sacrebleu";

// The code point at text[i] (valid UTF-8) and its length in bytes.
char32_t decode_at(std::string_view text, std::size_t i, std::size_t* length) {
  const auto b = [&](std::size_t k) { return static_cast<unsigned char>(text[i + k]); };
  const unsigned char c = b(0);
  if (c < 0x80) return *length = 1, c;
  if (c < 0xE0) return *length = 2, static_cast<char32_t>(((c & 0x1F) << 6) | (b(1) & 0x3F));
  if (c < 0xF0)
    return *length = 3,
           static_cast<char32_t>(((c & 0x0F) << 12) | ((b(1) & 0x3F) << 6) | (b(2) & 0x3F));
  return *length = 4, static_cast<char32_t>(((c & 0x07) << 18) | ((b(1) & 0x3F) << 12) |
                                            ((b(2) & 0x3F) << 6) | (b(3) & 0x3F));
}

// Python's str.isspace(), which str.split() and str.rstrip() use.
bool is_space(char32_t c) {
  return (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x20) || c == 0x85 || c == 0xA0 ||
         c == 0x1680 || (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 ||
         c == 0x202F || c == 0x205F || c == 0x3000;
}

std::vector<std::string_view> split_whitespace(std::string_view text) {
  std::vector<std::string_view> out;
  std::size_t start = std::string_view::npos;
  for (std::size_t i = 0; i < text.size();) {
    std::size_t n = 0;
    const char32_t c = decode_at(text, i, &n);
    if (is_space(c)) {
      if (start != std::string_view::npos) out.push_back(text.substr(start, i - start));
      start = std::string_view::npos;
    } else if (start == std::string_view::npos) {
      start = i;
    }
    i += n;
  }
  if (start != std::string_view::npos) out.push_back(text.substr(start));
  return out;
}

std::string_view rstrip(std::string_view text) {
  std::size_t end = 0;
  for (std::size_t i = 0; i < text.size();) {
    std::size_t n = 0;
    if (!is_space(decode_at(text, i, &n))) end = i + n;
    i += n;
  }
  return text.substr(0, end);
}

void replace_all(std::string& s, std::string_view from, std::string_view to) {
  std::string out;
  std::size_t pos = 0;
  for (std::size_t hit; (hit = s.find(from, pos)) != std::string::npos; pos = hit + from.size())
    out.append(s, pos, hit - pos).append(to);
  out.append(s, pos);
  s = std::move(out);
}

bool is_digit(char c) { return c >= '0' && c <= '9'; }

// The character class of 13a's first rule: [\{-\~\[-\` -\&\(-\+\:-\@\/].
bool is_13a_symbol(char c) {
  return (c >= '{' && c <= '~') || (c >= '[' && c <= '`') || (c >= ' ' && c <= '&') ||
         (c >= '(' && c <= '+') || (c >= ':' && c <= '@') || c == '/';
}

// re.sub of a two-character pattern (first, second) with "a b" spacing: leftmost,
// non-overlapping matches, as Python scans. `space_before`/`space_between`/`space_after` place the
// spaces of the replacement (\1 \2 , " \1 \2", ...).
template <class First, class Second>
std::string sub_pair(const std::string& s, First first, Second second, bool space_before,
                     bool space_after) {
  std::string out;
  out.reserve(s.size() + s.size() / 4);
  for (std::size_t i = 0; i < s.size();) {
    if (i + 1 < s.size() && first(s[i]) && second(s[i + 1])) {
      if (space_before) out += ' ';
      out += s[i];
      out += ' ';
      out += s[i + 1];
      if (space_after) out += ' ';
      i += 2;
    } else {
      out += s[i++];
    }
  }
  return out;
}

void check_streams(const std::vector<std::string>& hypotheses,
                   const std::vector<std::vector<std::string>>& references) {
  ATTN_CHECK(!references.empty(), kOp, "no reference streams");
  for (std::size_t k = 0; k < references.size(); ++k)
    ATTN_CHECK(references[k].size() == hypotheses.size(), kOp, "reference stream ", k + 1, " has ",
               references[k].size(), " segments, the hypotheses ", hypotheses.size());
  auto check = [](const std::string& s, const char* what, std::size_t i) {
    std::size_t offset = 0;
    ATTN_CHECK(is_valid_utf8(s, &offset), kOp, what, " segment ", i + 1,
               " is not valid UTF-8 (byte ", offset, ")");
  };
  for (std::size_t i = 0; i < hypotheses.size(); ++i) check(hypotheses[i], "hypothesis", i);
  for (const auto& stream : references)
    for (std::size_t i = 0; i < stream.size(); ++i) check(stream[i], "reference", i);
}

using NgramCounts = std::unordered_map<std::string, int64_t>;

// Word n-grams (1..4) of a tokenised segment, each keyed by its tokens joined by single spaces
// (tokens never hold whitespace). Returns the number of tokens.
int64_t word_ngrams(std::string_view segment, std::array<NgramCounts, 4>& counts) {
  const std::vector<std::string_view> tokens = split_whitespace(segment);
  for (std::size_t n = 1; n <= 4; ++n)
    for (std::size_t i = 0; i + n <= tokens.size(); ++i) {
      std::string key(tokens[i]);
      for (std::size_t k = 1; k < n; ++k) key.append(" ").append(tokens[i + k]);
      ++counts[n - 1][key];
    }
  return static_cast<int64_t>(tokens.size());
}

std::string preprocess_bleu(std::string_view segment, const SacreBleuOptions& options) {
  std::string s = options.lowercase ? lowercase(segment) : std::string(segment);
  s = std::string(rstrip(s));
  if (options.tokenizer == BleuTokenizer::thirteen_a) return tokenize_13a(s);
  return s;
}

std::u32string code_points(std::string_view text, bool keep_whitespace) {
  std::u32string out;
  for (std::size_t i = 0; i < text.size();) {
    std::size_t n = 0;
    const char32_t c = decode_at(text, i, &n);
    if (keep_whitespace || !is_space(c)) out += c;
    i += n;
  }
  return out;
}

using CharCounts = std::vector<std::unordered_map<std::u32string, int64_t>>;

CharCounts char_ngrams(const std::u32string& text, int order) {
  CharCounts counts(static_cast<std::size_t>(order));
  for (int n = 1; n <= order; ++n)
    for (std::size_t i = 0; i + static_cast<std::size_t>(n) <= text.size(); ++i)
      ++counts[n - 1][text.substr(i, static_cast<std::size_t>(n))];
  return counts;
}

// chrF++'s words (sacreBLEU's CHRF._remove_punctuation, after Popovic's chrF++.py): split at
// whitespace; a word of more than one character gives up one ASCII punctuation character at its
// end or, failing that, at its start, which becomes a word of its own ("(hi)" -> "(hi" ")").
std::vector<std::u32string> chrf_words(std::string_view text) {
  static const std::u32string kPunctuation = U"!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~";
  const auto is_punctuation = [](char32_t c) { return kPunctuation.find(c) != std::u32string::npos; };
  std::vector<std::u32string> words;
  std::u32string word;
  auto flush = [&] {
    if (word.empty()) return;
    if (word.size() > 1 && is_punctuation(word.back())) {
      words.push_back(word.substr(0, word.size() - 1));
      words.push_back(word.substr(word.size() - 1));
    } else if (word.size() > 1 && is_punctuation(word.front())) {
      words.push_back(word.substr(0, 1));
      words.push_back(word.substr(1));
    } else {
      words.push_back(word);
    }
    word.clear();
  };
  for (char32_t c : code_points(text, true)) {
    if (is_space(c))
      flush();
    else
      word += c;
  }
  flush();
  return words;
}

// The character n-grams (orders 1..char_order) then the word n-grams (1..word_order) of one
// segment, each n-gram a string (words joined by single spaces).
CharCounts chrf_ngrams(const std::string& segment, const ChrfOptions& o) {
  const std::string text = o.lowercase ? lowercase(segment) : segment;
  CharCounts counts = char_ngrams(code_points(text, o.whitespace), o.char_order);
  if (o.word_order == 0) return counts;
  const std::vector<std::u32string> words = chrf_words(text);
  for (int n = 1; n <= o.word_order; ++n) {
    auto& grams = counts.emplace_back();
    for (std::size_t i = 0; i + static_cast<std::size_t>(n) <= words.size(); ++i) {
      std::u32string gram = words[i];
      for (int k = 1; k < n; ++k) gram += U' ' + words[i + static_cast<std::size_t>(k)];
      ++grams[gram];
    }
  }
  return counts;
}

double chrf_f_score(const std::vector<std::array<int64_t, 3>>& stats, const ChrfOptions& o) {
  constexpr double eps = 1e-16;
  const double factor = o.beta * o.beta;
  double score = 0.0, avg_prec = 0.0, avg_rec = 0.0;
  int effective = 0;
  for (const auto& [n_hyp, n_ref, n_match] : stats) {
    const double prec = n_hyp > 0 ? static_cast<double>(n_match) / static_cast<double>(n_hyp) : eps;
    const double rec = n_ref > 0 ? static_cast<double>(n_match) / static_cast<double>(n_ref) : eps;
    const double denom = factor * prec + rec;
    score += denom > 0 ? (1 + factor) * prec * rec / denom : eps;
    if (n_hyp > 0 && n_ref > 0) {
      avg_prec += prec;
      avg_rec += rec;
      ++effective;
    }
  }
  if (o.eps_smoothing) return 100.0 * score / static_cast<double>(stats.size());
  if (effective == 0) return 0.0;
  avg_prec /= effective;
  avg_rec /= effective;
  if (avg_prec + avg_rec == 0.0) return 0.0;
  return 100.0 * (1 + factor) * avg_prec * avg_rec / (factor * avg_prec + avg_rec);
}

}  // namespace

std::string tokenize_13a(std::string_view text) {
  std::string line(text);
  replace_all(line, "<skipped>", "");
  replace_all(line, "-\n", "");
  replace_all(line, "\n", " ");
  if (line.find('&') != std::string::npos) {
    replace_all(line, "&quot;", "\"");
    replace_all(line, "&amp;", "&");
    replace_all(line, "&lt;", "<");
    replace_all(line, "&gt;", ">");
  }
  line = " " + line + " ";
  // Rule 1: every symbol of the class becomes " c ". Bytes suffice: the class is ASCII and no
  // byte of a multi-byte UTF-8 sequence is.
  std::string spaced;
  spaced.reserve(line.size() * 2);
  for (char c : line) {
    if (is_13a_symbol(c)) {
      spaced += ' ';
      spaced += c;
      spaced += ' ';
    } else {
      spaced += c;
    }
  }
  const auto not_digit = [](char c) { return !is_digit(c); };
  const auto period_comma = [](char c) { return c == '.' || c == ','; };
  // ([^0-9])([\.,]) -> "\1 \2 ";  ([\.,])([^0-9]) -> " \1 \2";  ([0-9])(-) -> "\1 \2 ".
  spaced = sub_pair(spaced, not_digit, period_comma, false, true);
  spaced = sub_pair(spaced, period_comma, not_digit, true, false);
  spaced = sub_pair(spaced, is_digit, [](char c) { return c == '-'; }, false, true);
  std::string out;
  for (std::string_view token : split_whitespace(spaced)) {
    if (!out.empty()) out += ' ';
    out.append(token);
  }
  return out;
}

BleuScore bleu_from_statistics(const std::array<int64_t, 4>& matches,
                               const std::array<int64_t, 4>& totals, int64_t hypothesis_length,
                               int64_t reference_length, const SacreBleuOptions& options) {
  BleuScore s;
  s.matches = matches;
  s.totals = totals;
  s.hypothesis_length = hypothesis_length;
  s.reference_length = reference_length;
  s.brevity_penalty = 1.0;
  if (hypothesis_length < reference_length)
    s.brevity_penalty = hypothesis_length > 0
                            ? std::exp(1.0 - static_cast<double>(reference_length) /
                                                 static_cast<double>(hypothesis_length))
                            : 0.0;
  if (std::all_of(matches.begin(), matches.end(), [](int64_t m) { return m == 0; })) return s;
  double value = options.smooth_value;
  if (value < 0) value = options.smoothing == BleuSmoothing::floor ? 0.1 : 1.0;
  double smooth_mteval = 1.0;
  int order = 4;
  for (int n = 1; n <= 4; ++n) {
    double correct = static_cast<double>(matches[n - 1]);
    double total = static_cast<double>(totals[n - 1]);
    if (options.smoothing == BleuSmoothing::add_k && n > 1) correct += value, total += value;
    if (total == 0) break;
    if (options.effective_order) order = n;
    double& p = s.precisions[n - 1];
    if (correct == 0) {
      if (options.smoothing == BleuSmoothing::exp) {
        smooth_mteval *= 2;
        p = 100.0 / (smooth_mteval * total);
      } else if (options.smoothing == BleuSmoothing::floor) {
        p = 100.0 * value / total;
      }
    } else {
      p = 100.0 * correct / total;
    }
  }
  double log_sum = 0.0;
  for (int n = 0; n < order; ++n)
    log_sum += s.precisions[n] == 0.0 ? -9999999999.0 : std::log(s.precisions[n]);
  s.bleu = s.brevity_penalty * std::exp(log_sum / order);
  return s;
}

BleuScore sacre_bleu(const std::vector<std::string>& hypotheses,
                     const std::vector<std::vector<std::string>>& references,
                     const SacreBleuOptions& options) {
  check_streams(hypotheses, references);
  std::array<int64_t, 4> matches{}, totals{};
  int64_t hyp_len_sum = 0, ref_len_sum = 0;
  for (std::size_t i = 0; i < hypotheses.size(); ++i) {
    // Reference n-grams: the largest count over the references; lengths for the closest one.
    std::array<NgramCounts, 4> ref_counts;
    std::vector<int64_t> ref_lens;
    for (const auto& stream : references) {
      std::array<NgramCounts, 4> one;
      ref_lens.push_back(word_ngrams(preprocess_bleu(stream[i], options), one));
      for (int n = 0; n < 4; ++n)
        for (const auto& [gram, count] : one[n])
          ref_counts[n][gram] = std::max(ref_counts[n][gram], count);
    }
    std::array<NgramCounts, 4> hyp_counts;
    const int64_t hyp_len = word_ngrams(preprocess_bleu(hypotheses[i], options), hyp_counts);
    int64_t closest_diff = -1, closest = -1;
    for (int64_t len : ref_lens) {
      const int64_t diff = std::abs(hyp_len - len);
      if (closest_diff == -1 || diff < closest_diff) closest_diff = diff, closest = len;
      else if (diff == closest_diff && len < closest) closest = len;
    }
    hyp_len_sum += hyp_len;
    ref_len_sum += closest;
    for (int n = 0; n < 4; ++n)
      for (const auto& [gram, count] : hyp_counts[n]) {
        totals[n] += count;
        const auto it = ref_counts[n].find(gram);
        if (it != ref_counts[n].end()) matches[n] += std::min(count, it->second);
      }
  }
  return bleu_from_statistics(matches, totals, hyp_len_sum, ref_len_sum, options);
}

std::string format_sacre_bleu(const BleuScore& s, int64_t references,
                              const SacreBleuOptions& o) {
  const char* smooth = o.smoothing == BleuSmoothing::exp     ? "exp"
                       : o.smoothing == BleuSmoothing::none  ? "none"
                       : o.smoothing == BleuSmoothing::floor ? "floor" : "add-k";
  std::string smooth_str = smooth;
  if (o.smoothing == BleuSmoothing::floor || o.smoothing == BleuSmoothing::add_k) {
    char v[32];
    const double value = o.smooth_value >= 0 ? o.smooth_value
                         : o.smoothing == BleuSmoothing::floor ? 0.1 : 1.0;
    std::snprintf(v, sizeof v, "[%.2f]", value);
    smooth_str += v;
  }
  const double ratio = s.reference_length ? static_cast<double>(s.hypothesis_length) /
                                                static_cast<double>(s.reference_length)
                                          : 0.0;
  char buf[512];
  std::snprintf(buf, sizeof buf,
                "BLEU|nrefs:%lld|case:%s|eff:%s|tok:%s|smooth:%s = %.1f %.1f/%.1f/%.1f/%.1f "
                "(BP = %.3f ratio = %.3f hyp_len = %lld ref_len = %lld)",
                static_cast<long long>(references), o.lowercase ? "lc" : "mixed",
                o.effective_order ? "yes" : "no",
                o.tokenizer == BleuTokenizer::thirteen_a ? "13a" : "none", smooth_str.c_str(),
                s.bleu, s.precisions[0], s.precisions[1], s.precisions[2], s.precisions[3],
                s.brevity_penalty, ratio, static_cast<long long>(s.hypothesis_length),
                static_cast<long long>(s.reference_length));
  return buf;
}

ChrfScore corpus_chrf(const std::vector<std::string>& hypotheses,
                      const std::vector<std::vector<std::string>>& references,
                      const ChrfOptions& options) {
  check_streams(hypotheses, references);
  ATTN_CHECK(options.char_order >= 1 && options.word_order >= 0 && options.beta > 0, kOp,
             "chrF needs char_order >= 1, word_order >= 0 and beta > 0, got ", options.char_order,
             ", ", options.word_order, " and ", options.beta);
  const std::size_t orders = static_cast<std::size_t>(options.char_order + options.word_order);
  ChrfScore out;
  out.statistics.assign(orders, {0, 0, 0});
  for (std::size_t i = 0; i < hypotheses.size(); ++i) {
    const CharCounts hyp = chrf_ngrams(hypotheses[i], options);
    std::vector<std::array<int64_t, 3>> best;
    double best_f = -1.0;
    for (const auto& stream : references) {
      const CharCounts ref = chrf_ngrams(stream[i], options);
      std::vector<std::array<int64_t, 3>> stats;
      for (std::size_t n = 0; n < orders; ++n) {
        int64_t hyp_count = 0, ref_count = 0, match = 0;
        for (const auto& [gram, count] : hyp[n]) {
          hyp_count += count;
          const auto it = ref[n].find(gram);
          if (it != ref[n].end()) match += std::min(count, it->second);
        }
        for (const auto& [gram, count] : ref[n]) ref_count += count;
        stats.push_back({ref[n].empty() ? 0 : hyp_count, ref_count, match});
      }
      const double f = chrf_f_score(stats, options);
      if (f > best_f) best_f = f, best = std::move(stats);
    }
    for (std::size_t n = 0; n < best.size(); ++n)
      for (int k = 0; k < 3; ++k) out.statistics[n][k] += best[n][k];
  }
  out.score = chrf_f_score(out.statistics, options);
  return out;
}

std::string format_chrf(const ChrfScore& score, int64_t references, const ChrfOptions& o) {
  char buf[256];
  std::snprintf(buf, sizeof buf, "chrF%g%s|nrefs:%lld|case:%s|eff:%s|nc:%d|nw:%d|space:%s = %.1f",
                o.beta, std::string(static_cast<std::size_t>(std::max(0, o.word_order)), '+').c_str(),
                static_cast<long long>(references), o.lowercase ? "lc" : "mixed",
                o.eps_smoothing ? "no" : "yes", o.char_order, o.word_order,
                o.whitespace ? "yes" : "no", score.score);
  return buf;
}

}  // namespace attn::seq2seq
