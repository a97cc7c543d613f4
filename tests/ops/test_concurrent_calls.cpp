// attn::attention and attention_backward called from several application threads at once, on
// every path of the front-end (src/attention.cpp): each thread's outputs and gradients must be
// bit-identical to the same call made alone. The calls share their input tensors (read only) and
// each opens its own OpenMP team inside the kernels, so this catches shared scratch buffers,
// static state, process-wide BLAS settings changed under another caller (SingleThreadedBlas) and
// results that depend on which team ran them.
//
// The paths and what selects them (the dispatch in src/attention.cpp):
//   composed  float32 with Luong local-p attention (no fused kernel takes local attention), and
//             float64, which only the composed path computes
//   flash     float32 scaled dot, Tq >= 16 (kernels/flash/flash_attention.h, flash_backward.h)
//   decode    float32 scaled dot, Tq < 16; its backward is the composed one
//             (kernels/decode/decode_attention.h); K and V of 8 MiB, above the 4 MiB from which the
//             kernel splits the work over threads
//   additive  float32 Bahdanau score (kernels/additive/additive_attention.h)
// Every problem is large enough for the kernels to run their OpenMP loops on several threads.
#include <gtest/gtest.h>
#include <omp.h>

#include <barrier>
#include <cmath>
#include <cstdint>
#include <string>
#include <thread>
#include <vector>

#include "attn/attention.h"
#include "support/attention_problem.h"
#include "support/bitwise_equal.h"
#include "support/test_support.h"

