// Decode attention (src/kernels/decode/decode_attention.*): one new query per sequence against a KV
// cache, B = 1, Hq = 8, Hkv in {8, 2}, d = 128, cache length L in {4096, 32768}, float32 and bf16
// caches, 1 and 2 threads. Decode reads every cache byte once and does ~2 FLOPs per byte, so it
// is judged by read bandwidth against a plain streaming sum over the same bytes.
//
// BM_Decode counters (the machine is shared and memory bandwidth drifts by tens of percent
// between runs, so the kernel and the baseline are timed alternately inside the same loop, and
// each rate is taken from its fastest call, the least disturbed one):
//   GB/s         K and V bytes of the cache / best kernel call
//   stream_GB/s  the same bytes (the same K and V buffers) summed as 32-bit integers by a plain
//                vectorised loop, same thread count, best call
//   vs_stream    GB/s / stream_GB/s (target >= 0.85)
//   us           best kernel call in microseconds
//   peak_MB      peak resident memory of the process so far (VmHWM; inputs included)
//   label        the Highway target the kernel dispatched to
//
// BM_DecodeApi: the same counters through the public attn::attention (float32 query, float32,
// bf16 or 8-bit (kv=2, attn/quantized.h: int8 + a float32 scale per 32 channels, 1.125 bytes per
// element, scales counted) cache read in place from a tensor with spare capacity), and the
// seq2seq decoder step.
//
// BM_Crossover: decode kernel vs the composed (BLAS) path on the Tensor glue, Tq = 1, for short
// caches, 2 threads (the seq2seq rows also 1); decode_us / composed_us below 1 means the decode
// kernel wins. It sets kDecodeMinKeys. Each path's time is its best call over 0.2 s: on a
// shared 2-core machine a 2-thread call whose second thread is descheduled takes milliseconds,
// so compare 2-thread rows only from a quiet run.
// weights=1 asks both for the attention weights (return_weights: a seq2seq decoder step that
// draws its alignment), which the composed path used to be the only one to provide.
//
//   ./build/bench/bench_decode
//   ./build/bench/bench_decode --benchmark_filter=BM_Decode
//   ./build/bench/bench_decode --benchmark_filter=BM_DecodeApi --benchmark_min_time=0.5
// (OpenBLAS 0.3.21 runs this Xeon on a generic kernel unless told its core type; it matters for
// BM_Crossover's composed path.)
#include <benchmark/benchmark.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "attention_validate.h"
#include "attn/attention.h"
#include "attn/paged_kv_cache.h"
#include "attn/quantized.h"
#include "attn/tensor.h"
#include "kernels/composed/attention_composed.h"
#include "kernels/decode/decode_attention.h"

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

double peak_rss_mb() {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line))
    if (line.rfind("VmHWM:", 0) == 0) return std::stod(line.substr(6)) / 1024.0;
  return 0.0;
}

std::vector<float> random_vector(size_t n, uint32_t seed) {
  std::vector<float> x(n);
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  for (float& e : x) e = dist(rng);
  return x;
}

// The baseline: sum 32-bit words of two buffers, threads splitting each buffer in contiguous
// halves (as the kernel's key splits do). Integer adds so that no bit pattern (bf16 pairs read as
// float could be NaN or subnormal) slows it down; the widest vectors this CPU has.
uint32_t sum_words_generic(const uint32_t* p, int64_t n) {
  uint32_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += p[i];
  return s;
}
#if defined(__x86_64__)
[[gnu::target("avx512f")]] uint32_t sum_words_avx512(const uint32_t* p, int64_t n) {
  uint32_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += p[i];
  return s;
}
#endif

