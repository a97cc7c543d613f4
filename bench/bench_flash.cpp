// The fused dot-product attention forward (src/kernels/flash/flash_attention.*) at B=1, H=8,
// d in {64, 128}, N = Tq = Tk in {512, 2048, 8192}, non-causal and causal, float32.
//
// Counters (the machine is shared and loads come and go, so rates are taken from the fastest
// iteration, the least disturbed one, and the baseline likewise):
//   GFLOP/s        4 N^2 d H / best iteration time (Q K^T and P V) for non-causal; causal counts
//                  only the visible pairs, 4 d H N (N + 1) / 2, so both measure useful work
//   mean_GFLOP/s   the same from the mean iteration time
//   sgemm_GFLOP/s  an OpenBLAS sgemm 2048 x 2048 x 2048, best of repeated calls timed right after
//                  each case (the practical fp32 ceiling; same thread count as the kernel)
//   vs_sgemm       GFLOP/s / sgemm_GFLOP/s
//   peak_MB        peak resident memory of the process so far (VmHWM; inputs included)
//   label          the Highway target the kernel dispatched to, and OpenBLAS's sgemm core
// BM_FlashForwardBf16 runs the bf16 kernel (src/kernels/flash/flash_attention_bf16.*: bf16 q, k, v,
// AVX512_BF16 dot products, float32 softmax and output) on the same problem and, alternating
// call by call in the same loop, the float32 kernel on the widened inputs, so both see the same
// load: its time and GFLOP/s are the bf16 kernel's, fp32_ms the float32 kernel's best, and
// bf16_speedup = fp32_ms / bf16 best time. Skipped where the CPU lacks AVX512_BF16.
// With weights=1 the kernel also writes the [B, H, N, N] probabilities (return_weights: a second
// pass per work item that recomputes the scores): GFLOP/s still counts only the forward's useful
// FLOPs, so the drop against weights=0 is the weights pass's cost, and weights_GB/s is the
// rate of that Tq x Tk store (into a buffer paged in by the warm-up call).
//
// OpenBLAS 0.3.21 does not recognise every CPU (this machine's Xeon is detected as "Prescott",
// an SSE3 kernel 6x below the real ceiling): force its kernel when the label says Prescott.
//
//   ./build/bench/bench_flash --benchmark_min_time=0.5
//   ATTN_SIMD_TARGET=avx2 ./build/bench/bench_flash   (cap the SIMD target)
#include <benchmark/benchmark.h>
#include <cblas.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "kernels/common/bf16.h"
#include "kernels/flash/flash_attention.h"
#include "kernels/flash/flash_attention_bf16.h"

namespace {

constexpr int64_t kBatch = 1, kHeads = 8;

std::vector<float> random_vector(size_t n, uint32_t seed) {
  std::vector<float> x(n);
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  for (float& e : x) e = dist(rng);
  return x;
}

double peak_rss_mb() {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line))
    if (line.rfind("VmHWM:", 0) == 0) return std::stod(line.substr(6)) / 1024.0;
  return 0.0;
}

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// GFLOP/s of a square OpenBLAS sgemm, best of the calls made in half a second, re-measured after
// every case so that the ratio compares runs made under the same load.
double sgemm_gflops() {
  const int n = 2048;
  const std::vector<float> a = random_vector(size_t{n} * n, 1), b = random_vector(size_t{n} * n, 2);
  std::vector<float> c(size_t{n} * n);
  double best = 1e30;
  const auto start = Clock::now();
  do {
    const auto call = Clock::now();
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, n, n, 1.0f, a.data(), n, b.data(),
                n, 0.0f, c.data(), n);
    best = std::min(best, seconds_since(call));
  } while (seconds_since(start) < 0.5);
  return 2.0 * n * n * double{n} / best * 1e-9;
}

void BM_FlashForward(benchmark::State& state) {
  const int64_t d = state.range(0), n = state.range(1);
  const bool causal = state.range(2) != 0;
  const bool with_weights = state.range(3) != 0;
  const std::vector<float> q = random_vector(size_t(kBatch * kHeads * n * d), 1);
  const std::vector<float> k = random_vector(size_t(kBatch * kHeads * n * d), 2);
  const std::vector<float> v = random_vector(size_t(kBatch * kHeads * n * d), 3);
  std::vector<float> out(size_t(kBatch * kHeads * n * d)), lse(size_t(kBatch * kHeads * n));

  attn::kernels::FlashAttentionArgs args;
  args.q = q.data(), args.k = k.data(), args.v = v.data();
  args.out = out.data(), args.lse = lse.data();
  args.batch = kBatch, args.q_heads = kHeads, args.kv_heads = kHeads;
  args.q_len = n, args.k_len = n, args.head_dim = d, args.value_dim = d;
  args.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(d)));
  args.causal = causal;
  std::vector<float> weights(with_weights ? size_t(kBatch * kHeads * n * n) : 0);
  if (with_weights) args.weights = weights.data();

  attn::kernels::flash_attention_forward(args);  // warm-up: page in buffers, spin up threads
  double best = 1e30, total = 0.0;
  for (auto _ : state) {
    const auto call = Clock::now();
    attn::kernels::flash_attention_forward(args);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
    const double seconds = seconds_since(call);
    best = std::min(best, seconds);
    total += seconds;
  }
  const double pairs = causal ? 0.5 * double(n) * double(n + 1) : double(n) * double(n);
  const double flops = 4.0 * pairs * double(d) * kHeads * kBatch;
  const double gflops = flops / best * 1e-9;
  const double sgemm = sgemm_gflops();
  state.counters["GFLOP/s"] = gflops;
  state.counters["mean_GFLOP/s"] = flops * static_cast<double>(state.iterations()) / total * 1e-9;
  state.counters["sgemm_GFLOP/s"] = sgemm;
  state.counters["vs_sgemm"] = gflops / sgemm;
  state.counters["peak_MB"] = peak_rss_mb();
  if (with_weights)
    state.counters["weights_GB/s"] = double(weights.size()) * sizeof(float) / best * 1e-9;
  state.SetLabel(std::string(attn::kernels::flash_attention_target_name()) + " sgemm:" +
                 openblas_get_corename());
}

