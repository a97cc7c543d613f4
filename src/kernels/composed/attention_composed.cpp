// The composed attention path: per (batch, head, query block) a dense score tile built with BLAS
// GEMMs (or the score's own loops), masks, a max-subtracted softmax, dropout and one more GEMM by V.
//
// Letters (attn/attention.h): B batch, Hq/Hkv query/key-value heads, Tq/Tk lengths, Dq/Dk/Dv
// widths; b batch, h query head, g = h / (Hq / Hkv) its key/value head, i query, j key.
// A query block is rows [i0, i0 + rows) of one (b, h); its keys are the union [j0, j1) of the
// rows' visible spans, so causal and windowed blocks skip the keys no row can see.
//
// Memory beyond inputs and outputs: per thread two rows x Tk tiles and small per-row scratch;
// key-side projections (additive, low-rank general, cosine, trilinear) are computed once per
// (b, key/value head) and shared by the query heads of the group.
//
// Forward, per block (steps mirrored by the backward):
//   1. local-p centres p_i = S_b sigmoid(v_p . tanh(W_p q_i))      (a GEMM Q W_p^T, then rows)
//   2. spans: the key interval each row may see (lengths, causal, window, local)
//   3. raw scores s_ij of the score kind                            (GEMMs or tanh loops)
//   4. masks: allowed, bias, ALiBi, local-p's exact window; hidden entries become -inf
//   5. softmax with the row max subtracted; lse_i = m_i + log sum_j exp(s_ij - m_i)
//   6. local-p Gaussian g_ij (not renormalised); weights w_ij = a_ij g_ij
//   7. dropout: P_ij = w_ij keep_ij / (1 - p)
//   8. out = P V                                                    (a GEMM)
//
// Threads: the forward runs (b, h, block) tasks with a dynamic schedule (no shared writes). The
// backward runs (b, g) tasks (a key/value head and its query heads, so dK and dV have a single
// writer) split statically over the threads; gradients of shared parameters (score weights,
// local-p, a bias broadcast over tasks) go to per-thread partials summed in thread order. Results
// are therefore bitwise reproducible at a fixed thread count.
#include "kernels/composed/attention_composed.h"

#include <cblas.h>
#include <omp.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#define ATTN_HAS_MXCSR 1
#endif

#include "attn/random.h"
#include "blas_kernel.h"
#include "blas_threads.h"

namespace attn::kernels {

namespace {

using detail::AttentionDims;

// ---------------------------------------------------------------------------------------------
// Threading and floating-point environment.

using detail::SingleThreadedBlas;

// exp of very negative scores underflows into float denormals, and P V on denormal operands runs
// about 10x slower; flush-to-zero and denormals-are-zero avoid it (the lost values are below
// 1e-38 next to a row sum >= 1). MXCSR is per thread: every worker sets and restores its own.
class FlushDenormals {
 public:
  explicit FlushDenormals(bool active) {
#ifdef ATTN_HAS_MXCSR
    saved_ = _mm_getcsr();
    if (active) _mm_setcsr(saved_ | 0x8040u);  // FTZ (bit 15) | DAZ (bit 6)
#endif
  }
  ~FlushDenormals() {
#ifdef ATTN_HAS_MXCSR
    _mm_setcsr(saved_);
#endif
  }
  FlushDenormals(const FlushDenormals&) = delete;
  FlushDenormals& operator=(const FlushDenormals&) = delete;

 private:
  unsigned saved_ = 0;
};

// ---------------------------------------------------------------------------------------------
// Row-major GEMM: C = alpha op(A) op(B) + beta C, op(A) m x k, op(B) k x n. Empty products are
// handled here (BLAS rejects a leading dimension of 0).

void blas_gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
               int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  detail::ensure_blas_kernel();
  cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans,
              static_cast<blasint>(m), static_cast<blasint>(n), static_cast<blasint>(k), alpha, a,
              static_cast<blasint>(lda), b, static_cast<blasint>(ldb), beta, c,
              static_cast<blasint>(ldc));
}
void blas_gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, double alpha, const double* a,
               int64_t lda, const double* b, int64_t ldb, double beta, double* c, int64_t ldc) {
  detail::ensure_blas_kernel();
  cblas_dgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans,
              static_cast<blasint>(m), static_cast<blasint>(n), static_cast<blasint>(k), alpha, a,
              static_cast<blasint>(lda), b, static_cast<blasint>(ldb), beta, c,
              static_cast<blasint>(ldc));
}

struct GemmShape {
  bool trans_a = false, trans_b = false;
  int64_t m = 0, n = 0, k = 0;
};

template <class T>
void gemm(GemmShape s, T alpha, const T* a, int64_t lda, const T* b, int64_t ldb, T beta, T* c,
          int64_t ldc) {
  if (s.m == 0 || s.n == 0) return;
  if (s.k == 0) {
    if (beta == T(1)) return;
    for (int64_t r = 0; r < s.m; ++r)
      for (int64_t col = 0; col < s.n; ++col)
        c[r * ldc + col] = beta == T(0) ? T(0) : beta * c[r * ldc + col];
    return;
  }
  blas_gemm(s.trans_a, s.trans_b, s.m, s.n, s.k, alpha, a, lda, b, ldb, beta, c, ldc);
}

template <class T>
double dot(const T* x, const T* y, int64_t n) {
  double s = 0.0;
  for (int64_t d = 0; d < n; ++d) s += static_cast<double>(x[d]) * static_cast<double>(y[d]);
  return s;
}

constexpr double kInf = std::numeric_limits<double>::infinity();

// ---------------------------------------------------------------------------------------------
// exp over a row, the softmax's cost next to the two GEMMs. Scalar expf runs at one value per
// ~4 ns; this branch-free form auto-vectorises (8-16 lanes in the AVX2 / AVX-512 clones).
// Inputs are x - shift with shift >= x (a row max or lse), so the domain is [-inf, ~0] and NaN.
//   exp(x) = 2^k e^r, k = round(x log2 e), r = x - k ln 2 (Cody-Waite split, |r| <= ln2 / 2),
//   e^r by its degree-7 Taylor polynomial (truncation r^8 / 8! < 6e-9, below float's 6e-8).
// Results below FLT_MIN (x < -87.3) are exactly 0, as flush-to-zero would make them anyway.

inline float exp_nonpositive(float x) {
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  float xc = x < -87.3f ? -87.3f : x;
  xc = xc > 88.0f ? 88.0f : xc;
  const float t = xc * 1.44269504f + kRound;
  const float k = t - kRound;
  float r = xc - k * 0.693145751953125f;  // ln 2, high bits (exact product for |k| < 2^11)
  r = r - k * 1.428606765330187e-06f;     // ln 2, low bits
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t ki = std::bit_cast<int32_t>(t) - std::bit_cast<int32_t>(kRound);
  const float scaled = std::bit_cast<float>(std::bit_cast<int32_t>(p) + ki * (int32_t{1} << 23));
  const float result = x < -87.3f ? 0.0f : scaled;
  return x != x ? x : result;  // NaN stays NaN
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define ATTN_EXP_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define ATTN_EXP_CLONES
#endif

// x[j] = exp(x[j] - shift).
ATTN_EXP_CLONES void exp_shifted(float* x, int64_t n, float shift) {
  for (int64_t j = 0; j < n; ++j) x[j] = exp_nonpositive(x[j] - shift);
}
void exp_shifted(double* x, int64_t n, double shift) {
  for (int64_t j = 0; j < n; ++j) x[j] = std::exp(x[j] - shift);
}

// The softmax's other row passes, in GCC vector types: without reassociation the compiler
// keeps a plain reduction scalar (one dependent double add, ~4 cycles, per element: as much as
// the vectorised exp), so the lanes are spelled out.
typedef float Floats8 __attribute__((vector_size(32)));
typedef double Doubles8 __attribute__((vector_size(64)));
typedef int32_t Ints8 __attribute__((vector_size(32)));

// sum_j x[j] accumulated in double (the softmax's one long reduction), in 8 lanes.
ATTN_EXP_CLONES double sum_in_double(const float* x, int64_t n) {
  Doubles8 acc = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    Floats8 v;
    std::memcpy(&v, x + j, sizeof v);
    acc += __builtin_convertvector(v, Doubles8);
  }
  double tail = 0.0;
  for (; j < n; ++j) tail += static_cast<double>(x[j]);
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7])) + tail;
}
double sum_in_double(const double* x, int64_t n) {
  double acc[4] = {0.0, 0.0, 0.0, 0.0};
  int64_t j = 0;
  for (; j + 4 <= n; j += 4)
    for (int64_t l = 0; l < 4; ++l) acc[l] += x[j + l];
  for (; j < n; ++j) acc[0] += x[j];
  return (acc[0] + acc[1]) + (acc[2] + acc[3]);
}

// sum_j a[j] b[j] accumulated in double (the backward's D_i = sum_j P_ij dP_ij), in 8 lanes.
ATTN_EXP_CLONES double dot_in_double(const float* a, const float* b, int64_t n) {
  Doubles8 acc = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    Floats8 va, vb;
    std::memcpy(&va, a + j, sizeof va);
    std::memcpy(&vb, b + j, sizeof vb);
    acc += __builtin_convertvector(va, Doubles8) * __builtin_convertvector(vb, Doubles8);
  }
  double tail = 0.0;
  for (; j < n; ++j) tail += static_cast<double>(a[j]) * b[j];
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7])) + tail;
}
double dot_in_double(const double* a, const double* b, int64_t n) {
  double acc = 0.0;
  for (int64_t j = 0; j < n; ++j) acc += a[j] * b[j];
  return acc;
}

