// Experiment 7: copying words never seen in training. The embedded corpus's names and numbers
// are replaced by invented ones, each used once, drawn from disjoint pools for training and
// held-out sentences; a translator without copying, with pointer-generator copying (See et al.
// 2017) and with the pointer-sentinel mixture (Merity et al. 2016) are trained on the same data
// and scored on how many of the held-out names and numbers they reproduce.
#include <algorithm>
#include <cctype>
#include <map>
#include <set>

#include "attn/random.h"
#include "seq2seq/metrics/bleu.h"
#include "seq2seq/data/vocab.h"
#include "tools/experiments/conclusions.h"
#include "tools/experiments/context.h"
#include "tools/experiments/statistics.h"
#include "tools/experiments/svg_chart.h"

namespace attn::experiments {

namespace s2s = attn::seq2seq;

namespace {

bool is_number(const std::string& token) {
  return !token.empty() && std::all_of(token.begin(), token.end(), [](unsigned char c) { return std::isdigit(c); });
}

// Invented words from a seeded stream: capitalised names of three consonant-vowel syllables,
// or numbers of 3 to 5 digits; never one of `used` (which then holds it).
class RareWords {
 public:
  explicit RareWords(uint64_t seed) : state_(seed) {}
  std::string next(bool number, std::set<std::string>& used) {
    static const char* consonants = "bdfgklmnprstvz";
    static const char* vowels = "aeiou";
    for (;;) {
      std::string w;
      if (number) {
        w = std::to_string(100 + draw() % 99900);
      } else {
        for (int s = 0; s < 3; ++s) {
          w += consonants[draw() % 14];
          w += vowels[draw() % 5];
        }
        w[0] = static_cast<char>(std::toupper(static_cast<unsigned char>(w[0])));
      }
      if (used.insert(w).second) return w;
    }
  }

