// Shared checks for tests that train translators (test_train, test_transformer_translator):
// scratch directories, a small seeded corpus, runs into a checkpoint, the "a tiny run learns"
// check, translations of a trained and a reloaded translator, and the bit-for-bit resume check.
#pragma once

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "seq2seq/data/corpus.h"
#include "seq2seq/decoding/decode.h"
#include "seq2seq/training/train.h"

namespace attn::testing {

// A fresh, empty directory under the system temp dir, unique to this process.
inline std::filesystem::path scratch_dir(const std::string& name) {
  const std::filesystem::path dir = std::filesystem::temp_directory_path() /
                                    ("attn_test_" + name + "_" + std::to_string(getpid()));
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  return dir;
}

// The embedded corpus cut down to `train_pairs` short sentences (at most 10 tokens).
inline seq2seq::Corpus small_corpus(int64_t train_pairs) {
  seq2seq::CorpusConfig c;
  c.train_pairs = train_pairs;
  c.valid_pairs = 50;
  c.test_pairs = 50;
  c.long_test_pairs = 10;
  c.max_train_tokens = 10;
  return seq2seq::generate_corpus(c);
}

// Runs `trainer` with its checkpoint going to `dir`: `max_steps` global steps, or to the end
// when 0. Returns run()'s result (true: the run finished).
inline bool run_into(seq2seq::Trainer& trainer, const std::filesystem::path& dir,
                     int64_t max_steps = 0) {
  seq2seq::RunControl control;
  control.max_steps = max_steps;
  control.out_dir = dir.string();
  return trainer.run(control);
}

// A seeded tiny run of `config` to the end: the label-smoothed loss (eps 0.1) must start near
// log V (above 4.5) and the mean of its last 10 steps must fall below 2.5. Prints both, after
// `what`.
inline void expect_run_learns(const seq2seq::TrainConfig& config, const seq2seq::Corpus& corpus,
                              const std::string& what) {
  seq2seq::Trainer trainer(config, corpus.train, corpus.valid);
  ASSERT_TRUE(trainer.run({}));
  const auto& losses = trainer.losses();
  ASSERT_EQ(static_cast<int64_t>(losses.size()), trainer.total_steps());
  double last = 0.0;
  const int64_t n = 10;
  for (int64_t i = 0; i < n; ++i) last += losses[losses.size() - 1 - i] / n;
  EXPECT_GT(losses.front(), 4.5);
  std::printf("%s: first loss %.3f, mean of the last %d %.3f\n", what.c_str(), losses.front(),
              int(n), last);
  EXPECT_LT(last, 2.5) << "mean loss of the last " << n << " steps";
}

// The translations of `sentences` by a trained translator and by its checkpoint loaded back:
// the same tokens with the same log-probabilities, bit for bit. Returns both (trained, loaded)
// for further checks.
using Translations = std::vector<seq2seq::Translation>;
inline std::pair<Translations, Translations> expect_same_translations(
    const seq2seq::Translator& trained, const seq2seq::Translator& loaded,
    const std::vector<std::string>& sentences, const seq2seq::DecodeConfig& config) {
  std::pair<Translations, Translations> xy = {trained.translate(sentences, config),
                                              loaded.translate(sentences, config)};
  const auto& [x, y] = xy;
  EXPECT_EQ(x.size(), y.size());
  for (std::size_t i = 0; i < x.size() && i < y.size(); ++i) {
    EXPECT_EQ(x[i].tokens, y[i].tokens);
    EXPECT_EQ(x[i].log_prob, y[i].log_prob);
  }
  return xy;
}

// Runs `config` uninterrupted, then again stopped at `stop_step` (mid-epoch, so the data
// position matters) into a checkpoint and resumed: the concatenated losses and the final weights
// must equal the uninterrupted run's bit for bit. `check_resumed` sees the resumed trainer before
// it continues.
inline void expect_resume_bit_for_bit(
    const seq2seq::TrainConfig& config, const seq2seq::Corpus& corpus, int64_t stop_step,
    const std::function<void(const seq2seq::Trainer&)>& check_resumed = {}) {
  seq2seq::Trainer full(config, corpus.train, corpus.valid);
  ASSERT_TRUE(full.run({}));
  const std::vector<double> expected = full.losses();
  ASSERT_GT(static_cast<int64_t>(expected.size()), stop_step + 5);

  const std::filesystem::path dir = scratch_dir("resume");
  seq2seq::Trainer first(config, corpus.train, corpus.valid);
  seq2seq::RunControl stop;
  stop.max_steps = stop_step;
  stop.out_dir = dir.string();
  EXPECT_FALSE(first.run(stop));
  seq2seq::Trainer resumed = seq2seq::Trainer::resume(dir.string(), corpus.train, corpus.valid);
  EXPECT_EQ(resumed.step(), stop_step);
  if (check_resumed) check_resumed(resumed);
  ASSERT_TRUE(resumed.run({}));

  std::vector<double> losses = first.losses();
  losses.insert(losses.end(), resumed.losses().begin(), resumed.losses().end());
  ASSERT_EQ(losses.size(), expected.size());
  for (std::size_t i = 0; i < losses.size(); ++i) EXPECT_EQ(losses[i], expected[i]) << "step " << i;
  const auto a = full.translator().parameters();
  const auto b = resumed.translator().parameters();
  ASSERT_EQ(a.size(), b.size());
  for (std::size_t i = 0; i < a.size(); ++i)
    EXPECT_EQ(a[i].value.to_vector(), b[i].value.to_vector()) << a[i].name;
  std::filesystem::remove_all(dir);
}

}  // namespace attn::testing