uint32_t stream_sum(const void* a, size_t a_bytes, const void* b, size_t b_bytes) {
#if defined(__x86_64__)
  static const bool avx512 = __builtin_cpu_supports("avx512f");
#else
  const bool avx512 = false;
#endif
  uint32_t total = 0;
#pragma omp parallel reduction(+ : total)
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    for (auto [ptr, bytes] : {std::pair{a, a_bytes}, std::pair{b, b_bytes}}) {
      const auto* words = static_cast<const uint32_t*>(ptr);
      const int64_t n = static_cast<int64_t>(bytes / 4);
      const int64_t lo = n * t / nt, hi = n * (t + 1) / nt;
#if defined(__x86_64__)
      total += avx512 ? sum_words_avx512(words + lo, hi - lo)
                      : sum_words_generic(words + lo, hi - lo);
#else
      total += sum_words_generic(words + lo, hi - lo);
#endif
    }
  }
  return total;
}

constexpr int64_t kBatch = 1, kQueryHeads = 8, kHeadDim = 128;

void BM_Decode(benchmark::State& state) {
  const int64_t kv_heads = state.range(0), L = state.range(1);
  const bool bf16 = state.range(2) != 0;
  const int threads = static_cast<int>(state.range(3));
  omp_set_num_threads(threads);

  const size_t cache_elems = size_t(kBatch * kv_heads * L * kHeadDim);
  const std::vector<float> q = random_vector(size_t(kBatch * kQueryHeads * kHeadDim), 1);
  // K and V in attn::Tensor storage, 64-byte aligned like a real cache (a std::vector's 16-byte
  // alignment splits every vector load of a row across two cache lines: 3-10% slower here).
  const size_t bytes_each = cache_elems * (bf16 ? 2 : 4);
  const attn::DType cache_type = bf16 ? attn::DType::bf16 : attn::DType::f32;
  const attn::Tensor k_cache = attn::Tensor::empty({int64_t(cache_elems)}, cache_type);
  const attn::Tensor v_cache = attn::Tensor::empty({int64_t(cache_elems)}, cache_type);
  attn::kernels::DecodeAttentionArgs args;
  const std::vector<float> k = random_vector(cache_elems, 2), v = random_vector(cache_elems, 3);
  if (bf16) {
    attn::kernels::float_to_bf16(k.data(), static_cast<uint16_t*>(k_cache.raw_data()), cache_elems);
    attn::kernels::float_to_bf16(v.data(), static_cast<uint16_t*>(v_cache.raw_data()), cache_elems);
    args.kv_type = attn::kernels::KvType::bf16;
  } else {
    std::memcpy(k_cache.raw_data(), k.data(), bytes_each);
    std::memcpy(v_cache.raw_data(), v.data(), bytes_each);
  }
  args.k.data = k_cache.raw_data(), args.v.data = v_cache.raw_data();
  for (attn::kernels::KvView* view : {&args.k, &args.v}) {
    view->stride_t = kHeadDim;
    view->stride_h = L * kHeadDim;
    view->stride_b = kv_heads * L * kHeadDim;
  }
  std::vector<float> out(size_t(kBatch * kQueryHeads * kHeadDim));
  std::vector<float> lse(size_t(kBatch * kQueryHeads));
  args.q = q.data(), args.out = out.data(), args.lse = lse.data();
  args.batch = kBatch, args.q_heads = kQueryHeads, args.kv_heads = kv_heads;
  args.q_len = 1, args.k_len = L, args.head_dim = kHeadDim, args.value_dim = kHeadDim;
  args.scale = static_cast<float>(1.0 / std::sqrt(double(kHeadDim)));
  args.causal = true, args.bottom_right = true;  // one query at the last position: all keys

  attn::kernels::decode_attention_forward(args);  // warm-up: page in, spin up threads
  benchmark::DoNotOptimize(stream_sum(args.k.data, bytes_each, args.v.data, bytes_each));
  double best = 1e30, best_stream = 1e30;
  for (auto _ : state) {
    auto start = Clock::now();
    attn::kernels::decode_attention_forward(args);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
    best = std::min(best, seconds_since(start));

    state.PauseTiming();
    start = Clock::now();
    benchmark::DoNotOptimize(stream_sum(args.k.data, bytes_each, args.v.data, bytes_each));
    best_stream = std::min(best_stream, seconds_since(start));
    state.ResumeTiming();
  }
  const double bytes = 2.0 * double(bytes_each);
  state.counters["GB/s"] = bytes / best * 1e-9;
  state.counters["stream_GB/s"] = bytes / best_stream * 1e-9;
  state.counters["vs_stream"] = best_stream / best;
  state.counters["us"] = best * 1e6;
  state.counters["peak_MB"] = peak_rss_mb();
  state.SetLabel(attn::kernels::decode_attention_target_name());
}