// max_j x[j], -inf for n = 0; NaN never wins (x > m ? x : m, lane by lane, as a bit select:
// clang has no ?: on vectors in C++).
ATTN_EXP_CLONES float row_max(const float* x, int64_t n) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  Floats8 m = {kNegInf, kNegInf, kNegInf, kNegInf, kNegInf, kNegInf, kNegInf, kNegInf};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    Floats8 v;
    std::memcpy(&v, x + j, sizeof v);
    const Ints8 take = v > m;  // all ones where v wins
    m = reinterpret_cast<Floats8>((take & reinterpret_cast<Ints8>(v)) |
                                  (~take & reinterpret_cast<Ints8>(m)));
  }
  float r = kNegInf;
  for (int64_t l = 0; l < 8; ++l) r = m[l] > r ? m[l] : r;
  for (; j < n; ++j) r = x[j] > r ? x[j] : r;
  return r;
}
double row_max(const double* x, int64_t n) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t j = 0; j < n; ++j) m = x[j] > m ? x[j] : m;
  return m;
}

// x[j] *= f.
ATTN_EXP_CLONES void scale_row(float* x, int64_t n, float f) {
  for (int64_t j = 0; j < n; ++j) x[j] *= f;
}
void scale_row(double* x, int64_t n, double f) {
  for (int64_t j = 0; j < n; ++j) x[j] *= f;
}

// ---------------------------------------------------------------------------------------------
// Scoring functions, flattened to raw pointers for the kernels.

enum class ScoreKind { dot, general_full, general_low_rank, additive, cosine, location, trilinear };

template <class T>
struct ScoreOps {
  ScoreKind kind = ScoreKind::dot;
  T alpha = T(1);        // dot: 1; scaled dot: the scale
  const T* w = nullptr;  // general W [Dq, Dk]; low-rank u [r, Dq]; location W [S, Dq];
                         // trilinear [w_q; w_k; w_m], each [D]
  const T* w2 = nullptr; // low-rank v [r, Dk]
  // Additive (concat is additive with W_q, W_k the column blocks of W and no bias).
  const T* wq = nullptr;
  const T* wk = nullptr;
  int64_t ld_wq = 0, ld_wk = 0;
  const T* bias = nullptr;  // [A] or null
  const T* vvec = nullptr;  // [A]
  T tau = T(0);             // cosine
  double eps = 0.0;         // cosine
  int64_t q_width = 0;      // columns of the per-block query projection
  int64_t k_width = 0;      // columns of the key projection cached per (b, key head)
  bool k_aux = false;       // one cached scalar per key (cosine norm, trilinear w_k . k)
};

// Gradient accumulators of one score's parameters (null where the score has no such field).
template <class T>
struct ScoreGrads {
  T* w = nullptr;
  T* w2 = nullptr;
  T* wq = nullptr;
  T* wk = nullptr;
  T* bias = nullptr;
  T* vvec = nullptr;
  T* tau = nullptr;
};

template <class T>
const T* ptr(const Tensor& t) {
  return t.defined() ? t.data<T>() : nullptr;
}

template <class T>
ScoreOps<T> make_score_ops(const Score& score, const AttentionDims& d) {
  ScoreOps<T> ops;
  std::visit(
      [&](const auto& s) {
        using S = std::decay_t<decltype(s)>;
        if constexpr (std::is_same_v<S, DotScore>) {
          ops.kind = ScoreKind::dot;
        } else if constexpr (std::is_same_v<S, ScaledDotScore>) {
          ops.kind = ScoreKind::dot;
          ops.alpha = static_cast<T>(s.scale ? *s.scale
                                             : 1.0 / std::sqrt(static_cast<double>(d.Dk)));
        } else if constexpr (std::is_same_v<S, GeneralScore>) {
          if (s.weight.defined()) {
            ops.kind = ScoreKind::general_full;
            ops.w = ptr<T>(s.weight);
            ops.q_width = d.Dk;  // Q W
          } else {
            ops.kind = ScoreKind::general_low_rank;
            ops.w = ptr<T>(s.u);
            ops.w2 = ptr<T>(s.v);
            ops.q_width = ops.k_width = s.u.size(0);  // Q u^T and K v^T
          }
        } else if constexpr (std::is_same_v<S, AdditiveScore>) {
          ops.kind = ScoreKind::additive;
          ops.wq = ptr<T>(s.w_query);
          ops.wk = ptr<T>(s.w_key);
          ops.ld_wq = d.Dq;
          ops.ld_wk = d.Dk;
          ops.bias = ptr<T>(s.bias);
          ops.vvec = ptr<T>(s.v);
          ops.q_width = ops.k_width = s.v.size(0);
        } else if constexpr (std::is_same_v<S, ConcatScore>) {
          ops.kind = ScoreKind::additive;
          ops.wq = ptr<T>(s.weight);
          ops.wk = ptr<T>(s.weight) + d.Dq;
          ops.ld_wq = ops.ld_wk = d.Dq + d.Dk;
          ops.vvec = ptr<T>(s.v);
          ops.q_width = ops.k_width = s.v.size(0);
        } else if constexpr (std::is_same_v<S, CosineScore>) {
          ops.kind = ScoreKind::cosine;
          ops.tau = s.tau.template data<T>()[0];
          ops.eps = s.eps;
          ops.q_width = ops.k_width = d.Dk;  // unit rows
          ops.k_aux = true;                  // key norms
        } else if constexpr (std::is_same_v<S, LocationScore>) {
          ops.kind = ScoreKind::location;
          ops.w = ptr<T>(s.weight);
        } else if constexpr (std::is_same_v<S, TrilinearScore>) {
          ops.kind = ScoreKind::trilinear;
          ops.w = ptr<T>(s.weight);
          ops.q_width = d.Dq;  // q * w_m
          ops.k_aux = true;    // w_k . k
        }
      },
      score);
  return ops;
}

// The gradient tensors of a score's parameters in a fixed order (the layout of the per-thread
// accumulators), created as zeros of dtype T with the parameters' shapes.
Tensor zeros_like(const Tensor& t, DType dtype) {
  return t.defined() ? Tensor::zeros(t.shape(), dtype) : Tensor();
}

Score zero_score_grad(const Score& score, DType dtype) {
  // The same alternative with default hyper-parameters (eps kept), then zeros for every field.
  Score grad = std::visit(
      [](const auto& s) -> Score {
        using S = std::decay_t<decltype(s)>;
        S g{};
        if constexpr (std::is_same_v<S, CosineScore>) g.eps = s.eps;
        return g;
      },
      score);
  std::vector<const Tensor*> params;
  detail::for_each_score_tensor(score, [&](const Tensor& t) { params.push_back(&t); });
  std::size_t f = 0;
  detail::for_each_score_tensor(grad, [&](Tensor& g) { g = zeros_like(*params[f++], dtype); });
  return grad;
}

std::vector<Tensor*> grad_fields(Score& grad) {
  std::vector<Tensor*> fields;
  detail::for_each_score_tensor(grad, [&](Tensor& t) {
    if (t.defined()) fields.push_back(&t);
  });
  return fields;
}

// Points `ScoreGrads` into a flat accumulator whose fields start at `offsets` (grad_fields order).
template <class T>
ScoreGrads<T> bind_score_grads(const Score& score, const AttentionDims& d, T* base,
                               const std::vector<int64_t>& offsets) {
  ScoreGrads<T> g;
  auto at = [&](std::size_t f) { return base + offsets[f]; };
  std::visit(
      [&](const auto& s) {
        using S = std::decay_t<decltype(s)>;
        if constexpr (std::is_same_v<S, GeneralScore>) {
          if (s.weight.defined()) {
            g.w = at(0);
          } else {
            g.w = at(0);
            g.w2 = at(1);
          }
        } else if constexpr (std::is_same_v<S, AdditiveScore>) {
          g.wq = at(0);
          g.wk = at(1);
          if (s.bias.defined()) {
            g.bias = at(2);
            g.vvec = at(3);
          } else {
            g.vvec = at(2);
          }
        } else if constexpr (std::is_same_v<S, ConcatScore>) {
          g.wq = at(0);
          g.wk = at(0) + d.Dq;
          g.vvec = at(1);
        } else if constexpr (std::is_same_v<S, CosineScore>) {
          g.tau = at(0);
        } else if constexpr (std::is_same_v<S, LocationScore> ||
                             std::is_same_v<S, TrilinearScore>) {
          g.w = at(0);
        }
      },
      score);
  return g;
}

// ---------------------------------------------------------------------------------------------
// Masks, read in place (never copied per head).

// A tensor broadcast to [B, Hq, Tq, Tk]: element (b, h, i, j) is at b sb + h sh + i si + j sj,
// with stride 0 on broadcast dimensions. The same offsets index the gradient of a bias.
struct Broadcast4 {
  int64_t sb = 0, sh = 0, si = 0, sj = 0;
  int64_t row(int64_t b, int64_t h, int64_t i) const { return b * sb + h * sh + i * si; }
};

Broadcast4 broadcast_strides(const Shape& shape) {
  int64_t strides[4] = {0, 0, 0, 0};
  const auto rank = static_cast<int64_t>(shape.size());
  int64_t stride = 1;
  for (int64_t e = rank - 1; e >= 0; --e) {
    const int64_t size = shape[static_cast<std::size_t>(e)];
    strides[e + 4 - rank] = size == 1 ? 0 : stride;
    stride *= size;
  }
  return {strides[0], strides[1], strides[2], strides[3]};
}

// Keys j in [lo, hi) pass the interval masks of one query row.
struct Span {
  int64_t lo = 0, hi = 0;
  bool empty() const { return hi <= lo; }
};

// ---------------------------------------------------------------------------------------------
// The problem, shared read-only by every thread.

template <class T>
struct Problem {
  AttentionDims d;
  int64_t group = 1;  // query heads per key/value head
  const T* q = nullptr;
  const T* k = nullptr;
  const T* v = nullptr;
  const AttentionParams* params = nullptr;

