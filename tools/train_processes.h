// The processes of one `attn train` run: one, or N started by mpirun (data-parallel training,
// attn/dist/data_parallel.h). Only builds with ATTN_WITH_MPI know MPI; without it, and in any
// process that mpirun did not start, this is one process and the training loop runs as always.
#pragma once

#include <cstdint>
#include <iosfwd>
#include <memory>
#include <string>

#include "seq2seq/training/train.h"

namespace attn::cli {

class TrainProcesses {
 public:
  // Joins the MPI job when mpirun started this process (its environment says so). On every rank
  // but 0, std::cout and std::cerr stay silent until destruction: rank 0 alone reports.
  TrainProcesses();
  ~TrainProcesses();  // MPI_Finalize (not while an exception unwinds: mpirun ends the job)
  TrainProcesses(const TrainProcesses&) = delete;
  TrainProcesses& operator=(const TrainProcesses&) = delete;

  int rank() const { return rank_; }
  int count() const { return count_; }
  bool root() const { return rank_ == 0; }

  // The gradient sharding of a run with --grad-shards `shards` (0: one shard per process): this
  // process's shards and, with several processes, the MPI sum in shard order. Throws a usage
  // error when there are fewer shards than processes.
  seq2seq::GradientSharding sharding(int64_t shards);

  // "data parallel: ..." (several processes): this rank's bytes and time of the gradient sums
  // per step, against the `seconds` the run's steps took.
  void report(std::ostream& out, double seconds) const;

 private:
  struct State;
  int rank_ = 0, count_ = 1;
  std::unique_ptr<State> state_;
};

}  // namespace attn::cli
