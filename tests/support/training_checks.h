// Shared checks for tests that train translators (test_train, test_transformer_translator):
// scratch directories, a small seeded corpus and the bit-for-bit resume check.
#pragma once

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdint>
#include <filesystem>
#include <functional>
#include <string>
#include <vector>

#include "seq2seq/corpus.h"
#include "seq2seq/train.h"

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
