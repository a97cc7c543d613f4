// libtorch's CPU attention beside attn's, on bench_flash's shapes, in the same run (optional
// target: built only where libtorch's CMake package is found, see bench/CMakeLists.txt).
//
// B=1, H=8, d in {64, 128}, N = Tq = Tk in {512, 2048, 8192}, float32, scaled dot-product,
// no mask. libtorch 1.13 (Debian) has no fused scaled_dot_product_attention, so its attention is
// the math path every 1.13 model runs: softmax(q k^T * scale) v with at::matmul / at::softmax,
// materialising the H x N x N scores (2 GiB at N = 8192); its backward is autograd's. attn runs
// attn::attention / attention_backward as dispatched (the fused flash kernels). Both get the
// same input bytes and the same thread count (kThreads for OpenMP, which both use through
// libgomp, and for OpenBLAS, which libtorch calls for its matmuls).
//
// Counters (rates from the fastest iteration, the least disturbed on a shared machine):
//   GFLOP/s       forward 4 N^2 d H (Q K^T and P V); forward + backward 14 N^2 d H (4 + the
//                 backward's five GEMM-sized products), whatever the implementation really does
//   mean_GFLOP/s  the same from the mean iteration time
//   extra_MB      peak resident memory during the case minus the resident memory before it
//                 (inputs included, as they are allocated inside the case)
//   max_abs_diff  largest |attn - libtorch| over the outputs (forward) or dq (forward + backward)
//
//   ./build/bench/bench_libtorch --benchmark_min_time=0.3
//   (N = 8192 forward + backward keeps ~6 GB of autograd state for libtorch and takes seconds per
//   iteration: --benchmark_filter=-.*N:8192 leaves those out)
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <benchmark/benchmark.h>
#include <cblas.h>
#include <malloc.h>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <fstream>
#include <string>

#include "attn/attention.h"

namespace {

constexpr int64_t kBatch = 1, kHeads = 8;
constexpr int kThreads = 2;

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// A field of /proc/self/status in MB: VmRSS (resident now) or VmHWM (peak resident).
double status_mb(const std::string& field) {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line))
    if (line.rfind(field + ":", 0) == 0) return std::stod(line.substr(field.size() + 1)) / 1024.0;
  return 0.0;
}

// Resets the process's peak resident memory to its current size (Linux >= 4.0) and returns that
// size, so that each case reports the memory it adds, not the peak of the cases before it (nor
// libtorch's ~190 MB of loaded code).
double reset_peak_rss() {
  std::ofstream("/proc/self/clear_refs") << "5";
  return status_mb("VmRSS");
}

// One problem: torch tensors, and attn tensors wrapping the same memory.
struct Problem {
  int64_t d = 0, n = 0;
  at::Tensor q, k, v, dout;
  attn::Tensor aq, ak, av, adout;
  attn::AttentionParams params;  // ScaledDotScore: scale 1/sqrt(d), as libtorch's below
  double scale = 0.0;
};

attn::Tensor wrap(const at::Tensor& t) {
  return attn::Tensor::wrap(t.data_ptr<float>(), {t.size(0), t.size(1), t.size(2), t.size(3)});
}

Problem make_problem(int64_t d, int64_t n) {
  Problem p;
  p.d = d, p.n = n;
  p.scale = 1.0 / std::sqrt(static_cast<double>(d));
  at::manual_seed(1);
  const auto options = at::TensorOptions().dtype(at::kFloat);
  p.q = at::randn({kBatch, kHeads, n, d}, options);
  p.k = at::randn({kBatch, kHeads, n, d}, options);
  p.v = at::randn({kBatch, kHeads, n, d}, options);
  p.dout = at::randn({kBatch, kHeads, n, d}, options);
  p.aq = wrap(p.q), p.ak = wrap(p.k), p.av = wrap(p.v), p.adout = wrap(p.dout);
  return p;
}

// libtorch 1.13's attention: the math path.
at::Tensor torch_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           double scale) {
  return at::matmul(at::softmax(at::matmul(q, k.transpose(-2, -1)) * scale, -1), v);
}

double max_abs_diff(const attn::Tensor& ours, const at::Tensor& theirs) {
  const at::Tensor wrapped = at::from_blob(const_cast<float*>(ours.data<float>()),
                                           theirs.sizes(), at::TensorOptions().dtype(at::kFloat));
  return (wrapped - theirs).abs().max().item<double>();
}

// Times `run` once per iteration, best and mean, and fills the counters.
template <class Run>
void time_case(benchmark::State& state, double flops, double rss_before_mb, Run&& run) {
  run();  // warm-up: page in buffers, start the threads
  double best = 1e30, total = 0.0;
  for (auto _ : state) {
    const auto call = Clock::now();
    run();
    benchmark::ClobberMemory();
    const double seconds = seconds_since(call);
    best = std::min(best, seconds);
    total += seconds;
  }
  state.counters["GFLOP/s"] = flops / best * 1e-9;
  state.counters["mean_GFLOP/s"] = flops * static_cast<double>(state.iterations()) / total * 1e-9;
  state.counters["extra_MB"] = status_mb("VmHWM") - rss_before_mb;
}

