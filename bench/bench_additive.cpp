// Additive (Bahdanau) attention at B=1, H=8, d = A = 128, N = Tq = Tk in {512, 2048}, float32:
//   Fused        the fused kernels (src/kernels/additive/additive_attention.*), forward and backward
//   Composed     attn's composed path (per (b, h) score tiles, scalar std::tanh per element),
//                N = 512 only
//   Materialised the Keras AdditiveAttention / OpenNMT "mlp" graph, written here: per head
//                E = Qp_i + Kp_j as [Tq, Tk, A], T = tanh(E) (a branch-free tanh the compiler
//                vectorises, so the baseline is not held back by scalar libm), s = T v (sgemv),
//                row softmax, O = P V (sgemm). Forward only; [Tq, Tk, A] is 2 GiB per head at
//                N = 2048, so heads run one after another.
//
// Counters (rates from the fastest iteration; the machine is shared):
//   ms              best iteration
//   Gtanh/s/core    N^2 A H useful tanh evaluations / best time / threads (the fused backward
//                   evaluates each one twice: its own rate is twice the printed one)
//   Gtanh/cpu_s     the same per second of process CPU time (all threads): on this shared
//                   2-core machine, what one core does while it actually runs the case
//   peak_MB         peak resident memory during the case (VmHWM, reset per case through
//                   /proc/self/clear_refs; inputs included)
//   threads         OpenMP threads
//
//   ./build/bench/bench_additive
// (attn picks the OpenBLAS kernel itself: attn/runtime.h.)
#include <benchmark/benchmark.h>
#include <cblas.h>
#include <omp.h>

#include <algorithm>
#include <bit>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <ctime>
#include <fstream>
#include <string>
#include <vector>

#include "attention_validate.h"
#include "kernels/additive/additive_attention.h"
#include "kernels/composed/attention_composed.h"

namespace {

constexpr int64_t kBatch = 1, kHeads = 8, kWidth = 128;  // d = Dq = Dk = Dv = A

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}
double process_cpu_seconds() {
  timespec ts{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
}

void reset_peak_rss() {
  std::ofstream("/proc/self/clear_refs") << "5";
}
double peak_rss_mb() {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line))
    if (line.rfind("VmHWM:", 0) == 0) return std::stod(line.substr(6)) / 1024.0;
  return 0.0;
}

attn::Tensor uniform(const attn::Shape& shape, uint64_t seed, double range) {
  attn::Tensor t = attn::Tensor::empty(shape, attn::DType::f32);
  float* p = t.data<float>();
  uint64_t state = seed * 0x9E3779B97F4A7C15ull + 1;
  for (int64_t x = 0; x < t.numel(); ++x) {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    p[x] = static_cast<float>(range * (2.0 * static_cast<double>(state >> 11) * 0x1.0p-53 - 1.0));
  }
  return t;
}

struct Problem {
  attn::detail::AttentionDims dims;
  attn::Tensor q, k, v, dout;
  attn::AttentionParams params;
};

Problem make_problem(int64_t n) {
  Problem p;
  p.dims = {kBatch, kHeads, kHeads, n, n, kWidth, kWidth, kWidth};
  p.q = uniform({kBatch, kHeads, n, kWidth}, 1, 1.0);
  p.k = uniform({kBatch, kHeads, n, kWidth}, 2, 1.0);
  p.v = uniform({kBatch, kHeads, n, kWidth}, 3, 1.0);
  p.dout = uniform({kBatch, kHeads, n, kWidth}, 4, 1.0);
  const double r = 1.0 / std::sqrt(static_cast<double>(kWidth));
  p.params.score = attn::AdditiveScore{uniform({kWidth, kWidth}, 5, r),
                                       uniform({kWidth, kWidth}, 6, r),
                                       uniform({kWidth}, 7, 0.5), uniform({kWidth}, 8, 1.0)};
  return p;
}

