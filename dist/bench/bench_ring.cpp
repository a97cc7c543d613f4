// Ring attention over MPI, measured per ring step, against all-to-all attention over heads
// (Ulysses) and one process (run by hand; BENCHMARKS.md):
//
//   OMP_NUM_THREADS=1 mpirun -np 2 build-dist/bin/bench_ring [T] [causal 0|1] [reps] [D]
//
// For a global sequence of T positions (B 1, 8 heads, D 64, float32, zigzag layout): per step
// of the forward and the backward, the time computing the block, the time still waiting for the
// next block afterwards (communication not hidden), the time the same exchange takes alone (no
// computation beside it), the fraction of it hidden behind computation, and the bytes each rank
// sent; then the total against single-process attn::attention on the full sequence (rank 0,
// same thread count per process), and Ulysses' totals, its time in all-to-alls and the bytes
// each rank sent (ring: summed over the steps). Medians over `reps` runs.
#include <mpi.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "attn/dist/ring_attention.h"
#include "attn/dist/ulysses_attention.h"

namespace {

using attn::Tensor;

Tensor random(const attn::Shape& shape, unsigned seed) {
  Tensor t = Tensor::empty(shape);
  float* p = t.data<float>();
  unsigned x = seed * 2654435761u + 1;
  for (int64_t i = 0; i < t.numel(); ++i) {
    x = x * 1664525u + 1013904223u;
    p[i] = static_cast<float>(x >> 8) / static_cast<float>(1u << 24) * 2.0f - 1.0f;
  }
  return t;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : v[v.size() / 2];
}

// The same ring exchange as one step, with nothing to compute beside it.
double exchange_alone(int64_t bytes, int reps) {
  int rank = 0, P = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &P);
  std::vector<char> a(static_cast<std::size_t>(bytes)), b(a.size());
  std::vector<double> times;
  for (int i = 0; i < reps; ++i) {
    MPI_Barrier(MPI_COMM_WORLD);
    const double t0 = MPI_Wtime();
    MPI_Request r[2];
    MPI_Irecv(b.data(), static_cast<int>(bytes), MPI_BYTE, (rank + P - 1) % P, 0, MPI_COMM_WORLD, &r[0]);
    MPI_Isend(a.data(), static_cast<int>(bytes), MPI_BYTE, (rank + 1) % P, 0, MPI_COMM_WORLD, &r[1]);
    MPI_Waitall(2, r, MPI_STATUSES_IGNORE);
    times.push_back(MPI_Wtime() - t0);
  }
  return median(times);
}

struct StepRow {
  std::vector<double> compute, wait;
  int64_t bytes = 0;
};

