// attn::dist — all-to-all attention over heads (DeepSpeed-Ulysses, Jacobs et al. 2023): the same
// sharding contract as ring_attention (attn/dist/ring_attention.h: q, k, v sharded along the
// sequence, Layout::contiguous with any shard lengths or Layout::zigzag), but instead of passing
// K/V blocks round a ring, one all-to-all per tensor re-shards q, k and v from [B, H, T/P, D] to
// [B, H/P, T, D]: every rank holds the whole sequence for H/P heads and runs attn::attention on
// it, and an all-to-all brings out and lse back to sequence sharding. The backward sends out,
// lse and dout to head sharding as well, runs attn::attention_backward and returns dq, dk, dv by
// all-to-all.
//
// Because each rank sees the whole sequence, everything attn::attention does over one sequence
// works unchanged: every score (location scores included), causal (also cross-attention with
// either alignment), key/query lengths, windows and ALiBi with either alignment, Luong local
// attention, float64 backward. Refused (attn::Error on every rank, no rank hangs): Hq or Hkv not
// divisible by the number of ranks (GQA: the key/value heads are split too, so rank s holds query
// heads [s Hq/P, (s+1) Hq/P) and the key/value heads they read), head_scores, caller-given
// boolean `allowed` masks and additive biases, dropout, return_weights; shards that break the
// layout or differ between ranks (as for the ring).
//
// ## Ring or Ulysses (see docs/SCALING.md, BENCHMARKS.md)
// Bytes each rank sends, with s = element size and t = T/P its shard:
//   ring     forward (P-1) t 2 Hkv D s            backward (2P-1) t 2 Hkv D s (K/V ahead
//            P-1 times, dK/dV behind P-1 times and home once)
//   Ulysses  forward (P-1)/P t (2 Hq + 2 Hkv) D s  backward (P-1)/P t (4 Hq + 4 Hkv) D s
//            (q, k, v, out there; q, k, v, out, dout there and dq, dk, dv back; lse is small)
// With Hq == Hkv Ulysses moves the same bytes as the ring's forward at P = 2 (2/3 of its
// backward's) and a fraction ~2/P for P > 2, but its transfers are not hidden behind computation
// (measured in BENCHMARKS.md) and it needs P | Hkv;
// with GQA (Hkv << Hq) the ring moves fewer bytes. choose_sequence_parallel() encodes this.
//
// All entry points are collective: every rank of `comm` calls them, in the same order.
#pragma once

#include <mpi.h>

#include <cstdint>

#include "attn/attention.h"
#include "attn/dist/ring_attention.h"
#include "attn/tensor.h"

namespace attn::dist {

// Measured on this rank (for benchmarks): seconds in all-to-alls (including the packing), seconds
// in attn's kernels, bytes sent to other ranks, and the whole call.
struct UlyssesStats {
  double all_to_all_s = 0.0;
  double compute_s = 0.0;
  int64_t bytes_sent = 0;
  double total_s = 0.0;
};

// Forward: out [B, Hq, Tq_local, Dv] and lse [B, Hq, Tq_local], equal to the matching rows of
// attn::attention on the gathered tensors. options.layout is the sharding of q, k and v.
AttentionOutput ulysses_attention(const Tensor& q, const Tensor& k, const Tensor& v,
                                  const AttentionParams& params, MPI_Comm comm,
                                  const RingOptions& options = {}, UlyssesStats* stats = nullptr);

// Backward: `forward` is what ulysses_attention (or ring_attention) returned on this rank, dout
// this rank's rows of the loss gradient. dq, dk, dv are this rank's shards; dscore the full
// parameter gradient (summed over ranks in float64), the same on every rank.
AttentionGrads ulysses_attention_backward(const Tensor& q, const Tensor& k, const Tensor& v,
                                          const AttentionParams& params,
                                          const AttentionOutput& forward, const Tensor& dout,
                                          MPI_Comm comm, const RingOptions& options = {},
                                          UlyssesStats* stats = nullptr);

enum class SequenceParallel { ring, ulysses };

// Which of the two to use for these head counts on `ranks` ranks: Ulysses when it can shard the
// call (both head counts divisible by the ranks, no head_scores / allowed / bias / dropout /
// return_weights) and it moves no more bytes than the ring (Hq + Hkv <= P Hkv); otherwise the
// ring. Also Ulysses when the ring cannot take the call at all but Ulysses can (location scores,
// bottom_right windows or ALiBi, Luong local attention). The same answer on every rank when
// given the same arguments.
SequenceParallel choose_sequence_parallel(int64_t Hq, int64_t Hkv, int ranks,
                                          const AttentionParams& params);

}  // namespace attn::dist
