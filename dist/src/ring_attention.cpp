// Ring attention over MPI: see attn/dist/ring_attention.h for the contract.
#include "attn/dist/ring_attention.h"

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <variant>

#include "collective.h"

namespace attn::dist {
using namespace detail;
namespace {

constexpr double kNegInf = -std::numeric_limits<double>::infinity();
// attn::attention takes its fused kernels (which honour a given lse in the backward) from this
// many query rows on; shorter query runs are padded with hidden rows in the backward.
constexpr int64_t kMinFusedRows = 16;


// What cannot be sharded, or "" when the call can be.
std::string unsupported(const AttentionParams& p, bool backward, DType qdtype) {
  const Mask& m = p.mask;
  if (std::holds_alternative<LocationScore>(p.score))
    return "location scores have a parameter per key position and cannot be sharded";
  if (!p.head_scores.empty()) return "head_scores are not supported";
  if ((m.window || !m.alibi_slopes.empty()) && m.alignment == Alignment::bottom_right)
    return "windows and ALiBi are sharded over global positions with Alignment::top_left only";
  if (m.allowed.defined()) return "boolean 'allowed' masks are not supported";
  if (m.bias.defined()) return "additive biases are not supported";
  if (m.local.kind != LocalKind::none) return "Luong local attention is not supported";
  if (p.dropout.p > 0.0) return "dropout is not supported";
  if (p.return_weights) return "return_weights is not supported (the weights span all ranks)";
  if (m.causal && m.alignment == Alignment::bottom_right &&
      (!m.key_lengths.empty() || !m.query_lengths.empty()))
    return "causal with Alignment::bottom_right and lengths is not supported (use top_left)";
  if (backward && qdtype == DType::f64)
    return "the float64 backward is not supported (attn's float64 backward renormalises per "
           "call and cannot take the global lse); use float32";
  return "";
}

// This rank's checks before the collective validation: what the ring cannot shard, causal
// shards that are not self-attention, and attn's own checks of shapes and score parameters on one
// query against one key (the lengths are the global ones, so they are left out there).
std::function<std::string()> ring_checks(const Tensor& q, const Tensor& k, const Tensor& v,
                                         const AttentionParams& params, bool backward) {
  return [&q, &k, &v, &params, backward]() -> std::string {
    std::string error = unsupported(params, backward, q.dtype());
    if (error.empty() && params.mask.causal && q.size(2) != k.size(2))
      error = "causal ring attention is self-attention: this rank holds " +
              std::to_string(q.size(2)) + " queries and " + std::to_string(k.size(2)) + " keys";
    if (!error.empty()) return error;
    try {
      AttentionParams one = params;
      one.mask.key_lengths.clear();
      one.mask.query_lengths.clear();
      one.mask.causal = false;
      const int64_t nq = std::min<int64_t>(q.size(2), 1), nk = std::min<int64_t>(k.size(2), 1);
      (void)attention(q.slice(2, 0, nq), k.slice(2, 0, nk), v.slice(2, 0, nk), one);
      for (const auto* lengths : {&params.mask.key_lengths, &params.mask.query_lengths})
        if (!lengths->empty() && static_cast<int64_t>(lengths->size()) != q.size(0))
          return "key_lengths and query_lengths need one entry per batch entry";
    } catch (const Error& e) {
      return e.what();
    }
    return "";
  };
}

// ---------------------------------------------------------------------------------------------
// Blocks: K and V of one rank packed into one byte buffer, so one message carries both.


// Two tensors [B, H, T, D1] and [B, H, T, D2] of rank-dependent T in one buffer.
struct PairLayout {
  int64_t B = 0, H = 0, D1 = 0, D2 = 0;
  DType t1 = DType::f32, t2 = DType::f32;
  int64_t bytes(int64_t T) const {
    return B * H * T * (D1 * static_cast<int64_t>(dtype_size(t1)) +
                        D2 * static_cast<int64_t>(dtype_size(t2)));
  }
  std::pair<Tensor, Tensor> view(std::vector<std::byte>& buf, int64_t T) const {
    std::byte* p = buf.data();
    Tensor a = wrap_bytes(p, t1, {B, H, T, D1});
    Tensor b = wrap_bytes(p + B * H * T * D1 * static_cast<int64_t>(dtype_size(t1)), t2,
                          {B, H, T, D2});
    return {a, b};
  }
};

// The relation of a query run and a key run under the mask.
enum class Visibility { none, full, diagonal };
Visibility visibility(const Range& qr, const Range& kr, bool causal) {
  if (qr.length == 0 || kr.length == 0) return Visibility::none;
  if (!causal) return Visibility::full;
  if (kr.global_start + kr.length - 1 <= qr.global_start) return Visibility::full;
  if (kr.global_start > qr.global_start + qr.length - 1) return Visibility::none;
  return Visibility::diagonal;  // the same run: q and k are cut alike under a causal mask
}

std::vector<int64_t> local_lengths(const std::vector<int64_t>& global, const Range& r) {
  std::vector<int64_t> out;
  bool all = true;
  for (int64_t len : global) {
    out.push_back(std::clamp<int64_t>(len - r.global_start, 0, r.length));
    all = all && out.back() == r.length;
  }
  if (all) out.clear();  // nothing hidden: leave the mask out
  return out;
}

// A window side moved by `by` positions (unbounded stays unbounded).
int64_t shifted(int64_t size, int64_t by) { return size == Window::unbounded ? size : size + by; }

// Whether any key of `kr` lies in the window of any query of `qr` (global positions, top_left:
// query i sees keys j with -left <= j - i <= right).
bool window_reaches(const std::optional<Window>& w, const Range& qr, const Range& kr) {
  if (!w) return true;
  const int64_t lo = kr.global_start - (qr.global_start + qr.length - 1);  // smallest j - i
  const int64_t hi = kr.global_start + kr.length - 1 - qr.global_start;    // largest j - i
  return (w->left == Window::unbounded || hi >= -w->left) &&
         (w->right == Window::unbounded || lo <= w->right);
}

// The window of global positions as a boolean mask of one pair, [1, 1, rows, kr.length]: rows
// past qr.length (padding of the backward) are left visible; they are hidden by query_lengths.
Tensor window_allowed(const Window& w, const Range& qr, const Range& kr, int64_t rows) {
  Tensor allowed = Tensor::empty({1, 1, rows, kr.length}, DType::b8);
  bool* a = allowed.data<bool>();
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < kr.length; ++j) {
      const int64_t d = (kr.global_start + j) - (qr.global_start + i);
      a[i * kr.length + j] = i >= qr.length || ((w.left == Window::unbounded || d >= -w.left) &&
                                                (w.right == Window::unbounded || d <= w.right));
    }
  return allowed;
}

// ALiBi over global positions as the additive bias of one pair, [1, Hq, rows, kr.length]:
// -slope[h] |i - j| with i, j global (float64 values rounded once to the bias dtype).
Tensor alibi_bias(const std::vector<double>& slopes, const Range& qr, const Range& kr, int64_t rows,
                  DType dtype) {
  const int64_t H = static_cast<int64_t>(slopes.size());
  std::vector<double> b(static_cast<std::size_t>(H * rows * kr.length));
  for (int64_t h = 0; h < H; ++h)
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < kr.length; ++j)
        b[(h * rows + i) * kr.length + j] =
            -slopes[h] * static_cast<double>(std::llabs((kr.global_start + j) - (qr.global_start + i)));
  return Tensor::from(b, {1, H, rows, kr.length}).to(dtype);
}