  // Scores: one entry when every head shares params.score, else one per query head.
  std::vector<ScoreOps<T>> scores;
  int64_t score_slot(int64_t h) const { return scores.size() == 1 ? 0 : h; }
  // Key projections are cached per (b, key slot): the key/value head when the score is shared,
  // the query head otherwise.
  int64_t key_slots = 0;
  int64_t key_slot(int64_t h) const { return scores.size() == 1 ? h / group : h; }
  std::vector<T> key_proj, key_aux;
  std::vector<int64_t> key_proj_offset, key_aux_offset;  // [B * key_slots]

  // Masks.
  const bool* allowed = nullptr;
  Broadcast4 allowed_at;
  const T* bias = nullptr;
  Broadcast4 bias_at;
  const std::vector<double>* alibi = nullptr;
  LocalKind local = LocalKind::none;
  int64_t half_width = 0;
  const T* w_p = nullptr;  // local-p [A_p, Dq]
  const T* v_p = nullptr;  // local-p [A_p]
  int64_t local_width = 0;
  double dropout_p = 0.0;
  T dropout_scale = T(1);
  uint64_t dropout_seed = 0;
  uint32_t dropout_threshold = 0;  // keep iff the 24-bit uniform >= ceil(p 2^24)

  int64_t block_rows = 0;  // query rows per block

  int64_t key_length(int64_t b) const {
    const auto& l = params->mask.key_lengths;
    return l.empty() ? d.Tk : l[static_cast<std::size_t>(b)];
  }
  int64_t query_length(int64_t b) const {
    const auto& l = params->mask.query_lengths;
    return l.empty() ? d.Tq : l[static_cast<std::size_t>(b)];
  }
  int64_t position(int64_t b, int64_t i) const {
    return params->mask.alignment == Alignment::bottom_right
               ? i + key_length(b) - query_length(b)
               : i;
  }
  const T* q_rows(int64_t b, int64_t h, int64_t i) const {
    return q + ((b * d.Hq + h) * d.Tq + i) * d.Dq;
  }
  const T* k_rows(int64_t b, int64_t g) const { return k + (b * d.Hkv + g) * d.Tk * d.Dk; }
  const T* v_rows(int64_t b, int64_t g) const { return v + (b * d.Hkv + g) * d.Tk * d.Dv; }
  // Dropout's split hash (attn/random.h), exactly attn::dropout_keep: the row key once per
  // query row (drop_row), then one 32-bit round per key (keep; only called when dropout_p > 0).
  uint64_t drop_row(int64_t b, int64_t h, int64_t i) const {
    return dropout_row_key(dropout_seed, static_cast<uint64_t>(b), static_cast<uint64_t>(h),
                           static_cast<uint64_t>(i));
  }
  bool keep(uint64_t row_key, int64_t j) const {
    return dropout_bits(row_key, static_cast<uint32_t>(j)) >= dropout_threshold;
  }
  // Local-p's Gaussian exp(-(j - p)^2 / (2 sigma^2)), sigma = D / 2.
  double sigma() const { return static_cast<double>(half_width) / 2.0; }
};

template <class T>
Problem<T> make_problem(const AttentionDims& d, const Tensor& q, const Tensor& k, const Tensor& v,
                        const AttentionParams& params) {
  Problem<T> pr;
  pr.d = d;
  pr.group = d.Hq / d.Hkv;
  pr.q = q.data<T>();
  pr.k = k.data<T>();
  pr.v = v.data<T>();
  pr.params = &params;
  if (params.head_scores.empty()) {
    pr.scores.push_back(make_score_ops<T>(params.score, d));
  } else {
    for (const Score& s : params.head_scores) pr.scores.push_back(make_score_ops<T>(s, d));
  }
  pr.key_slots = pr.scores.size() == 1 ? d.Hkv : d.Hq;

  const Mask& m = params.mask;
  if (m.allowed.defined()) {
    pr.allowed = m.allowed.data<bool>();
    pr.allowed_at = broadcast_strides(m.allowed.shape());
  }
  if (m.bias.defined()) {
    pr.bias = m.bias.data<T>();
    pr.bias_at = broadcast_strides(m.bias.shape());
  }
  if (!m.alibi_slopes.empty()) pr.alibi = &m.alibi_slopes;
  pr.local = m.local.kind;
  pr.half_width = m.local.half_width;
  if (pr.local == LocalKind::predictive) {
    pr.w_p = m.local.w_p.data<T>();
    pr.v_p = m.local.v_p.data<T>();
    pr.local_width = m.local.v_p.size(0);
  }
  pr.dropout_p = params.dropout.p;
  pr.dropout_scale = static_cast<T>(1.0 / (1.0 - params.dropout.p));
  pr.dropout_seed = params.dropout.seed;
  pr.dropout_threshold = dropout_threshold(params.dropout.p);
  // Blocks of about 2^16 scores (256 KiB in float32) stay in L2 between the score GEMM, the
  // softmax and the P V GEMM; at least 32 rows keep the GEMMs efficient.
  pr.block_rows = std::clamp<int64_t>((int64_t{1} << 16) / std::max<int64_t>(d.Tk, 1), 32, 256);
  return pr;
}

// ---------------------------------------------------------------------------------------------
// Key-side projections, once per (b, key slot).