namespace attn {
namespace {

using testing::bitwise_equal;
using testing::random_tensor;
using Sizes = testing::AttentionSizes;

constexpr int kThreads = 4;  // application threads calling at once
constexpr int kRounds = 6;   // each thread repeats its calls

// One attention problem on one path: inputs, parameters and a name for messages.
struct Problem {
  std::string path;
  testing::AttentionInputs in;
  AttentionParams params;
};

// Parameters scaled by 1/sqrt(fan-in) so that scores stay O(1).
Tensor param(const Shape& shape, DType dtype, uint64_t seed, double fan_in) {
  const double r = 1.0 / std::sqrt(fan_in);
  return random_tensor(shape, dtype, seed, -r, r);
}

Problem composed_local_problem() {
  const Sizes s{.B = 2, .Hq = 4, .Hkv = 2, .Tq = 96, .Tk = 128, .Dq = 32, .Dk = 32, .Dv = 32};
  Problem p{"composed (f32, local-p)", testing::make_inputs(s, DType::f32, 11), {}};
  p.params.score = ScaledDotScore{};
  p.params.mask.key_lengths = {128, 101};
  p.params.mask.local = {.kind = LocalKind::predictive, .half_width = 12,
                         .w_p = param({8, s.Dq}, DType::f32, 12, s.Dq),
                         .v_p = param({8}, DType::f32, 13, 8)};
  p.params.return_weights = true;
  return p;
}

Problem composed_f64_problem() {
  const Sizes s{.B = 2, .Hq = 4, .Hkv = 4, .Tq = 80, .Tk = 96, .Dq = 24, .Dk = 24, .Dv = 16};
  Problem p{"composed (f64, general score)", testing::make_inputs(s, DType::f64, 21), {}};
  p.params.score = GeneralScore{param({s.Dq, s.Dk}, DType::f64, 22, s.Dq), {}, {}};
  p.params.mask.causal = true;
  p.params.mask.alignment = Alignment::bottom_right;
  p.params.mask.bias = random_tensor({s.Tq, s.Tk}, DType::f64, 23);
  p.params.dropout = {.p = 0.1, .seed = 24};
  return p;
}

Problem flash_problem() {
  const Sizes s{.B = 2, .Hq = 8, .Hkv = 2, .Tq = 160, .Tk = 192, .Dq = 64, .Dk = 64, .Dv = 64};
  Problem p{"flash", testing::make_inputs(s, DType::f32, 31), {}};
  p.params.score = ScaledDotScore{};
  p.params.mask.key_lengths = {192, 150};
  p.params.mask.causal = true;
  p.params.mask.alignment = Alignment::bottom_right;
  p.params.mask.bias = random_tensor({1, s.Hq, 1, s.Tk}, DType::f32, 32);
  p.params.dropout = {.p = 0.1, .seed = 33};
  p.params.return_weights = true;
  return p;
}

Problem decode_problem() {
  const Sizes s{.B = 2, .Hq = 8, .Hkv = 4, .Tq = 4, .Tk = 2048, .Dq = 64, .Dk = 64, .Dv = 64};
  Problem p{"decode", testing::make_inputs(s, DType::f32, 41), {}};
  p.params.score = ScaledDotScore{};
  p.params.mask.key_lengths = {2048, 1900};
  p.params.mask.causal = true;
  p.params.mask.alignment = Alignment::bottom_right;
  p.params.mask.alibi_slopes = alibi_slopes(s.Hq);
  p.params.return_weights = true;
  return p;
}

Problem additive_problem() {
  const Sizes s{.B = 2, .Hq = 4, .Hkv = 2, .Tq = 64, .Tk = 96, .Dq = 32, .Dk = 32, .Dv = 24};
  constexpr int64_t A = 16;
  Problem p{"additive", testing::make_inputs(s, DType::f32, 51), {}};
  p.params.score = AdditiveScore{param({A, s.Dq}, DType::f32, 52, s.Dq),
                                 param({A, s.Dk}, DType::f32, 53, s.Dk),
                                 param({A}, DType::f32, 54, 4.0), param({A}, DType::f32, 55, 1.0)};
  p.params.mask.key_lengths = {96, 70};
  p.params.mask.causal = true;
  p.params.mask.alignment = Alignment::bottom_right;
  p.params.dropout = {.p = 0.1, .seed = 56};
  p.params.return_weights = true;
  return p;
}

std::vector<Problem> all_problems() {
  return {composed_local_problem(), composed_f64_problem(), flash_problem(), decode_problem(),
          additive_problem()};
}

struct Results {
  AttentionOutput out;
  AttentionGrads grads;
};

Results run(const Problem& p) {
  Results r;
  r.out = attention(p.in.q, p.in.k, p.in.v, p.params);
  r.grads = attention_backward(p.in.q, p.in.k, p.in.v, p.params, r.out, p.in.dout);
  return r;
}

// Every output and gradient of `got` bit for bit against `want`.
void expect_same_bits(const Results& got, const Results& want, const std::string& what) {
  SCOPED_TRACE(what);
  testing::expect_same_bits(got.out, got.grads, want.out, want.grads);
}

// Runs kThreads threads for kRounds rounds; in round r thread t computes
// problems[pick(t, r)]. The threads wait for each other at the start of every round, so the
// calls overlap. Returns results[t][r]; exceptions are reported as failures of that call.
template <class Pick>
std::vector<std::vector<Results>> run_concurrently(const std::vector<Problem>& problems,
                                                   Pick pick) {
  std::vector<std::vector<Results>> results(kThreads, std::vector<Results>(kRounds));
  std::vector<std::vector<std::string>> errors(kThreads);
  std::barrier start(kThreads);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t)
    threads.emplace_back([&, t] {
      for (int r = 0; r < kRounds; ++r) {
        start.arrive_and_wait();
        try {
          results[t][r] = run(problems[pick(t, r)]);
        } catch (const std::exception& e) {
          errors[t].push_back(e.what());
        }
      }
    });
  for (std::thread& th : threads) th.join();
  for (int t = 0; t < kThreads; ++t)
    for (const std::string& e : errors[t]) ADD_FAILURE() << "thread " << t << ": " << e;
  return results;
}

TEST(ConcurrentCalls, KernelsRunOnSeveralOpenMPThreads) {
  // The kernels' own threading is part of what the tests below exercise.
  if (omp_get_max_threads() < 2) GTEST_SKIP() << "one OpenMP thread: no team inside the calls";
  SUCCEED();
}

// Each path on its own: kThreads threads all making the same call.
TEST(ConcurrentCalls, SamePathFromSeveralThreadsMatchesTheCallAlone) {
  const std::vector<Problem> problems = all_problems();
  for (std::size_t i = 0; i < problems.size(); ++i) {
    SCOPED_TRACE(problems[i].path);
    const Results alone = run(problems[i]);
    const auto results = run_concurrently(problems, [i](int, int) { return i; });
    for (int t = 0; t < kThreads; ++t)
      for (int r = 0; r < kRounds; ++r)
        expect_same_bits(results[t][r], alone,
                         "thread " + std::to_string(t) + " round " + std::to_string(r));
  }
}

// Different paths at the same moment: in round r thread t runs problem (t + r) mod n, so every
// round mixes paths and every thread runs several of them.
TEST(ConcurrentCalls, DifferentPathsAtOnceMatchTheCallsAlone) {
  const std::vector<Problem> problems = all_problems();
  std::vector<Results> alone;
  for (const Problem& p : problems) alone.push_back(run(p));
  const auto pick = [n = problems.size()](int t, int r) {
    return static_cast<std::size_t>(t + r) % n;
  };
  const auto results = run_concurrently(problems, pick);
  for (int t = 0; t < kThreads; ++t)
    for (int r = 0; r < kRounds; ++r) {
      const std::size_t i = pick(t, r);
      expect_same_bits(results[t][r], alone[i],
                       problems[i].path + ", thread " + std::to_string(t) + " round " +
                           std::to_string(r));
    }
}

}  // namespace
}  // namespace attn