void DecodeCases(benchmark::internal::Benchmark* b) {
  for (int64_t hkv : {8, 2})
    for (int64_t L : {4096, 32768})
      for (int64_t bf16 : {0, 1})
        for (int64_t threads : {1, 2}) b->Args({hkv, L, bf16, threads});
  b->ArgNames({"Hkv", "L", "bf16", "threads"})->Unit(benchmark::kMicrosecond)->UseRealTime();
}
BENCHMARK(BM_Decode)->Apply(DecodeCases);

// The same through the public API, as a server would call it: attn::attention with a float32
// query against a KV cache of L valid rows in a cache tensor with spare capacity (rows strided
// over the capacity, as KVCache::keys() returns them), float32, bf16 or 8-bit (kv = 0, 1, 2).
// Counters as BM_Decode;
// the stream reads the whole cache tensors (capacity rows included) and is rated per byte.
// Also the seq2seq decoder step, B = 64, Tq = 1, Tk = 50, d = 256, one head.
void BM_DecodeApi(benchmark::State& state) {
  const int64_t B = state.range(0), Hq = state.range(1), Hkv = state.range(2), L = state.range(3),
                d = state.range(4);
  const bool bf16 = state.range(5) == 1, int8 = state.range(5) == 2;
  omp_set_num_threads(static_cast<int>(state.range(6)));
  const int64_t capacity = L + 64;
  const attn::DType cache_type = bf16 ? attn::DType::bf16 : attn::DType::f32;
  const auto random_cache = [&](uint32_t seed) {
    attn::Tensor full = attn::Tensor::empty({B, Hkv, capacity, d});
    const std::vector<float> x = random_vector(size_t(full.numel()), seed);
    std::memcpy(full.data<float>(), x.data(), x.size() * sizeof(float));
    return full.to(cache_type);
  };
  const attn::Tensor k_cache = random_cache(2), v_cache = random_cache(3);
  const attn::Tensor k = k_cache.slice(2, 0, L), v = v_cache.slice(2, 0, L);
  attn::QuantizedTensor k8_cache, v8_cache, k8, v8;
  if (int8) {
    k8_cache = attn::quantize_int8(k_cache), v8_cache = attn::quantize_int8(v_cache);
    k8 = k8_cache.slice(2, 0, L), v8 = v8_cache.slice(2, 0, L);
  }
  attn::Tensor q = attn::Tensor::empty({B, Hq, 1, d});
  const std::vector<float> qx = random_vector(size_t(q.numel()), 1);
  std::memcpy(q.data<float>(), qx.data(), qx.size() * sizeof(float));
  attn::AttentionParams params;
  params.mask.causal = true;
  params.mask.alignment = attn::Alignment::bottom_right;
  const auto call = [&] {
    return int8 ? attn::attention(q, k8, v8, params) : attn::attention(q, k, v, params);
  };
  // Bytes per element read by a call, and the buffers the stream baseline sums (the int8
  // values: the scales are 1/32 of them, rated at the same per-byte rate).
  const double elem_bytes =
      int8 ? 1.0 + 4.0 / double(attn::kInt8Block) : double(attn::dtype_size(cache_type));
  const size_t cache_bytes =
      int8 ? size_t(k_cache.numel()) : size_t(k_cache.numel()) * attn::dtype_size(cache_type);
  const void* k_stream = int8 ? static_cast<const void*>(k8_cache.values()) : k_cache.raw_data();
  const void* v_stream = int8 ? static_cast<const void*>(v8_cache.values()) : v_cache.raw_data();
  benchmark::DoNotOptimize(call().out.raw_data());  // warm-up
  double best = 1e30, best_stream = 1e30;
  for (auto _ : state) {
    auto start = Clock::now();
    benchmark::DoNotOptimize(call().out.raw_data());
    best = std::min(best, seconds_since(start));
    state.PauseTiming();
    start = Clock::now();
    benchmark::DoNotOptimize(stream_sum(k_stream, cache_bytes, v_stream, cache_bytes));
    best_stream = std::min(best_stream, seconds_since(start));
    state.ResumeTiming();
  }
  const double bytes = 2.0 * double(B * Hkv * L * d) * elem_bytes;
  state.counters["GB/s"] = bytes / best * 1e-9;
  state.counters["stream_GB/s"] = 2.0 * double(cache_bytes) / best_stream * 1e-9;
  state.counters["vs_stream"] = state.counters["GB/s"] / state.counters["stream_GB/s"];
  state.counters["us"] = best * 1e6;
}
BENCHMARK(BM_DecodeApi)
    ->ArgsProduct({{1}, {8}, {8, 2}, {4096, 32768}, {128}, {0, 1, 2}, {1, 2}})
    ->ArgsProduct({{64}, {1}, {1}, {50}, {256}, {0, 1, 2}, {1, 2}})
    ->ArgNames({"B", "Hq", "Hkv", "L", "d", "kv", "threads"})
    ->Unit(benchmark::kMicrosecond)
    ->UseRealTime();

