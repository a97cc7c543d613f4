// Data-parallel training (attn/dist/data_parallel.h driving seq2seq::GradientSharding) under
// mpirun with 1, 2, 3 and 4 ranks: a GRU and a Transformer translator on the small embedded
// corpus, a few steps each.
//
// - P processes with S gradient shards give the weights, Adam moments and losses of one process
//   with the same S, bit for bit (the sum's order is fixed: shard order, left to right), with
//   dropout on; and two P-process runs with ranks delayed differently give the same bits.
// - P processes (S = P) against the plain one-process loop (S = 1): the same mathematics in
//   another float32 summation order, compared within the bound derived at kPlainBound below.
// - A run checkpointed by rank 0 and resumed by every rank continues bit for bit.
#include <gtest/gtest.h>
#include <mpi.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include "attn/dist/data_parallel.h"
#include "attn/error.h"
#include "mpi_test_main.h"
#include "support/training_checks.h"

namespace {

namespace s2s = attn::seq2seq;

using attn::testing::rank_of, attn::testing::ranks;

const s2s::Corpus& corpus() {
  static const s2s::Corpus c = attn::testing::small_corpus(200);
  return c;
}

s2s::TrainConfig gru_config(double dropout) {
  s2s::TrainConfig c;
  c.model.embedding = 8;
  c.model.hidden = 16;
  c.model.dropout = dropout;
  c.batch_size = 24;
  c.epochs = 1;
  c.lr = 1e-2;
  c.schedule.warmup_steps = 2;
  return c;
}

s2s::TrainConfig transformer_config(double dropout) {
  s2s::TrainConfig c = gru_config(dropout);
  c.model.arch = s2s::Architecture::transformer;
  c.model.embedding = c.model.hidden = 16;
  c.model.heads = 2;
  c.model.ffn = 32;
  return c;
}

// This rank's share of `shards` gradient shards, summed over MPI_COMM_WORLD; `delay` (ms per
// rank) holds ranks back by different amounts before every sum, so that they arrive in another
// order each time.
s2s::GradientSharding mpi_sharding(int64_t shards, int delay_ms = 0) {
  const attn::dist::ShardRange own = attn::dist::shard_range(shards, ranks(), rank_of());
  s2s::GradientSharding g;
  g.shards = shards;
  g.first = own.first;
  g.count = own.count;
  g.sum_shards = [shards, delay_ms](const float* mine, int64_t n, float* sum) {
    if (delay_ms > 0) std::this_thread::sleep_for(std::chrono::milliseconds(delay_ms * ((rank_of() * 7) % 3)));
    attn::dist::sum_shards_in_order(mine, n, shards, sum, MPI_COMM_WORLD);
  };
  g.any = [](bool stop) { return attn::dist::any_rank(stop, MPI_COMM_WORLD); };
  return g;
}

struct RunResult {
  std::vector<std::vector<float>> weights, grads;
  std::vector<double> losses;
};

RunResult result_of(const s2s::Trainer& t) {
  RunResult r;
  for (const attn::nn::Parameter& p : t.translator().parameters()) {
    const std::vector<double> w = p.value.to_vector(), g = p.grad.to_vector();  // exact
    r.weights.emplace_back(w.begin(), w.end());
    r.grads.emplace_back(g.begin(), g.end());
  }
  r.losses = t.losses();
  return r;
}

RunResult train(const s2s::TrainConfig& config, int64_t steps, const s2s::GradientSharding& sharding) {
  s2s::Trainer t(config, corpus().train, corpus().valid);
  s2s::RunControl control;
  control.max_steps = steps;
  control.sharding = sharding;
  t.run(control);
  return result_of(t);
}

bool same_bits(const RunResult& a, const RunResult& b) {
  if (a.weights.size() != b.weights.size() || a.losses.size() != b.losses.size()) return false;
  for (size_t i = 0; i < a.weights.size(); ++i)
    if (a.weights[i].size() != b.weights[i].size() ||
        std::memcmp(a.weights[i].data(), b.weights[i].data(), a.weights[i].size() * sizeof(float)) != 0 ||
        std::memcmp(a.grads[i].data(), b.grads[i].data(), a.grads[i].size() * sizeof(float)) != 0)
      return false;
  return std::memcmp(a.losses.data(), b.losses.data(), a.losses.size() * sizeof(double)) == 0;
}

// Every rank holds bit-identical weights: each compares its own with rank 0's.
void expect_ranks_agree(const RunResult& mine) {
  std::vector<float> flat;
  for (const auto& w : mine.weights) flat.insert(flat.end(), w.begin(), w.end());
  std::vector<float> root = flat;
  MPI_Bcast(root.data(), static_cast<int>(root.size()), MPI_FLOAT, 0, MPI_COMM_WORLD);
  EXPECT_EQ(std::memcmp(root.data(), flat.data(), flat.size() * sizeof(float)), 0)
      << "rank " << rank_of() << "'s weights differ from rank 0's";
}

class DataParallel : public ::testing::TestWithParam<bool> {  // true: Transformer
 protected:
  s2s::TrainConfig config(double dropout) const {
    return GetParam() ? transformer_config(dropout) : gru_config(dropout);
  }
};

// 12 shards divide among 1, 2, 3 and 4 ranks; 24 rows make 2 per shard.
constexpr int64_t kShards = 12;
constexpr int64_t kSteps = 3;

TEST_P(DataParallel, SameBitsAsOneProcessWithTheSameShards) {
  const s2s::TrainConfig c = config(0.1);
  const RunResult parallel = train(c, kSteps, mpi_sharding(kShards));
  expect_ranks_agree(parallel);
  if (rank_of() == 0) {
    s2s::GradientSharding alone;
    alone.shards = kShards;
    const RunResult one = train(c, kSteps, alone);
    ASSERT_EQ(one.losses.size(), static_cast<size_t>(kSteps));
    EXPECT_TRUE(same_bits(parallel, one)) << ranks() << " processes differ from one with " << kShards << " shards";
    // The shards really are used: the plain loop rounds differently (and draws other masks).
    EXPECT_FALSE(same_bits(parallel, train(c, kSteps, {}))) << "sharding changed nothing";
  }
}

TEST_P(DataParallel, TimingDoesNotChangeTheResult) {
  const s2s::TrainConfig c = config(0.1);
  const RunResult a = train(c, kSteps, mpi_sharding(kShards, 0));
  const RunResult b = train(c, kSteps, mpi_sharding(kShards, 3));
  EXPECT_TRUE(same_bits(a, b)) << "rank " << rank_of();
}

// P processes with S = P shards against the plain loop (S = 1), dropout off: the same sums of
// float32 terms in another order. Step 1's gradient: each element is a float32 sum over the
// batch's rows, and splitting the rows into P parts and adding the partial sums changes only the
// order; with K the number of float32 additions on the longest path, each side is within
// gamma_K * sum|terms| of the exact sum. sum|terms| is not observable; its scale is taken as the
// model's largest gradient element g_max (every gradient is a sum of products of the same
// activations and upstream gradients; a parameter's own largest element is no scale: the
// Transformer's key-projection bias has an exact gradient of 0, cancelling terms of the common
// size, and both sides hold rounding noise there):
// |g_P - g_1| <= 2 gamma_K g_max with K = rows x longest sequence x hidden x 4, a generous path
// length. At 1 rank both sides are the plain loop and agree exactly. Adam then turns a gradient element g into an update of size lr g / (|g| + eps) at the
// first step, so an element whose sign rounding can flip (|g| below the bound) moves by 2 lr:
// the weights are compared with lr-sized slack for those elements only.
TEST_P(DataParallel, MatchesThePlainLoopToReductionOrder) {
  const s2s::TrainConfig c = config(0.0);
  const int64_t P = ranks();
  const RunResult parallel = train(c, 1, mpi_sharding(P));
  if (rank_of() != 0) return;
  const RunResult plain = train(c, 1, {});
  ASSERT_EQ(parallel.grads.size(), plain.grads.size());
  EXPECT_NEAR(parallel.losses[0], plain.losses[0], 1e-5 * std::fabs(plain.losses[0]));
  const double u = std::ldexp(1.0, -24);
  const double K = static_cast<double>(c.batch_size * 12 * 4 * c.model.hidden);
  const double gamma = K * u / (1.0 - K * u);
  double g_max = 0.0;
  for (const auto& grad : plain.grads)
    for (float g : grad) g_max = std::max(g_max, std::fabs(static_cast<double>(g)));
  const double bound = 2.0 * gamma * g_max;
  int64_t flippable = 0, elements = 0;
  double worst = 0.0, weight_diff = 0.0;  // the largest gradient difference / bound, weight difference
  for (size_t i = 0; i < plain.grads.size(); ++i) {
    for (size_t j = 0; j < plain.grads[i].size(); ++j) {
      const double g1 = plain.grads[i][j], gp = parallel.grads[i][j];
      worst = std::max(worst, std::fabs(gp - g1) / bound);
      weight_diff = std::max(weight_diff, std::fabs(static_cast<double>(parallel.weights[i][j]) - plain.weights[i][j]));
      ASSERT_LE(std::fabs(gp - g1), bound) << "gradient of parameter " << i << " element " << j
                                           << ": " << gp << " vs " << g1 << " (bound " << bound << ")";
      // After one Adam step: the same update unless the sign of g may differ.
      const double w1 = plain.weights[i][j], wp = parallel.weights[i][j];
      const double slack = std::fabs(g1) <= bound ? 2.0 * c.lr : 1e-6 * (std::fabs(w1) + c.lr);
      if (std::fabs(g1) <= bound) ++flippable;
      ++elements;
      ASSERT_LE(std::fabs(wp - w1), slack) << "weight of parameter " << i << " element " << j;
    }
  }
  std::printf("[ rank 0 ] %lld of %lld gradient elements within the bound of 0; largest gradient "
              "difference %.3g of the bound; largest weight difference %.3g (lr %g)\n",
              static_cast<long long>(flippable), static_cast<long long>(elements), worst, weight_diff, c.lr);
}

// Rank 0 writes the checkpoint after 2 steps; every rank resumes from it and runs to step 4: the
// same bits as an uninterrupted 4-step run on the same ranks.
TEST_P(DataParallel, ResumesBitForBit) {
  const s2s::TrainConfig c = config(0.1);
  const RunResult straight = train(c, 4, mpi_sharding(kShards));
  // Rank 0's scratch directory, named to every rank.
  std::string dir = rank_of() == 0 ? attn::testing::scratch_dir("data_parallel").string() : "";
  int length = static_cast<int>(dir.size());
  MPI_Bcast(&length, 1, MPI_INT, 0, MPI_COMM_WORLD);
  dir.resize(static_cast<size_t>(length));
  MPI_Bcast(dir.data(), length, MPI_CHAR, 0, MPI_COMM_WORLD);
  {
    s2s::Trainer first(c, corpus().train, corpus().valid);
    s2s::RunControl control;
    control.max_steps = 2;
    control.sharding = mpi_sharding(kShards);
    if (rank_of() == 0) control.out_dir = dir;  // rank 0 alone writes
    first.run(control);
  }
  MPI_Barrier(MPI_COMM_WORLD);
  s2s::Trainer resumed = s2s::Trainer::resume(dir, corpus().train, corpus().valid);
  EXPECT_EQ(resumed.step(), 2);
  s2s::RunControl control;
  control.max_steps = 4;
  control.sharding = mpi_sharding(kShards);
  resumed.run(control);
  RunResult r = result_of(resumed);
  RunResult tail = straight;
  tail.losses.erase(tail.losses.begin(), tail.losses.begin() + 2);
  EXPECT_TRUE(same_bits(r, tail)) << "rank " << rank_of();
  MPI_Barrier(MPI_COMM_WORLD);
  if (rank_of() == 0) std::filesystem::remove_all(dir);
}

INSTANTIATE_TEST_SUITE_P(Models, DataParallel, ::testing::Bool(),
                         [](const auto& info) { return info.param ? "Transformer" : "GRU"; });

// Errors reach every rank (none hangs).
TEST(DataParallelErrors, ClearMessages) {
  const int P = ranks();
  std::vector<float> mine(static_cast<size_t>(10 + rank_of())), sum(mine.size());
  if (P > 1) {
    try {
      attn::dist::sum_shards_in_order(mine.data(), static_cast<int64_t>(mine.size()), P, sum.data(),
                                      MPI_COMM_WORLD);
      ADD_FAILURE() << "gradient sizes that differ between ranks were accepted";
    } catch (const attn::Error& e) {
      EXPECT_NE(std::string(e.what()).find("differ between ranks"), std::string::npos) << e.what();
    }
    try {
      attn::dist::sum_shards_in_order(mine.data(), 10, P - 1, sum.data(), MPI_COMM_WORLD);
      ADD_FAILURE() << "fewer shards than ranks were accepted";
    } catch (const attn::Error& e) {
      EXPECT_NE(std::string(e.what()).find("every rank needs one"), std::string::npos) << e.what();
    }
  }
  // A process with part of the shards and no way to add the others' refuses to train.
  s2s::Trainer t(gru_config(0.0), corpus().train, corpus().valid);
  s2s::RunControl control;
  control.max_steps = 1;
  control.sharding.shards = 4;
  control.sharding.count = 2;
  try {
    t.run(control);
    ADD_FAILURE() << "a partial sharding without sum_shards was accepted";
  } catch (const attn::Error& e) {
    EXPECT_NE(std::string(e.what()).find("no sum_shards"), std::string::npos) << e.what();
  }
  // The sum still works after the errors.
  const attn::dist::ShardRange own = attn::dist::shard_range(P, P, rank_of());
  std::vector<float> g(static_cast<size_t>(own.count * 5), static_cast<float>(rank_of() + 1)), s(5);
  attn::dist::sum_shards_in_order(g.data(), 5, P, s.data(), MPI_COMM_WORLD);
  EXPECT_EQ(s[4], static_cast<float>(P * (P + 1) / 2));
}

}  // namespace

int main(int argc, char** argv) { return attn::testing::mpi_gtest_main(argc, argv); }