// The parameters of one (query run, key run) pair in the pair's local positions. `rows`: the
// query rows the call gets (the backward pads short runs). Windows and ALiBi are over global
// positions: a window becomes the native window shifted by the runs' offset when both sides stay
// >= 0, else a boolean mask of the pair; ALiBi becomes an additive bias of the pair.
AttentionParams pair_params(const AttentionParams& base, const Range& qr, const Range& kr,
                            Visibility vis, int64_t rows, DType bias_dtype) {
  AttentionParams p = base;
  p.mask.causal = vis == Visibility::diagonal;
  p.mask.alignment = Alignment::top_left;
  p.mask.key_lengths = local_lengths(base.mask.key_lengths, kr);
  p.mask.query_lengths = local_lengths(base.mask.query_lengths, qr);
  if (base.mask.window) {
    const Window& w = *base.mask.window;
    const int64_t delta = qr.global_start - kr.global_start;
    const Window local{shifted(w.left, -delta), shifted(w.right, delta)};
    if (local.left >= 0 && local.right >= 0) {
      p.mask.window = local;
    } else {
      p.mask.window.reset();
      p.mask.allowed = window_allowed(w, qr, kr, rows);
    }
  }
  if (!base.mask.alibi_slopes.empty()) {
    p.mask.alibi_slopes.clear();
    p.mask.bias = alibi_bias(base.mask.alibi_slopes, qr, kr, rows, bias_dtype);
  }
  return p;
}