template <class T>
void compute_key_cache(Problem<T>& pr, int threads) {
  const AttentionDims& d = pr.d;
  const int64_t n = d.B * pr.key_slots;
  pr.key_proj_offset.assign(static_cast<std::size_t>(n), 0);
  pr.key_aux_offset.assign(static_cast<std::size_t>(n), 0);
  int64_t proj_total = 0, aux_total = 0;
  for (int64_t t = 0; t < n; ++t) {
    const ScoreOps<T>& ops = pr.scores[static_cast<std::size_t>(pr.score_slot(t % pr.key_slots))];
    pr.key_proj_offset[static_cast<std::size_t>(t)] = proj_total;
    pr.key_aux_offset[static_cast<std::size_t>(t)] = aux_total;
    proj_total += d.Tk * ops.k_width;
    aux_total += ops.k_aux ? d.Tk : 0;
  }
  if (proj_total == 0 && aux_total == 0) return;
  pr.key_proj.assign(static_cast<std::size_t>(proj_total), T(0));
  pr.key_aux.assign(static_cast<std::size_t>(aux_total), T(0));

#pragma omp parallel for schedule(dynamic) num_threads(threads)
  for (int64_t t = 0; t < n; ++t) {
    const FlushDenormals ftz(std::is_same_v<T, float>);
    const int64_t b = t / pr.key_slots, slot = t % pr.key_slots;
    const int64_t g = pr.scores.size() == 1 ? slot : slot / pr.group;
    const ScoreOps<T>& ops = pr.scores[static_cast<std::size_t>(pr.score_slot(slot))];
    const T* kk = pr.k_rows(b, g);
    T* proj = pr.key_proj.data() + pr.key_proj_offset[static_cast<std::size_t>(t)];
    T* aux = pr.key_aux.data() + pr.key_aux_offset[static_cast<std::size_t>(t)];
    switch (ops.kind) {
      case ScoreKind::general_low_rank:  // K v^T  [Tk, r]
        gemm<T>({false, true, d.Tk, ops.k_width, d.Dk}, T(1), kk, d.Dk, ops.w2, d.Dk, T(0), proj,
                ops.k_width);
        break;
      case ScoreKind::additive:  // K W_k^T  [Tk, A]
        gemm<T>({false, true, d.Tk, ops.k_width, d.Dk}, T(1), kk, d.Dk, ops.wk, ops.ld_wk, T(0),
                proj, ops.k_width);
        break;
      case ScoreKind::cosine:  // k_j / max(|k_j|, eps), and |k_j|
        for (int64_t j = 0; j < d.Tk; ++j) {
          const double len = std::sqrt(dot(kk + j * d.Dk, kk + j * d.Dk, d.Dk));
          const double inv = 1.0 / std::max(len, ops.eps);
          aux[j] = static_cast<T>(len);
          for (int64_t c = 0; c < d.Dk; ++c)
            proj[j * d.Dk + c] = static_cast<T>(kk[j * d.Dk + c] * inv);
        }
        break;
      case ScoreKind::trilinear:  // w_k . k_j
        for (int64_t j = 0; j < d.Tk; ++j)
          aux[j] = static_cast<T>(dot(kk + j * d.Dk, ops.w + d.Dq, d.Dk));
        break;
      default:
        break;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Per-thread scratch.

template <class T>
struct Workspace {
  std::vector<T> scores;     // [rows, cols]: raw scores, masked scores, then P
  std::vector<T> dscores;    // [rows, cols]: backward dP, then dS
  std::vector<T> qproj;      // [rows, q_width]: Q W, Q u^T, Q W_q^T + b, unit rows, q * w_m
  std::vector<T> dqproj;     // [rows, q_width]
  std::vector<T> qaux;       // [rows]: cosine |q_i|, trilinear w_q . q_i
  std::vector<T> lp_hidden;  // [rows, A_p]: tanh(W_p q_i)
  std::vector<T> lp_dhidden; // [rows, A_p]
  std::vector<double> lp_center, lp_sigmoid, lp_dcenter;  // [rows]
  std::vector<Span> spans;   // [rows]
  std::vector<T> dkey_proj;  // [Tk, k_width]: backward, gradient of the cached key projection
  std::vector<T> dkey_aux;   // [Tk]

  void reserve(const Problem<T>& pr, bool backward) {
    const AttentionDims& d = pr.d;
    const auto rows = static_cast<std::size_t>(pr.block_rows);
    int64_t qw = 0, kw = 0;
    for (const ScoreOps<T>& s : pr.scores) {
      qw = std::max(qw, s.q_width);
      kw = std::max(kw, s.k_width);
    }
    scores.resize(rows * static_cast<std::size_t>(d.Tk));
    qproj.resize(rows * static_cast<std::size_t>(qw));
    qaux.resize(rows);
    lp_hidden.resize(rows * static_cast<std::size_t>(pr.local_width));
    lp_center.resize(rows);
    lp_sigmoid.resize(rows);
    spans.resize(rows);
    if (backward) {
      dscores.resize(rows * static_cast<std::size_t>(d.Tk));
      dqproj.resize(rows * static_cast<std::size_t>(qw));
      lp_dhidden.resize(rows * static_cast<std::size_t>(pr.local_width));
      lp_dcenter.resize(rows);
      dkey_proj.resize(static_cast<std::size_t>(d.Tk * kw));
      dkey_aux.resize(static_cast<std::size_t>(d.Tk));
    }
  }
};

// The query block being processed.
struct Block {
  int64_t b = 0, h = 0, g = 0;  // batch, query head, key/value head
  int64_t i0 = 0, rows = 0;     // query rows [i0, i0 + rows)
  int64_t j0 = 0, cols = 0;     // keys [j0, j0 + cols): the union of the rows' spans
};

// Step 1: local-p centres p_i = S_b sigmoid(v_p . tanh(W_p q_i)) of the block's rows.
template <class T>
void predict_centres(const Problem<T>& pr, Workspace<T>& ws, const Block& blk) {
  const AttentionDims& d = pr.d;
  const int64_t A = pr.local_width;
  T* hidden = ws.lp_hidden.data();
  gemm<T>({false, true, blk.rows, A, d.Dq}, T(1), pr.q_rows(blk.b, blk.h, blk.i0), d.Dq, pr.w_p,
          d.Dq, T(0), hidden, A);
  const double S = static_cast<double>(pr.key_length(blk.b));
  for (int64_t r = 0; r < blk.rows; ++r) {
    double z = 0.0;
    for (int64_t a = 0; a < A; ++a) {
      const double t = std::tanh(static_cast<double>(hidden[r * A + a]));
      hidden[r * A + a] = static_cast<T>(t);
      z += static_cast<double>(pr.v_p[a]) * t;
    }
    const double sig = 1.0 / (1.0 + std::exp(-z));
    ws.lp_sigmoid[static_cast<std::size_t>(r)] = sig;
    ws.lp_center[static_cast<std::size_t>(r)] = S * sig;
  }
}

// Step 2: the interval of keys row i may see under the interval masks. Window sizes are compared
// as offsets j - pos (bounded by Tq + Tk), so Window::unbounded never overflows.
template <class T>
Span row_span(const Problem<T>& pr, int64_t b, int64_t i, double centre) {
  const Mask& m = pr.params->mask;
  if (i >= pr.query_length(b)) return {};
  Span s{0, pr.key_length(b)};
  const int64_t pos = pr.position(b, i);
  const int64_t reach = pr.d.Tq + pr.d.Tk + 1;  // any offset beyond this changes nothing
  if (m.causal) s.hi = std::min(s.hi, pos + 1);
  if (m.window) {
    if (m.window->left != Window::unbounded) s.lo = std::max(s.lo, pos - std::min(m.window->left, reach));
    if (m.window->right != Window::unbounded) s.hi = std::min(s.hi, pos + std::min(m.window->right, reach) + 1);
  }
  if (pr.local == LocalKind::monotonic) {
    const int64_t D = std::min(pr.half_width, reach);
    s.lo = std::max(s.lo, pos - D);
    s.hi = std::min(s.hi, pos + D + 1);
  } else if (pr.local == LocalKind::predictive && !std::isnan(centre)) {
    // A bracket one key wider on each side; the exact |j - p_i| <= D test runs per element
    // in apply_masks, in the same form as the reference. A NaN centre (a NaN query) keeps every
    // key so that the NaN reaches this row's output.
    const double D = static_cast<double>(pr.half_width);
    const double lo = std::floor(centre - D) - 1.0, hi = std::ceil(centre + D) + 2.0;
    if (lo > static_cast<double>(s.lo)) s.lo = static_cast<int64_t>(std::min(lo, 1e18));
    if (hi < static_cast<double>(s.hi)) s.hi = static_cast<int64_t>(std::max(hi, -1e18));
  }
  if (s.hi < s.lo) s.hi = s.lo;
  return s;
}

// Steps 1-2 for a block: centres, spans and the block's key range.
template <class T>
void block_geometry(const Problem<T>& pr, Workspace<T>& ws, Block& blk) {
  if (pr.local == LocalKind::predictive) predict_centres(pr, ws, blk);
  int64_t lo = pr.d.Tk, hi = 0;
  for (int64_t r = 0; r < blk.rows; ++r) {
    const double centre =
        pr.local == LocalKind::predictive ? ws.lp_center[static_cast<std::size_t>(r)] : 0.0;
    const Span s = row_span(pr, blk.b, blk.i0 + r, centre);
    ws.spans[static_cast<std::size_t>(r)] = s;
    if (!s.empty()) {
      lo = std::min(lo, s.lo);
      hi = std::max(hi, s.hi);
    }
  }
  blk.j0 = hi > lo ? lo : 0;
  blk.cols = hi > lo ? hi - lo : 0;
}

// Step 3: raw scores S [rows, cols] of the block, plus the query projection kept in ws.qproj
// and ws.qaux for the backward.
template <class T>
void raw_scores(const Problem<T>& pr, const ScoreOps<T>& ops, Workspace<T>& ws, const Block& blk) {
  const AttentionDims& d = pr.d;
  const int64_t rows = blk.rows, cols = blk.cols, j0 = blk.j0;
  const T* q = pr.q_rows(blk.b, blk.h, blk.i0);
  const T* k = pr.k_rows(blk.b, blk.g) + j0 * d.Dk;
  const auto cache = static_cast<std::size_t>(blk.b * pr.key_slots + pr.key_slot(blk.h));
  const T* kproj = pr.key_proj.data() + pr.key_proj_offset[cache] + j0 * ops.k_width;
  const T* kaux = pr.key_aux.data() + pr.key_aux_offset[cache] + j0;
  T* S = ws.scores.data();
  T* qp = ws.qproj.data();
  T* qaux = ws.qaux.data();
  switch (ops.kind) {
    case ScoreKind::dot:  // alpha Q K^T
      gemm<T>({false, true, rows, cols, d.Dk}, ops.alpha, q, d.Dq, k, d.Dk, T(0), S, cols);
      break;
    case ScoreKind::general_full:  // (Q W) K^T
      gemm<T>({false, false, rows, d.Dk, d.Dq}, T(1), q, d.Dq, ops.w, d.Dk, T(0), qp, d.Dk);
      gemm<T>({false, true, rows, cols, d.Dk}, T(1), qp, d.Dk, k, d.Dk, T(0), S, cols);
      break;
    case ScoreKind::general_low_rank:  // (Q u^T) (K v^T)^T
      gemm<T>({false, true, rows, ops.q_width, d.Dq}, T(1), q, d.Dq, ops.w, d.Dq, T(0), qp,
              ops.q_width);
      gemm<T>({false, true, rows, cols, ops.q_width}, T(1), qp, ops.q_width, kproj, ops.k_width,
              T(0), S, cols);
      break;
    case ScoreKind::additive: {
      // Qp = Q W_q^T + b once per block; s_ij = sum_a v_a tanh(Qp_ia + Kp_ja), only over each
      // row's span (the tanh evaluations are the cost of this score).
      const int64_t A = ops.q_width;
      gemm<T>({false, true, rows, A, d.Dq}, T(1), q, d.Dq, ops.wq, ops.ld_wq, T(0), qp, A);
      if (ops.bias)
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t a = 0; a < A; ++a) qp[r * A + a] += ops.bias[a];
      for (int64_t r = 0; r < rows; ++r) {
        const Span s = ws.spans[static_cast<std::size_t>(r)];
        T* Srow = S + r * cols;
        for (int64_t jj = 0; jj < cols; ++jj) {
          const int64_t j = j0 + jj;
          if (j < s.lo || j >= s.hi) continue;  // hidden: overwritten by apply_masks
          const T* kp = kproj + jj * A;
          T acc = T(0);
          for (int64_t a = 0; a < A; ++a) acc += ops.vvec[a] * std::tanh(qp[r * A + a] + kp[a]);
          Srow[jj] = acc;
        }
      }
      break;
    }
    case ScoreKind::cosine: {  // tau (Q / |Q|) (K / |K|)^T
      for (int64_t r = 0; r < rows; ++r) {
        const double len = std::sqrt(dot(q + r * d.Dq, q + r * d.Dq, d.Dq));
        const double inv = 1.0 / std::max(len, ops.eps);
        qaux[r] = static_cast<T>(len);
        for (int64_t c = 0; c < d.Dq; ++c) qp[r * d.Dq + c] = static_cast<T>(q[r * d.Dq + c] * inv);
      }
      gemm<T>({false, true, rows, cols, d.Dk}, ops.tau, qp, d.Dk, kproj, d.Dk, T(0), S, cols);
      break;
    }
    case ScoreKind::location:  // Q W[j0:j1]^T: the scores do not read the keys
      gemm<T>({false, true, rows, cols, d.Dq}, T(1), q, d.Dq, ops.w + j0 * d.Dq, d.Dq, T(0), S,
              cols);
      break;
    case ScoreKind::trilinear: {  // (Q * w_m) K^T + (Q w_q) 1^T + 1 (K w_k)^T
      const T* wq = ops.w;
      const T* wm = ops.w + 2 * d.Dq;
      for (int64_t r = 0; r < rows; ++r) {
        qaux[r] = static_cast<T>(dot(q + r * d.Dq, wq, d.Dq));
        for (int64_t c = 0; c < d.Dq; ++c) qp[r * d.Dq + c] = q[r * d.Dq + c] * wm[c];
      }
      gemm<T>({false, true, rows, cols, d.Dk}, T(1), qp, d.Dq, k, d.Dk, T(0), S, cols);
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t jj = 0; jj < cols; ++jj) S[r * cols + jj] += qaux[r] + kaux[jj];
      break;
    }
  }
}

// Step 4: masked scores in place; hidden entries become -inf (a visible -inf score, from a -inf
// bias, behaves the same: zero weight).
template <class T>
void apply_masks(const Problem<T>& pr, Workspace<T>& ws, const Block& blk) {
  const T neg_inf = -std::numeric_limits<T>::infinity();
  const double D = static_cast<double>(pr.half_width);
  for (int64_t r = 0; r < blk.rows; ++r) {
    const int64_t i = blk.i0 + r;
    const Span s = ws.spans[static_cast<std::size_t>(r)];
    T* Srow = ws.scores.data() + r * blk.cols;
    const int64_t lo = std::clamp(s.lo - blk.j0, int64_t{0}, blk.cols);
    const int64_t hi = std::clamp(s.hi - blk.j0, lo, blk.cols);
    std::fill(Srow, Srow + lo, neg_inf);
    std::fill(Srow + hi, Srow + blk.cols, neg_inf);
    if (hi == lo) continue;
    if (pr.allowed) {
      const bool* allowed = pr.allowed + pr.allowed_at.row(blk.b, blk.h, i);
      for (int64_t jj = lo; jj < hi; ++jj)
        if (!allowed[(blk.j0 + jj) * pr.allowed_at.sj]) Srow[jj] = neg_inf;
    }
    if (pr.local == LocalKind::predictive) {
      const double centre = ws.lp_center[static_cast<std::size_t>(r)];
      for (int64_t jj = lo; jj < hi; ++jj)
        if (std::abs(static_cast<double>(blk.j0 + jj) - centre) > D) Srow[jj] = neg_inf;
    }
    if (pr.bias) {
      const T* bias = pr.bias + pr.bias_at.row(blk.b, blk.h, i);
      for (int64_t jj = lo; jj < hi; ++jj) Srow[jj] += bias[(blk.j0 + jj) * pr.bias_at.sj];
    }
    if (pr.alibi) {
      const double slope = (*pr.alibi)[static_cast<std::size_t>(blk.h)];
      const int64_t pos = pr.position(blk.b, i);
      for (int64_t jj = lo; jj < hi; ++jj)
        Srow[jj] -= static_cast<T>(slope * static_cast<double>(std::abs(pos - (blk.j0 + jj))));
    }
  }
}

// Steps 1-4 for one block.
template <class T>
void block_scores(const Problem<T>& pr, Workspace<T>& ws, Block& blk) {
  block_geometry(pr, ws, blk);
  if (blk.cols == 0) return;
  const ScoreOps<T>& ops = pr.scores[static_cast<std::size_t>(pr.score_slot(blk.h))];
  raw_scores(pr, ops, ws, blk);
  apply_masks(pr, ws, blk);
}

template <class T>
double gaussian(const Problem<T>& pr, double centre, int64_t j) {
  const double offset = static_cast<double>(j) - centre;
  const double sigma = pr.sigma();
  return std::exp(-offset * offset / (2.0 * sigma * sigma));
}

// ---------------------------------------------------------------------------------------------
// Forward.

// 5. a_j = exp(s_j - m) / sum_j exp(s_j - m) in place over a row whose maximum m is finite;
// returns the sum. exp(-inf) = 0 for hidden keys. The row sum is accumulated in double: it is
// the one long reduction of the softmax. The backward recomputes P with this same function
// rather than as exp(s - lse): lse = m + log(sum) rounded to T has an absolute error of
// ~ |m| u (6e-5 at |s| ~ 1e3 in float32), which would scale the row by (1 + that) and make
// D_i = sum_j P_ij dP_ij wrong by as much relative to dP; dS = P (dP - D) is a difference of
// nearly equal terms, so dQ lost two to three digits (issue #10, test_large_logits).
template <class T>
double softmax_row(T* row, int64_t cols, T m) {
  exp_shifted(row, cols, m);
  const double sum = sum_in_double(row, cols);
  scale_row(row, cols, static_cast<T>(1.0 / sum));
  return sum;
}

template <class T>
void forward_block(const Problem<T>& pr, Workspace<T>& ws, Block blk, T* out, T* lse, T* weights) {
  const AttentionDims& d = pr.d;
  block_scores(pr, ws, blk);
  const int64_t cols = blk.cols;
  T* S = ws.scores.data();
  const T neg_inf = -std::numeric_limits<T>::infinity();

  // 5-7, row by row: softmax, local-p Gaussian, weights, dropout.
  for (int64_t r = 0; r < blk.rows; ++r) {
    const int64_t i = blk.i0 + r;
    const int64_t bhi = (blk.b * d.Hq + blk.h) * d.Tq + i;
    T* Srow = S + r * cols;
    T* wrow = weights ? weights + bhi * d.Tk : nullptr;
    // 5. max (NaN-aware: a NaN score makes the row NaN, and only this row)
    T m = neg_inf;
    bool any_nan = false;
    for (int64_t jj = 0; jj < cols; ++jj) {
      const T s = Srow[jj];
      if (s > m) m = s;
      any_nan |= std::isnan(s);
    }
    if (m == neg_inf && !any_nan) {  // fully masked: out 0, lse -inf, weights 0
      lse[bhi] = neg_inf;
      std::fill(Srow, Srow + cols, T(0));
      continue;
    }
    if (any_nan) {
      lse[bhi] = std::numeric_limits<T>::quiet_NaN();
      for (int64_t jj = 0; jj < cols; ++jj)
        Srow[jj] = Srow[jj] == neg_inf ? T(0) : std::numeric_limits<T>::quiet_NaN();
      if (wrow) std::copy(Srow, Srow + cols, wrow + blk.j0);
      continue;
    }
    const double sum = softmax_row(Srow, cols, m);
    lse[bhi] = static_cast<T>(static_cast<double>(m) + std::log(sum));
    // 6. local-p: w_ij = a_ij g_ij
    if (pr.local == LocalKind::predictive) {
      const double centre = ws.lp_center[static_cast<std::size_t>(r)];
      for (int64_t jj = 0; jj < cols; ++jj)
        if (Srow[jj] != T(0)) Srow[jj] *= static_cast<T>(gaussian(pr, centre, blk.j0 + jj));
    }
    if (wrow) std::copy(Srow, Srow + cols, wrow + blk.j0);
    // 7. dropout
    if (pr.dropout_p > 0.0) {
      const uint64_t row_key = pr.drop_row(blk.b, blk.h, i);
      for (int64_t jj = 0; jj < cols; ++jj)
        Srow[jj] = pr.keep(row_key, blk.j0 + jj) ? Srow[jj] * pr.dropout_scale : T(0);
    }
  }
  // 8. out = P V[j0:j1]  (zero rows when the block sees no key)
  T* o = out + ((blk.b * d.Hq + blk.h) * d.Tq + blk.i0) * d.Dv;
  gemm<T>({false, false, blk.rows, d.Dv, cols}, T(1), S, cols, pr.v_rows(blk.b, blk.g) + blk.j0 * d.Dv,
          d.Dv, T(0), o, d.Dv);
}

// Threads for a region of `tasks` independent tasks and about `flops` of work: one thread for
// small problems (waking a team costs more than it saves, and far more on a loaded machine), never
// more threads than tasks.
int threads_for(int64_t tasks, double flops) {
  if (flops < 2e6) return 1;
  return static_cast<int>(std::clamp<int64_t>(tasks, 1, std::max(1, omp_get_max_threads())));
}

// Flops of the two products Q K^T and P V of a problem (the other work scales with them).
double pair_flops(const AttentionDims& d) {
  return 2.0 * static_cast<double>(d.B * d.Hq) * static_cast<double>(d.Tq) *
         static_cast<double>(d.Tk) * static_cast<double>(d.Dk + d.Dv);
}

}  // namespace