 private:
  uint64_t draw() {
    state_ = mix64(state_ + 0x9e3779b97f4a7c15ULL);
    return state_;
  }
  uint64_t state_;
};

}  // namespace

std::vector<s2s::SentencePair> with_rare_words(const std::vector<s2s::SentencePair>& pairs, uint64_t seed,
                                               std::set<std::string>& used, std::vector<std::vector<std::string>>* inserted) {
  RareWords words(seed);
  std::vector<s2s::SentencePair> out;
  out.reserve(pairs.size());
  for (const auto& p : pairs) {
    const s2s::Tokens source = s2s::tokenize_training_text(p.source);
    s2s::Tokens target = s2s::tokenize_training_text(p.target);
    std::map<std::string, std::string> replaced;
    s2s::Tokens new_source;
    for (const std::string& t : source) {
      const bool number = is_number(t);
      if (number || s2s::is_corpus_name(t)) {
        auto it = replaced.find(t);
        if (it == replaced.end()) it = replaced.emplace(t, words.next(number, used)).first;
        new_source.push_back(it->second);
      } else {
        new_source.push_back(t);
      }
    }
    std::vector<std::string> here;
    for (std::string& t : target) {
      const auto it = replaced.find(t);
      if (it != replaced.end()) {
        t = it->second;
        here.push_back(t);
      }
    }
    out.push_back({s2s::join_tokens(new_source), s2s::join_tokens(target)});
    if (inserted) inserted->push_back(std::move(here));
  }
  return out;
}

double copied_share(const std::vector<s2s::Tokens>& hypotheses, const std::vector<std::vector<std::string>>& inserted,
                    int64_t* total_out) {
  int64_t hits = 0, total = 0;
  for (size_t i = 0; i < hypotheses.size() && i < inserted.size(); ++i) {
    std::multiset<std::string> have;
    for (const auto& t : hypotheses[i]) have.insert(s2s::lowercase(t));
    for (const auto& w : inserted[i]) {
      ++total;
      const auto it = have.find(s2s::lowercase(w));
      if (it != have.end()) ++hits, have.erase(it);
    }
  }
  if (total_out) *total_out = total;
  return total > 0 ? 100.0 * static_cast<double>(hits) / static_cast<double>(total) : 0.0;
}

void copying_experiment(Context& ctx, Report& report) {
  ctx.begin("copying");
  const s2s::Corpus& corpus = ctx.corpus();
  // Training and held-out sentences with every name and number replaced by an invented one
  // (each used once; the held-out pool never overlaps the training pool).
  std::set<std::string> used;
  const std::vector<s2s::SentencePair> train = with_rare_words(corpus.train, 71, used, nullptr);
  const std::vector<s2s::SentencePair> valid = with_rare_words(corpus.valid, 72, used, nullptr);
  std::vector<std::vector<std::string>> all_inserted;
  const std::vector<s2s::SentencePair> held_all = with_rare_words(corpus.test, 73, used, &all_inserted);
  std::vector<s2s::SentencePair> held;
  std::vector<std::vector<std::string>> inserted;
  for (size_t i = 0; i < held_all.size(); ++i)
    if (!all_inserted[i].empty()) held.push_back(held_all[i]), inserted.push_back(all_inserted[i]);

  struct Variant { std::string name; bool copy; s2s::CopyKind kind; };
  const std::vector<Variant> variants = {{"no copying", false, s2s::CopyKind::generator},
                                         {"pointer-generator", true, s2s::CopyKind::generator},
                                         {"pointer-sentinel", true, s2s::CopyKind::sentinel}};
  const std::vector<uint64_t> seeds = ctx.quick() ? std::vector<uint64_t>{1} : std::vector<uint64_t>{1, 2};
  Table table{"copying_runs", {"model", "seed", "copied_percent", "rare_words", "bleu", "train_seconds", "parameters"}, {}};
  struct Agg { Summary copied, bleu, time; int64_t params = 0; };
  std::vector<Agg> agg;
  const double runs = static_cast<double>(variants.size() * seeds.size());
  double run_index = 0;
  int64_t rare_total = 0;
  for (const Variant& v : variants) {
    std::vector<double> copied, bleu, time;
    int64_t params = 0;
    for (const uint64_t seed : seeds) {
      s2s::TrainConfig c = preset_config(ctx, s2s::AttentionPreset::luong_general, seed);
      c.model.copy = v.copy;
      c.model.copy_kind = v.kind;
      c.vocab.min_frequency = 2;  // every invented word is seen once: <unk> to the vocabularies
      // Quick mode: twice the epochs of the other quick translators (at 375 steps the models
      // whose decoder attention has not yet aligned translate little but the copied words).
      if (ctx.quick()) c.epochs *= 2;
      const std::string key = "copying " + v.name + " seed " + std::to_string(seed);
      const auto& t = ctx.train_on(key, c, train, valid, run_index / runs, (run_index + 0.9) / runs);
      ctx.progress((run_index + 0.9) / runs, "evaluating " + key);
      const s2s::EvalResult r = s2s::evaluate(t.translator, held);
      const double share = copied_share(r.hypotheses, inserted, &rare_total);
      copied.push_back(share), bleu.push_back(r.bleu.bleu), time.push_back(t.train_seconds);
      params = t.parameters;
      table.add({v.name, std::to_string(seed), num(share, 4), std::to_string(rare_total), num(r.bleu.bleu, 4),
                 num(t.train_seconds, 4), std::to_string(t.parameters)});
      ++run_index;
    }
    agg.push_back({summarize(copied), summarize(bleu), summarize(time), params});
  }
  BarChart copied_chart{"Unseen names and numbers reproduced", "output layer", "rare words copied (%)", {}, {}, {}};
  BarChart bleu_chart{"BLEU on sentences with unseen names and numbers", "output layer", "BLEU (0-100)", {}, {}, {}};
  for (size_t i = 0; i < variants.size(); ++i) {
    copied_chart.categories.push_back(variants[i].name), copied_chart.values.push_back(agg[i].copied.mean);
    copied_chart.error.push_back(agg[i].copied.stddev);
    bleu_chart.categories.push_back(variants[i].name), bleu_chart.values.push_back(agg[i].bleu.mean);
    bleu_chart.error.push_back(agg[i].bleu.stddev);
  }
  Section sec = new_section("copying", "7. Copying words never seen in training",
                            "Pointer-generator copying (See et al. 2017) and the pointer-sentinel mixture "
                            "(Merity et al. 2016) let a model emit a source word its vocabulary lacks; without "
                            "copying, a name or number never seen in training can only come out as <unk>.");
  sec.charts.push_back(render(copied_chart));
  sec.charts.push_back(render(bleu_chart));
  const Agg& none = agg[0];
  const Agg& generator = agg[1];
  const Agg& sentinel = agg[2];
  const bool several = seeds.size() > 1;
  auto pm = [&](const Summary& s) { return num(s.mean, 3) + (several ? " ± " + num(s.stddev, 2) : ""); };
  sec.conclusions.push_back("Of " + std::to_string(rare_total) + " invented names and numbers in " +
                            std::to_string(held.size()) + " held-out sentences, the translator reproduced " +
                            pm(none.copied) + "% without copying, " + pm(generator.copied) +
                            "% with the pointer-generator and " + pm(sentinel.copied) +
                            "% with the pointer-sentinel mixture" + (several ? " (mean ± standard deviation over " +
                                                                               std::to_string(seeds.size()) + " seeds)" : "") +
                            ". " +
                            versus_claim(std::min(generator.copied.mean, sentinel.copied.mean) > none.copied.mean + 10.0,
                                         "a copy mechanism lets a translator reproduce words it never saw in training"));
  sec.conclusions.push_back("BLEU on these sentences: " + pm(none.bleu) + " without copying, " + pm(generator.bleu) +
                            " pointer-generator, " + pm(sentinel.bleu) + " pointer-sentinel.");
  // Sentinel against generator, against the noise between seeds (at least 2 points of copy rate).
  const double noise = std::max({generator.copied.stddev, sentinel.copied.stddev, 2.0});
  const double diff = sentinel.copied.mean - generator.copied.mean;
  sec.conclusions.push_back("The pointer-sentinel mixture copied " + num(std::fabs(diff), 2) + " points " +
                            (diff >= 0 ? "more" : "fewer") + " than the pointer-generator: " +
                            (std::fabs(diff) <= noise ? "within" : "beyond") + " the noise of " + num(noise, 2) +
                            " points" + (several ? " (largest seed spread, at least 2)" : " (2 assumed: one seed)") +
                            "; it has " + std::to_string(sentinel.params - generator.params) +
                            " parameters more than the pointer-generator. Training took " + num(none.time.mean, 3) +
                            ", " + num(generator.time.mean, 3) + " and " + num(sentinel.time.mean, 3) + " s.");
  sec.notes.push_back("Every name (Marie, Paul, ...) and number of the embedded corpus was replaced, in source "
                      "and target alike, by an invented word (\"Bakoru\", \"4821\") used in one sentence only; "
                      "training and held-out sentences draw from disjoint pools, and words seen fewer than twice "
                      "stay out of the vocabularies, so no invented word is a vocabulary word. Held-out: the " +
                      std::to_string(held.size()) + " test sentences that contain one. A rare word counts as "
                      "reproduced when the greedy translation contains it. French agreement with an invented "
                      "name's gender cannot be known, which costs all three models alike.");
  sec.notes.push_back("Luong general translator as in experiment 4 (embedding " +
                      std::to_string(preset_config(ctx, s2s::AttentionPreset::luong_general, 1).model.embedding) +
                      ", hidden " + std::to_string(preset_config(ctx, s2s::AttentionPreset::luong_general, 1).model.hidden) +
                      "), the same steps for the three output layers." +
                      (ctx.quick() ? " Quick mode: tiny models, one seed, indicative only." : ""));
  sec.tables.push_back(std::move(table));
  finish(ctx, report, std::move(sec));
}

}  // namespace attn::experiments
