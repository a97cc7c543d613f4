// The float64 oracle for attention (see attn/reference.h and the contract in attn/attention.h).
//
// Plain loops over every (b, h, i, j), the full [B, Hq, Tq, Tk] score tensor, no BLAS, no
// threads, no tiling. Each query row goes through the same numbered steps in the forward and,
// recomputed, in the backward:
//
//   1. visibility   which keys row (b, h, i) may attend (lengths, causal, window, allowed, local)
//   2. scores       s_ij = score_h(q_i, k_j) + bias_ij - slope_h |pos(i) - j|
//   3. softmax      a_ij = exp(s_ij - lse_i) over visible keys, lse_i = log sum_j exp(s_ij)
//   4. local-p      w_ij = a_ij * g_ij, g_ij = exp(-(j - p_i)^2 / (2 sigma^2))  (not renormalised)
//   5. dropout      P_ij = w_ij * keep_ij / (1 - p)
//   6. values       out_i = sum_j P_ij v_j
//
// Letters: b batch, h query head, g = h / (Hq / Hkv) its key/value head, i query, j key.
#include "attn/reference.h"

#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "attention_validate.h"
#include "attn/random.h"

namespace attn::reference {

namespace {

using detail::AttentionDims;

constexpr double kInf = std::numeric_limits<double>::infinity();

// ---------------------------------------------------------------------------------------------
// Inputs in float64, contiguous, with row accessors.

struct Problem {
  AttentionDims dims;
  Tensor q, k, v;           // float64, contiguous
  AttentionParams params;   // every parameter tensor float64 and contiguous; allowed contiguous