void report(benchmark::State& state, double best, double best_cpu, int64_t n) {
  const int threads = omp_get_max_threads();
  const double tanh_evals = double(n) * double(n) * kWidth * kHeads * kBatch;
  state.counters["ms"] = best * 1e3;
  state.counters["Gtanh/s/core"] = tanh_evals / best / threads * 1e-9;
  state.counters["Gtanh/cpu_s"] = tanh_evals / best_cpu * 1e-9;
  state.counters["peak_MB"] = peak_rss_mb();
  state.counters["threads"] = threads;
}

template <class F>
void time_iterations(benchmark::State& state, int64_t n, F&& run) {
  double best = 1e30, best_cpu = 1e30;
  for (auto _ : state) {
    const auto start = Clock::now();
    const double cpu_start = process_cpu_seconds();
    run();
    best = std::min(best, seconds_since(start));
    best_cpu = std::min(best_cpu, process_cpu_seconds() - cpu_start);
  }
  report(state, best, best_cpu, n);
}

void BM_FusedForward(benchmark::State& state) {
  reset_peak_rss();
  const Problem p = make_problem(state.range(0));
  time_iterations(state, state.range(0), [&] {
    benchmark::DoNotOptimize(
        attn::kernels::additive_attention_forward(p.dims, p.q, p.k, p.v, p.params));
  });
  state.SetLabel(attn::kernels::additive_attention_target_name());
}

void BM_FusedBackward(benchmark::State& state) {
  reset_peak_rss();
  const Problem p = make_problem(state.range(0));
  const attn::AttentionOutput fwd =
      attn::kernels::additive_attention_forward(p.dims, p.q, p.k, p.v, p.params);
  time_iterations(state, state.range(0), [&] {
    benchmark::DoNotOptimize(
        attn::kernels::additive_attention_backward(p.dims, p.q, p.k, p.v, p.params, fwd, p.dout));
  });
  state.SetLabel(attn::kernels::additive_attention_target_name());
}

void BM_ComposedForward(benchmark::State& state) {
  reset_peak_rss();
  const Problem p = make_problem(state.range(0));
  time_iterations(state, state.range(0), [&] {
    benchmark::DoNotOptimize(
        attn::kernels::composed_attention_forward<float>(p.dims, p.q, p.k, p.v, p.params));
  });
}

void BM_ComposedBackward(benchmark::State& state) {
  reset_peak_rss();
  const Problem p = make_problem(state.range(0));
  const attn::AttentionOutput fwd =
      attn::kernels::composed_attention_forward<float>(p.dims, p.q, p.k, p.v, p.params);
  time_iterations(state, state.range(0), [&] {
    benchmark::DoNotOptimize(attn::kernels::composed_attention_backward<float>(
        p.dims, p.q, p.k, p.v, p.params, fwd, p.dout));
  });
}