// The (query run, key run) pairs of one ring step, each visible fully or on its diagonal, in
// slices of at most kSliceRows queries: between slices the ring's transfers are progressed
// (MPI_Testall), since most MPI libraries move a large message only inside MPI calls. A diagonal
// slice of queries [a, b) becomes keys [start, a) fully visible and keys [a, b) on the diagonal.
constexpr int64_t kSliceRows = 256;
std::vector<std::pair<Range, Range>> step_pairs(const std::vector<Range>& q_runs,
                                                const std::vector<Range>& k_runs, bool causal,
                                                const std::optional<Window>& window) {
  std::vector<std::pair<Range, Range>> pairs;
  for (const Range& kr : k_runs) {
    for (const Range& qr : q_runs) {
      const Visibility vis = visibility(qr, kr, causal);
      if (vis == Visibility::none) continue;
      for (int64_t a = 0; a < qr.length; a += kSliceRows) {
        const int64_t b = std::min(qr.length, a + kSliceRows);
        const Range qs{qr.global_start + a, qr.local_start + a, b - a};
        // Pairs wholly outside a window are skipped: a local window computes few blocks.
        auto add = [&](const Range& ks) {
          if (window_reaches(window, qs, ks)) pairs.push_back({qs, ks});
        };
        if (vis == Visibility::full) {
          add(kr);
          continue;
        }
        if (a > 0) add(Range{kr.global_start, kr.local_start, a});
        add(Range{kr.global_start + a, kr.local_start + a, b - a});
      }
    }
  }
  return pairs;
}

void progress(std::vector<MPI_Request>& requests) {
  if (requests.empty()) return;
  int done = 0;
  MPI_Testall(static_cast<int>(requests.size()), requests.data(), &done, MPI_STATUSES_IGNORE);
}

// Running out and lse of this rank's queries, in float64, merged block by block.
struct Accumulator {
  int64_t rows_per_head = 0, D = 0, heads = 0;
  std::vector<double> out, lse;
  Accumulator(int64_t BH, int64_t T, int64_t D_)
      : rows_per_head(T), D(D_), heads(BH), out(static_cast<std::size_t>(BH * T * D_), 0.0),
        lse(static_cast<std::size_t>(BH * T), kNegInf) {}

