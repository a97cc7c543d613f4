// Baseline benchmark of attn's general (composed) attention path: every scoring function, forward
// and backward, at B=1, H=8, d=64, T in {128, 512, 2048}, float32.
//
// Counters: GFLOP/s from the nominal attention FLOP count (forward 4 T^2 d H: Q K^T and P V;
// backward 10 T^2 d H: five GEMM-sized products; scoring functions that cost more than a dot
// product still count the same, so their rates compare directly against dot), the ratio to an
// OpenBLAS sgemm of the same FLOP count timed in the same process, and the peak resident memory.
//
//   ./build/bench/bench_attention --benchmark_min_time=0.2
#include <benchmark/benchmark.h>
#include <cblas.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <map>
#include <random>
#include <string>

#include "attn/attention.h"

namespace {

constexpr int64_t kBatch = 1, kHeads = 8, kWidth = 64;

attn::Tensor random_tensor(const attn::Shape& shape, uint32_t seed, double scale = 1.0) {
  attn::Tensor t = attn::Tensor::empty(shape, attn::DType::f32);
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, static_cast<float>(scale));
  float* p = t.data<float>();
  for (int64_t i = 0; i < t.numel(); ++i) p[i] = dist(rng);
  return t;
}

attn::Score make_score(int kind, int64_t T) {
  const int64_t d = kWidth;
  const double w = 1.0 / std::sqrt(static_cast<double>(d));
  switch (kind) {
    case 0: return attn::DotScore{};
    case 1: return attn::ScaledDotScore{};
    case 2: return attn::GeneralScore{.weight = random_tensor({d, d}, 11, w)};
    case 3: return attn::AdditiveScore{.w_query = random_tensor({d, d}, 12, w),
                                       .w_key = random_tensor({d, d}, 13, w),
                                       .bias = random_tensor({d}, 14, 0.1),
                                       .v = random_tensor({d}, 15, w)};
    case 4: return attn::ConcatScore{.weight = random_tensor({d, 2 * d}, 16, w),
                                     .v = random_tensor({d}, 17, w)};
    case 5: return attn::CosineScore{.tau = attn::Tensor::full({1}, 5.0)};
    case 6: return attn::LocationScore{.weight = random_tensor({T, d}, 18, w)};
    default: return attn::TrilinearScore{.weight = random_tensor({3 * d}, 19, w)};
  }
}

const char* kNames[] = {"dot", "scaled_dot", "general", "additive",
                        "concat", "cosine", "location", "trilinear"};

double peak_rss_mb() {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line))
    if (line.rfind("VmHWM:", 0) == 0) return std::stod(line.substr(6)) / 1024.0;
  return 0.0;
}

// GFLOP/s of one OpenBLAS sgemm performing `flops` FLOPs as an (n x d) by (d x n) product
// repeated over heads, measured once per size and cached.
double sgemm_gflops(int64_t T) {
  static std::map<int64_t, double> cache;
  auto it = cache.find(T);
  if (it != cache.end()) return it->second;
  const int64_t n = T, d = kWidth;
  attn::Tensor a = random_tensor({n, d}, 1), b = random_tensor({d, n}, 2);
  attn::Tensor c = attn::Tensor::zeros({n, n});
  auto run = [&] {
    for (int64_t h = 0; h < kHeads; ++h)
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, static_cast<int>(n), static_cast<int>(n),
                  static_cast<int>(d), 1.0f, a.data<float>(), static_cast<int>(d), b.data<float>(),
                  static_cast<int>(n), 0.0f, c.data<float>(), static_cast<int>(n));
  };
  run();
  int reps = 0;
  const auto start = std::chrono::steady_clock::now();
  double seconds = 0.0;
  do {
    run();
    ++reps;
    seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  } while (seconds < 0.2);
  const double rate = 2.0 * n * n * d * kHeads * reps / seconds * 1e-9;
  cache[T] = rate;
  return rate;
}

using Clock = std::chrono::steady_clock;

void report(benchmark::State& state, double flops_per_iter, int64_t T, Clock::time_point start) {
  const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
  const double gflops = flops_per_iter * static_cast<double>(state.iterations()) / seconds * 1e-9;
  const double sgemm = sgemm_gflops(T);
  state.counters["GFLOP/s"] = gflops;
  state.counters["sgemm_GFLOP/s"] = sgemm;
  state.counters["vs_sgemm"] = gflops / sgemm;
  state.counters["peak_MB"] = peak_rss_mb();
}

void BM_Forward(benchmark::State& state) {
  const int kind = static_cast<int>(state.range(0));
  const int64_t T = state.range(1);
  const attn::Tensor q = random_tensor({kBatch, kHeads, T, kWidth}, 1);
  const attn::Tensor k = random_tensor({kBatch, kHeads, T, kWidth}, 2);
  const attn::Tensor v = random_tensor({kBatch, kHeads, T, kWidth}, 3);
  attn::AttentionParams params;
  params.score = make_score(kind, T);
  const auto start = Clock::now();
  for (auto _ : state) benchmark::DoNotOptimize(attn::attention(q, k, v, params).out.raw_data());
  state.SetLabel(kNames[kind]);
  report(state, 4.0 * T * T * kWidth * kHeads * kBatch, T, start);
}

void BM_Backward(benchmark::State& state) {
  const int kind = static_cast<int>(state.range(0));
  const int64_t T = state.range(1);
  const attn::Tensor q = random_tensor({kBatch, kHeads, T, kWidth}, 1);
  const attn::Tensor k = random_tensor({kBatch, kHeads, T, kWidth}, 2);
  const attn::Tensor v = random_tensor({kBatch, kHeads, T, kWidth}, 3);
  const attn::Tensor dout = random_tensor({kBatch, kHeads, T, kWidth}, 4);
  attn::AttentionParams params;
  params.score = make_score(kind, T);
  const attn::AttentionOutput fwd = attn::attention(q, k, v, params);
  const auto start = Clock::now();
  for (auto _ : state)
    benchmark::DoNotOptimize(attn::attention_backward(q, k, v, params, fwd, dout).dq.raw_data());
  state.SetLabel(kNames[kind]);
  report(state, 10.0 * T * T * kWidth * kHeads * kBatch, T, start);
}

void Cases(benchmark::internal::Benchmark* b) {
  for (int kind = 0; kind < 8; ++kind)
    for (int64_t T : {128, 512, 2048}) b->Args({kind, T});
  b->ArgNames({"score", "T"})->Unit(benchmark::kMillisecond)->UseRealTime();
}

BENCHMARK(BM_Forward)->Apply(Cases);
BENCHMARK(BM_Backward)->Apply(Cases);

}  // namespace

BENCHMARK_MAIN();
