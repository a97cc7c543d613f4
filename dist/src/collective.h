// Internal to attn::dist (not installed): what ring_attention.cpp and ulysses_attention.cpp
// share — the collective agreement on errors, a private communicator, the cross-rank signature
// check and the global plan of shard lengths.
#pragma once

#include <mpi.h>

#include <climits>
#include <cstdint>
#include <functional>
#include <string>
#include <type_traits>
#include <variant>
#include <vector>

#include "attn/attention.h"
#include "attn/dist/ring_attention.h"
#include "attn/tensor.h"

namespace attn::dist::detail {

// ---------------------------------------------------------------------------------------------
// Collective error agreement: every rank learns the first failing rank's message and throws it.

inline void agree(MPI_Comm comm, const char* op, const std::string& local_error) {
  int rank = 0, size = 1;
  MPI_Comm_rank(comm, &rank);
  MPI_Comm_size(comm, &size);
  int mine = local_error.empty() ? size : rank, first = size;
  MPI_Allreduce(&mine, &first, 1, MPI_INT, MPI_MIN, comm);
  if (first == size) return;
  std::string message = local_error;
  int length = static_cast<int>(message.size());
  MPI_Bcast(&length, 1, MPI_INT, first, comm);
  message.resize(static_cast<std::size_t>(length));
  MPI_Bcast(message.data(), length, MPI_CHAR, first, comm);
  throw Error(op, (size > 1 ? "rank " + std::to_string(first) + ": " : std::string()) + message);
}

// A private duplicate of the caller's communicator, so that the ring's messages never match the
// caller's own.
class Comm {
 public:
  explicit Comm(MPI_Comm parent) {
    MPI_Comm_dup(parent, &comm_);
    MPI_Comm_rank(comm_, &rank_);
    MPI_Comm_size(comm_, &size_);
  }
  ~Comm() { MPI_Comm_free(&comm_); }
  Comm(const Comm&) = delete;
  Comm& operator=(const Comm&) = delete;
  MPI_Comm get() const { return comm_; }
  int rank() const { return rank_; }
  int size() const { return size_; }
  int next() const { return (rank_ + 1) % size_; }
  int prev() const { return (rank_ + size_ - 1) % size_; }

 private:
  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0, size_ = 1;
};

inline uint64_t fnv(uint64_t h, const void* data, std::size_t bytes) {
  const auto* p = static_cast<const unsigned char*>(data);
  for (std::size_t i = 0; i < bytes; ++i) h = (h ^ p[i]) * 1099511628211ull;
  return h;
}
inline uint64_t fnv_tensor(uint64_t h, const Tensor& t) {
  if (!t.defined()) return fnv(h, "undef", 5);
  const Tensor c = t.contiguous();
  for (int64_t d : c.shape()) h = fnv(h, &d, sizeof d);
  return fnv(h, c.raw_data(), static_cast<std::size_t>(c.numel()) * dtype_size(c.dtype()));
}

// The tensors of a score (parameters, or their gradients).
inline std::vector<Tensor*> score_tensors(Score& score) {
  return std::visit(
      [](auto& s) -> std::vector<Tensor*> {
        using S = std::decay_t<decltype(s)>;
        if constexpr (std::is_same_v<S, GeneralScore>) return {&s.weight, &s.u, &s.v};
        else if constexpr (std::is_same_v<S, AdditiveScore>) return {&s.w_query, &s.w_key, &s.bias, &s.v};
        else if constexpr (std::is_same_v<S, ConcatScore>) return {&s.weight, &s.v};
        else if constexpr (std::is_same_v<S, CosineScore>) return {&s.tau};
        else if constexpr (std::is_same_v<S, LocationScore>) return {&s.weight};
        else if constexpr (std::is_same_v<S, TrilinearScore>) return {&s.weight};
        else return {};
      },
      score);
}
// Everything that must agree across ranks, as integers.
inline std::vector<int64_t> signature(const Tensor& q, const Tensor& k, const Tensor& v,
                               const AttentionParams& p, Layout layout) {
  uint64_t h = 1469598103934665603ull;
  const Mask& m = p.mask;
  h = fnv(h, m.key_lengths.data(), m.key_lengths.size() * sizeof(int64_t));
  h = fnv(h, "|", 1);
  h = fnv(h, m.query_lengths.data(), m.query_lengths.size() * sizeof(int64_t));
  Score score = p.score;
  for (Tensor* t : score_tensors(score)) h = fnv_tensor(h, *t);
  if (const auto* s = std::get_if<ScaledDotScore>(&p.score); s && s->scale) h = fnv(h, &*s->scale, 8);
  if (const auto* s = std::get_if<CosineScore>(&p.score)) h = fnv(h, &s->eps, 8);
  return {q.size(0), q.size(1), k.size(1), q.size(3), k.size(3), v.size(3),
          static_cast<int64_t>(q.dtype()), static_cast<int64_t>(k.dtype()),
          static_cast<int64_t>(v.dtype()), static_cast<int64_t>(p.score.index()),
          m.causal ? 1 : 0, static_cast<int64_t>(m.alignment), static_cast<int64_t>(layout),
          static_cast<int64_t>(m.key_lengths.size()), static_cast<int64_t>(m.query_lengths.size()),
          static_cast<int64_t>(h & 0x7fffffffffffffffull)};
}

inline const char* const kSignatureNames[] = {"batch", "query heads", "key/value heads", "query features",
                                 "key features", "value features", "q dtype", "k dtype",
                                 "v dtype", "score", "causal", "alignment", "layout",
                                 "key_lengths size", "query_lengths size",
                                 "key/query lengths or score parameters"};

// The global picture, the same on every rank once validated.
struct Plan {
  int P = 1, rank = 0;
  Layout layout = Layout::zigzag;
  std::vector<int64_t> tq, tk;  // per-rank shard lengths
  int64_t Tq = 0, Tk = 0;       // global lengths
  std::vector<Range> q_ranges(int r) const { return ranges(tq, Tq, r); }
  std::vector<Range> k_ranges(int r) const { return ranges(tk, Tk, r); }