  template <class T>
  void merge_typed(const Tensor& blk_out, const Tensor& blk_lse, int64_t row0, int64_t rows) {
    const T* o = blk_out.data<T>();
    const T* l = blk_lse.data<T>();
    for (int64_t bh = 0; bh < heads; ++bh) {
      for (int64_t i = 0; i < rows; ++i) {
        const double l2 = static_cast<double>(l[bh * rows + i]);
        if (l2 == kNegInf) continue;  // nothing visible in this block
        const std::size_t row = static_cast<std::size_t>(bh * rows_per_head + row0 + i);
        double* acc = out.data() + row * static_cast<std::size_t>(D);
        const T* src = o + (bh * rows + i) * D;
        const double l1 = lse[row];
        if (l1 == kNegInf) {
          for (int64_t d = 0; d < D; ++d) acc[d] = static_cast<double>(src[d]);
          lse[row] = l2;
          continue;
        }
        const double m = std::max(l1, l2);
        const double total = m + std::log(std::exp(l1 - m) + std::exp(l2 - m));
        const double a = std::exp(l1 - total), b = std::exp(l2 - total);
        for (int64_t d = 0; d < D; ++d) acc[d] = a * acc[d] + b * static_cast<double>(src[d]);
        lse[row] = std::isnan(l2) ? l2 : total;
      }
    }
  }
  void merge(const AttentionOutput& blk, int64_t row0, int64_t rows) {
    const Tensor o = blk.out.contiguous(), l = blk.lse.contiguous();
    if (o.dtype() == DType::f64) merge_typed<double>(o, l, row0, rows);
    else merge_typed<float>(o, l, row0, rows);
  }
};

// dst[rows row0.., all heads] += src (a [B, H, rows, D] tensor), float64 accumulator.
template <class T>
void add_rows_of(std::vector<double>& dst, int64_t rows_per_head, const Tensor& s, int64_t row0) {
  const T* p = s.data<T>();
  const int64_t BH = s.size(0) * s.size(1), rows = s.size(2), D = s.size(3);
  for (int64_t bh = 0; bh < BH; ++bh)
    for (int64_t i = 0; i < rows; ++i) {
      double* d = dst.data() + (bh * rows_per_head + row0 + i) * D;
      const T* x = p + (bh * rows + i) * D;
      for (int64_t c = 0; c < D; ++c) d[c] += static_cast<double>(x[c]);
    }
}

// Adds src [B, H, rows, D] to rows [row0, row0 + rows) of dst (float64, rows_per_head rows per
// head). Float32 is read in place: converting each block's gradient to a float64 tensor first
// (Tensor::to, element by element) cost more than the block's fused backward (perf, BENCHMARKS.md).
void add_rows(std::vector<double>& dst, int64_t rows_per_head, const Tensor& src, int64_t row0) {
  if (src.dtype() == DType::f32) return add_rows_of<float>(dst, rows_per_head, src.contiguous(), row0);
  add_rows_of<double>(dst, rows_per_head, src.to(DType::f64).contiguous(), row0);
}

// A tensor of `dtype` from float64 values, written directly (Tensor::from + to() converted element
// by element through a float64 copy: a sixth of the ring's time in perf).
Tensor from_doubles(const std::vector<double>& values, const Shape& shape, DType dtype) {
  if (dtype != DType::f32 && dtype != DType::f64) return Tensor::from(values, shape).to(dtype);
  Tensor t = Tensor::empty(shape, dtype);
  ATTN_CHECK(t.numel() == static_cast<int64_t>(values.size()), "ring_attention", "internal: ",
             values.size(), " values for ", t.shape_str());
  if (dtype == DType::f64) {
    std::copy(values.begin(), values.end(), t.data<double>());
  } else {
    float* p = t.data<float>();
    for (std::size_t i = 0; i < values.size(); ++i) p[i] = static_cast<float>(values[i]);
  }
  return t;
}

// Rows [start, start + len) of x along dim 2, at least `min_rows` rows: padded with zeros past len.
Tensor rows_padded(const Tensor& x, int64_t start, int64_t len, int64_t min_rows) {
  const Tensor part = x.slice(2, start, start + len);
  if (len >= min_rows) return part;
  Shape shape = x.shape();
  shape[2] = min_rows;
  Tensor padded = Tensor::zeros(shape, x.dtype());
  padded.slice(2, 0, len).copy_from(part);
  return padded;
}
Tensor lse_padded(const Tensor& lse, int64_t start, int64_t len, int64_t min_rows) {
  const Tensor part = lse.slice(2, start, start + len);
  if (len >= min_rows) return part;
  Tensor padded = Tensor::full({lse.size(0), lse.size(1), min_rows}, kNegInf, lse.dtype());
  padded.slice(2, 0, len).copy_from(part);
  return padded;
}

