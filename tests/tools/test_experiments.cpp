// `attn experiments` (tools/experiments/): the statistics against closed forms, the SVG charts'
// axes and labels, the report writer (HTML, CSV, JSON) and conclusions generated from the numbers
// they are given.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "attn/error.h"
#include "seq2seq/data/corpus.h"
#include "seq2seq/data/vocab.h"
#include "tools/experiments/conclusions.h"
#include "tools/experiments/context.h"
#include "tools/experiments/experiments.h"
#include "tools/experiments/report_html.h"
#include "tools/experiments/statistics.h"
#include "tools/experiments/svg_chart.h"

namespace {

namespace ex = attn::experiments;
namespace fs = std::filesystem;

size_t count(const std::string& text, const std::string& what) {
  size_t n = 0;
  for (size_t at = text.find(what); at != std::string::npos; at = text.find(what, at + 1)) ++n;
  return n;
}

// Var(q.k) = d for independent N(0, 1) entries; the sample variance of n draws has a standard
// error of about Var * sqrt(2 / n) (q.k is close to normal for these d), so 5 of them is generous.
TEST(ExperimentStatistics, DotProductVarianceIsWidth) {
  const int64_t samples = 20000;
  for (const int64_t d : {16, 64, 256}) {
    const double var = ex::dot_product_variance(d, samples, 1.0, 7);
    const double tolerance = 5.0 * static_cast<double>(d) * std::sqrt(2.0 / samples);
    EXPECT_NEAR(var, static_cast<double>(d), tolerance) << "d=" << d;
    const double scaled = ex::dot_product_variance(d, samples, 1.0 / std::sqrt(static_cast<double>(d)), 7);
    EXPECT_NEAR(scaled, 1.0, 5.0 * std::sqrt(2.0 / samples)) << "d=" << d;
  }
}

TEST(ExperimentStatistics, UniformRowHasEntropyLogN) {
  for (const int n : {1, 2, 7, 64, 1000}) {
    const std::vector<double> p(static_cast<size_t>(n), 1.0 / n);
    const ex::RowStats s = ex::row_stats(p);
    EXPECT_NEAR(s.entropy, std::log(static_cast<double>(n)), 1e-12) << "n=" << n;
    EXPECT_NEAR(s.largest, 1.0 / n, 1e-15);
    // ||diag(p) - p p^T||_F^2 = n (1/n - 1/n^2)^2 + (n^2 - n) / n^4 = (n - 1) / n^2
    EXPECT_NEAR(s.jacobian_norm, std::sqrt(static_cast<double>(n - 1)) / n, 1e-12) << "n=" << n;
  }
}

TEST(ExperimentStatistics, OneHotRowPassesNoGradient) {
  const ex::RowStats s = ex::row_stats(std::vector<double>{0.0, 1.0, 0.0, 0.0});
  EXPECT_DOUBLE_EQ(s.largest, 1.0);
  EXPECT_DOUBLE_EQ(s.entropy, 0.0);
  EXPECT_DOUBLE_EQ(s.jacobian_norm, 0.0);
}

TEST(ExperimentStatistics, SoftmaxSumsToOneAndSurvivesLargeScores) {
  const std::vector<double> p = ex::softmax({1e4, 1e4 - 1.0, -1e4});
  EXPECT_NEAR(p[0] + p[1] + p[2], 1.0, 1e-15);
  EXPECT_NEAR(p[0] / p[1], std::exp(1.0), 1e-9);
  EXPECT_EQ(p[2], 0.0);
}

TEST(ExperimentStatistics, HistogramCountsSumToTheCount) {
  std::vector<double> values;
  for (int i = 0; i < 1000; ++i) values.push_back(std::sin(i) * 1.5);  // some outside [0, 1)
  values.push_back(NAN);
  const ex::Histogram h = ex::histogram(values, 0.0, 1.0, 10);
  EXPECT_EQ(h.total(), static_cast<int64_t>(values.size()));
  ASSERT_EQ(h.counts.size(), 10u);
  EXPECT_DOUBLE_EQ(h.bin_center(0), 0.05);
  const ex::Histogram exact = ex::histogram({0.0, 0.25, 0.5, 0.75, 0.999}, 0.0, 1.0, 4);
  EXPECT_EQ(exact.counts, (std::vector<int64_t>{1, 1, 1, 2}));
  EXPECT_THROW(ex::histogram(values, 1.0, 1.0, 4), attn::Error);
  EXPECT_THROW(ex::histogram(values, 0.0, 1.0, 0), attn::Error);
}

TEST(ExperimentStatistics, SummaryAndMedian) {
  const ex::Summary s = ex::summarize({1, 2, 3, 4});
  EXPECT_DOUBLE_EQ(s.mean, 2.5);
  EXPECT_DOUBLE_EQ(s.variance, 5.0 / 3.0);
  EXPECT_DOUBLE_EQ(s.min, 1);
  EXPECT_DOUBLE_EQ(s.max, 4);
  EXPECT_DOUBLE_EQ(ex::median({3, 1, 2}), 2);
  EXPECT_DOUBLE_EQ(ex::median({4, 1, 2, 3}), 2.5);
  EXPECT_DOUBLE_EQ(ex::summarize({5}).variance, 0.0);
}

TEST(ExperimentCharts, LineChartHasAxesLabelsLegendAndPoints) {
  ex::LineChart c{"Forward time", "sequence length N (tokens)", "time (ms)", true, true,
                  {{"dot", {128, 256, 512}, {0.1, 0.4, 1.6}, {}, false, -1},
                   {"additive <fused>", {128, 256, 512}, {0.3, 1.2, 4.8}, {0.01, 0.02, 0.03}, true, -1}}};
  const std::string svg = ex::render(c);
  EXPECT_EQ(svg.rfind("<svg class=\"chart\" data-kind=\"line\"", 0), 0u);
  EXPECT_NE(svg.find("class=\"x-axis\""), std::string::npos);
  EXPECT_NE(svg.find("class=\"y-axis\""), std::string::npos);
  EXPECT_NE(svg.find("sequence length N (tokens)"), std::string::npos);
  EXPECT_NE(svg.find("time (ms)"), std::string::npos);
  EXPECT_NE(svg.find("<title>Forward time</title>"), std::string::npos);
  EXPECT_NE(svg.find("class=\"legend\""), std::string::npos);
  EXPECT_NE(svg.find("additive &lt;fused&gt;"), std::string::npos);  // escaped
  EXPECT_EQ(count(svg, "<circle"), 6u);
  EXPECT_EQ(count(svg, "class=\"error-bar\""), 3u);
  EXPECT_NE(svg.find(">100<"), std::string::npos);  // a decade tick of the log x axis
  EXPECT_EQ(svg.find("<script"), std::string::npos);
  EXPECT_EQ(svg.find("http://www.w3.org/2000/svg"), svg.find("http"));  // no other URL
}

TEST(ExperimentCharts, BarChartAndHeatmap) {
  const std::string bar = ex::render(ex::BarChart{"BLEU", "scoring function", "BLEU (0-100)",
                                                  {"dot", "general"}, {20.5, 22.0}, {0.5, 1.0}});
  EXPECT_NE(bar.find("data-kind=\"bar\""), std::string::npos);
  EXPECT_EQ(count(bar, "<rect x="), 3u);  // background + 2 bars
  EXPECT_NE(bar.find("BLEU (0-100)"), std::string::npos);
  EXPECT_NE(bar.find(">general<"), std::string::npos);
  ex::Heatmap h;
  h.title = "dot";
  h.columns = {"the", "black", "cat"};
  h.rows = {"le", "chat", "noir"};
  h.values = {{0.9, 0.05, 0.05}, {0.0, 0.1, 0.9}, {0.0, 0.95, 0.05}};
  const std::string hm = ex::render(h);
  EXPECT_NE(hm.find("data-kind=\"heatmap\""), std::string::npos);
  EXPECT_NE(hm.find("colour-scale"), std::string::npos);
  EXPECT_NE(hm.find("attention weight"), std::string::npos);
  EXPECT_NE(hm.find(">noir<"), std::string::npos);
  EXPECT_THROW(ex::render(ex::LineChart{"empty", "x", "y", false, false, {}}), attn::Error);
  EXPECT_THROW(ex::render(ex::BarChart{"bad", "x", "y", {"a"}, {}, {}}), attn::Error);
}

TEST(ExperimentConclusions, GeneratedFromTheNumbers) {
  EXPECT_EQ(ex::compare_times("additive", 3.2, "dot", 1.0, "at d=64"), "additive was 3.2x slower than dot at d=64");
  EXPECT_EQ(ex::compare_times("additive", 1.0, "dot", 2.5, "at d=64"), "additive was 2.5x faster than dot at d=64");
  EXPECT_EQ(ex::compare_times("a", 1.0, "b", 1.02, ""), "a was as fast as b (within 5%)");
  EXPECT_EQ(ex::versus_claim(true, "x"), "This agrees with the usual claim that x.");
  EXPECT_EQ(ex::versus_claim(false, "x"), "This contradicts the usual claim that x.");
  EXPECT_EQ(ex::num(3.14159, 2), "3.1");
}

TEST(ExperimentReport, WritesHtmlCsvAndJson) {
  ex::Report r;
  r.title = "Test report";
  r.preamble = {"a <b> c"};
  ex::Section s;
  s.id = "cost";
  s.title = "1. Cost";
  s.conclusions = {"dot was fast", "This contradicts the usual claim that y."};
  s.charts = {ex::render(ex::BarChart{"t", "x", "y", {"a"}, {1.0}, {}})};
  s.tables = {ex::Table{"cost", {"score", "ms"}, {{"dot", "1.5"}, {"add,itive", "nan"}}}};
  r.sections = {s};
  const fs::path dir = fs::temp_directory_path() / ("attn_report_test_" + std::to_string(::getpid()));
  ex::write_report(r, dir.string());
  std::ifstream html_in(dir / "report.html");
  std::stringstream html;
  html << html_in.rdbuf();
  EXPECT_NE(html.str().find("<svg class=\"chart\""), std::string::npos);
  EXPECT_NE(html.str().find("a &lt;b&gt; c"), std::string::npos);
  EXPECT_NE(html.str().find("class=\"contradicts\""), std::string::npos);
  EXPECT_EQ(html.str().find("<script"), std::string::npos);
  EXPECT_EQ(html.str().find("<link"), std::string::npos);
  std::ifstream csv_in(dir / "cost.csv");
  std::stringstream csv;
  csv << csv_in.rdbuf();
  EXPECT_EQ(csv.str(), "score,ms\ndot,1.5\n\"add,itive\",nan\n");
  const std::string json = ex::to_json(r);
  EXPECT_NE(json.find("[\"dot\", 1.5]"), std::string::npos);
  EXPECT_NE(json.find("[\"add,itive\", \"nan\"]"), std::string::npos);
  EXPECT_TRUE(fs::exists(dir / "results.json"));
  fs::remove_all(dir);
}

// The per-word statistics behind translate --stats and eval --weight-histogram, and the charts.
TEST(ExperimentStatistics, WeightRowStatsAndHistogramChart) {
  const ex::WeightRowStats s = ex::weight_row_stats({{0.25, 0.25, 0.25, 0.25}, {0.0, 1.0, 0.0}});
  ASSERT_EQ(s.largest.size(), 2u);
  EXPECT_DOUBLE_EQ(s.largest[0], 0.25);
  EXPECT_NEAR(s.entropy[0], std::log(4.0), 1e-12);
  EXPECT_DOUBLE_EQ(s.largest[1], 1.0);
  EXPECT_DOUBLE_EQ(s.entropy[1], 0.0);
  const ex::Histogram h = ex::histogram({0.05, 0.15, 0.15, 0.95}, 0.0, 1.0, 10);
  const ex::BarChart c = ex::histogram_chart(h, "t", "largest weight", "target words");
  ASSERT_EQ(c.categories.size(), 10u);
  EXPECT_EQ(c.categories[1], "0.1");
  EXPECT_EQ(c.y_label, "share of target words");
  double share = 0.0;
  for (double v : c.values) share += v;
  EXPECT_NEAR(share, 1.0, 1e-12);
  EXPECT_DOUBLE_EQ(c.values[1], 0.5);
  const std::string doc = ex::svg_document({ex::render(c), ex::render(c)}, c.width, c.height);
  EXPECT_EQ(doc.rfind("<?xml", 0), 0u);
  EXPECT_EQ(count(doc, "<svg class=\"chart\""), 2u);
  EXPECT_NE(doc.find("translate(330,0)"), std::string::npos);
}

// Experiment 7's data: every name and number replaced alike in source and target, each invented
// word in one sentence only, training and held-out pools disjoint; and the copy score.
TEST(ExperimentCopying, RareWordsReplaceNamesAndNumbersOnceInDisjointPools) {
  namespace s2s = attn::seq2seq;
  const std::vector<s2s::SentencePair> pairs = {{"Marie sees 12 cats .", "Marie voit 12 chats ."},
                                                {"Paul and Marie run .", "Paul et Marie courent ."},
                                                {"the cat sleeps .", "le chat dort ."}};
  std::set<std::string> used;
  std::vector<std::vector<std::string>> train_words, test_words;
  const auto train = ex::with_rare_words(pairs, 1, used, &train_words);
  const auto test = ex::with_rare_words(pairs, 2, used, &test_words);
  ASSERT_EQ(train.size(), 3u);
  ASSERT_EQ(train_words.size(), 3u);
  EXPECT_EQ(train_words[0].size(), 2u);  // Marie, 12
  EXPECT_EQ(train_words[1].size(), 2u);  // Paul, Marie
  EXPECT_TRUE(train_words[2].empty());
  EXPECT_EQ(train[2], pairs[2]);
  std::set<std::string> seen_train;
  for (size_t i = 0; i < pairs.size(); ++i) {
    const s2s::Tokens src = s2s::tokenize_training_text(train[i].source);
    const s2s::Tokens tgt = s2s::tokenize_training_text(train[i].target);
    for (const auto& t : src) {
      EXPECT_FALSE(s2s::is_corpus_name(t)) << t;
      EXPECT_FALSE(t == "12") << t;
    }
    for (const auto& w : train_words[i]) {
      EXPECT_TRUE(seen_train.insert(w).second) << w << " used twice";
      // A sentence-initial name is lowercased by the tokenisation, on both sides alike.
      const auto has = [&](const s2s::Tokens& tokens) {
        for (const auto& t : tokens) if (s2s::lowercase(t) == s2s::lowercase(w)) return true;
        return false;
      };
      EXPECT_TRUE(has(src)) << w;
      EXPECT_TRUE(has(tgt)) << w;
    }
  }
  for (const auto& words : test_words)
    for (const auto& w : words) EXPECT_FALSE(seen_train.count(w)) << w << " in both pools";
  // A number stays a number, a name a capitalised word.
  EXPECT_TRUE(std::isdigit(static_cast<unsigned char>(train_words[0][1][0])));
  EXPECT_TRUE(std::isupper(static_cast<unsigned char>(train_words[0][0][0])));
  int64_t total = 0;
  const std::vector<s2s::Tokens> hyps = {{"bakoru", "voit", "chats"}, {"x"}};
  EXPECT_DOUBLE_EQ(ex::copied_share(hyps, {{"Bakoru", "4821"}, {"Tizeba"}}, &total), 100.0 / 3.0);
  EXPECT_EQ(total, 3);
  EXPECT_DOUBLE_EQ(ex::copied_share({{"a", "a"}}, {{"a", "a", "a"}}, &total), 200.0 / 3.0);
  EXPECT_DOUBLE_EQ(ex::copied_share({}, {}, &total), 0.0);
  EXPECT_EQ(total, 0);
}

TEST(ExperimentReport, BadInputIsAClearError) {
  EXPECT_THROW(ex::parse_only("cost,nonsense"), attn::Error);
  try {
    ex::parse_only("nonsense");
  } catch (const attn::Error& e) {
    EXPECT_NE(std::string(e.what()).find("unknown experiment 'nonsense'"), std::string::npos);
    EXPECT_NE(std::string(e.what()).find("alignments"), std::string::npos);
  }
  EXPECT_EQ(ex::parse_only("scale,cost,scale"), (std::vector<std::string>{"scale", "cost"}));
  EXPECT_THROW(ex::check_writable_directory("/proc/attn-cannot-write-here"), attn::Error);
}

}  // namespace