double forward_flops(const Problem& p) { return 4.0 * p.n * p.n * p.d * kHeads * kBatch; }
double training_flops(const Problem& p) { return 14.0 * p.n * p.n * p.d * kHeads * kBatch; }

void BM_TorchForward(benchmark::State& state) {
  const double rss_before_mb = reset_peak_rss();
  const Problem p = make_problem(state.range(0), state.range(1));
  const at::NoGradGuard no_grad;
  at::Tensor out;
  time_case(state, forward_flops(p), rss_before_mb,
            [&] { out = torch_attention(p.q, p.k, p.v, p.scale); });
  const attn::AttentionOutput ours = attn::attention(p.aq, p.ak, p.av, p.params);
  state.counters["max_abs_diff"] = max_abs_diff(ours.out, out);
  state.SetLabel("libtorch " + std::string(TORCH_VERSION) + " math path");
}

void BM_AttnForward(benchmark::State& state) {
  const double rss_before_mb = reset_peak_rss();
  const Problem p = make_problem(state.range(0), state.range(1));
  attn::AttentionOutput out;
  time_case(state, forward_flops(p), rss_before_mb,
            [&] { out = attn::attention(p.aq, p.ak, p.av, p.params); });
  const at::NoGradGuard no_grad;
  state.counters["max_abs_diff"] = max_abs_diff(out.out, torch_attention(p.q, p.k, p.v, p.scale));
  state.SetLabel("attn");
}

void BM_TorchForwardBackward(benchmark::State& state) {
  const double rss_before_mb = reset_peak_rss();
  const Problem p = make_problem(state.range(0), state.range(1));
  const at::Tensor q = p.q.clone().requires_grad_(true);
  const at::Tensor k = p.k.clone().requires_grad_(true);
  const at::Tensor v = p.v.clone().requires_grad_(true);
  time_case(state, training_flops(p), rss_before_mb, [&] {
    for (const at::Tensor& t : {q, k, v}) t.mutable_grad() = at::Tensor();  // no accumulation
    torch_attention(q, k, v, p.scale).backward(p.dout);
  });
  const attn::AttentionOutput fwd = attn::attention(p.aq, p.ak, p.av, p.params);
  const attn::AttentionGrads grads =
      attn::attention_backward(p.aq, p.ak, p.av, p.params, fwd, p.adout);
  state.counters["max_abs_diff"] = max_abs_diff(grads.dq, q.grad());
  state.SetLabel("libtorch " + std::string(TORCH_VERSION) + " math path + autograd");
}

void BM_AttnForwardBackward(benchmark::State& state) {
  const double rss_before_mb = reset_peak_rss();
  const Problem p = make_problem(state.range(0), state.range(1));
  time_case(state, training_flops(p), rss_before_mb, [&] {
    const attn::AttentionOutput fwd = attn::attention(p.aq, p.ak, p.av, p.params);
    benchmark::DoNotOptimize(
        attn::attention_backward(p.aq, p.ak, p.av, p.params, fwd, p.adout).dq.raw_data());
  });
  state.SetLabel("attn");
}

void Cases(benchmark::internal::Benchmark* b) {
  for (int64_t d : {64, 128})
    for (int64_t n : {512, 2048, 8192}) b->Args({d, n});
  b->ArgNames({"d", "N"})->Unit(benchmark::kMillisecond)->UseRealTime();
}

BENCHMARK(BM_TorchForward)->Apply(Cases);
BENCHMARK(BM_AttnForward)->Apply(Cases);
BENCHMARK(BM_TorchForwardBackward)->Apply(Cases);
BENCHMARK(BM_AttnForwardBackward)->Apply(Cases);

}  // namespace

int main(int argc, char** argv) {
  // The same thread count everywhere: libtorch's intra-op pool (OpenMP, libgomp, shared with
  // attn's kernels) and OpenBLAS, which libtorch's matmuls call.
  at::set_num_threads(kThreads);
  openblas_set_num_threads(kThreads);
  // A fixed mmap threshold (setting it turns off glibc's adaptive one): every large buffer is
  // mapped on allocation and unmapped on free, so memory a case frees does not stay resident and
  // hide the next case's peak.
  mallopt(M_MMAP_THRESHOLD, 1 << 20);
  benchmark::AddCustomContext("libtorch_threads", std::to_string(at::get_num_threads()));
  benchmark::AddCustomContext("openblas_core", openblas_get_corename());
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
