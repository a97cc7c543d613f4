// attn::dist — data-parallel training over the ranks of an MPI communicator: the MPI side of
// seq2seq::GradientSharding (seq2seq/training/train.h), which keeps the training loop free of MPI.
//
// Every global batch is cut into S gradient shards (S >= the number of ranks P); rank r computes
// the contiguous run shard_range(S, P, r) of them and the gradients are summed in shard order
// 0, 1, ..., S-1, left to right in float32, on every rank. MPI_Allreduce is not used for the sum:
// the order in which it adds is the implementation's (Open MPI picks its algorithm by message
// size and communicator size), so its result could depend on P. Here MPI moves bytes only and
// every addition is ours:
//   1. MPI_Alltoallv: the gradient vector is cut into P chunks; rank c receives chunk c of every
//      shard's gradient, from the rank that computed it (ranks hold increasing shards, so the
//      received buffers arrive in shard order);
//   2. rank c adds its chunk over the S shards, left to right;
//   3. MPI_Allgatherv: every rank receives every summed chunk.
// Each element is therefore ((g_0 + g_1) + g_2) + ... + g_{S-1}, exactly as one process running
// the S shards one after the other adds them (seq2seq::Trainer with shards = S): P processes and
// one give the same bits, and timing cannot change them. With S = P the traffic per rank is
// 2 (P-1)/P of the gradient, as for a ring allreduce (reduce-scatter + allgather).
#pragma once

#include <mpi.h>

#include <cstdint>

namespace attn::dist {

// The shards [first, first + count) rank `rank` of `ranks` computes: contiguous, balanced (the
// counts differ by at most one), in rank order.
struct ShardRange {
  int64_t first = 0;
  int64_t count = 0;
};
ShardRange shard_range(int64_t shards, int ranks, int rank);

// Bytes this rank sent and received, and the seconds spent, in the calls that took these stats.
struct ReductionStats {
  int64_t calls = 0;
  int64_t bytes_sent = 0;
  int64_t bytes_received = 0;
  double seconds = 0.0;
};

// Collective. `mine` holds this rank's shard_range(shards, P, rank).count buffers of n floats
// (shard-major); `sum` (n floats, every rank) receives the sum over all `shards` buffers in shard
// order, left to right. n must be the same on every rank (checked: attn::Error on every rank).
void sum_shards_in_order(const float* mine, int64_t n, int64_t shards, float* sum, MPI_Comm comm,
                         ReductionStats* stats = nullptr);

// Collective: true on every rank when `flag` is true on any (logical or: exact in any order).
bool any_rank(bool flag, MPI_Comm comm);

}  // namespace attn::dist
