// Gradient sharding in one process (seq2seq::GradientSharding, the MPI-free half of data-parallel
// training; the MPI half is tested under mpirun in dist/tests): the loss normaliser that lets the
// shards of a batch sum to the batch, and a sharded run's determinism, equivalence and errors.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "attn/error.h"
#include "seq2seq/models/loss.h"
#include "seq2seq/training/train.h"
#include "support/test_support.h"
#include "support/training_checks.h"

namespace {

namespace s2s = attn::seq2seq;
using attn::DType;
using attn::Tensor;

// Rows [begin, end) of a [N, V] tensor.
Tensor rows(const Tensor& t, int64_t begin, int64_t end) { return t.slice(0, begin, end).contiguous(); }

// Each part's loss divided by the whole batch's count sums to the whole batch's loss, and its
// gradient rows are the whole batch's, bit for bit (the same 1/M scales each row).
TEST(GradientShards, NormaliserMakesPartsSumToTheBatch) {
  const int64_t N = 10, V = 7;
  const Tensor logits = attn::testing::random_tensor({N, V}, DType::f32, 3);
  const std::vector<int32_t> targets = {1, 0, 3, 6, 0, 2, 5, 5, 0, 4};  // 0: padding, ignored
  s2s::CrossEntropyConfig ce;
  ce.label_smoothing = 0.1;
  const s2s::CrossEntropyResult whole = s2s::cross_entropy(logits, targets, ce);
  ASSERT_EQ(whole.count, 7);
  s2s::CrossEntropyConfig part = ce;
  part.normalizer = whole.count;
  double loss = 0.0, nll = 0.0;
  for (auto [b, e] : {std::pair<int64_t, int64_t>{0, 4}, {4, 9}, {9, 10}}) {
    const std::vector<int32_t> t(targets.begin() + b, targets.begin() + e);
    const s2s::CrossEntropyResult r = s2s::cross_entropy(rows(logits, b, e), t, part);
    loss += r.loss;
    nll += r.nll;
    const std::vector<double> got = r.dlogits.to_vector(), want = rows(whole.dlogits, b, e).to_vector();
    EXPECT_EQ(got, want) << "rows " << b << ".." << e;
  }
  EXPECT_NEAR(loss, whole.loss, 1e-12 * std::fabs(whole.loss));
  EXPECT_NEAR(nll, whole.nll, 1e-12 * std::fabs(whole.nll));
}

s2s::TrainConfig tiny_config() {
  s2s::TrainConfig c;
  c.model.embedding = 8;
  c.model.hidden = 16;
  c.batch_size = 12;
  c.epochs = 1;
  c.lr = 1e-2;
  c.schedule.warmup_steps = 2;
  return c;
}

std::vector<double> weights_after(int64_t shards, int64_t steps) {
  static const s2s::Corpus corpus = attn::testing::small_corpus(100);
  s2s::Trainer t(tiny_config(), corpus.train, corpus.valid);
  s2s::RunControl control;
  control.max_steps = steps;
  control.sharding.shards = shards;
  t.run(control);
  std::vector<double> w;
  for (const attn::nn::Parameter& p : t.translator().parameters()) {
    const std::vector<double> v = p.value.to_vector();
    w.insert(w.end(), v.begin(), v.end());
  }
  return w;
}

// Shards run one after the other in one process: the same bits every time, and after one step
// the plain loop's weights up to the summation order (Adam moves each weight by about lr, and by
// up to 2 lr where rounding can flip the sign of a gradient that is 0 up to rounding; the largest
// difference seen is far below that). 13 shards of 12 rows: one shard is empty.
TEST(GradientShards, OneProcessIsDeterministicAndCloseToThePlainLoop) {
  const double lr = tiny_config().lr;
  for (int64_t shards : {3, 13}) {
    const std::vector<double> a = weights_after(shards, 2), b = weights_after(shards, 2);
    ASSERT_EQ(a.size(), b.size());
    EXPECT_EQ(std::memcmp(a.data(), b.data(), a.size() * sizeof(double)), 0) << shards << " shards";
    const std::vector<double> sharded = weights_after(shards, 1), plain = weights_after(1, 1);
    double worst = 0.0;
    for (size_t i = 0; i < plain.size(); ++i) worst = std::max(worst, std::fabs(sharded[i] - plain[i]));
    EXPECT_LE(worst, 2 * lr) << shards << " shards";
    EXPECT_GT(worst, 0.0) << "sharding changed no rounding: is it used?";
  }
}

TEST(GradientShards, BadShardingIsRefused) {
  const s2s::Corpus corpus = attn::testing::small_corpus(50);
  s2s::Trainer t(tiny_config(), corpus.train, corpus.valid);
  s2s::RunControl control;
  control.max_steps = 1;
  control.sharding.shards = 0;
  attn::testing::expect_error([&] { t.run(control); }, {"train", "gradient shards"});
  control.sharding.shards = 4;
  control.sharding.first = 3;
  control.sharding.count = 2;
  attn::testing::expect_error([&] { t.run(control); }, {"train", "must lie in [0, 4)"});
  control.sharding.first = 0;
  attn::testing::expect_error([&] { t.run(control); }, {"train", "no sum_shards"});
  EXPECT_EQ(t.step(), 0);
}

}  // namespace
