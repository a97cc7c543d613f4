#include "attn/dist/data_parallel.h"

#include <algorithm>
#include <chrono>
#include <climits>
#include <cstring>
#include <vector>

#include "attn/error.h"

namespace attn::dist {
namespace {

constexpr const char* kOp = "dist::sum_shards_in_order";

int comm_size(MPI_Comm comm) {
  int p = 1;
  MPI_Comm_size(comm, &p);
  return p;
}
int comm_rank(MPI_Comm comm) {
  int r = 0;
  MPI_Comm_rank(comm, &r);
  return r;
}

// Element range of chunk c of P of an n-vector.
int64_t chunk_begin(int64_t n, int P, int c) { return n * c / P; }

}  // namespace

ShardRange shard_range(int64_t shards, int ranks, int rank) {
  const int64_t first = shards * rank / ranks, end = shards * (rank + 1) / ranks;
  return {first, end - first};
}

void sum_shards_in_order(const float* mine, int64_t n, int64_t shards, float* sum, MPI_Comm comm,
                         ReductionStats* stats) {
  const auto start = std::chrono::steady_clock::now();
  const int P = comm_size(comm), rank = comm_rank(comm);
  // Every rank must agree on (n, shards): a mismatch would misplace bytes, not fail.
  // One MIN over (n, -n, shards, -shards) gives the minima and maxima.
  long long args[4] = {n, -n, shards, -shards}, lo[4];
  MPI_Allreduce(args, lo, 4, MPI_LONG_LONG, MPI_MIN, comm);
  ATTN_CHECK(lo[0] == -lo[1] && lo[2] == -lo[3], kOp, "gradient sizes ", lo[0], "..", -lo[1],
             " or shard counts ", lo[2], "..", -lo[3], " differ between ranks");
  ATTN_CHECK(shards >= P, kOp, shards, " gradient shards cannot be shared by ", P,
             " ranks: every rank needs one at least");
  ATTN_CHECK(n >= 0 && n * shards / P < INT_MAX / 2, kOp, "a gradient of ", n, " floats in ",
             shards, " shards exceeds MPI's int counts");
  const ShardRange own = shard_range(shards, P, rank);
  // 1. chunk c of each of my shards goes to rank c, in shard order.
  std::vector<int> send_counts(P), send_offsets(P), recv_counts(P), recv_offsets(P);
  std::vector<float> send(static_cast<size_t>(own.count * n));
  int64_t at = 0;
  for (int c = 0; c < P; ++c) {
    const int64_t b = chunk_begin(n, P, c), len = chunk_begin(n, P, c + 1) - b;
    send_offsets[c] = static_cast<int>(at);
    for (int64_t k = 0; k < own.count; ++k, at += len)
      std::memcpy(send.data() + at, mine + k * n + b, static_cast<size_t>(len) * sizeof(float));
    send_counts[c] = static_cast<int>(at) - send_offsets[c];
  }
  const int64_t my_begin = chunk_begin(n, P, rank), my_len = chunk_begin(n, P, rank + 1) - my_begin;
  at = 0;
  for (int q = 0; q < P; ++q) {
    recv_offsets[q] = static_cast<int>(at);
    recv_counts[q] = static_cast<int>(shard_range(shards, P, q).count * my_len);
    at += recv_counts[q];
  }
  std::vector<float> received(static_cast<size_t>(at));
  MPI_Alltoallv(send.data(), send_counts.data(), send_offsets.data(), MPI_FLOAT, received.data(),
                recv_counts.data(), recv_offsets.data(), MPI_FLOAT, comm);
  // 2. my chunk summed over the shards 0..S-1, left to right (ranks hold increasing shards).
  std::vector<float> chunk(received.begin(), received.begin() + my_len);
  for (int64_t s = 1; s < shards; ++s) {
    const float* g = received.data() + s * my_len;
    for (int64_t i = 0; i < my_len; ++i) chunk[i] += g[i];
  }
  // 3. every summed chunk to every rank.
  std::vector<int> chunk_counts(P), chunk_offsets(P);
  for (int c = 0; c < P; ++c) {
    chunk_offsets[c] = static_cast<int>(chunk_begin(n, P, c));
    chunk_counts[c] = static_cast<int>(chunk_begin(n, P, c + 1)) - chunk_offsets[c];
  }
  MPI_Allgatherv(chunk.data(), static_cast<int>(my_len), MPI_FLOAT, sum, chunk_counts.data(),
                 chunk_offsets.data(), MPI_FLOAT, comm);
  if (stats) {
    const int64_t kept = own.count * my_len;  // my own shards' chunk stays here
    ++stats->calls;
    stats->bytes_sent += static_cast<int64_t>(sizeof(float)) * (own.count * n - kept + my_len * (P - 1));
    stats->bytes_received += static_cast<int64_t>(sizeof(float)) * (shards * my_len - kept + (n - my_len));
    stats->seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  }
}

bool any_rank(bool flag, MPI_Comm comm) {
  int mine = flag ? 1 : 0, any = 0;
  MPI_Allreduce(&mine, &any, 1, MPI_INT, MPI_LOR, comm);
  return any != 0;
}

}  // namespace attn::dist