// The same over a paged cache (attn/paged_kv_cache.h): pages of 64 positions, the sequence's
// pages interleaved in the pool with a second sequence's (grown in alternate chunks of 256
// positions, as two requests of a server would), float32 or bf16; decoded through the public
// attention(q, cache, {sequence}). Counters as BM_DecodeApi; the stream sums the whole pool.
void BM_DecodePaged(benchmark::State& state) {
  const int64_t Hq = state.range(0), Hkv = state.range(1), L = state.range(2), d = state.range(3);
  const bool bf16 = state.range(4) != 0;
  omp_set_num_threads(static_cast<int>(state.range(5)));
  constexpr int64_t kPage = 64, kChunk = 256;
  const attn::DType dtype = bf16 ? attn::DType::bf16 : attn::DType::f32;
  attn::PagedKVCache cache({.num_kv_heads = Hkv, .head_dim = d, .page_size = kPage,
                            .num_pages = 2 * L / kPage, .dtype = dtype});
  const int64_t seq = cache.add_sequence(), other = cache.add_sequence();
  const auto chunk = [&](uint32_t seed) {
    attn::Tensor t = attn::Tensor::empty({Hkv, kChunk, d});
    const std::vector<float> x = random_vector(size_t(t.numel()), seed);
    std::memcpy(t.data<float>(), x.data(), x.size() * sizeof(float));
    return t;
  };
  const attn::Tensor k_rows = chunk(2), v_rows = chunk(3);
  for (int64_t done = 0; done < L; done += kChunk) {
    cache.append(seq, k_rows, v_rows);
    cache.append(other, v_rows, k_rows);
  }
  attn::Tensor q = attn::Tensor::empty({1, Hq, 1, d});
  const std::vector<float> qx = random_vector(size_t(q.numel()), 1);
  std::memcpy(q.data<float>(), qx.data(), qx.size() * sizeof(float));
  attn::AttentionParams params;
  params.mask.causal = true;
  params.mask.alignment = attn::Alignment::bottom_right;
  const std::vector<int64_t> seqs{seq};
  const size_t pool_bytes = size_t(cache.key_pool().numel()) * attn::dtype_size(dtype);
  benchmark::DoNotOptimize(attn::attention(q, cache, seqs, params).out.raw_data());  // warm-up
  double best = 1e30, best_stream = 1e30;
  for (auto _ : state) {
    auto start = Clock::now();
    benchmark::DoNotOptimize(attn::attention(q, cache, seqs, params).out.raw_data());
    best = std::min(best, seconds_since(start));
    state.PauseTiming();
    start = Clock::now();
    benchmark::DoNotOptimize(stream_sum(cache.key_pool().raw_data(), pool_bytes,
                                        cache.value_pool().raw_data(), pool_bytes));
    best_stream = std::min(best_stream, seconds_since(start));
    state.ResumeTiming();
  }
  const double bytes = 2.0 * double(Hkv * L * d) * double(attn::dtype_size(dtype));
  state.counters["GB/s"] = bytes / best * 1e-9;
  state.counters["stream_GB/s"] = 2.0 * double(pool_bytes) / best_stream * 1e-9;
  state.counters["vs_stream"] = state.counters["GB/s"] / state.counters["stream_GB/s"];
  state.counters["us"] = best * 1e6;
}
BENCHMARK(BM_DecodePaged)
    ->ArgsProduct({{8}, {8, 2}, {4096, 32768}, {128}, {0, 1}, {1, 2}})
    ->ArgNames({"Hq", "Hkv", "L", "d", "bf16", "threads"})
    ->Unit(benchmark::kMicrosecond)
    ->UseRealTime();

