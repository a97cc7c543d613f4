// What the experiments share: the options, progress reporting with an ETA, timing and memory
// measurement, and the translators trained once and reused by several experiments.
#pragma once

#include <chrono>
#include <functional>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "seq2seq/data/corpus.h"
#include "seq2seq/training/train.h"
#include "tools/experiments/experiments.h"
#include "tools/experiments/report_html.h"

namespace attn::experiments {

class Context {
 public:
  Context(const Options& options, std::function<void(const std::string&)> sink,
          std::vector<std::pair<std::string, double>> plan);

  bool quick() const { return options_.quick; }
  // Enters experiment `name` (one of the plan's).
  void begin(const std::string& name);
  // Within the current experiment: fraction done in [0, 1] and what runs now.
  void progress(double fraction, const std::string& what);
  void end();

  // The embedded corpus of this mode (generated once).
  const seq2seq::Corpus& corpus();

  struct Trained {
    seq2seq::Translator translator;
    double train_seconds = 0.0;
    int64_t parameters = 0;
    int64_t steps = 0;
    std::vector<double> losses;
  };
  // Trains (once per key) a translator with `config` on the corpus's train split; progress goes
  // to the current experiment between `from` and `to`.
  const Trained& train(const std::string& key, const seq2seq::TrainConfig& config, double from,
                       double to);
  // The same on other data (experiment 7's sentences with invented words).
  const Trained& train_on(const std::string& key, const seq2seq::TrainConfig& config,
                          const std::vector<seq2seq::SentencePair>& train,
                          const std::vector<seq2seq::SentencePair>& valid, double from, double to);

 private:
  Options options_;
  std::function<void(const std::string&)> sink_;
  std::vector<std::pair<std::string, double>> plan_;  // name, expected seconds
  std::chrono::steady_clock::time_point start_;
  double done_weight_ = 0.0, total_weight_ = 0.0, current_weight_ = 0.0;
  size_t index_ = 0;
  std::string current_;
  std::unique_ptr<seq2seq::Corpus> corpus_;
  std::map<std::string, Trained> trained_;
};

double seconds_since(std::chrono::steady_clock::time_point start);

// Best wall time of `repeats` calls of f, seconds.
double best_seconds(int repeats, const std::function<void()>& f);

// Peak resident memory f adds above what the process held before it, bytes; -1 where the kernel
// does not let the peak be reset (/proc/self/clear_refs).
// It fixes malloc's mmap threshold low so that freed blocks leave the resident size;
// restore_malloc_thresholds() sets it high again (training allocates many large tensors).
double peak_extra_bytes(const std::function<void()>& f);
void restore_malloc_thresholds();

// A section with its anchor, title and the question it answers.
Section new_section(std::string id, std::string title, std::string question);
// Appends an experiment's section and leaves the experiment (Context::end).
void finish(Context& ctx, Report& report, Section section);

// One experiment per function: each appends its section to the report.
void cost_experiment(Context& ctx, Report& report);
void scale_experiment(Context& ctx, Report& report);
void length_experiment(Context& ctx, Report& report);
void luong_experiment(Context& ctx, Report& report);
void heads_experiment(Context& ctx, Report& report);
void alignments_experiment(Context& ctx, Report& report);
void copying_experiment(Context& ctx, Report& report);

// Experiment 7's data: `pairs` with every corpus name and number replaced, in source and target
// alike, by an invented word (a capitalised nonsense name or a 3-5 digit number) drawn from a
// stream seeded by `seed` and not yet in `used` (which receives it), so each is used once and
// splits drawn with one `used` never share one. `inserted` (optional) receives each pair's
// invented words as they appear in its target.
std::vector<seq2seq::SentencePair> with_rare_words(const std::vector<seq2seq::SentencePair>& pairs, uint64_t seed,
                                                   std::set<std::string>& used,
                                                   std::vector<std::vector<std::string>>* inserted);
// Percentage of the `inserted` words (per sentence) found in the hypotheses, case-insensitively,
// each hypothesis token matching at most one; `total` receives the number of inserted words.
double copied_share(const std::vector<seq2seq::Tokens>& hypotheses,
                    const std::vector<std::vector<std::string>>& inserted, int64_t* total);

// The translator setup of this mode (RNN, Luong general by default).
seq2seq::TrainConfig base_rnn_config(const Context& ctx);
seq2seq::TrainConfig base_transformer_config(const Context& ctx, int64_t heads);
// The key of Context::train for a preset and seed (shared by luong, length and alignments).
std::string preset_key(seq2seq::AttentionPreset preset, uint64_t seed);
seq2seq::TrainConfig preset_config(const Context& ctx, seq2seq::AttentionPreset preset, uint64_t seed);

}  // namespace attn::experiments