void wait_all(std::vector<MPI_Request>& requests) {
  if (requests.empty()) return;
  MPI_Waitall(static_cast<int>(requests.size()), requests.data(), MPI_STATUSES_IGNORE);
  requests.clear();
}

// One ring transfer: `recv_bytes` from the previous rank into `recv`, `send_bytes` of `send` to
// the next rank, both non-blocking. Returns the bytes sent.
int64_t exchange(std::vector<MPI_Request>& requests, const Comm& comm, std::vector<std::byte>& recv,
                 int64_t recv_bytes, std::vector<std::byte>& send, int64_t send_bytes, int tag,
                 const char* op) {
  requests.resize(2);
  MPI_Irecv(recv.data(), count_of(recv_bytes, op), MPI_BYTE, comm.prev(), tag, comm.get(),
            &requests[0]);
  MPI_Isend(send.data(), count_of(send_bytes, op), MPI_BYTE, comm.next(), tag, comm.get(),
            &requests[1]);
  return send_bytes;
}

// The end of a step: waits for the next block, records the step.
void finish_step(std::vector<MPI_Request>& requests, RingStepStats step, double compute_s,
                 RingStats* stats) {
  const double t = MPI_Wtime();
  wait_all(requests);
  step.compute_s = compute_s;
  step.wait_s += MPI_Wtime() - t;
  if (stats) stats->steps.push_back(step);
}

DType result_dtype(DType q) { return q == DType::bf16 ? DType::f32 : q; }

}  // namespace

// ---------------------------------------------------------------------------------------------

std::vector<Range> shard_ranges(int64_t length, int ranks, int rank, Layout layout) {
  ATTN_CHECK(ranks >= 1 && rank >= 0 && rank < ranks && length >= 0, "shard_ranges",
             "rank ", rank, " of ", ranks, " ranks, length ", length);
  auto piece = [](int64_t total, int64_t parts, int64_t i) {
    const int64_t base = total / parts, extra = total % parts;
    return std::pair<int64_t, int64_t>{i * base + std::min(i, extra), base + (i < extra ? 1 : 0)};
  };
  if (layout == Layout::contiguous) {
    const auto [start, len] = piece(length, ranks, rank);
    return {Range{start, 0, len}};
  }
  const auto [s0, l0] = piece(length, 2 * ranks, rank);
  const auto [s1, l1] = piece(length, 2 * ranks, 2 * ranks - 1 - rank);
  return {Range{s0, 0, l0}, Range{s1, l0, l1}};
}

Tensor shard_sequence(const Tensor& full, int64_t dim, int ranks, int rank, Layout layout) {
  const std::vector<Range> runs = shard_ranges(full.size(dim), ranks, rank, layout);
  Shape shape = full.shape();
  int64_t total = 0;
  for (const Range& r : runs) total += r.length;
  shape[static_cast<std::size_t>(dim < 0 ? dim + full.dim() : dim)] = total;
  Tensor out = Tensor::empty(shape, full.dtype());
  for (const Range& r : runs)
    if (r.length > 0)
      out.slice(dim, r.local_start, r.local_start + r.length)
          .copy_from(full.slice(dim, r.global_start, r.global_start + r.length));
  return out;
}