 private:
  std::vector<Range> ranges(const std::vector<int64_t>& lens, int64_t total, int r) const {
    if (layout == Layout::zigzag) return shard_ranges(total, P, r, layout);
    int64_t start = 0;
    for (int i = 0; i < r; ++i) start += lens[static_cast<std::size_t>(i)];
    return {Range{start, 0, lens[static_cast<std::size_t>(r)]}};
  }
};

// Collective validation: local checks, then agreement of every rank's shapes and parameters.
// `local_checks` runs once q, k and v are known to be 4-d; it returns this rank's error or "".
inline Plan validate(const char* op, const Comm& comm, const Tensor& q, const Tensor& k,
                     const Tensor& v, const AttentionParams& params, Layout layout,
                     const std::function<std::string()>& local_checks) {
  std::string error;
  if (!q.defined() || !k.defined() || !v.defined() || q.dim() != 4 || k.dim() != 4 ||
      v.dim() != 4)
    error = "q, k and v must be defined [B, H, T, D] tensors";
  else
    error = local_checks();
  agree(comm.get(), op, error);

  std::vector<int64_t> sig = signature(q, k, v, params, layout);
  sig.push_back(q.size(2));
  sig.push_back(k.size(2));
  const std::size_t n = sig.size();
  std::vector<int64_t> all(n * static_cast<std::size_t>(comm.size()));
  MPI_Allgather(sig.data(), static_cast<int>(n), MPI_INT64_T, all.data(), static_cast<int>(n),
                MPI_INT64_T, comm.get());
  Plan plan;
  plan.P = comm.size();
  plan.rank = comm.rank();
  plan.layout = layout;
  // The same verdict on every rank: all ranks look at the same gathered numbers.
  std::string verdict;
  for (int r = 1; r < plan.P && verdict.empty(); ++r)
    for (std::size_t i = 0; i + 2 < n && verdict.empty(); ++i)
      if (all[r * n + i] != all[i])
        verdict = std::string(kSignatureNames[i]) + " differ between rank 0 and rank " +
                  std::to_string(r);
  for (int r = 0; r < plan.P; ++r) {
    plan.tq.push_back(all[r * n + n - 2]);
    plan.tk.push_back(all[r * n + n - 1]);
    plan.Tq += plan.tq.back();
    plan.Tk += plan.tk.back();
  }
  if (verdict.empty() && layout == Layout::zigzag) {
    for (int r = 0; r < plan.P && verdict.empty(); ++r) {
      int64_t want_q = 0, want_k = 0;
      for (const Range& g : shard_ranges(plan.Tq, plan.P, r, layout)) want_q += g.length;
      for (const Range& g : shard_ranges(plan.Tk, plan.P, r, layout)) want_k += g.length;
      if (plan.tq[r] != want_q || plan.tk[r] != want_k)
        verdict = "zigzag shards: rank " + std::to_string(r) + " holds " +
                  std::to_string(plan.tq[r]) + " queries and " + std::to_string(plan.tk[r]) +
                  " keys; global lengths " + std::to_string(plan.Tq) + " and " +
                  std::to_string(plan.Tk) + " over " + std::to_string(plan.P) +
                  " ranks give it " + std::to_string(want_q) + " and " + std::to_string(want_k);
    }
  }
  if (!verdict.empty()) throw Error(op, verdict);
  return plan;
}

inline Tensor wrap_bytes(std::byte* p, DType dtype, const Shape& shape) {
  switch (dtype) {
    case DType::f32: return Tensor::wrap(reinterpret_cast<float*>(p), shape);
    case DType::f64: return Tensor::wrap(reinterpret_cast<double*>(p), shape);
    case DType::bf16: return Tensor::wrap(reinterpret_cast<BFloat16*>(p), shape);
    case DType::b8: return Tensor::wrap(reinterpret_cast<bool*>(p), shape);
  }
  return {};
}

inline int count_of(int64_t bytes, const char* op) {
  ATTN_CHECK(bytes <= INT_MAX, op, "a block of ", bytes, " bytes is more than one MPI message "
             "carries (2^31 - 1); use more ranks");
  return static_cast<int>(bytes);
}

// The shapes the backward needs of `forward` and dout (this rank's rows), or "".
inline std::string forward_shape_error(const Tensor& q, const Tensor& v,
                                       const AttentionOutput& forward, const Tensor& dout) {
  if (!q.defined() || q.dim() != 4 || !v.defined() || v.dim() != 4) return "";
  const Shape out_shape{q.size(0), q.size(1), q.size(2), v.size(3)};
  const Shape lse_shape{q.size(0), q.size(1), q.size(2)};
  if (!forward.out.defined() || forward.out.shape() != out_shape || !forward.lse.defined() ||
      forward.lse.shape() != lse_shape || !dout.defined() || dout.shape() != out_shape)
    return "forward.out and dout must be " + shape_str(out_shape) + " and forward.lse " +
           shape_str(lse_shape) + " (this rank's rows)";
  return "";
}

}  // namespace attn::dist::detail