template <class T>
AttentionOutput composed_attention_forward(const AttentionDims& dims, const Tensor& q,
                                           const Tensor& k, const Tensor& v,
                                           const AttentionParams& params) {
  const AttentionDims& d = dims;
  constexpr DType dtype = dtype_of<T>();
  AttentionOutput result;
  // Every row of out and lse is written by exactly one block; weights only where visible.
  result.out = Tensor::empty({d.B, d.Hq, d.Tq, d.Dv}, dtype);
  result.lse = Tensor::full({d.B, d.Hq, d.Tq}, -kInf, dtype);
  if (params.return_weights) {
    result.weights = Tensor::zeros({d.B, d.Hq, d.Tq, d.Tk}, dtype);
    result.mean_weights = Tensor::zeros({d.B, d.Tq, d.Tk}, dtype);
  }
  if (d.B == 0 || d.Tq == 0) return result;

  Problem<T> pr = make_problem<T>(d, q, k, v, params);
  const int64_t blocks = (d.Tq + pr.block_rows - 1) / pr.block_rows;
  const int64_t tasks = d.B * d.Hq * blocks;
  const int nthreads = threads_for(tasks, pair_flops(d));
  const SingleThreadedBlas single_blas(nthreads > 1);
  if (d.Tk > 0) compute_key_cache(pr, nthreads);

  std::vector<Workspace<T>> workspaces(static_cast<std::size_t>(nthreads));
  for (Workspace<T>& ws : workspaces) ws.reserve(pr, /*backward=*/false);

  T* out = result.out.data<T>();
  T* lse = result.lse.data<T>();
  T* weights = params.return_weights ? result.weights.data<T>() : nullptr;

#pragma omp parallel num_threads(nthreads)
  {
    const FlushDenormals ftz(std::is_same_v<T, float>);
    Workspace<T>& ws = workspaces[static_cast<std::size_t>(omp_get_thread_num())];
#pragma omp for schedule(dynamic)
    for (int64_t t = 0; t < tasks; ++t) {
      Block blk;
      blk.b = t / (d.Hq * blocks);
      blk.h = t / blocks % d.Hq;
      blk.g = blk.h / pr.group;
      blk.i0 = t % blocks * pr.block_rows;
      blk.rows = std::min(pr.block_rows, d.Tq - blk.i0);
      forward_block(pr, ws, blk, out, lse, weights);
    }
  }

  if (weights) {
    // mean over heads, summed in head order
    T* mean = result.mean_weights.data<T>();
    const T inv_heads = static_cast<T>(1.0 / static_cast<double>(d.Hq));
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t bi = 0; bi < d.B * d.Tq; ++bi) {
      const int64_t b = bi / d.Tq, i = bi % d.Tq;
      T* m = mean + (b * d.Tq + i) * d.Tk;
      for (int64_t h = 0; h < d.Hq; ++h) {
        const T* w = weights + ((b * d.Hq + h) * d.Tq + i) * d.Tk;
        for (int64_t j = 0; j < d.Tk; ++j) m[j] += w[j];
      }
      for (int64_t j = 0; j < d.Tk; ++j) m[j] *= inv_heads;
    }
  }
  return result;
}