Tensor gather_sequence(const Tensor& local, int64_t dim, Layout layout, MPI_Comm comm) {
  int P = 1;
  MPI_Comm_size(comm, &P);
  if (dim < 0) dim += local.dim();
  // Move `dim` to the front so that every shard is one contiguous run of bytes.
  const Tensor front = local.transpose(0, dim).contiguous();
  int64_t row_bytes = static_cast<int64_t>(dtype_size(local.dtype()));
  for (int64_t d = 1; d < front.dim(); ++d) row_bytes *= front.size(d);
  int64_t mine = local.size(dim);
  std::vector<int64_t> lens(static_cast<std::size_t>(P));
  MPI_Allgather(&mine, 1, MPI_INT64_T, lens.data(), 1, MPI_INT64_T, comm);
  std::vector<int> counts(static_cast<std::size_t>(P)), displs(static_cast<std::size_t>(P));
  int64_t total = 0;
  for (int r = 0; r < P; ++r) {
    counts[r] = count_of(lens[r] * row_bytes, "gather_sequence");
    displs[r] = count_of(total * row_bytes, "gather_sequence");
    total += lens[r];
  }
  Shape gathered_shape = front.shape();
  gathered_shape[0] = total;
  Tensor gathered = Tensor::empty(gathered_shape, local.dtype());
  MPI_Allgatherv(front.raw_data(), count_of(mine * row_bytes, "gather_sequence"), MPI_BYTE,
                 gathered.raw_data(), counts.data(), displs.data(), MPI_BYTE, comm);
  // Put each rank's runs where they belong.
  Tensor full = Tensor::empty(gathered_shape, local.dtype());
  int64_t offset = 0;
  for (int r = 0; r < P; ++r) {
    std::vector<Range> runs;
    if (layout == Layout::contiguous) runs = {Range{offset, 0, lens[r]}};
    else runs = shard_ranges(total, P, r, layout);
    for (const Range& run : runs)
      if (run.length > 0)
        full.slice(0, run.global_start, run.global_start + run.length)
            .copy_from(gathered.slice(0, offset + run.local_start,
                                      offset + run.local_start + run.length));
    offset += lens[r];
  }
  return full.transpose(0, dim).contiguous();
}

AttentionOutput ring_attention(const Tensor& q, const Tensor& k, const Tensor& v,
                               const AttentionParams& params, MPI_Comm parent,
                               const RingOptions& options, RingStats* stats) {
  const char* op = "ring_attention";
  const double t_begin = MPI_Wtime();
  const Comm comm(parent);
  const Plan plan = validate(op, comm, q, k, v, params, options.layout, ring_checks(q, k, v, params, false));
  const int64_t B = q.size(0), Hq = q.size(1), Hkv = k.size(1), Dv = v.size(3);
  const PairLayout kv{B, Hkv, k.size(3), Dv, k.dtype(), v.dtype()};
  int64_t max_tk = 0;
  for (int64_t t : plan.tk) max_tk = std::max(max_tk, t);
  std::vector<std::byte> cur(static_cast<std::size_t>(kv.bytes(max_tk))), nxt(cur.size());
  {
    auto [kb, vb] = kv.view(cur, k.size(2));
    kb.copy_from(k);
    vb.copy_from(v);
  }
  const std::vector<Range> my_q = plan.q_ranges(plan.rank);
  Accumulator acc(B * Hq, q.size(2), Dv);
  if (stats) stats->steps.clear();
  std::vector<MPI_Request> reqs;
  for (int s = 0; s < plan.P; ++s) {
    const int src = (plan.rank - s + plan.P) % plan.P;
    const int incoming = (src - 1 + plan.P) % plan.P;
    RingStepStats step;
    if (s + 1 < plan.P)  // the next block travels while this one is computed
      step.bytes_sent = exchange(reqs, comm, nxt, kv.bytes(plan.tk[incoming]), cur,
                                 kv.bytes(plan.tk[src]), s, op);
    const double t0 = MPI_Wtime();
    auto [kb, vb] = kv.view(cur, plan.tk[src]);
    for (const auto& [qr, kr] :
         step_pairs(my_q, plan.k_ranges(src), params.mask.causal, params.mask.window)) {
      const AttentionOutput part = attention(
          q.slice(2, qr.local_start, qr.local_start + qr.length),
          kb.slice(2, kr.local_start, kr.local_start + kr.length),
          vb.slice(2, kr.local_start, kr.local_start + kr.length),
          pair_params(params, qr, kr, visibility(qr, kr, params.mask.causal), qr.length,
                      result_dtype(q.dtype())));
      acc.merge(part, qr.local_start, qr.length);
      progress(reqs);
    }
    finish_step(reqs, step, MPI_Wtime() - t0, stats);
    std::swap(cur, nxt);
  }
  const DType dtype = result_dtype(q.dtype());
  AttentionOutput result;
  result.out = from_doubles(acc.out, {B, Hq, q.size(2), Dv}, dtype);
  result.lse = from_doubles(acc.lse, {B, Hq, q.size(2)}, dtype);
  if (stats) stats->total_s = MPI_Wtime() - t_begin;
  return result;
}