// Decode kernel vs composed path through the Tensor-level glue (what attention() would run).
void BM_Crossover(benchmark::State& state) {
  const int64_t B = state.range(0), H = state.range(1), Tk = state.range(2), d = state.range(3);
  const bool weights = state.range(4) != 0;
  omp_set_num_threads(static_cast<int>(state.range(5)));
  const attn::detail::AttentionDims dims{.B = B, .Hq = H, .Hkv = H, .Tq = 1, .Tk = Tk,
                                         .Dq = d, .Dk = d, .Dv = d};
  const auto make = [](attn::Shape shape, uint32_t seed) {
    attn::Tensor t = attn::Tensor::empty(shape);
    const std::vector<float> x = random_vector(size_t(t.numel()), seed);
    std::memcpy(t.data<float>(), x.data(), x.size() * sizeof(float));
    return t;
  };
  const attn::Tensor q = make({B, H, 1, d}, 1), k = make({B, H, Tk, d}, 2),
                     v = make({B, H, Tk, d}, 3);
  attn::AttentionParams params;
  params.mask.causal = true;
  params.mask.alignment = attn::Alignment::bottom_right;
  params.return_weights = weights;
  const auto time_best = [&](auto&& run) {
    double best = 1e30;
    const auto start = Clock::now();
    do {
      const auto call = Clock::now();
      benchmark::DoNotOptimize(run().out.raw_data());
      best = std::min(best, seconds_since(call));
    } while (seconds_since(start) < 0.2);
    return best;
  };
  double decode = 0.0, composed = 0.0;
  for (auto _ : state) {
    decode = time_best([&] { return attn::kernels::decode_attention(dims, q, k, v, params); });
    composed = time_best(
        [&] { return attn::kernels::composed_attention_forward<float>(dims, q, k, v, params); });
  }
  state.counters["decode_us"] = decode * 1e6;
  state.counters["composed_us"] = composed * 1e6;
  state.counters["decode/composed"] = decode / composed;
}
BENCHMARK(BM_Crossover)
    ->ArgsProduct({{1}, {8}, {1, 4, 8, 16, 32, 64, 128, 512, 4096}, {64, 128}, {0}, {2}})
    // seq2seq decoder steps: B = 64, Tq = 1, Tk = 50, d = 256 (one head) or 8 heads of d = 32,
    // with and without drawing the alignment (return_weights); 1 thread as well, whose ratio
    // a loaded 2-core machine disturbs far less than the 2-thread one.
    ->ArgsProduct({{64}, {1}, {50}, {256}, {0, 1}, {1, 2}})
    ->ArgsProduct({{64}, {8}, {50}, {32}, {0, 1}, {1, 2}})
    ->ArgNames({"B", "H", "Tk", "d", "weights", "threads"})
    ->Iterations(1)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

}  // namespace

BENCHMARK_MAIN();
