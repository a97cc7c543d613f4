#include "tools/train_processes.h"

#include <cstdio>
#include <cstdlib>
#include <exception>
#include <iostream>
#include <streambuf>

#include "tools/cli_options.h"

#ifdef ATTN_WITH_MPI
#include "attn/dist/data_parallel.h"
#endif

namespace attn::cli {
namespace {

// Swallows everything written to it.
class NullBuffer : public std::streambuf {
 protected:
  int overflow(int c) override { return c; }
  std::streamsize xsputn(const char*, std::streamsize n) override { return n; }
};

#ifdef ATTN_WITH_MPI
// mpirun (Open MPI, MPICH, PMIx launchers) tells its processes so in the environment.
bool started_by_mpirun() {
  for (const char* name : {"OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_SIZE"})
    if (std::getenv(name) != nullptr) return true;
  return false;
}
#endif

}  // namespace

struct TrainProcesses::State {
  NullBuffer null;
  std::streambuf *cout = nullptr, *cerr = nullptr;  // restored at the end on muted ranks
  bool mpi = false;
#ifdef ATTN_WITH_MPI
  attn::dist::ReductionStats stats;
#endif
};

TrainProcesses::TrainProcesses() : state_(std::make_unique<State>()) {
#ifdef ATTN_WITH_MPI
  if (started_by_mpirun()) {
    int initialized = 0;
    MPI_Initialized(&initialized);
    if (!initialized) MPI_Init(nullptr, nullptr);
    state_->mpi = !initialized;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank_);
    MPI_Comm_size(MPI_COMM_WORLD, &count_);
  }
#endif
  if (!root()) {
    state_->cout = std::cout.rdbuf(&state_->null);
    state_->cerr = std::cerr.rdbuf(&state_->null);
  }
}

TrainProcesses::~TrainProcesses() {
  if (state_->cout) std::cout.rdbuf(state_->cout);
  if (state_->cerr) std::cerr.rdbuf(state_->cerr);
#ifdef ATTN_WITH_MPI
  // A process that fails returns non-zero without finalizing: mpirun then ends every rank (the
  // others may wait in a collective that this one will never join).
  if (state_->mpi && std::uncaught_exceptions() == 0) MPI_Finalize();
#endif
}

seq2seq::GradientSharding TrainProcesses::sharding(int64_t shards) {
  seq2seq::GradientSharding g;
  g.shards = shards > 0 ? shards : count_;
  if (g.shards < count_)
    throw UsageError("--grad-shards " + std::to_string(shards) + " is fewer than the " +
                     std::to_string(count_) + " processes: each computes one shard at least");
#ifdef ATTN_WITH_MPI
  if (count_ > 1) {
    const attn::dist::ShardRange own = attn::dist::shard_range(g.shards, count_, rank_);
    g.first = own.first;
    g.count = own.count;
    g.sum_shards = [this, shards = g.shards](const float* mine, int64_t n, float* sum) {
      attn::dist::sum_shards_in_order(mine, n, shards, sum, MPI_COMM_WORLD, &state_->stats);
    };
    g.any = [](bool stop) { return attn::dist::any_rank(stop, MPI_COMM_WORLD); };
  }
#endif
  return g;
}

void TrainProcesses::report(std::ostream& out, double seconds) const {
#ifdef ATTN_WITH_MPI
  const attn::dist::ReductionStats& s = state_->stats;
  if (count_ < 2 || s.calls == 0) return;
  char buf[320];
  std::snprintf(buf, sizeof buf,
                "data parallel: %d processes; gradient sum per step (rank 0): %.3f MB sent, "
                "%.3f MB received, %.2f ms (%.1f%% of the %.1f ms step)\n",
                count_, s.bytes_sent / 1e6 / s.calls, s.bytes_received / 1e6 / s.calls,
                s.seconds * 1e3 / s.calls, 100.0 * s.seconds / seconds, seconds * 1e3 / s.calls);
  out << buf;
#else
  (void)out, (void)seconds;
#endif
}

}  // namespace attn::cli