void report(const char* what, const std::vector<StepRow>& rows, int reps) {
  std::printf("%s\n  step  compute_ms  wait_ms  alone_ms  hidden  MB_sent\n", what);
  for (std::size_t s = 0; s < rows.size(); ++s) {
    const double c = median(rows[s].compute), w = median(rows[s].wait);
    const double alone = rows[s].bytes > 0 ? exchange_alone(rows[s].bytes, reps) : 0.0;
    const double hidden = alone > 0 ? std::clamp(1.0 - w / alone, 0.0, 1.0) : 1.0;
    std::printf("  %4zu  %10.3f  %7.3f  %8.3f  %5.0f%%  %7.2f\n", s, c * 1e3, w * 1e3, alone * 1e3,
                hidden * 100, rows[s].bytes / 1e6);
  }
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rank = 0, P = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &P);
  const int64_t T = argc > 1 ? std::atoll(argv[1]) : 4096;
  const bool causal = argc > 2 ? std::atoi(argv[2]) != 0 : true;
  const int reps = argc > 3 ? std::atoi(argv[3]) : 5;
  const int64_t D = argc > 4 ? std::atoll(argv[4]) : 64;
  const int64_t B = 1, H = 8;
  const auto layout = attn::dist::Layout::zigzag;

  const Tensor q = random({B, H, T, D}, 1), k = random({B, H, T, D}, 2), v = random({B, H, T, D}, 3);
  const Tensor dout = random({B, H, T, D}, 4);
  auto shard = [&](const Tensor& t) { return attn::dist::shard_sequence(t, 2, P, rank, layout); };
  const Tensor sq = shard(q), sk = shard(k), sv = shard(v), sd = shard(dout);
  attn::AttentionParams params;
  params.mask.causal = causal;

  std::vector<StepRow> fwd_rows(static_cast<std::size_t>(P)), bwd_rows(static_cast<std::size_t>(P));
  std::vector<double> ring_fwd, ring_bwd, uly_fwd, uly_bwd, uly_a2a_fwd, uly_a2a_bwd;
  int64_t ring_bytes_fwd = 0, ring_bytes_bwd = 0, uly_bytes_fwd = 0, uly_bytes_bwd = 0;
  for (int i = 0; i < reps + 1; ++i) {  // the first run warms up
    MPI_Barrier(MPI_COMM_WORLD);
    attn::dist::RingStats fs, bs;
    const attn::AttentionOutput f = attn::dist::ring_attention(sq, sk, sv, params, MPI_COMM_WORLD, {layout}, &fs);
    MPI_Barrier(MPI_COMM_WORLD);
    attn::dist::ring_attention_backward(sq, sk, sv, params, f, sd, MPI_COMM_WORLD, {layout}, &bs);
    MPI_Barrier(MPI_COMM_WORLD);
    attn::dist::UlyssesStats uf, ub;
    const attn::AttentionOutput g = attn::dist::ulysses_attention(sq, sk, sv, params, MPI_COMM_WORLD, {layout}, &uf);
    MPI_Barrier(MPI_COMM_WORLD);
    attn::dist::ulysses_attention_backward(sq, sk, sv, params, g, sd, MPI_COMM_WORLD, {layout}, &ub);
    if (i == 0) continue;
    // The slowest rank sets the pace.
    double totals[6] = {fs.total_s, bs.total_s, uf.total_s, ub.total_s, uf.all_to_all_s,
                        ub.all_to_all_s},
           worst[6];
    MPI_Allreduce(totals, worst, 6, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
    ring_fwd.push_back(worst[0]);
    ring_bwd.push_back(worst[1]);
    uly_fwd.push_back(worst[2]);
    uly_bwd.push_back(worst[3]);
    uly_a2a_fwd.push_back(worst[4]);
    uly_a2a_bwd.push_back(worst[5]);
    uly_bytes_fwd = uf.bytes_sent;
    uly_bytes_bwd = ub.bytes_sent;
    ring_bytes_fwd = ring_bytes_bwd = 0;
    for (const auto& st : fs.steps) ring_bytes_fwd += st.bytes_sent;
    for (const auto& st : bs.steps) ring_bytes_bwd += st.bytes_sent;
    for (int s = 0; s < P; ++s) {
      fwd_rows[s].compute.push_back(fs.steps[s].compute_s);
      fwd_rows[s].wait.push_back(fs.steps[s].wait_s);
      fwd_rows[s].bytes = fs.steps[s].bytes_sent;
      bwd_rows[s].compute.push_back(bs.steps[s].compute_s);
      bwd_rows[s].wait.push_back(bs.steps[s].wait_s);
      bwd_rows[s].bytes = bs.steps[s].bytes_sent;
    }
  }
  std::vector<double> single_fwd, single_bwd;
  MPI_Barrier(MPI_COMM_WORLD);
  if (rank == 0) {
    for (int i = 0; i < reps + 1; ++i) {
      double t0 = MPI_Wtime();
      const attn::AttentionOutput f = attn::attention(q, k, v, params);
      double t1 = MPI_Wtime();
      attn::attention_backward(q, k, v, params, f, dout);
      double t2 = MPI_Wtime();
      if (i == 0) continue;
      single_fwd.push_back(t1 - t0);
      single_bwd.push_back(t2 - t1);
    }
  }
  MPI_Barrier(MPI_COMM_WORLD);
  if (rank == 0) {
    std::printf("ring attention: %d ranks, T %lld, B %lld, H %lld, D %lld, %s, zigzag, float32, "
                "medians of %d (rank 0's steps)\n",
                P, static_cast<long long>(T), static_cast<long long>(B), static_cast<long long>(H),
                static_cast<long long>(D), causal ? "causal" : "non-causal", reps);
  }
  // exchange_alone is collective: every rank runs report, rank 0 prints.
  if (rank != 0) std::freopen("/dev/null", "w", stdout);
  report("forward", fwd_rows, reps);
  report("backward (K/V ahead; dK/dV of the block behind)", bwd_rows, reps);
  if (rank == 0) {
    std::printf("total  ring forward %.1f ms, backward %.1f ms;  single process forward %.1f ms, "
                "backward %.1f ms\n",
                median(ring_fwd) * 1e3, median(ring_bwd) * 1e3, median(single_fwd) * 1e3,
                median(single_bwd) * 1e3);
    std::printf("total  ulysses forward %.1f ms (all-to-all %.1f), backward %.1f ms (all-to-all "
                "%.1f)\n",
                median(uly_fwd) * 1e3, median(uly_a2a_fwd) * 1e3, median(uly_bwd) * 1e3,
                median(uly_a2a_bwd) * 1e3);
    std::printf("MB sent by rank 0  ring forward %.2f, backward %.2f;  ulysses forward %.2f, "
                "backward %.2f\n",
                ring_bytes_fwd / 1e6, ring_bytes_bwd / 1e6, uly_bytes_fwd / 1e6,
                uly_bytes_bwd / 1e6);
  }
  MPI_Finalize();
  return 0;
}