// ---------------------------------------------------------------------------------------------
// Backward (FlashAttention-2 formulation, Dao 2023, algorithm 2, without the tiling over keys):
// recompute P_ij (the forward's softmax_row on the recomputed scores: exactly normalised, see
// there), then walk steps 8..1 back. "dX" is dLoss/dX.

namespace {

// Where a task writes its gradients.
template <class T>
struct GradTargets {
  T* dq = nullptr;     // like q
  T* dk = nullptr;     // like k
  T* dv = nullptr;     // like v
  T* dbias = nullptr;  // the bias gradient (direct) or this thread's partial (shared)
  std::vector<ScoreGrads<T>> dscores;  // per score slot, this thread's partials
  T* dw_p = nullptr;   // local-p, this thread's partials
  T* dv_p = nullptr;
};

// Steps 3 back: the score's own backward for a block, given dS in ws.dscores [rows, cols].
// Gradients of the cached key projection go to ws.dkey_proj / ws.dkey_aux (applied to dK and
// the parameters once per head or group, in finish_key_grads).
template <class T>
void score_backward(const Problem<T>& pr, const ScoreOps<T>& ops, const ScoreGrads<T>& gr,
                    Workspace<T>& ws, const Block& blk, T* dq, T* dk) {
  const AttentionDims& d = pr.d;
  const int64_t rows = blk.rows, cols = blk.cols, j0 = blk.j0;
  const T* q = pr.q_rows(blk.b, blk.h, blk.i0);
  const T* k = pr.k_rows(blk.b, blk.g) + j0 * d.Dk;
  dk += j0 * d.Dk;
  const auto cache = static_cast<std::size_t>(blk.b * pr.key_slots + pr.key_slot(blk.h));
  const T* kproj = pr.key_proj.data() + pr.key_proj_offset[cache] + j0 * ops.k_width;
  T* dkproj = ws.dkey_proj.data() + j0 * ops.k_width;
  T* dkaux = ws.dkey_aux.data() + j0;
  const T* dS = ws.dscores.data();
  const T* qp = ws.qproj.data();
  T* dqp = ws.dqproj.data();
  switch (ops.kind) {
    case ScoreKind::dot:  // S = alpha Q K^T: dQ += alpha dS K, dK += alpha dS^T Q
      gemm<T>({false, false, rows, d.Dq, cols}, ops.alpha, dS, cols, k, d.Dk, T(1), dq, d.Dq);
      gemm<T>({true, false, cols, d.Dk, rows}, ops.alpha, dS, cols, q, d.Dq, T(1), dk, d.Dk);
      break;
    case ScoreKind::general_full:  // S = Qw K^T, Qw = Q W
      gemm<T>({false, false, rows, d.Dk, cols}, T(1), dS, cols, k, d.Dk, T(0), dqp, d.Dk);
      gemm<T>({false, true, rows, d.Dq, d.Dk}, T(1), dqp, d.Dk, ops.w, d.Dk, T(1), dq, d.Dq);
      gemm<T>({true, false, d.Dq, d.Dk, rows}, T(1), q, d.Dq, dqp, d.Dk, T(1), gr.w, d.Dk);
      gemm<T>({true, false, cols, d.Dk, rows}, T(1), dS, cols, qp, d.Dk, T(1), dk, d.Dk);
      break;
    case ScoreKind::general_low_rank: {  // S = Qu Kv^T, Qu = Q u^T, Kv = K v^T
      const int64_t R = ops.q_width;
      gemm<T>({false, false, rows, R, cols}, T(1), dS, cols, kproj, R, T(0), dqp, R);
      gemm<T>({false, false, rows, d.Dq, R}, T(1), dqp, R, ops.w, d.Dq, T(1), dq, d.Dq);
      gemm<T>({true, false, R, d.Dq, rows}, T(1), dqp, R, q, d.Dq, T(1), gr.w, d.Dq);
      gemm<T>({true, false, cols, R, rows}, T(1), dS, cols, qp, R, T(1), dkproj, R);
      break;
    }
    case ScoreKind::additive: {
      // s_ij = sum_a v_a t_ija, t = tanh(Qp_ia + Kp_ja):
      //   dv_a += ds t, dQp_ia += ds v_a (1 - t^2), dKp_ja += ds v_a (1 - t^2)
      const int64_t A = ops.q_width;
      std::fill(dqp, dqp + rows * A, T(0));
      for (int64_t r = 0; r < rows; ++r) {
        const T* qrow = qp + r * A;
        T* dqrow = dqp + r * A;
        for (int64_t jj = 0; jj < cols; ++jj) {
          const T ds = dS[r * cols + jj];
          if (ds == T(0)) continue;  // hidden keys and zero gradients: nothing flows
          const T* kp = kproj + jj * A;
          T* dkp = dkproj + jj * A;
          for (int64_t a = 0; a < A; ++a) {
            const T t = std::tanh(qrow[a] + kp[a]);
            gr.vvec[a] += ds * t;
            const T g = ds * ops.vvec[a] * (T(1) - t * t);
            dqrow[a] += g;
            dkp[a] += g;
          }
        }
      }
      // Qp = Q W_q^T + b: dQ += dQp W_q, dW_q += dQp^T Q, db += colsum(dQp)
      gemm<T>({false, false, rows, d.Dq, A}, T(1), dqp, A, ops.wq, ops.ld_wq, T(1), dq, d.Dq);
      gemm<T>({true, false, A, d.Dq, rows}, T(1), dqp, A, q, d.Dq, T(1), gr.wq, ops.ld_wq);
      if (gr.bias)
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t a = 0; a < A; ++a) gr.bias[a] += dqp[r * A + a];
      break;
    }
    case ScoreKind::cosine: {
      // S = tau Qn Kn^T: dtau += sum_ij dS_ij (Qn Kn^T)_ij = sum_i Qn_i . (dS Kn)_i,
      // dQn = tau dS Kn, dKn += tau dS^T Qn, then through the row normalisation.
      gemm<T>({false, false, rows, d.Dk, cols}, T(1), dS, cols, kproj, d.Dk, T(0), dqp, d.Dk);
      double dtau = 0.0;
      for (int64_t r = 0; r < rows; ++r) dtau += dot(qp + r * d.Dk, dqp + r * d.Dk, d.Dk);
      *gr.tau += static_cast<T>(dtau);
      // y = x / max(|x|, eps): dx = (dy - y (y . dy)) / |x| where |x| > eps, dy / eps otherwise
      const T* qaux = ws.qaux.data();
      for (int64_t r = 0; r < rows; ++r) {
        const double len = static_cast<double>(qaux[r]);
        const T* y = qp + r * d.Dk;
        T* dy = dqp + r * d.Dk;
        T* dx = dq + r * d.Dq;
        if (len > ops.eps) {
          const double proj = dot(y, dy, d.Dk);
          for (int64_t c = 0; c < d.Dq; ++c)
            dx[c] += static_cast<T>(static_cast<double>(ops.tau) *
                                    (static_cast<double>(dy[c]) - y[c] * proj) / len);
        } else {
          for (int64_t c = 0; c < d.Dq; ++c)
            dx[c] += static_cast<T>(static_cast<double>(ops.tau) * dy[c] / ops.eps);
        }
      }
      gemm<T>({true, false, cols, d.Dk, rows}, ops.tau, dS, cols, qp, d.Dk, T(1), dkproj, d.Dk);
      break;
    }
    case ScoreKind::location:  // S = Q W[j0:j1]^T
      gemm<T>({false, false, rows, d.Dq, cols}, T(1), dS, cols, ops.w + j0 * d.Dq, d.Dq, T(1), dq,
              d.Dq);
      gemm<T>({true, false, cols, d.Dq, rows}, T(1), dS, cols, q, d.Dq, T(1), gr.w + j0 * d.Dq,
              d.Dq);
      break;
    case ScoreKind::trilinear: {
      // S = Qm K^T + (Q w_q) 1^T + 1 (K w_k)^T, Qm = Q * w_m
      const T* wq = ops.w;
      const T* wm = ops.w + 2 * d.Dq;
      T* dwq = gr.w;
      T* dwm = gr.w + 2 * d.Dq;
      gemm<T>({false, false, rows, d.Dq, cols}, T(1), dS, cols, k, d.Dk, T(0), dqp, d.Dq);
      for (int64_t r = 0; r < rows; ++r) {
        T rowsum = T(0);
        for (int64_t jj = 0; jj < cols; ++jj) rowsum += dS[r * cols + jj];
        const T* qr = q + r * d.Dq;
        for (int64_t c = 0; c < d.Dq; ++c) {
          dq[r * d.Dq + c] += dqp[r * d.Dq + c] * wm[c] + rowsum * wq[c];
          dwm[c] += dqp[r * d.Dq + c] * qr[c];
          dwq[c] += rowsum * qr[c];
        }
      }
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t jj = 0; jj < cols; ++jj) dkaux[jj] += dS[r * cols + jj];
      gemm<T>({true, false, cols, d.Dk, rows}, T(1), dS, cols, qp, d.Dq, T(1), dk, d.Dk);
      break;
    }
  }
}