  int64_t kv_head(int64_t h) const { return h / (dims.Hq / dims.Hkv); }
  const double* q_row(int64_t b, int64_t h, int64_t i) const {
    return q.data<double>() + ((b * dims.Hq + h) * dims.Tq + i) * dims.Dq;
  }
  const double* k_row(int64_t b, int64_t g, int64_t j) const {
    return k.data<double>() + ((b * dims.Hkv + g) * dims.Tk + j) * dims.Dk;
  }
  const double* v_row(int64_t b, int64_t g, int64_t j) const {
    return v.data<double>() + ((b * dims.Hkv + g) * dims.Tk + j) * dims.Dv;
  }
  int64_t key_length(int64_t b) const {
    const auto& lengths = params.mask.key_lengths;
    return lengths.empty() ? dims.Tk : lengths[static_cast<std::size_t>(b)];
  }
  int64_t query_length(int64_t b) const {
    const auto& lengths = params.mask.query_lengths;
    return lengths.empty() ? dims.Tq : lengths[static_cast<std::size_t>(b)];
  }
  // pos(i): the key position query i sits at (attention.h, "Masks").
  int64_t position(int64_t b, int64_t i) const {
    return params.mask.alignment == Alignment::bottom_right
               ? i + key_length(b) - query_length(b)
               : i;
  }
};

Problem make_problem(const AttentionDims& dims, const Tensor& q, const Tensor& k, const Tensor& v,
                     const AttentionParams& params) {
  return {dims, q.to(DType::f64).contiguous(), k.to(DType::f64).contiguous(),
          v.to(DType::f64).contiguous(), detail::convert_params(params, DType::f64)};
}

// Flat index into a tensor of `shape` broadcast (numpy rules, right-aligned) to
// [B, Hq, Tq, Tk] at (b, h, i, j): size-1 dimensions always read index 0.
int64_t broadcast_offset(const Shape& shape, int64_t b, int64_t h, int64_t i, int64_t j) {
  const int64_t full[4] = {b, h, i, j};
  const int64_t rank = static_cast<int64_t>(shape.size());
  int64_t offset = 0, stride = 1;
  for (int64_t e = rank - 1; e >= 0; --e) {
    const int64_t d = e + 4 - rank;  // matching dimension of [B, Hq, Tq, Tk]
    const int64_t size = shape[static_cast<std::size_t>(e)];
    const int64_t index = (d >= 0 && size != 1) ? full[d] : 0;
    offset += index * stride;
    stride *= size;
  }
  return offset;
}

double dot(const double* x, const double* y, int64_t n) {
  double s = 0.0;
  for (int64_t d = 0; d < n; ++d) s += x[d] * y[d];
  return s;
}

double norm(const double* x, int64_t n) { return std::sqrt(dot(x, x, n)); }

// ---------------------------------------------------------------------------------------------
// Scoring functions: score_forward gives s(q_i, k_j); score_backward adds ds * ds/d(inputs) to
// dq_i, dk_j and to the gradient struct (same alternative, same fields as the parameters).

struct ScoreArgs {
  const double* q;  // [Dq]
  const double* k;  // [Dk]
  int64_t j;        // key position (the location score reads row j of its weight)
  int64_t Dq, Dk;
};

struct ScoreGradArgs {
  double ds;   // dLoss / ds_ij
  double* dq;  // [Dq], accumulated
  double* dk;  // [Dk], accumulated
};

double scaled_dot_scale(const ScaledDotScore& s, int64_t Dk) {
  return s.scale ? *s.scale : 1.0 / std::sqrt(static_cast<double>(Dk));
}

const double* ptr(const Tensor& t) { return t.data<double>(); }
double* mut(Tensor& t) { return t.data<double>(); }

// dot: s = q . k
double score_forward(const DotScore&, const ScoreArgs& x) { return dot(x.q, x.k, x.Dq); }
void score_backward(const DotScore&, const ScoreArgs& x, const ScoreGradArgs& g, DotScore&) {
  for (int64_t d = 0; d < x.Dq; ++d) {
    g.dq[d] += g.ds * x.k[d];
    g.dk[d] += g.ds * x.q[d];
  }
}

// scaled dot: s = c q . k
double score_forward(const ScaledDotScore& s, const ScoreArgs& x) {
  return scaled_dot_scale(s, x.Dk) * dot(x.q, x.k, x.Dq);
}
void score_backward(const ScaledDotScore& s, const ScoreArgs& x, const ScoreGradArgs& g,
                    ScaledDotScore&) {
  const double c = scaled_dot_scale(s, x.Dk);
  for (int64_t d = 0; d < x.Dq; ++d) {
    g.dq[d] += g.ds * c * x.k[d];
    g.dk[d] += g.ds * c * x.q[d];
  }
}

// general: s = q^T W k (full, W [Dq, Dk]) or s = sum_r (u_r . q)(v_r . k) (low rank)
double score_forward(const GeneralScore& s, const ScoreArgs& x) {
  double total = 0.0;
  if (s.weight.defined()) {
    const double* W = ptr(s.weight);
    for (int64_t a = 0; a < x.Dq; ++a)
      for (int64_t c = 0; c < x.Dk; ++c) total += x.q[a] * W[a * x.Dk + c] * x.k[c];
  } else {
    const double *U = ptr(s.u), *V = ptr(s.v);
    for (int64_t r = 0; r < s.u.size(0); ++r)
      total += dot(U + r * x.Dq, x.q, x.Dq) * dot(V + r * x.Dk, x.k, x.Dk);
  }
  return total;
}
void score_backward(const GeneralScore& s, const ScoreArgs& x, const ScoreGradArgs& g,
                    GeneralScore& grad) {
  if (s.weight.defined()) {
    const double* W = ptr(s.weight);
    double* dW = mut(grad.weight);
    for (int64_t a = 0; a < x.Dq; ++a)
      for (int64_t c = 0; c < x.Dk; ++c) {
        g.dq[a] += g.ds * W[a * x.Dk + c] * x.k[c];
        g.dk[c] += g.ds * x.q[a] * W[a * x.Dk + c];
        dW[a * x.Dk + c] += g.ds * x.q[a] * x.k[c];
      }
  } else {
    const double *U = ptr(s.u), *V = ptr(s.v);
    double *dU = mut(grad.u), *dV = mut(grad.v);
    for (int64_t r = 0; r < s.u.size(0); ++r) {
      const double uq = dot(U + r * x.Dq, x.q, x.Dq);  // u_r . q
      const double vk = dot(V + r * x.Dk, x.k, x.Dk);  // v_r . k
      for (int64_t d = 0; d < x.Dq; ++d) {
        g.dq[d] += g.ds * vk * U[r * x.Dq + d];
        dU[r * x.Dq + d] += g.ds * vk * x.q[d];
      }
      for (int64_t d = 0; d < x.Dk; ++d) {
        g.dk[d] += g.ds * uq * V[r * x.Dk + d];
        dV[r * x.Dk + d] += g.ds * uq * x.k[d];
      }
    }
  }
}

// additive: s = v . tanh(W_q q + W_k k + bias)
double score_forward(const AdditiveScore& s, const ScoreArgs& x) {
  const int64_t A = s.v.size(0);
  const double *Wq = ptr(s.w_query), *Wk = ptr(s.w_key), *v = ptr(s.v);
  double total = 0.0;
  for (int64_t a = 0; a < A; ++a) {
    double pre = dot(Wq + a * x.Dq, x.q, x.Dq) + dot(Wk + a * x.Dk, x.k, x.Dk);
    if (s.bias.defined()) pre += ptr(s.bias)[a];
    total += v[a] * std::tanh(pre);
  }
  return total;
}
void score_backward(const AdditiveScore& s, const ScoreArgs& x, const ScoreGradArgs& g,
                    AdditiveScore& grad) {
  const int64_t A = s.v.size(0);
  const double *Wq = ptr(s.w_query), *Wk = ptr(s.w_key), *v = ptr(s.v);
  double *dWq = mut(grad.w_query), *dWk = mut(grad.w_key), *dv = mut(grad.v);
  for (int64_t a = 0; a < A; ++a) {
    double pre = dot(Wq + a * x.Dq, x.q, x.Dq) + dot(Wk + a * x.Dk, x.k, x.Dk);
    if (s.bias.defined()) pre += ptr(s.bias)[a];
    const double t = std::tanh(pre);
    dv[a] += g.ds * t;
    const double dpre = g.ds * v[a] * (1.0 - t * t);  // tanh' = 1 - tanh^2
    if (s.bias.defined()) mut(grad.bias)[a] += dpre;
    for (int64_t d = 0; d < x.Dq; ++d) {
      dWq[a * x.Dq + d] += dpre * x.q[d];
      g.dq[d] += dpre * Wq[a * x.Dq + d];
    }
    for (int64_t d = 0; d < x.Dk; ++d) {
      dWk[a * x.Dk + d] += dpre * x.k[d];
      g.dk[d] += dpre * Wk[a * x.Dk + d];
    }
  }
}

// concat: s = v . tanh(W [q; k]), W [A, Dq + Dk]
double score_forward(const ConcatScore& s, const ScoreArgs& x) {
  const int64_t A = s.v.size(0), width = x.Dq + x.Dk;
  const double *W = ptr(s.weight), *v = ptr(s.v);
  double total = 0.0;
  for (int64_t a = 0; a < A; ++a) {
    const double pre = dot(W + a * width, x.q, x.Dq) + dot(W + a * width + x.Dq, x.k, x.Dk);
    total += v[a] * std::tanh(pre);
  }
  return total;
}
void score_backward(const ConcatScore& s, const ScoreArgs& x, const ScoreGradArgs& g,
                    ConcatScore& grad) {
  const int64_t A = s.v.size(0), width = x.Dq + x.Dk;
  const double *W = ptr(s.weight), *v = ptr(s.v);
  double *dW = mut(grad.weight), *dv = mut(grad.v);
  for (int64_t a = 0; a < A; ++a) {
    const double pre = dot(W + a * width, x.q, x.Dq) + dot(W + a * width + x.Dq, x.k, x.Dk);
    const double t = std::tanh(pre);
    dv[a] += g.ds * t;
    const double dpre = g.ds * v[a] * (1.0 - t * t);
    for (int64_t d = 0; d < x.Dq; ++d) {
      dW[a * width + d] += dpre * x.q[d];
      g.dq[d] += dpre * W[a * width + d];
    }
    for (int64_t d = 0; d < x.Dk; ++d) {
      dW[a * width + x.Dq + d] += dpre * x.k[d];
      g.dk[d] += dpre * W[a * width + x.Dq + d];
    }
  }
}

// cosine: s = tau * (q . k) / (n_q n_k), n_x = max(|x|, eps)
double score_forward(const CosineScore& s, const ScoreArgs& x) {
  const double nq = std::max(norm(x.q, x.Dq), s.eps), nk = std::max(norm(x.k, x.Dk), s.eps);
  return ptr(s.tau)[0] * dot(x.q, x.k, x.Dq) / (nq * nk);
}
void score_backward(const CosineScore& s, const ScoreArgs& x, const ScoreGradArgs& g,
                    CosineScore& grad) {
  const double tau = ptr(s.tau)[0];
  const double len_q = norm(x.q, x.Dq), len_k = norm(x.k, x.Dk);
  const double nq = std::max(len_q, s.eps), nk = std::max(len_k, s.eps);
  const double qk = dot(x.q, x.k, x.Dq);
  const double cosine = qk / (nq * nk);
  mut(grad.tau)[0] += g.ds * cosine;
  // d n_q / dq = q / |q| where |q| > eps, 0 where the eps clamp is active.
  const double dnq_scale = len_q > s.eps ? 1.0 / len_q : 0.0;
  const double dnk_scale = len_k > s.eps ? 1.0 / len_k : 0.0;
  for (int64_t d = 0; d < x.Dq; ++d) {
    g.dq[d] += g.ds * tau * (x.k[d] / (nq * nk) - cosine / nq * x.q[d] * dnq_scale);
    g.dk[d] += g.ds * tau * (x.q[d] / (nq * nk) - cosine / nk * x.k[d] * dnk_scale);
  }
}

// location: s_j = (W q)_j, W [S_max, Dq]; keys are not read.
double score_forward(const LocationScore& s, const ScoreArgs& x) {
  return dot(ptr(s.weight) + x.j * x.Dq, x.q, x.Dq);
}
void score_backward(const LocationScore& s, const ScoreArgs& x, const ScoreGradArgs& g,
                    LocationScore& grad) {
  const double* W = ptr(s.weight) + x.j * x.Dq;
  double* dW = mut(grad.weight) + x.j * x.Dq;
  for (int64_t d = 0; d < x.Dq; ++d) {
    g.dq[d] += g.ds * W[d];
    dW[d] += g.ds * x.q[d];
  }
}

// trilinear: s = w1 . q + w2 . k + w3 . (q * k), weight = [w1; w2; w3], each [D]
double score_forward(const TrilinearScore& s, const ScoreArgs& x) {
  const int64_t D = x.Dq;
  const double* w = ptr(s.weight);
  double total = 0.0;
  for (int64_t d = 0; d < D; ++d)
    total += w[d] * x.q[d] + w[D + d] * x.k[d] + w[2 * D + d] * x.q[d] * x.k[d];
  return total;
}
void score_backward(const TrilinearScore& s, const ScoreArgs& x, const ScoreGradArgs& g,
                    TrilinearScore& grad) {
  const int64_t D = x.Dq;
  const double* w = ptr(s.weight);
  double* dw = mut(grad.weight);
  for (int64_t d = 0; d < D; ++d) {
    dw[d] += g.ds * x.q[d];
    dw[D + d] += g.ds * x.k[d];
    dw[2 * D + d] += g.ds * x.q[d] * x.k[d];
    g.dq[d] += g.ds * (w[d] + w[2 * D + d] * x.k[d]);
    g.dk[d] += g.ds * (w[D + d] + w[2 * D + d] * x.q[d]);
  }
}

double score_value(const Score& score, const ScoreArgs& x) {
  return std::visit([&](const auto& s) { return score_forward(s, x); }, score);
}

void score_gradient(const Score& score, const ScoreArgs& x, const ScoreGradArgs& g, Score& grad) {
  std::visit(
      [&](const auto& s) {
        using S = std::decay_t<decltype(s)>;
        score_backward(s, x, g, std::get<S>(grad));
      },
      score);
}

Tensor zeros_like(const Tensor& t) {
  return t.defined() ? Tensor::zeros(t.shape(), DType::f64) : Tensor();
}

// The gradient struct of a score: the same alternative, a float64 zero tensor in every defined
// tensor field, undefined fields left undefined, non-tensor fields (scale, eps) default.
Score zero_score_grad(const Score& score) {
  return std::visit(
      [](const auto& s) -> Score {
        using S = std::decay_t<decltype(s)>;
        S grad{};
        if constexpr (std::is_same_v<S, GeneralScore>) {
          grad.weight = zeros_like(s.weight);
          grad.u = zeros_like(s.u);
          grad.v = zeros_like(s.v);
        } else if constexpr (std::is_same_v<S, AdditiveScore>) {
          grad.w_query = zeros_like(s.w_query);
          grad.w_key = zeros_like(s.w_key);
          grad.bias = zeros_like(s.bias);
          grad.v = zeros_like(s.v);
        } else if constexpr (std::is_same_v<S, ConcatScore>) {
          grad.weight = zeros_like(s.weight);
          grad.v = zeros_like(s.v);
        } else if constexpr (std::is_same_v<S, CosineScore>) {
          grad.tau = zeros_like(s.tau);
        } else if constexpr (std::is_same_v<S, LocationScore> ||
                             std::is_same_v<S, TrilinearScore>) {
          grad.weight = zeros_like(s.weight);
        }
        return grad;
      },
      score);
}

// ---------------------------------------------------------------------------------------------
// Local-p (Luong et al. 2015, eq. 9-10): p_i = S_b * sigmoid(v_p . tanh(W_p q_i)).

struct LocalPrediction {
  std::vector<double> hidden;  // tanh(W_p q_i), [A]
  double sigmoid = 0.0;        // sigmoid(v_p . hidden)
  double center = 0.0;         // p_i
  double sigma = 0.0;          // half_width / 2
};

LocalPrediction predict_center(const Problem& pr, int64_t b, const double* q) {
  const LocalAttention& local = pr.params.mask.local;
  const int64_t A = local.v_p.size(0), Dq = pr.dims.Dq;
  LocalPrediction lp;
  lp.hidden.resize(static_cast<std::size_t>(A));
  double z = 0.0;
  for (int64_t a = 0; a < A; ++a) {
    lp.hidden[static_cast<std::size_t>(a)] = std::tanh(dot(ptr(local.w_p) + a * Dq, q, Dq));
    z += ptr(local.v_p)[a] * lp.hidden[static_cast<std::size_t>(a)];
  }
  lp.sigmoid = 1.0 / (1.0 + std::exp(-z));
  lp.center = static_cast<double>(pr.key_length(b)) * lp.sigmoid;
  lp.sigma = static_cast<double>(local.half_width) / 2.0;
  return lp;
}

// ---------------------------------------------------------------------------------------------
// Forward steps 1-5 for one query row (b, h, i); the backward recomputes them.

struct Row {
  // True when no key is visible, or every visible score is -inf (e.g. a -inf bias): the row's
  // output, weights and every gradient through it are exactly 0 and its lse is -inf.
  bool empty = true;
  double lse = -kInf;
  std::vector<char> visible;     // [Tk]                       step 1
  std::vector<double> score;     // s_ij where visible         step 2
  std::vector<double> softmax;   // a_ij, 0 where hidden       step 3
  std::vector<double> gauss;     // g_ij, 1 unless local-p     step 4
  std::vector<double> weight;    // w_ij = a_ij g_ij           step 4
  std::vector<double> keep;      // keep_ij / (1 - p)          step 5
  std::vector<double> prob;      // P_ij = w_ij keep_ij        step 5
  LocalPrediction local;         // p_i, for local-p
};

// Step 1's visibility of key j for query (b, h, i), every mask except local-p's window.
bool key_visible(const Problem& pr, int64_t b, int64_t h, int64_t i, int64_t j) {
  const Mask& m = pr.params.mask;
  if (i >= pr.query_length(b) || j >= pr.key_length(b)) return false;
  const int64_t pos = pr.position(b, i);
  if (m.causal && j > pos) return false;
  if (m.window) {
    // Compare the offset j - pos (small) against the sizes, so unbounded never overflows.
    if (m.window->left != Window::unbounded && j - pos < -m.window->left) return false;
    if (m.window->right != Window::unbounded && j - pos > m.window->right) return false;
  }
  if (m.allowed.defined() &&
      !m.allowed.data<bool>()[broadcast_offset(m.allowed.shape(), b, h, i, j)])
    return false;
  if (m.local.kind == LocalKind::monotonic && std::abs(j - pos) > m.local.half_width)
    return false;
  return true;
}

Row forward_row(const Problem& pr, int64_t b, int64_t h, int64_t i) {
  const AttentionDims& d = pr.dims;
  const Mask& m = pr.params.mask;
  const auto Tk = static_cast<std::size_t>(d.Tk);
  const int64_t g = pr.kv_head(h);
  const double* q = pr.q_row(b, h, i);
  Row row;
  row.visible.assign(Tk, 0);
  row.score.assign(Tk, -kInf);
  row.softmax.assign(Tk, 0.0);
  row.gauss.assign(Tk, 1.0);
  row.weight.assign(Tk, 0.0);
  row.keep.assign(Tk, 0.0);
  row.prob.assign(Tk, 0.0);

  // 1. Visibility. Local-p's window |j - p_i| <= D is written as !(|j - p_i| > D) so that a NaN
  //    p_i (a NaN query) keeps its keys and the NaN reaches this row's output instead of
  //    silently masking the row.
  const bool predictive = m.local.kind == LocalKind::predictive;
  if (predictive && i < pr.query_length(b)) row.local = predict_center(pr, b, q);
  int64_t visible_count = 0;
  for (int64_t j = 0; j < d.Tk; ++j) {
    bool seen = key_visible(pr, b, h, i, j);
    if (seen && predictive)
      seen = !(std::abs(static_cast<double>(j) - row.local.center) >
               static_cast<double>(m.local.half_width));
    row.visible[static_cast<std::size_t>(j)] = seen;
    visible_count += seen;
  }
  if (visible_count == 0) return row;

  // 2. Scores of the visible keys, with the additive bias and ALiBi.
  const Score& score = detail::head_score(pr.params, h);
  for (int64_t j = 0; j < d.Tk; ++j) {
    if (!row.visible[static_cast<std::size_t>(j)]) continue;
    double s = score_value(score, {q, pr.k_row(b, g, j), j, d.Dq, d.Dk});
    if (m.bias.defined()) s += ptr(m.bias)[broadcast_offset(m.bias.shape(), b, h, i, j)];
    if (!m.alibi_slopes.empty())
      s -= m.alibi_slopes[static_cast<std::size_t>(h)] *
           static_cast<double>(std::abs(pr.position(b, i) - j));
    row.score[static_cast<std::size_t>(j)] = s;
  }

  // 3. Softmax with the row maximum subtracted (scores of 1e4 would overflow exp). A NaN score
  //    makes the maximum NaN so the whole row (and only this row) becomes NaN.
  double max_score = -kInf;
  bool any_nan = false;
  for (int64_t j = 0; j < d.Tk; ++j) {
    if (!row.visible[static_cast<std::size_t>(j)]) continue;
    const double s = row.score[static_cast<std::size_t>(j)];
    if (std::isnan(s)) any_nan = true;
    else max_score = std::max(max_score, s);
  }
  if (any_nan) max_score = std::numeric_limits<double>::quiet_NaN();
  if (max_score == -kInf) return row;  // every visible score is -inf: nothing to attend
  row.empty = false;
  double sum = 0.0;
  for (int64_t j = 0; j < d.Tk; ++j)
    if (row.visible[static_cast<std::size_t>(j)])
      sum += std::exp(row.score[static_cast<std::size_t>(j)] - max_score);
  row.lse = max_score + std::log(sum);
  for (int64_t j = 0; j < d.Tk; ++j)
    if (row.visible[static_cast<std::size_t>(j)])
      row.softmax[static_cast<std::size_t>(j)] =
          std::exp(row.score[static_cast<std::size_t>(j)] - max_score) / sum;

  // 4. Local-p's Gaussian centred on p_i, multiplied in without renormalising.
  for (int64_t j = 0; j < d.Tk; ++j) {
    const auto uj = static_cast<std::size_t>(j);
    if (!row.visible[uj]) continue;
    if (predictive) {
      const double offset = static_cast<double>(j) - row.local.center;
      row.gauss[uj] = std::exp(-offset * offset / (2.0 * row.local.sigma * row.local.sigma));
    }
    row.weight[uj] = row.softmax[uj] * row.gauss[uj];
  }

  // 5. Dropout: a counter-based keep decision per (b, h, i, j), kept weights scaled by 1/(1-p).
  const Dropout& dropout = pr.params.dropout;
  for (int64_t j = 0; j < d.Tk; ++j) {
    const auto uj = static_cast<std::size_t>(j);
    if (!row.visible[uj]) continue;
    const bool kept = dropout_keep(dropout.seed, dropout.p, static_cast<uint64_t>(b),
                                   static_cast<uint64_t>(h), static_cast<uint64_t>(i),
                                   static_cast<uint64_t>(j));
    row.keep[uj] = kept ? 1.0 / (1.0 - dropout.p) : 0.0;
    row.prob[uj] = row.weight[uj] * row.keep[uj];
  }
  return row;
}

}  // namespace

// =============================================================================================
AttentionOutput attention(const Tensor& q, const Tensor& k, const Tensor& v,
                          const AttentionParams& params) {
  const AttentionDims dims = detail::validate_attention("reference::attention", q, k, v, params);
  const Problem pr = make_problem(dims, q, k, v, params);
  const AttentionDims& d = pr.dims;

  AttentionOutput result;
  result.out = Tensor::zeros({d.B, d.Hq, d.Tq, d.Dv}, DType::f64);
  result.lse = Tensor::full({d.B, d.Hq, d.Tq}, -kInf, DType::f64);
  if (params.return_weights) {
    result.weights = Tensor::zeros({d.B, d.Hq, d.Tq, d.Tk}, DType::f64);
    result.mean_weights = Tensor::zeros({d.B, d.Tq, d.Tk}, DType::f64);
  }
  double* out = result.out.data<double>();
  double* lse = result.lse.data<double>();

  for (int64_t b = 0; b < d.B; ++b)
    for (int64_t h = 0; h < d.Hq; ++h)
      for (int64_t i = 0; i < d.Tq; ++i) {
        const Row row = forward_row(pr, b, h, i);  // steps 1-5
        if (row.empty) continue;                   // out 0, lse -inf, weights 0
        const int64_t bhi = (b * d.Hq + h) * d.Tq + i;
        lse[bhi] = row.lse;
        // 6. out_i = sum_j P_ij v_j over the visible keys (hidden keys' values are never read).
        double* o = out + bhi * d.Dv;
        for (int64_t j = 0; j < d.Tk; ++j) {
          if (!row.visible[static_cast<std::size_t>(j)]) continue;
          const double* vj = pr.v_row(b, pr.kv_head(h), j);
          for (int64_t c = 0; c < d.Dv; ++c) o[c] += row.prob[static_cast<std::size_t>(j)] * vj[c];
        }
        if (params.return_weights) {
          double* w = result.weights.data<double>() + bhi * d.Tk;
          double* mean = result.mean_weights.data<double>() + (b * d.Tq + i) * d.Tk;
          for (int64_t j = 0; j < d.Tk; ++j) {
            w[j] = row.weight[static_cast<std::size_t>(j)];
            mean[j] += w[j] / static_cast<double>(d.Hq);
          }
        }
      }
  return result;
}

// =============================================================================================
// Backward: recompute steps 1-5 per row, then walk them in reverse. Step numbers match the
// forward; "dX" is dLoss/dX.
AttentionGrads attention_backward(const Tensor& q, const Tensor& k, const Tensor& v,
                                  const AttentionParams& params, const AttentionOutput& forward,
                                  const Tensor& dout) {
  const char* op = "reference::attention_backward";
  const AttentionDims dims = detail::validate_attention(op, q, k, v, params);
  detail::validate_attention_backward(op, dims, forward, dout);
  const Problem pr = make_problem(dims, q, k, v, params);
  const AttentionDims& d = pr.dims;
  const Mask& m = pr.params.mask;
  const Tensor grad_out = dout.to(DType::f64).contiguous();

  AttentionGrads grads;
  grads.dq = Tensor::zeros(q.shape(), DType::f64);
  grads.dk = Tensor::zeros(k.shape(), DType::f64);
  grads.dv = Tensor::zeros(v.shape(), DType::f64);
  grads.dbias = zeros_like(m.bias);
  grads.dscore = zero_score_grad(pr.params.score);
  for (const Score& s : pr.params.head_scores) grads.dhead_scores.push_back(zero_score_grad(s));
  const bool predictive = m.local.kind == LocalKind::predictive;
  if (predictive) {
    grads.dlocal.w_p = zeros_like(m.local.w_p);
    grads.dlocal.v_p = zeros_like(m.local.v_p);
  }
  // Gradient rows in the contiguous layouts of q, k, v.
  auto dq_row = [&](int64_t b, int64_t h, int64_t i) {
    return grads.dq.data<double>() + ((b * d.Hq + h) * d.Tq + i) * d.Dq;
  };
  auto dk_row = [&](int64_t b, int64_t g, int64_t j) {
    return grads.dk.data<double>() + ((b * d.Hkv + g) * d.Tk + j) * d.Dk;
  };
  auto dv_row = [&](int64_t b, int64_t g, int64_t j) {
    return grads.dv.data<double>() + ((b * d.Hkv + g) * d.Tk + j) * d.Dv;
  };
  const auto Tk = static_cast<std::size_t>(d.Tk);

  for (int64_t b = 0; b < d.B; ++b)
    for (int64_t h = 0; h < d.Hq; ++h)
      for (int64_t i = 0; i < d.Tq; ++i) {
        const Row row = forward_row(pr, b, h, i);
        if (row.empty) continue;  // fully masked: every gradient through this row is 0
        const int64_t g = pr.kv_head(h);
        const double* q_i = pr.q_row(b, h, i);
        const double* dout_i = grad_out.data<double>() + ((b * d.Hq + h) * d.Tq + i) * d.Dv;
        double* dq_i = dq_row(b, h, i);

        // 6. out_i = sum_j P_ij v_j  ->  dP_ij = dout_i . v_j,  dv_j += P_ij dout_i
        std::vector<double> dprob(Tk, 0.0);
        for (int64_t j = 0; j < d.Tk; ++j) {
          const auto uj = static_cast<std::size_t>(j);
          if (!row.visible[uj]) continue;
          dprob[uj] = dot(dout_i, pr.v_row(b, g, j), d.Dv);
          double* dv_j = dv_row(b, g, j);
          for (int64_t c = 0; c < d.Dv; ++c) dv_j[c] += row.prob[uj] * dout_i[c];
        }

        // 5. P_ij = w_ij keep_ij  ->  dw_ij = dP_ij keep_ij
        std::vector<double> dweight(Tk, 0.0);
        for (std::size_t j = 0; j < Tk; ++j)
          if (row.visible[j]) dweight[j] = dprob[j] * row.keep[j];

        // 4. w_ij = a_ij g_ij  ->  da_ij = dw_ij g_ij,  dg_ij = dw_ij a_ij.
        //    g_ij = exp(-(j - p_i)^2 / (2 sigma^2))  ->  dp_i += dg_ij g_ij (j - p_i) / sigma^2.
        //    The window |j - p_i| <= D is piecewise constant in p_i: no gradient through it.
        std::vector<double> dsoftmax(Tk, 0.0);
        double dcenter = 0.0;
        for (int64_t j = 0; j < d.Tk; ++j) {
          const auto uj = static_cast<std::size_t>(j);
          if (!row.visible[uj]) continue;
          dsoftmax[uj] = dweight[uj] * row.gauss[uj];
          if (predictive) {
            const double dgauss = dweight[uj] * row.softmax[uj];
            const double offset = static_cast<double>(j) - row.local.center;
            dcenter += dgauss * row.gauss[uj] * offset / (row.local.sigma * row.local.sigma);
          }
        }
        if (predictive) {
          // 4a. p_i = S_b sigmoid(z), z = v_p . t, t = tanh(W_p q_i)
          //     dz = dp_i S_b sigmoid (1 - sigmoid);  dv_p += dz t;  du = dz v_p (1 - t^2);
          //     dW_p += du q_i^T;  dq_i += W_p^T du
          const LocalPrediction& lp = row.local;
          const double dz = dcenter * static_cast<double>(pr.key_length(b)) * lp.sigmoid *
                            (1.0 - lp.sigmoid);
          const double* w_p = ptr(m.local.w_p);
          const double* v_p = ptr(m.local.v_p);
          double* dw_p = mut(grads.dlocal.w_p);
          double* dv_p = mut(grads.dlocal.v_p);
          for (int64_t a = 0; a < m.local.v_p.size(0); ++a) {
            const double t = lp.hidden[static_cast<std::size_t>(a)];
            dv_p[a] += dz * t;
            const double du = dz * v_p[a] * (1.0 - t * t);
            for (int64_t c = 0; c < d.Dq; ++c) {
              dw_p[a * d.Dq + c] += du * q_i[c];
              dq_i[c] += du * w_p[a * d.Dq + c];
            }
          }
        }

        // 3. a_ij = softmax_j(s_ij)  ->  ds_ij = a_ij (da_ij - sum_k a_ik da_ik).
        //    Computed from da directly (not via dout . out), so it holds with dropout and local-p.
        double softmax_dot = 0.0;
        for (std::size_t j = 0; j < Tk; ++j)
          if (row.visible[j]) softmax_dot += row.softmax[j] * dsoftmax[j];
        std::vector<double> dscore(Tk, 0.0);
        for (std::size_t j = 0; j < Tk; ++j)
          if (row.visible[j]) dscore[j] = row.softmax[j] * (dsoftmax[j] - softmax_dot);

        // 2. s_ij = score_h(q_i, k_j) + bias_ij + alibi_ij  ->  dbias_ij += ds_ij (summed over the
        //    broadcast dimensions), score backward into dq_i, dk_j and the score's parameters.
        //    ALiBi slopes are constants: no gradient.
        const Score& score = detail::head_score(pr.params, h);
        Score& dscore_params = pr.params.head_scores.empty()
                                   ? grads.dscore
                                   : grads.dhead_scores[static_cast<std::size_t>(h)];
        for (int64_t j = 0; j < d.Tk; ++j) {
          const auto uj = static_cast<std::size_t>(j);
          if (!row.visible[uj]) continue;
          if (m.bias.defined())
            mut(grads.dbias)[broadcast_offset(m.bias.shape(), b, h, i, j)] += dscore[uj];
          score_gradient(score, {q_i, pr.k_row(b, g, j), j, d.Dq, d.Dk},
                         {dscore[uj], dq_i, dk_row(b, g, j)}, dscore_params);
        }
        // 1. Visibility is piecewise constant: no gradient.
      }
  return grads;
}

}  // namespace attn::reference