AttentionGrads ring_attention_backward(const Tensor& q, const Tensor& k, const Tensor& v,
                                       const AttentionParams& params,
                                       const AttentionOutput& forward, const Tensor& dout,
                                       MPI_Comm parent, const RingOptions& options,
                                       RingStats* stats) {
  const char* op = "ring_attention_backward";
  const double t_begin = MPI_Wtime();
  const Comm comm(parent);
  agree(comm.get(), op, forward_shape_error(q, v, forward, dout));
  const Plan plan = validate(op, comm, q, k, v, params, options.layout, ring_checks(q, k, v, params, true));
  const int64_t B = q.size(0), Hq = q.size(1), Hkv = k.size(1), Dq = q.size(3), Dk = k.size(3),
                Dv = v.size(3);
  const DType gdtype = result_dtype(q.dtype());  // float32 here (float64 is refused)
  const PairLayout kv{B, Hkv, Dk, Dv, k.dtype(), v.dtype()};
  const PairLayout dkv{B, Hkv, Dk, Dv, gdtype, gdtype};
  int64_t max_tk = 0;
  for (int64_t t : plan.tk) max_tk = std::max(max_tk, t);
  std::vector<std::byte> cur(static_cast<std::size_t>(kv.bytes(max_tk))), nxt(cur.size());
  std::vector<std::byte> dsend(static_cast<std::size_t>(dkv.bytes(max_tk))), drecv(dsend.size());
  {
    auto [kb, vb] = kv.view(cur, k.size(2));
    kb.copy_from(k);
    vb.copy_from(v);
  }
  const Tensor out = forward.out.to(gdtype);
  const Tensor lse = forward.lse.to(gdtype);
  const Tensor g = dout.to(gdtype);
  const std::vector<Range> my_q = plan.q_ranges(plan.rank);
  std::vector<double> dq(static_cast<std::size_t>(B * Hq * q.size(2) * Dq), 0.0);
  Score dscore = params.score;  // the same alternative; its tensors become float64 sums
  std::vector<Tensor*> dparams = score_tensors(dscore);
  for (Tensor* t : dparams)
    if (t->defined()) *t = Tensor::zeros(t->shape(), DType::f64);
  if (stats) stats->steps.clear();
  std::vector<MPI_Request> kv_reqs, d_reqs;
  for (int s = 0; s < plan.P; ++s) {
    const int src = (plan.rank - s + plan.P) % plan.P;
    const int incoming = (src - 1 + plan.P) % plan.P;
    const int64_t tk = plan.tk[src];
    RingStepStats step;
    if (s + 1 < plan.P)
      step.bytes_sent += exchange(kv_reqs, comm, nxt, kv.bytes(plan.tk[incoming]), cur,
                                  kv.bytes(tk), s, op);
    const double t0 = MPI_Wtime();
    auto [kb, vb] = kv.view(cur, tk);
    std::vector<double> dk(static_cast<std::size_t>(B * Hkv * tk * Dk), 0.0);
    std::vector<double> dv(static_cast<std::size_t>(B * Hkv * tk * Dv), 0.0);
    for (const auto& [qr, kr] :
         step_pairs(my_q, plan.k_ranges(src), params.mask.causal, params.mask.window)) {
      {
        const Visibility vis = visibility(qr, kr, params.mask.causal);
        // Short query runs are padded with hidden rows up to the fused kernels' minimum: those
        // kernels recompute P = exp(s - lse) from the given (global) lse.
        const int64_t rows = std::max(qr.length, kMinFusedRows);
        AttentionParams pp = pair_params(params, qr, kr, vis, rows, result_dtype(q.dtype()));
        if (rows > qr.length) {
          std::vector<int64_t> ql = pp.mask.query_lengths;
          if (ql.empty()) ql.assign(static_cast<std::size_t>(B), qr.length);
          pp.mask.query_lengths = ql;
        }
        AttentionOutput fwd;
        fwd.out = rows_padded(out, qr.local_start, qr.length, rows);
        fwd.lse = lse_padded(lse, qr.local_start, qr.length, rows);
        const AttentionGrads part = attention_backward(
            rows_padded(q, qr.local_start, qr.length, rows),
            kb.slice(2, kr.local_start, kr.local_start + kr.length),
            vb.slice(2, kr.local_start, kr.local_start + kr.length), pp, fwd,
            rows_padded(g, qr.local_start, qr.length, rows));
        add_rows(dq, q.size(2), part.dq.slice(2, 0, qr.length), qr.local_start);
        add_rows(dk, tk, part.dk, kr.local_start);
        add_rows(dv, tk, part.dv, kr.local_start);
        Score partial = part.dscore;
        std::vector<Tensor*> pt = score_tensors(partial);
        for (std::size_t i = 0; i < pt.size() && i < dparams.size(); ++i) {
          if (!dparams[i]->defined() || !pt[i]->defined()) continue;
          const Tensor x = pt[i]->to(DType::f64).contiguous();
          double* a = dparams[i]->data<double>();
          const double* b = x.data<double>();
          for (int64_t e = 0; e < x.numel(); ++e) a[e] += b[e];
        }
      }
      progress(kv_reqs);
      progress(d_reqs);
    }
    const double t1 = MPI_Wtime();
    // This block's dK and dV from the ranks it visited before: they were sent at the end of the
    // previous step and travelled during this step's computation.
    const double t_dkv = MPI_Wtime();
    wait_all(d_reqs);
    step.wait_s = MPI_Wtime() - t_dkv;
    auto [dks, dvs] = dkv.view(dsend, tk);
    {
      if (s > 0) {  // the sums so far, added to this rank's part in float64, rounded once
        auto [dkr, dvr] = dkv.view(drecv, tk);
        add_rows(dk, tk, dkr, 0);
        add_rows(dv, tk, dvr, 0);
      }
      dks.copy_from(from_doubles(dk, {B, Hkv, tk, Dk}, gdtype));
      dvs.copy_from(from_doubles(dv, {B, Hkv, tk, Dv}, gdtype));
    }
    // Send this block's dK/dV on (at the last step: home to its owner, rank + 1), receive the
    // next block's (at the last step: this rank's own, complete).
    step.bytes_sent += exchange(d_reqs, comm, drecv, dkv.bytes(plan.tk[incoming]), dsend,
                                dkv.bytes(tk), plan.P + s, op);
    finish_step(kv_reqs, step, t1 - t0, stats);
    std::swap(cur, nxt);
  }
  const double t_last = MPI_Wtime();
  wait_all(d_reqs);  // this rank's own dK/dV, home from the last rank its block visited
  if (stats && !stats->steps.empty()) stats->steps.back().wait_s += MPI_Wtime() - t_last;
  AttentionGrads grads;
  grads.dq = from_doubles(dq, q.shape(), gdtype);
  {
    auto [dkr, dvr] = dkv.view(drecv, k.size(2));
    grads.dk = dkr.clone();
    grads.dv = dvr.clone();
  }
  // The score's parameters are shared by every rank: their gradient is the sum over ranks.
  for (Tensor* t : dparams) {
    if (!t->defined()) continue;
    MPI_Allreduce(MPI_IN_PLACE, t->data<double>(), static_cast<int>(t->numel()), MPI_DOUBLE,
                  MPI_SUM, comm.get());
    *t = t->to(gdtype);
  }
  grads.dscore = dscore;
  if (stats) stats->total_s = MPI_Wtime() - t_begin;
  return grads;
}

}  // namespace attn::dist