void Cases(benchmark::internal::Benchmark* b) {
  for (int64_t d : {64, 128})
    for (int64_t n : {512, 2048, 8192})
      for (int64_t causal : {0, 1}) b->Args({d, n, causal, 0});
  for (int64_t causal : {0, 1}) b->Args({64, 2048, causal, 1});
  b->ArgNames({"d", "N", "causal", "weights"})->Unit(benchmark::kMillisecond)->UseRealTime();
}

BENCHMARK(BM_FlashForward)->Apply(Cases);

void BM_FlashForwardBf16(benchmark::State& state) {
  if (!attn::kernels::flash_attention_bf16_available()) {
    state.SkipWithError("CPU without AVX512_BF16 (or ATTN_SIMD_TARGET below avx3)");
    return;
  }
  const int64_t d = state.range(0), n = state.range(1);
  const bool causal = state.range(2) != 0;
  const size_t elems = size_t(kBatch * kHeads * n * d);
  // The float32 kernel gets the bf16 inputs widened, so both solve the same problem.
  std::vector<uint16_t> qb(elems), kb(elems), vb(elems);
  attn::kernels::float_to_bf16(random_vector(elems, 1).data(), qb.data(), elems);
  attn::kernels::float_to_bf16(random_vector(elems, 2).data(), kb.data(), elems);
  attn::kernels::float_to_bf16(random_vector(elems, 3).data(), vb.data(), elems);
  std::vector<float> q(elems), k(elems), v(elems);
  attn::kernels::bf16_to_float(qb.data(), q.data(), elems);
  attn::kernels::bf16_to_float(kb.data(), k.data(), elems);
  attn::kernels::bf16_to_float(vb.data(), v.data(), elems);
  std::vector<float> out(elems), lse(size_t(kBatch * kHeads * n));

  attn::kernels::FlashBf16Args bf;
  bf.q = qb.data(), bf.k = kb.data(), bf.v = vb.data(), bf.out = out.data(), bf.lse = lse.data();
  bf.batch = kBatch, bf.q_heads = kHeads, bf.kv_heads = kHeads;
  bf.q_len = n, bf.k_len = n, bf.head_dim = d, bf.value_dim = d;
  bf.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(d)));
  bf.causal = causal;
  attn::kernels::FlashAttentionArgs f32;
  f32.q = q.data(), f32.k = k.data(), f32.v = v.data(), f32.out = out.data(), f32.lse = lse.data();
  f32.batch = kBatch, f32.q_heads = kHeads, f32.kv_heads = kHeads;
  f32.q_len = n, f32.k_len = n, f32.head_dim = d, f32.value_dim = d;
  f32.scale = bf.scale;
  f32.causal = causal;

  attn::kernels::flash_attention_bf16_forward(bf);  // warm-up
  attn::kernels::flash_attention_forward(f32);
  double best = 1e30, total = 0.0, best_f32 = 1e30;
  for (auto _ : state) {
    auto call = Clock::now();
    attn::kernels::flash_attention_bf16_forward(bf);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
    const double seconds = seconds_since(call);
    state.SetIterationTime(seconds);
    best = std::min(best, seconds);
    total += seconds;
    call = Clock::now();
    attn::kernels::flash_attention_forward(f32);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
    best_f32 = std::min(best_f32, seconds_since(call));
  }
  const double pairs = causal ? 0.5 * double(n) * double(n + 1) : double(n) * double(n);
  const double flops = 4.0 * pairs * double(d) * kHeads * kBatch;
  const double sgemm = sgemm_gflops();
  state.counters["GFLOP/s"] = flops / best * 1e-9;
  state.counters["mean_GFLOP/s"] = flops * static_cast<double>(state.iterations()) / total * 1e-9;
  state.counters["fp32_ms"] = best_f32 * 1e3;
  state.counters["bf16_speedup"] = best_f32 / best;
  state.counters["sgemm_GFLOP/s"] = sgemm;
  state.counters["vs_sgemm"] = flops / best * 1e-9 / sgemm;
  state.counters["peak_MB"] = peak_rss_mb();
  state.SetLabel(std::string("bf16 vs ") + attn::kernels::flash_attention_target_name() +
                 " sgemm:" + openblas_get_corename());
}

void Bf16Cases(benchmark::internal::Benchmark* b) {
  for (int64_t d : {64, 128})
    for (int64_t n : {512, 2048})
      for (int64_t causal : {0, 1}) b->Args({d, n, causal});
  b->ArgNames({"d", "N", "causal"})->Unit(benchmark::kMillisecond)->UseManualTime();
}

BENCHMARK(BM_FlashForwardBf16)->Apply(Bf16Cases);

}  // namespace

BENCHMARK_MAIN();