// tanh(x) = 1 - 2 / (e^{2x} + 1), branch-free so that the loop below vectorises: e^{2x} = 2^y,
// y = 2 log2(e) x clamped to [-126, 126], 2^y = 2^n 2^f with a degree-6 Taylor polynomial of
// 2^f = e^{f ln 2}, |f| <= 1/2 (truncation < 3e-8 relative).
inline float tanh_branch_free(float x) {
  float y = x * 2.8853900817779268f;
  y = y < -126.0f ? -126.0f : y;
  y = y > 126.0f ? 126.0f : y;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23
  const float n = (y + kRound) - kRound;
  const float f = (y - n) * 0.6931471805599453f;
  float p = 1.0f / 720.0f;
  p = p * f + 1.0f / 120.0f;
  p = p * f + 1.0f / 24.0f;
  p = p * f + 1.0f / 6.0f;
  p = p * f + 0.5f;
  p = p * f + 1.0f;
  p = p * f + 1.0f;
  const float e = std::bit_cast<float>(std::bit_cast<int32_t>(p) +
                                       (static_cast<int32_t>(n) << 23));
  return 1.0f - 2.0f / (e + 1.0f);
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define BENCH_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define BENCH_CLONES
#endif

// E[j][a] = tanh(qp[a] + kp[j][a]) for one query row: the materialised tensor's row.
BENCH_CLONES void tanh_row(float* e, const float* qp, const float* kp, int64_t tk, int64_t A) {
  for (int64_t j = 0; j < tk; ++j)
    for (int64_t a = 0; a < A; ++a) e[j * A + a] = tanh_branch_free(qp[a] + kp[j * A + a]);
}

void materialised_forward(const Problem& p, std::vector<float>& e, std::vector<float>& s,
                          std::vector<float>& out) {
  const auto& score = std::get<attn::AdditiveScore>(p.params.score);
  const int64_t n = p.dims.Tq, A = kWidth, d = kWidth;
  std::vector<float> qp(size_t(n * A)), kp(size_t(n * A));
  for (int64_t h = 0; h < kHeads; ++h) {
    const float* q = p.q.data<float>() + h * n * d;
    const float* k = p.k.data<float>() + h * n * d;
    const float* v = p.v.data<float>() + h * n * d;
    // Dense projections (Keras: query = W_q q + b, key = W_k k).
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, A, d, 1.0f, q, d,
                score.w_query.data<float>(), d, 0.0f, qp.data(), A);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t a = 0; a < A; ++a) qp[size_t(i * A + a)] += score.bias.data<float>()[a];
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, A, d, 1.0f, k, d,
                score.w_key.data<float>(), d, 0.0f, kp.data(), A);
    // tanh(query[:, None] + key[None]) as [Tq, Tk, A].
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; ++i)
      tanh_row(e.data() + i * n * A, qp.data() + i * A, kp.data(), n, A);
    // scores = reduce_sum(v * tanh(..), axis=-1): [Tq * Tk, A] x [A].
    cblas_sgemv(CblasRowMajor, CblasNoTrans, n * n, A, 1.0f, e.data(), A,
                score.v.data<float>(), 1, 0.0f, s.data(), 1);
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; ++i) {
      float* row = s.data() + i * n;
      const float m = *std::max_element(row, row + n);
      float sum = 0.0f;
      for (int64_t j = 0; j < n; ++j) sum += row[j] = std::exp(row[j] - m);
      for (int64_t j = 0; j < n; ++j) row[j] /= sum;
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, d, n, 1.0f, s.data(), n, v, d, 0.0f,
                out.data() + h * n * d, d);
  }
}

void BM_MaterialisedForward(benchmark::State& state) {
  reset_peak_rss();
  const int64_t n = state.range(0);
  const Problem p = make_problem(n);
  std::vector<float> e(size_t(n * n * kWidth)), s(size_t(n * n)), out(size_t(kHeads * n * kWidth));
  time_iterations(state, n, [&] {
    materialised_forward(p, e, s, out);
    benchmark::DoNotOptimize(out.data());
  });
}

void Sizes(benchmark::internal::Benchmark* b) {
  b->Arg(512)->Arg(2048)->ArgNames({"N"})->Unit(benchmark::kMillisecond)->UseRealTime();
}
// The slow baselines: one iteration is seconds long.
void SlowSizes(benchmark::internal::Benchmark* b) {
  Sizes(b);
  b->Iterations(1);
}

BENCHMARK(BM_FusedForward)->Apply(Sizes);
BENCHMARK(BM_FusedBackward)->Apply(Sizes);
BENCHMARK(BM_MaterialisedForward)->Apply(SlowSizes);
// The composed path evaluates a scalar std::tanh per (i, j, a): tens of seconds per iteration at
// N = 512 already (N = 2048 is 16x that), so it runs at N = 512 only.
void ComposedSizes(benchmark::internal::Benchmark* b) {
  b->Arg(512)->ArgNames({"N"})->Unit(benchmark::kMillisecond)->UseRealTime()->Iterations(1);
}
BENCHMARK(BM_ComposedForward)->Apply(ComposedSizes);
BENCHMARK(BM_ComposedBackward)->Apply(ComposedSizes);

}  // namespace

BENCHMARK_MAIN();
