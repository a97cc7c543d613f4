// All-to-all attention over heads (DeepSpeed-Ulysses): see attn/dist/ulysses_attention.h.
#include "attn/dist/ulysses_attention.h"

#include <cstddef>
#include <functional>
#include <string>
#include <variant>
#include <vector>

#include "collective.h"

namespace attn::dist {
using namespace detail;
namespace {

// What Ulysses cannot take, or "" (the rest is checked by attn::attention on the whole sequence).
std::string ulysses_unsupported(const AttentionParams& p) {
  if (!p.head_scores.empty()) return "head_scores are not supported";
  if (p.mask.allowed.defined()) return "boolean 'allowed' masks are not supported";
  if (p.mask.bias.defined()) return "additive biases are not supported";
  if (p.dropout.p > 0.0) return "dropout is not supported";
  if (p.return_weights) return "return_weights is not supported (the weights span all ranks)";
  return "";
}

std::function<std::string()> ulysses_checks(const Tensor& q, const Tensor& k, const Tensor& v,
                                            const AttentionParams& params, int P) {
  return [&q, &k, &v, &params, P]() -> std::string {
    std::string error = ulysses_unsupported(params);
    if (!error.empty()) return error;
    // What the all-to-alls rely on before attn::attention checks the rest on the whole sequence.
    if (k.size(0) != q.size(0) || v.size(0) != q.size(0) || v.size(1) != k.size(1) ||
        v.size(2) != k.size(2) || k.size(1) == 0 || q.size(1) % k.size(1) != 0)
      return "q " + shape_str(q.shape()) + ", k " + shape_str(k.shape()) + " and v " +
             shape_str(v.shape()) + " need one batch, k and v the same heads and length, and the "
             "query heads a multiple of the key/value heads";
    if (q.size(1) % P != 0 || k.size(1) % P != 0)
      return "Ulysses splits the heads over the ranks: " + std::to_string(q.size(1)) +
             " query heads and " + std::to_string(k.size(1)) + " key/value heads do not divide by " +
             std::to_string(P) + " ranks (use ring_attention)";
    if (!params.mask.alibi_slopes.empty() &&
        static_cast<int64_t>(params.mask.alibi_slopes.size()) != q.size(1))
      return "alibi_slopes has " + std::to_string(params.mask.alibi_slopes.size()) +
             " entries for " + std::to_string(q.size(1)) + " query heads";
    return "";
  };
}

std::vector<int> byte_displacements(const std::vector<int>& counts, const char* op) {
  std::vector<int> displs(counts.size());
  int64_t total = 0;
  for (std::size_t i = 0; i < counts.size(); ++i) {
    displs[i] = count_of(total, op);
    total += counts[i];
  }
  return displs;
}

int64_t sent_elsewhere(const std::vector<int>& counts, int rank) {
  int64_t bytes = 0;
  for (std::size_t i = 0; i < counts.size(); ++i)
    if (static_cast<int>(i) != rank) bytes += counts[i];
  return bytes;
}

// The runs of every rank's shard of a sequence (per-rank lengths `lens`).
using RunsOf = std::vector<Range> (Plan::*)(int) const;

// This rank's sequence shard [B, H, t, F] -> [B, H/P, T, F]: heads [s H/P, (s+1) H/P) go to rank
// s, and each rank's rows land at their global positions (`runs`: q_ranges or k_ranges).
Tensor to_heads(const Tensor& local, const Plan& plan, RunsOf runs, const std::vector<int64_t>& lens,
                int64_t T, const Comm& comm, const char* op, UlyssesStats& stats) {
  const double t0 = MPI_Wtime();
  const int P = plan.P;
  const int64_t B = local.size(0), h = local.size(1) / P, t = local.size(2), F = local.size(3);
  const int64_t es = static_cast<int64_t>(dtype_size(local.dtype()));
  std::vector<int> send_counts(static_cast<std::size_t>(P)), recv_counts(send_counts.size());
  for (int r = 0; r < P; ++r) {
    send_counts[r] = count_of(B * h * t * F * es, op);
    recv_counts[r] = count_of(B * h * lens[r] * F * es, op);
  }
  const std::vector<int> send_displs = byte_displacements(send_counts, op),
                         recv_displs = byte_displacements(recv_counts, op);
  std::vector<std::byte> send(static_cast<std::size_t>(B * h * t * F * es * P));
  for (int s = 0; s < P; ++s)
    wrap_bytes(send.data() + send_displs[s], local.dtype(), {B, h, t, F})
        .copy_from(local.slice(1, s * h, (s + 1) * h));
  std::vector<std::byte> recv(static_cast<std::size_t>(B * h * T * F * es));
  MPI_Alltoallv(send.data(), send_counts.data(), send_displs.data(), MPI_BYTE, recv.data(),
                recv_counts.data(), recv_displs.data(), MPI_BYTE, comm.get());
  Tensor full = Tensor::empty({B, h, T, F}, local.dtype());
  for (int r = 0; r < P; ++r) {
    const Tensor part = wrap_bytes(recv.data() + recv_displs[r], local.dtype(), {B, h, lens[r], F});
    for (const Range& run : (plan.*runs)(r))
      if (run.length > 0)
        full.slice(2, run.global_start, run.global_start + run.length)
            .copy_from(part.slice(2, run.local_start, run.local_start + run.length));
  }
  stats.bytes_sent += sent_elsewhere(send_counts, plan.rank);
  stats.all_to_all_s += MPI_Wtime() - t0;
  return full;
}

// The inverse: this rank's heads [B, h, T, F] of the whole sequence -> its sequence shard
// [B, h P, t, F] (rank r gets the rows of its runs, for every rank's heads).
Tensor to_sequence(const Tensor& heads, const Plan& plan, RunsOf runs,
                   const std::vector<int64_t>& lens, const Comm& comm, const char* op,
                   UlyssesStats& stats) {
  const double t0 = MPI_Wtime();
  const int P = plan.P;
  const int64_t B = heads.size(0), h = heads.size(1), F = heads.size(3);
  const int64_t t = lens[static_cast<std::size_t>(plan.rank)];
  const int64_t es = static_cast<int64_t>(dtype_size(heads.dtype()));
  std::vector<int> send_counts(static_cast<std::size_t>(P)), recv_counts(send_counts.size());
  for (int r = 0; r < P; ++r) {
    send_counts[r] = count_of(B * h * lens[r] * F * es, op);
    recv_counts[r] = count_of(B * h * t * F * es, op);
  }
  const std::vector<int> send_displs = byte_displacements(send_counts, op),
                         recv_displs = byte_displacements(recv_counts, op);
  std::vector<std::byte> send(static_cast<std::size_t>(B * h * heads.size(2) * F * es));
  for (int r = 0; r < P; ++r) {
    const Tensor part = wrap_bytes(send.data() + send_displs[r], heads.dtype(), {B, h, lens[r], F});
    for (const Range& run : (plan.*runs)(r))
      if (run.length > 0)
        part.slice(2, run.local_start, run.local_start + run.length)
            .copy_from(heads.slice(2, run.global_start, run.global_start + run.length));
  }
  std::vector<std::byte> recv(static_cast<std::size_t>(B * h * t * F * es * P));
  MPI_Alltoallv(send.data(), send_counts.data(), send_displs.data(), MPI_BYTE, recv.data(),
                recv_counts.data(), recv_displs.data(), MPI_BYTE, comm.get());
  Tensor local = Tensor::empty({B, h * P, t, F}, heads.dtype());
  for (int s = 0; s < P; ++s)
    local.slice(1, s * h, (s + 1) * h)
        .copy_from(wrap_bytes(recv.data() + recv_displs[s], heads.dtype(), {B, h, t, F}));
  stats.bytes_sent += sent_elsewhere(send_counts, plan.rank);
  stats.all_to_all_s += MPI_Wtime() - t0;
  return local;
}

// q, k and v to head sharding.
struct HeadInputs {
  Tensor q, k, v;
};
HeadInputs inputs_to_heads(const Tensor& q, const Tensor& k, const Tensor& v, const Plan& plan,
                           const Comm& comm, const char* op, UlyssesStats& stats) {
  return {to_heads(q, plan, &Plan::q_ranges, plan.tq, plan.Tq, comm, op, stats),
          to_heads(k, plan, &Plan::k_ranges, plan.tk, plan.Tk, comm, op, stats),
          to_heads(v, plan, &Plan::k_ranges, plan.tk, plan.Tk, comm, op, stats)};
}

// lse [B, H, t] travels as [B, H, t, 1].
Tensor lse_to_heads(const Tensor& lse, const Plan& plan, const Comm& comm, const char* op,
                    UlyssesStats& stats) {
  const Tensor full = to_heads(lse.unsqueeze(3), plan, &Plan::q_ranges, plan.tq, plan.Tq, comm,
                               op, stats);
  return full.reshape({full.size(0), full.size(1), full.size(2)});
}

// The parameters of this rank's heads: ALiBi slopes of its query heads; the rest is per call.
AttentionParams head_params(const AttentionParams& params, int64_t Hq, const Plan& plan) {
  AttentionParams p = params;
  if (!p.mask.alibi_slopes.empty()) {
    const int64_t h = Hq / plan.P;
    p.mask.alibi_slopes.assign(params.mask.alibi_slopes.begin() + plan.rank * h,
                               params.mask.alibi_slopes.begin() + (plan.rank + 1) * h);
  }
  return p;
}

// Sums parameter gradients over the ranks (each rank's covers its heads), in float64: the score's
// and those of Luong local-p (w_p, v_p).
void sum_over_ranks(Score& dscore, LocalAttention& dlocal, const Comm& comm) {
  std::vector<Tensor*> tensors = score_tensors(dscore);
  tensors.push_back(&dlocal.w_p);
  tensors.push_back(&dlocal.v_p);
  for (Tensor* t : tensors) {
    if (!t->defined()) continue;
    std::vector<double> values = t->to_vector();
    MPI_Allreduce(MPI_IN_PLACE, values.data(), static_cast<int>(values.size()), MPI_DOUBLE,
                  MPI_SUM, comm.get());
    *t = Tensor::from(values, t->shape()).to(t->dtype());
  }
}

}  // namespace

AttentionOutput ulysses_attention(const Tensor& q, const Tensor& k, const Tensor& v,
                                  const AttentionParams& params, MPI_Comm parent,
                                  const RingOptions& options, UlyssesStats* stats) {
  const char* op = "ulysses_attention";
  const double t_begin = MPI_Wtime();
  const Comm comm(parent);
  const Plan plan = validate(op, comm, q, k, v, params, options.layout,
                             ulysses_checks(q, k, v, params, comm.size()));
  UlyssesStats local_stats;
  const auto [qh, kh, vh] = inputs_to_heads(q, k, v, plan, comm, op, local_stats);
  const double t0 = MPI_Wtime();
  AttentionOutput heads;
  std::string error;
  try {
    heads = attention(qh, kh, vh, head_params(params, q.size(1), plan));
  } catch (const Error& e) {
    error = e.what();
  }
  local_stats.compute_s += MPI_Wtime() - t0;
  agree(comm.get(), op, error);
  AttentionOutput result;
  result.out = to_sequence(heads.out, plan, &Plan::q_ranges, plan.tq, comm, op, local_stats);
  const Tensor lse = to_sequence(heads.lse.unsqueeze(3), plan, &Plan::q_ranges, plan.tq, comm, op,
                                 local_stats);
  result.lse = lse.reshape({lse.size(0), lse.size(1), lse.size(2)});
  local_stats.total_s = MPI_Wtime() - t_begin;
  if (stats) *stats = local_stats;
  return result;
}

AttentionGrads ulysses_attention_backward(const Tensor& q, const Tensor& k, const Tensor& v,
                                          const AttentionParams& params,
                                          const AttentionOutput& forward, const Tensor& dout,
                                          MPI_Comm parent, const RingOptions& options,
                                          UlyssesStats* stats) {
  const char* op = "ulysses_attention_backward";
  const double t_begin = MPI_Wtime();
  const Comm comm(parent);
  agree(comm.get(), op, forward_shape_error(q, v, forward, dout));
  const Plan plan = validate(op, comm, q, k, v, params, options.layout,
                             ulysses_checks(q, k, v, params, comm.size()));
  UlyssesStats local_stats;
  const auto [qh, kh, vh] = inputs_to_heads(q, k, v, plan, comm, op, local_stats);
  AttentionOutput fh;
  fh.out = to_heads(forward.out, plan, &Plan::q_ranges, plan.tq, plan.Tq, comm, op, local_stats);
  fh.lse = lse_to_heads(forward.lse, plan, comm, op, local_stats);
  const Tensor gh = to_heads(dout, plan, &Plan::q_ranges, plan.tq, plan.Tq, comm, op, local_stats);
  const double t0 = MPI_Wtime();
  AttentionGrads heads;
  std::string error;
  try {
    heads = attention_backward(qh, kh, vh, head_params(params, q.size(1), plan), fh, gh);
  } catch (const Error& e) {
    error = e.what();
  }
  local_stats.compute_s += MPI_Wtime() - t0;
  agree(comm.get(), op, error);
  AttentionGrads grads;
  grads.dq = to_sequence(heads.dq, plan, &Plan::q_ranges, plan.tq, comm, op, local_stats);
  grads.dk = to_sequence(heads.dk, plan, &Plan::k_ranges, plan.tk, comm, op, local_stats);
  grads.dv = to_sequence(heads.dv, plan, &Plan::k_ranges, plan.tk, comm, op, local_stats);
  grads.dscore = heads.dscore;
  grads.dlocal = heads.dlocal;
  sum_over_ranks(grads.dscore, grads.dlocal, comm);
  local_stats.total_s = MPI_Wtime() - t_begin;
  if (stats) *stats = local_stats;
  return grads;
}

SequenceParallel choose_sequence_parallel(int64_t Hq, int64_t Hkv, int ranks,
                                          const AttentionParams& params) {
  if (ranks < 1 || Hq % ranks != 0 || Hkv % ranks != 0 || !ulysses_unsupported(params).empty())
    return SequenceParallel::ring;
  const Mask& m = params.mask;
  const bool ring_cannot = std::holds_alternative<LocationScore>(params.score) ||
                           m.local.kind != LocalKind::none ||
                           ((m.window || !m.alibi_slopes.empty()) &&
                            m.alignment == Alignment::bottom_right);
  if (ring_cannot) return SequenceParallel::ulysses;
  return Hq + Hkv <= static_cast<int64_t>(ranks) * Hkv ? SequenceParallel::ulysses
                                                       : SequenceParallel::ring;
}

}  // namespace attn::dist
