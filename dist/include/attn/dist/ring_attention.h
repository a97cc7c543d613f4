// attn::dist — ring attention over the ranks of an MPI communicator (Liu et al. 2023, "Ring
// Attention with Blockwise Transformers"): attention over a sequence that no single process holds.
// Optional part of the build (ATTN_WITH_MPI, target attn::dist); the core library attn has no MPI
// dependency.
//
// ## Sharding contract
//
// q, k and v are sharded along the sequence (dimension 2 of [B, H, T, D]) over the P ranks of
// `comm`; every rank passes its own shard, all other dimensions, dtypes and `params` are the same
// on every rank (checked: a mismatch raises attn::Error on every rank, no rank hangs).
//
//   Layout::contiguous  rank r holds one run of positions; the global sequence is the
//                       concatenation of the shards in rank order, and the shards may have any
//                       lengths (uneven, even empty). shard_ranges() gives the balanced split.
//   Layout::zigzag      the global length T is cut into 2P chunks (chunk c holds T / 2P positions,
//                       one more for c < T % 2P); rank r holds chunk r followed by chunk 2P-1-r.
//                       Under a causal mask every rank then has the same work (no rank idles on
//                       the masked half). Each rank's length must be exactly that of its chunks.
//
// Queries and keys are sharded separately with the same layout (cross-attention: Tq != Tk).
// Each rank keeps its queries; K/V blocks travel round the ring (rank r sends to r+1 and receives
// from r-1, the next block's transfer overlapping the current block's computation), and partial
// results merge by log-sum-exp. The backward uses the merged out and lse (the flash formulation):
// dQ accumulates locally, dK and dV accumulate on their block as it travels and return to the
// block's owner. The score's parameter gradients (general, additive, ...) are summed over all
// ranks: every rank returns the full gradient.
//
// Masks, in GLOBAL positions:
//   mask.key_lengths / query_lengths  global lengths per batch entry (the same on every rank)
//   mask.causal                       self-attention positions: needs Tq == Tk on every rank;
//                                     Alignment::top_left (bottom_right only without lengths,
//                                     where the two agree)
//   mask.window                       over global positions, Alignment::top_left: block pairs
//                                     wholly outside the window are skipped; a pair whose
//                                     shifted window stays >= 0 on both sides uses the native
//                                     window, the others a boolean mask of the pair (rows x keys)
//   mask.alibi_slopes                 -slope[h] |i - j| over global positions, top_left: an
//                                     additive bias of each pair (Hq x rows x keys floats)
// Scores: dot, scaled dot (scale 1/sqrt(Dk) of the local Dk, which is the global one), general,
// additive, concat, cosine, trilinear — the scores whose only per-key input is the key itself.
// Grouped-query attention (Hq a multiple of Hkv) as in attn::attention.
//
// Not sharded (attn::Error on every rank): location scores (a parameter per key position),
// head_scores, boolean `allowed` masks and additive biases given by the caller (global [Tq, Tk]
// tensors, which no rank holds whole), windows and ALiBi with Alignment::bottom_right, Luong
// local attention, dropout, return_weights. The backward needs float32 (or bf16, whose gradients are float32):
// attn's float64 backward renormalises the softmax within each call, so a per-block float64
// backward cannot take the global lse.
//
// attn/dist/ulysses_attention.h shards the same inputs over heads instead (all-to-all), and takes
// most of what the ring refuses when the heads divide by the ranks; choose_sequence_parallel()
// there picks between the two.
//
// All entry points are collective: every rank of `comm` calls them, in the same order.
#pragma once

#include <mpi.h>

#include <cstdint>
#include <vector>

#include "attn/attention.h"
#include "attn/tensor.h"

namespace attn::dist {

enum class Layout { contiguous, zigzag };

// One run of a rank's shard: positions [global_start, global_start + length) of the global
// sequence, stored at [local_start, local_start + length) of the shard.
struct Range {
  int64_t global_start = 0;
  int64_t local_start = 0;
  int64_t length = 0;
};

// The runs rank `rank` of `ranks` holds of a sequence of `length` positions (contiguous: the
// balanced split, the first length % ranks ranks one longer).
std::vector<Range> shard_ranges(int64_t length, int ranks, int rank, Layout layout);

// This rank's shard of a full tensor along `dim` (a copy).
Tensor shard_sequence(const Tensor& full, int64_t dim, int ranks, int rank, Layout layout);

// The full tensor along `dim` from every rank's shard, on every rank (collective). Shards must
// follow shard_ranges() for the global length they sum to.
Tensor gather_sequence(const Tensor& local, int64_t dim, Layout layout, MPI_Comm comm);

struct RingOptions {
  Layout layout = Layout::zigzag;
};

// Per ring step, measured on this rank (for benchmarks): seconds computing the step's block,
// seconds waiting for the next block after the computation (the communication not hidden), and
// bytes this rank sent in the step.
struct RingStepStats {
  double compute_s = 0.0;
  double wait_s = 0.0;
  int64_t bytes_sent = 0;
};
struct RingStats {
  std::vector<RingStepStats> steps;
  double total_s = 0.0;
};

// Forward: out [B, Hq, Tq_local, Dv] and lse [B, Hq, Tq_local] of this rank's queries against
// the whole key sequence; equal to the matching rows of attn::attention on the gathered tensors.
AttentionOutput ring_attention(const Tensor& q, const Tensor& k, const Tensor& v,
                               const AttentionParams& params, MPI_Comm comm,
                               const RingOptions& options = {}, RingStats* stats = nullptr);

// Backward: `forward` is what ring_attention returned on this rank, dout this rank's rows of the
// loss gradient. dq, dk, dv are this rank's shards; dscore the full (all-rank) parameter gradient.
AttentionGrads ring_attention_backward(const Tensor& q, const Tensor& k, const Tensor& v,
                                       const AttentionParams& params,
                                       const AttentionOutput& forward, const Tensor& dout,
                                       MPI_Comm comm, const RingOptions& options = {},
                                       RingStats* stats = nullptr);

}  // namespace attn::dist