// The cached key projection's gradient, accumulated over the blocks of a head (or of a whole
// group when the heads share the score), applied to dK and the parameters; then cleared.
template <class T>
void finish_key_grads(const Problem<T>& pr, const ScoreOps<T>& ops, const ScoreGrads<T>& gr,
                      Workspace<T>& ws, int64_t b, int64_t g, int64_t key_slot, T* dk) {
  const AttentionDims& d = pr.d;
  const T* k = pr.k_rows(b, g);
  T* dkproj = ws.dkey_proj.data();
  T* dkaux = ws.dkey_aux.data();
  const auto cache = static_cast<std::size_t>(b * pr.key_slots + key_slot);
  switch (ops.kind) {
    case ScoreKind::general_low_rank: {  // Kv = K v^T: dK += dKv v, dv += dKv^T K
      const int64_t R = ops.k_width;
      gemm<T>({false, false, d.Tk, d.Dk, R}, T(1), dkproj, R, ops.w2, d.Dk, T(1), dk, d.Dk);
      gemm<T>({true, false, R, d.Dk, d.Tk}, T(1), dkproj, R, k, d.Dk, T(1), gr.w2, d.Dk);
      break;
    }
    case ScoreKind::additive: {  // Kp = K W_k^T: dK += dKp W_k, dW_k += dKp^T K
      const int64_t A = ops.k_width;
      gemm<T>({false, false, d.Tk, d.Dk, A}, T(1), dkproj, A, ops.wk, ops.ld_wk, T(1), dk, d.Dk);
      gemm<T>({true, false, A, d.Dk, d.Tk}, T(1), dkproj, A, k, d.Dk, T(1), gr.wk, ops.ld_wk);
      break;
    }
    case ScoreKind::cosine: {  // Kn = K / max(|K|, eps), row by row
      const T* kn = pr.key_proj.data() + pr.key_proj_offset[cache];
      const T* klen = pr.key_aux.data() + pr.key_aux_offset[cache];
      for (int64_t j = 0; j < d.Tk; ++j) {
        const double len = static_cast<double>(klen[j]);
        const T* y = kn + j * d.Dk;
        const T* dy = dkproj + j * d.Dk;
        T* dx = dk + j * d.Dk;
        if (len > ops.eps) {
          const double proj = dot(y, dy, d.Dk);
          for (int64_t c = 0; c < d.Dk; ++c)
            dx[c] += static_cast<T>((static_cast<double>(dy[c]) - y[c] * proj) / len);
        } else {
          for (int64_t c = 0; c < d.Dk; ++c) dx[c] += static_cast<T>(dy[c] / ops.eps);
        }
      }
      break;
    }
    case ScoreKind::trilinear: {  // column term c_j = w_k . k_j: dK_j += dc_j w_k, dw_k += dc_j k_j
      const T* wk = ops.w + d.Dq;
      T* dwk = gr.w + d.Dq;
      for (int64_t j = 0; j < d.Tk; ++j) {
        const T c = dkaux[j];
        if (c == T(0)) continue;
        for (int64_t e = 0; e < d.Dk; ++e) {
          dk[j * d.Dk + e] += c * wk[e];
          dwk[e] += c * k[j * d.Dk + e];
        }
      }
      break;
    }
    default:
      return;
  }
  std::fill(ws.dkey_proj.begin(), ws.dkey_proj.end(), T(0));
  std::fill(ws.dkey_aux.begin(), ws.dkey_aux.end(), T(0));
}

template <class T>
void backward_block(const Problem<T>& pr, Workspace<T>& ws, Block blk, const T* lse_all,
                    const T* dout_all, GradTargets<T>& tg) {
  const AttentionDims& d = pr.d;
  block_scores(pr, ws, blk);  // steps 1-4 recomputed
  const int64_t rows = blk.rows, cols = blk.cols;
  if (cols == 0) return;  // no key visible to any row: every gradient through it is 0
  const T neg_inf = -std::numeric_limits<T>::infinity();
  const bool predictive = pr.local == LocalKind::predictive;
  const bool dropout = pr.dropout_p > 0.0;
  const int64_t bh = blk.b * d.Hq + blk.h;
  const T* lse = lse_all + bh * d.Tq + blk.i0;
  const T* dO = dout_all + (bh * d.Tq + blk.i0) * d.Dv;
  const T* V = pr.v_rows(blk.b, blk.g) + blk.j0 * d.Dv;
  T* P = ws.scores.data();
  T* dS = ws.dscores.data();

  // 5 again: a_ij, normalised by the row's own recomputed max and sum exactly as the forward
  // did (softmax_row), not exp(s_ij - lse_i); lse only classifies the row: 0 on hidden keys and
  // on fully masked rows (lse = -inf), NaN on the visible keys of a NaN row.
  for (int64_t r = 0; r < rows; ++r) {
    T* row = P + r * cols;
    const T l = lse[r];
    if (std::isnan(l)) {  // a NaN row stays NaN on its visible keys only
      for (int64_t jj = 0; jj < cols; ++jj) row[jj] = row[jj] == neg_inf ? T(0) : l;
      continue;
    }
    const T m = row_max(row, cols);
    if (l == neg_inf || m == neg_inf) {
      std::fill(row, row + cols, T(0));
      continue;
    }
    softmax_row(row, cols, m);
  }
  // 6-7 again into dS (used as scratch): P_drop = a g keep / (1 - p). Without local-p and
  // dropout, P_drop is P itself.
  const bool reweighted = predictive || dropout;
  for (int64_t r = 0; reweighted && r < rows; ++r) {
    const double centre = predictive ? ws.lp_center[static_cast<std::size_t>(r)] : 0.0;
    const uint64_t row_key = dropout ? pr.drop_row(blk.b, blk.h, blk.i0 + r) : 0;
    for (int64_t jj = 0; jj < cols; ++jj) {
      T w = P[r * cols + jj];
      if (w != T(0)) {
        if (predictive) w *= static_cast<T>(gaussian(pr, centre, blk.j0 + jj));
        if (dropout) w = pr.keep(row_key, blk.j0 + jj) ? w * pr.dropout_scale : T(0);
      }
      dS[r * cols + jj] = w;
    }
  }
  // 8. out = P_drop V: dV += P_drop^T dO, dP_drop = dO V^T
  T* dV = tg.dv + ((blk.b * d.Hkv + blk.g) * d.Tk + blk.j0) * d.Dv;
  gemm<T>({true, false, cols, d.Dv, rows}, T(1), reweighted ? dS : P, cols, dO, d.Dv, T(1), dV,
          d.Dv);
  gemm<T>({false, true, rows, cols, d.Dv}, T(1), dO, d.Dv, V, d.Dv, T(0), dS, cols);

  for (int64_t r = 0; r < rows; ++r) {
    T* drow = dS + r * cols;
    const T* prow = P + r * cols;
    if (lse[r] == neg_inf) {  // fully masked row: exactly zero gradients
      std::fill(drow, drow + cols, T(0));
      if (predictive) ws.lp_dcenter[static_cast<std::size_t>(r)] = 0.0;
      continue;
    }
    double row_dot = 0.0;
    if (!reweighted) {  // da = dP_drop: one vectorisable pass
      const T D = static_cast<T>(dot_in_double(drow, prow, cols));
      // (hidden keys stay exactly 0 even when D is NaN: a NaN row does not reach them)
      for (int64_t jj = 0; jj < cols; ++jj)
        drow[jj] = prow[jj] == T(0) ? T(0) : prow[jj] * (drow[jj] - D);
      continue;
    }
    const double centre = predictive ? ws.lp_center[static_cast<std::size_t>(r)] : 0.0;
    const double sigma2 = predictive ? pr.sigma() * pr.sigma() : 1.0;
    double dcentre = 0.0;
    const uint64_t row_key = dropout ? pr.drop_row(blk.b, blk.h, blk.i0 + r) : 0;
    for (int64_t jj = 0; jj < cols; ++jj) {
      const T a = prow[jj];
      if (a == T(0)) {  // hidden or underflowed: ds = 0
        drow[jj] = T(0);
        continue;
      }
      // 7. dw = dP_drop keep / (1 - p)
      T dw = drow[jj];
      if (dropout) dw = pr.keep(row_key, blk.j0 + jj) ? dw * pr.dropout_scale : T(0);
      // 6. w = a g: da = dw g, dg = dw a, dp_i += dg g (j - p_i) / sigma^2
      if (predictive) {
        const double j = static_cast<double>(blk.j0 + jj);
        const double g = gaussian(pr, centre, blk.j0 + jj);
        dcentre += static_cast<double>(dw) * a * g * (j - centre) / sigma2;
        dw = static_cast<T>(dw * g);
      }
      drow[jj] = dw;  // da
      row_dot += static_cast<double>(dw) * a;
    }
    // 5. softmax: ds_ij = a_ij (da_ij - sum_k a_ik da_ik)
    const T D = static_cast<T>(row_dot);
    for (int64_t jj = 0; jj < cols; ++jj) drow[jj] = prow[jj] * (drow[jj] - D);
    if (predictive) ws.lp_dcenter[static_cast<std::size_t>(r)] = dcentre;
  }

  // 4. bias: dbias += dS, summed over the broadcast dimensions (ALiBi is constant)
  if (tg.dbias) {
    for (int64_t r = 0; r < rows; ++r) {
      T* db = tg.dbias + pr.bias_at.row(blk.b, blk.h, blk.i0 + r);
      const T* drow = dS + r * cols;
      for (int64_t jj = 0; jj < cols; ++jj) db[(blk.j0 + jj) * pr.bias_at.sj] += drow[jj];
    }
  }

  // 3. the score's own backward
  T* dq = tg.dq + (bh * d.Tq + blk.i0) * d.Dq;
  T* dk = tg.dk + (blk.b * d.Hkv + blk.g) * d.Tk * d.Dk;
  const int64_t slot = pr.score_slot(blk.h);
  score_backward(pr, pr.scores[static_cast<std::size_t>(slot)],
                 tg.dscores[static_cast<std::size_t>(slot)], ws, blk, dq, dk);

  // 1. local-p: p_i = S_b sigmoid(z), z = v_p . t, t = tanh(W_p q_i)
  //    dz = dp S_b sig (1 - sig); dv_p += dz t; dh = dz v_p (1 - t^2); dW_p += dh^T Q; dQ += dh W_p
  if (predictive) {
    const int64_t A = pr.local_width;
    const double S = static_cast<double>(pr.key_length(blk.b));
    const T* hidden = ws.lp_hidden.data();
    T* dh = ws.lp_dhidden.data();
    for (int64_t r = 0; r < rows; ++r) {
      const double sig = ws.lp_sigmoid[static_cast<std::size_t>(r)];
      const double dz = ws.lp_dcenter[static_cast<std::size_t>(r)] * S * sig * (1.0 - sig);
      for (int64_t a = 0; a < A; ++a) {
        const double t = static_cast<double>(hidden[r * A + a]);
        tg.dv_p[a] += static_cast<T>(dz * t);
        dh[r * A + a] = static_cast<T>(dz * static_cast<double>(pr.v_p[a]) * (1.0 - t * t));
      }
    }
    gemm<T>({true, false, A, d.Dq, rows}, T(1), dh, A, pr.q_rows(blk.b, blk.h, blk.i0), d.Dq, T(1),
            tg.dw_p, d.Dq);
    gemm<T>({false, false, rows, d.Dq, A}, T(1), dh, A, pr.w_p, d.Dq, T(1), dq, d.Dq);
  }
}

}  // namespace

