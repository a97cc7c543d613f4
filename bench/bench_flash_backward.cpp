// The fused dot-product attention backward (src/kernels/flash/flash_backward.*) at B=1, H=8,
// d in {64, 128}, N = Tq = Tk in {512, 2048}, non-causal and causal, float32, against the
// composed backward (attn::attention_backward, BLAS GEMMs on materialised score tiles) and an
// OpenBLAS sgemm timed in the same run. Plus dropout p = 0.1 at d = 64, N = 2048 (drop_pct = 10):
// its best_ms minus the drop_pct = 0 case's is the cost of regenerating the keep mask.
//
// Counters (rates from the fastest iteration, the least disturbed one on a shared machine):
//   GFLOP/s        10 N^2 d H / best time (five GEMM-sized products: Q K^T, dO V^T, P^T dO,
//                  dS K, dS^T Q); causal counts only the visible pairs, 10 d H N (N + 1) / 2
//   sgemm_GFLOP/s  OpenBLAS sgemm 2048^3, best of the calls made in half a second after the case
//   vs_sgemm       GFLOP/s / sgemm_GFLOP/s
//   vs_sgemm_cpu   the same ratio from process CPU time (FLOP per CPU-second, all threads summed)
//                  instead of wall time: steadier when other jobs share the cores
//   composed_ms    best of 3 calls of the composed backward (kernels::composed_attention_backward,
//                  what attn::attention_backward ran before the fused kernel; called directly so
//                  the column stays the composed path after the front-end dispatches to the fused
//                  one) on the same inputs
//   speedup        composed_ms / fused ms
//   label          the Highway target and OpenBLAS's sgemm core
//
// OpenBLAS 0.3.21 detects this machine's Xeon as "Prescott" (an SSE3 kernel): force its kernel.
//   ./build/bench/bench_flash_backward --benchmark_min_time=0.5
#include <benchmark/benchmark.h>
#include <cblas.h>

#include <algorithm>
#include <chrono>
#include <ctime>
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "attention_validate.h"
#include "attn/attention.h"
#include "kernels/composed/attention_composed.h"
#include "kernels/flash/flash_backward.h"

namespace {

constexpr int64_t kBatch = 1, kHeads = 8;

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

std::vector<float> random_vector(size_t n, uint32_t seed) {
  std::vector<float> x(n);
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  for (float& e : x) e = dist(rng);
  return x;
}

attn::Tensor random_tensor(const attn::Shape& shape, uint32_t seed) {
  int64_t n = 1;
  for (int64_t s : shape) n *= s;
  return attn::Tensor::from(random_vector(static_cast<size_t>(n), seed), shape);
}

double cpu_seconds() { return static_cast<double>(std::clock()) / CLOCKS_PER_SEC; }

// Best wall-clock and best CPU-time rates of sgemm.
struct Rates {
  double wall_gflops = 0.0, cpu_gflops = 0.0;
};

Rates sgemm_gflops() {
  const int n = 2048;
  const std::vector<float> a = random_vector(size_t{n} * n, 1), b = random_vector(size_t{n} * n, 2);
  std::vector<float> c(size_t{n} * n);
  double best = 1e30, best_cpu = 1e30;
  const auto start = Clock::now();
  do {
    const auto call = Clock::now();
    const double cpu = cpu_seconds();
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, n, n, 1.0f, a.data(), n, b.data(),
                n, 0.0f, c.data(), n);
    best = std::min(best, seconds_since(call));
    best_cpu = std::min(best_cpu, cpu_seconds() - cpu);
  } while (seconds_since(start) < 0.5);
  const double flops = 2.0 * n * n * double{n};
  return {flops / best * 1e-9, flops / best_cpu * 1e-9};
}

void BM_FlashBackward(benchmark::State& state) {
  const int64_t d = state.range(0), n = state.range(1);
  const bool causal = state.range(2) != 0;
  const double dropout_p = static_cast<double>(state.range(3)) / 100.0;
  const attn::Tensor q = random_tensor({kBatch, kHeads, n, d}, 1);
  const attn::Tensor k = random_tensor({kBatch, kHeads, n, d}, 2);
  const attn::Tensor v = random_tensor({kBatch, kHeads, n, d}, 3);
  const attn::Tensor dout = random_tensor({kBatch, kHeads, n, d}, 4);
  attn::AttentionParams params;
  params.mask.causal = causal;
  params.dropout = {dropout_p, 1234};
  const attn::detail::AttentionDims dims =
      attn::detail::validate_attention("bench", q, k, v, params);
  const attn::AttentionParams converted = attn::detail::convert_params(params, attn::DType::f32);
  const attn::AttentionOutput forward = attn::attention(q, k, v, params);

  // Warm-up: page in buffers, spin up threads.
  attn::AttentionGrads grads =
      attn::kernels::flash_attention_backward(dims, q, k, v, converted, forward, dout);
  double best = 1e30, best_cpu = 1e30;
  for (auto _ : state) {
    const auto call = Clock::now();
    const double cpu = cpu_seconds();
    grads = attn::kernels::flash_attention_backward(dims, q, k, v, converted, forward, dout);
    benchmark::DoNotOptimize(grads.dq.data<float>());
    benchmark::ClobberMemory();
    best = std::min(best, seconds_since(call));
    best_cpu = std::min(best_cpu, cpu_seconds() - cpu);
  }
  double composed = 1e30;
  for (int rep = 0; rep < 3; ++rep) {
    const auto call = Clock::now();
    const attn::AttentionGrads g = attn::kernels::composed_attention_backward<float>(
        dims, q, k, v, converted, forward, dout);
    benchmark::DoNotOptimize(g.dq.data<float>());
    composed = std::min(composed, seconds_since(call));
  }
  const double pairs = causal ? 0.5 * double(n) * double(n + 1) : double(n) * double(n);
  const double flops = 10.0 * pairs * double(d) * kHeads * kBatch;
  const double gflops = flops / best * 1e-9;
  const Rates sgemm = sgemm_gflops();
  state.counters["best_ms"] = best * 1e3;
  state.counters["GFLOP/s"] = gflops;
  state.counters["sgemm_GFLOP/s"] = sgemm.wall_gflops;
  state.counters["vs_sgemm"] = gflops / sgemm.wall_gflops;
  state.counters["vs_sgemm_cpu"] = flops / best_cpu * 1e-9 / sgemm.cpu_gflops;
  state.counters["composed_ms"] = composed * 1e3;
  state.counters["speedup"] = composed / best;
  state.SetLabel(std::string(attn::kernels::flash_backward_target_name()) + " sgemm:" +
                 openblas_get_corename());
}

void Cases(benchmark::internal::Benchmark* b) {
  for (int64_t d : {64, 128})
    for (int64_t n : {512, 2048})
      for (int64_t causal : {0, 1}) b->Args({d, n, causal, 0});
  b->Args({64, 2048, 0, 10});  // dropout p = 0.1
  b->ArgNames({"d", "N", "causal", "drop_pct"})->Unit(benchmark::kMillisecond)->UseRealTime();
}

BENCHMARK(BM_FlashBackward)->Apply(Cases);

}  // namespace

BENCHMARK_MAIN();
