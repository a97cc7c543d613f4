// The data-parallel gradient sum (attn::dist::sum_shards_in_order, one shard per rank) against
// MPI_Allreduce (MPI_SUM, the implementation's own order) on the same float32 vector, per size
// (run by hand; BENCHMARKS.md "Data-parallel training over MPI"):
//
//   mpirun -np 2 build-dist/bin/bench_grad_sum [reps]
//
// Per size: median ms of each over `reps` calls (after a barrier), bytes this rank sent, and the
// effective rate 2 (P-1)/P x 4 N / time. Rank 0 prints; docs/scaling_model.py fits a latency and
// a bandwidth to the sum's times.
#include <mpi.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "attn/dist/data_parallel.h"

namespace {

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rank = 0, P = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &P);
  const int reps = argc > 1 ? std::max(1, std::atoi(argv[1])) : 21;
  if (rank == 0)
    std::printf("ranks %d, one shard each, median of %d\n%12s %10s %12s %12s %10s %12s\n", P, reps,
                "floats", "MB sent", "sum ms", "allreduce ms", "sum/ar", "sum GB/s");
  for (int64_t n : {1000LL, 10000LL, 100000LL, 770000LL, 2940000LL, 10000000LL}) {
    std::vector<float> mine(static_cast<size_t>(n)), sum(mine.size()), ar(mine.size());
    for (int64_t i = 0; i < n; ++i) mine[i] = static_cast<float>((i * 7 + rank) % 13) * 0.25f;
    std::vector<double> t_sum, t_ar;
    attn::dist::ReductionStats stats;
    for (int r = 0; r < reps; ++r) {
      MPI_Barrier(MPI_COMM_WORLD);
      double t0 = MPI_Wtime();
      attn::dist::sum_shards_in_order(mine.data(), n, P, sum.data(), MPI_COMM_WORLD, &stats);
      t_sum.push_back(MPI_Wtime() - t0);
      MPI_Barrier(MPI_COMM_WORLD);
      t0 = MPI_Wtime();
      MPI_Allreduce(mine.data(), ar.data(), static_cast<int>(n), MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
      t_ar.push_back(MPI_Wtime() - t0);
    }
    const double s = median(t_sum), a = median(t_ar);
    if (rank == 0)
      std::printf("%12lld %10.3f %12.3f %12.3f %10.2f %12.2f\n", static_cast<long long>(n),
                  stats.bytes_sent / 1e6 / stats.calls, s * 1e3, a * 1e3, s / a,
                  2.0 * (P - 1) / P * 4.0 * n / s / 1e9);
  }
  MPI_Finalize();
  return 0;
}