template <class T>
AttentionGrads composed_attention_backward(const AttentionDims& dims, const Tensor& q,
                                           const Tensor& k, const Tensor& v,
                                           const AttentionParams& params,
                                           const AttentionOutput& forward, const Tensor& dout) {
  const AttentionDims& d = dims;
  constexpr DType dtype = dtype_of<T>();
  const Mask& m = params.mask;
  AttentionGrads grads;
  grads.dq = Tensor::zeros(q.shape(), dtype);
  grads.dk = Tensor::zeros(k.shape(), dtype);
  grads.dv = Tensor::zeros(v.shape(), dtype);
  grads.dbias = zeros_like(m.bias, dtype);
  grads.dscore = zero_score_grad(params.score, dtype);
  for (const Score& s : params.head_scores) grads.dhead_scores.push_back(zero_score_grad(s, dtype));
  const bool predictive = m.local.kind == LocalKind::predictive;
  grads.dlocal.kind = m.local.kind;
  grads.dlocal.half_width = m.local.half_width;
  if (predictive) {
    grads.dlocal.w_p = zeros_like(m.local.w_p, dtype);
    grads.dlocal.v_p = zeros_like(m.local.v_p, dtype);
  }
  if (d.B == 0 || d.Tq == 0 || d.Tk == 0) return grads;

  Problem<T> pr = make_problem<T>(d, q, k, v, params);
  const int64_t blocks = (d.Tq + pr.block_rows - 1) / pr.block_rows;
  const int64_t tasks = d.B * d.Hkv;  // (b, g): the only writer of dK[b, g] and dV[b, g]
  const int nthreads = threads_for(tasks, 2.5 * pair_flops(d));
  const SingleThreadedBlas single_blas(nthreads > 1);
  compute_key_cache(pr, nthreads);

  // Per-thread accumulators for parameters shared across tasks, laid out field after field:
  // each score slot's gradient fields, local-p's w_p and v_p, and the bias when a bias slice is
  // reached from more than one task (broadcast over batch, or over the heads of several groups).
  std::vector<Score*> slot_grads;
  if (params.head_scores.empty()) {
    slot_grads.push_back(&grads.dscore);
  } else {
    for (Score& s : grads.dhead_scores) slot_grads.push_back(&s);
  }
  std::vector<std::vector<int64_t>> slot_offsets;
  std::vector<std::pair<Tensor*, int64_t>> shared_fields;  // (gradient tensor, offset)
  int64_t total = 0;
  for (Score* s : slot_grads) {
    std::vector<int64_t> offsets;
    for (Tensor* t : grad_fields(*s)) {
      offsets.push_back(total);
      shared_fields.emplace_back(t, total);
      total += t->numel();
    }
    slot_offsets.push_back(std::move(offsets));
  }
  int64_t off_wp = -1, off_vp = -1, off_bias = -1;
  if (predictive) {
    off_wp = total;
    shared_fields.emplace_back(&grads.dlocal.w_p, total);
    total += grads.dlocal.w_p.numel();
    off_vp = total;
    shared_fields.emplace_back(&grads.dlocal.v_p, total);
    total += grads.dlocal.v_p.numel();
  }
  if (m.bias.defined()) {
    const bool batch_owned = pr.bias_at.sb != 0 || d.B == 1;
    const bool heads_owned = pr.bias_at.sh != 0 || d.Hkv == 1;
    if (!(batch_owned && heads_owned)) {
      off_bias = total;
      shared_fields.emplace_back(&grads.dbias, total);
      total += grads.dbias.numel();
    }
  }
  std::vector<std::vector<T>> partials(static_cast<std::size_t>(nthreads),
                                       std::vector<T>(static_cast<std::size_t>(total), T(0)));
  std::vector<Workspace<T>> workspaces(static_cast<std::size_t>(nthreads));
  for (Workspace<T>& ws : workspaces) ws.reserve(pr, /*backward=*/true);

  const T* lse = forward.lse.data<T>();
  const T* dO = dout.data<T>();

#pragma omp parallel num_threads(nthreads)
  {
    const FlushDenormals ftz(std::is_same_v<T, float>);
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    Workspace<T>& ws = workspaces[static_cast<std::size_t>(t)];
    T* partial = partials[static_cast<std::size_t>(t)].data();
    GradTargets<T> tg;
    tg.dq = grads.dq.data<T>();
    tg.dk = grads.dk.data<T>();
    tg.dv = grads.dv.data<T>();
    tg.dbias = off_bias >= 0 ? partial + off_bias
                             : (m.bias.defined() ? grads.dbias.data<T>() : nullptr);
    for (std::size_t s = 0; s < slot_grads.size(); ++s) {
      const Score& score = params.head_scores.empty() ? params.score : params.head_scores[s];
      tg.dscores.push_back(bind_score_grads<T>(score, d, partial, slot_offsets[s]));
    }
    if (predictive) {
      tg.dw_p = partial + off_wp;
      tg.dv_p = partial + off_vp;
    }
    std::fill(ws.dkey_proj.begin(), ws.dkey_proj.end(), T(0));
    std::fill(ws.dkey_aux.begin(), ws.dkey_aux.end(), T(0));

    // A static split of the tasks: the partials' summation order depends only on nt.
    const int64_t first = tasks * t / nt, last = tasks * (t + 1) / nt;
    for (int64_t task = first; task < last; ++task) {
      const int64_t b = task / d.Hkv, g = task % d.Hkv;
      T* dk = tg.dk + (b * d.Hkv + g) * d.Tk * d.Dk;
      for (int64_t h = g * pr.group; h < (g + 1) * pr.group; ++h) {
        for (int64_t blk_index = 0; blk_index < blocks; ++blk_index) {
          Block blk;
          blk.b = b;
          blk.h = h;
          blk.g = g;
          blk.i0 = blk_index * pr.block_rows;
          blk.rows = std::min(pr.block_rows, d.Tq - blk.i0);
          backward_block(pr, ws, blk, lse, dO, tg);
        }
        // The key projection gradient: once per group when the heads share the score.
        const bool last_of_cache = params.head_scores.empty() ? h == (g + 1) * pr.group - 1 : true;
        if (last_of_cache) {
          const int64_t slot = pr.score_slot(h);
          finish_key_grads(pr, pr.scores[static_cast<std::size_t>(slot)],
                           tg.dscores[static_cast<std::size_t>(slot)], ws, b, g, pr.key_slot(h),
                           dk);
        }
      }
    }
  }

  // Thread partials summed in thread order (deterministic at a fixed thread count).
  for (const auto& [tensor, offset] : shared_fields) {
    T* dst = tensor->template data<T>();
    const int64_t n = tensor->numel();
    for (int th = 0; th < nthreads; ++th) {
      const T* src = partials[static_cast<std::size_t>(th)].data() + offset;
      for (int64_t e = 0; e < n; ++e) dst[e] += src[e];
    }
  }
  return grads;
}

template AttentionOutput composed_attention_forward<float>(const AttentionDims&, const Tensor&,
                                                           const Tensor&, const Tensor&,
                                                           const AttentionParams&);
template AttentionOutput composed_attention_forward<double>(const AttentionDims&, const Tensor&,
                                                            const Tensor&, const Tensor&,
                                                            const AttentionParams&);
template AttentionGrads composed_attention_backward<float>(const AttentionDims&, const Tensor&,
                                                           const Tensor&, const Tensor&,
                                                           const AttentionParams&,
                                                           const AttentionOutput&, const Tensor&);
template AttentionGrads composed_attention_backward<double>(const AttentionDims&, const Tensor&,
                                                            const Tensor&, const Tensor&,
                                                            const AttentionParams&,
                                                            const AttentionOutput&, const Tensor&);

}  // namespace attn::kernels
