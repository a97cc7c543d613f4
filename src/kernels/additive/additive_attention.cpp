// Dispatch and front-end glue of the fused additive / concat attention; the SIMD bodies are in
// additive_attention-inl.h (shared), _forward-inl.h and _backward-inl.h, compiled here once
// per Highway target.
//
// The glue owns the GEMMs, called outside the kernels' OpenMP regions on single-threaded
// OpenBLAS (its spinning workers would take the cores the kernels need, blas_threads.h). The
// GEMMs are split into fixed chunks of rows over our OpenMP threads (project_chunk,
// run_parallel):
//   forward   1. Qp' = 2 log2(e) (Q W_q^T + b)   2. Kp' = 2 log2(e) K W_k^T   3. fused kernel
//   backward  1.-2. the same projections         3. fused kernel -> dQp, dKp, dv, dV
//             4. dQ = dQp W_q, dW_q = dQp^T Q, db = sum_rows dQp      (differentiates 1.)
//             5. dK = dKp W_k, dW_k = dKp^T K                          (differentiates 2.)
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "kernels/additive/additive_attention.cpp"
#include "hwy/foreach_target.h"  // IWYU pragma: keep

#include "hwy/highway.h"
#include "kernels/additive/additive_attention-inl.h"
#include "kernels/additive/additive_attention_backward-inl.h"
#include "kernels/additive/additive_attention_forward-inl.h"

#if HWY_ONCE
#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <variant>
#include <vector>

#include "blas_kernel.h"
#include "blas_threads.h"
#include "hwy/aligned_allocator.h"
#include "kernels/common/fused_args.h"
#include "kernels/common/simd_target.h"

namespace attn::kernels {

HWY_EXPORT(AdditiveAttentionForwardImpl);
HWY_EXPORT(AdditiveAttentionBackwardImpl);
HWY_EXPORT(AdditiveTargetName);

void additive_attention_forward_kernel(const AdditiveAttentionArgs& args, float* out, float* lse,
                                       float* weights) {
  apply_simd_target_from_env();
  HWY_DYNAMIC_DISPATCH(AdditiveAttentionForwardImpl)(args, out, lse, weights);
}

void additive_attention_backward_kernel(const AdditiveAttentionArgs& args,
                                        const AdditiveAttentionGradArgs& grads) {
  apply_simd_target_from_env();
  HWY_DYNAMIC_DISPATCH(AdditiveAttentionBackwardImpl)(args, grads);
}

const char* additive_attention_target_name() {
  apply_simd_target_from_env();
  return HWY_DYNAMIC_DISPATCH(AdditiveTargetName)();
}

bool additive_attention_supported(DType dtype, const AttentionParams& params) {
  const bool additive = std::holds_alternative<AdditiveScore>(params.score) ||
                        std::holds_alternative<ConcatScore>(params.score);
  const Mask& mask = params.mask;
  return dtype == DType::f32 && additive && params.head_scores.empty() &&
         mask.local.kind == LocalKind::none;
}

namespace {

constexpr float kTwoLog2e = 2.0f * 1.4426950408889634f;

// The score's parameters as raw pointers: concat is additive with W_q, W_k the column blocks of
// W (leading dimension Dq + Dk) and no bias.
struct AdditiveWeights {
  const float* wq = nullptr;  // [A, ld_w], columns [0, Dq)
  const float* wk = nullptr;  // [A, ld_w], columns [0, Dk)
  int64_t ld_wq = 0, ld_wk = 0;
  const float* bias = nullptr;  // [A] or nullptr
  const float* v = nullptr;     // [A]
  int64_t hidden = 0;
};

AdditiveWeights weights_of(const Score& score, const detail::AttentionDims& d) {
  AdditiveWeights w;
  if (const auto* s = std::get_if<AdditiveScore>(&score)) {
    w.wq = s->w_query.data<float>(), w.ld_wq = d.Dq;
    w.wk = s->w_key.data<float>(), w.ld_wk = d.Dk;
    w.bias = s->bias.defined() ? s->bias.data<float>() : nullptr;
    w.v = s->v.data<float>();
    w.hidden = s->v.numel();
  } else {
    const auto& c = std::get<ConcatScore>(score);
    w.wq = c.weight.data<float>(), w.ld_wq = d.Dq + d.Dk;
    w.wk = c.weight.data<float>() + d.Dq, w.ld_wk = d.Dq + d.Dk;
    w.v = c.v.data<float>();
    w.hidden = c.v.numel();
  }
  return w;
}

// Row-major C = alpha op(A) op(B) + beta C; empty products handled here (BLAS rejects a
// leading dimension of 0).
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
          const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c,
          int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) {
    for (int64_t r = 0; r < m; ++r)
      for (int64_t col = 0; col < n; ++col)
        c[r * ldc + col] = beta == 0.0f ? 0.0f : beta * c[r * ldc + col];
    return;
  }
  detail::ensure_blas_kernel();
  cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans,
              trans_b ? CblasTrans : CblasNoTrans, static_cast<blasint>(m),
              static_cast<blasint>(n), static_cast<blasint>(k), alpha, a,
              static_cast<blasint>(lda), b, static_cast<blasint>(ldb), beta, c,
              static_cast<blasint>(ldc));
}

// Rows per projection GEMM call. Fixed, not per thread, so that every row comes out the same
// for any thread count (BLAS may pick its kernel by the problem's size); 256 rows of A = 128
// keep each call large enough for the GEMM kernel's full speed.
constexpr int64_t kProjectionChunk = 256;

// One projection: dst[r] = 2 log2(e) (src[r] W^T + bias), rows of S floats (columns >= A zero).
struct ProjectionRows {
  int64_t rows = 0, width = 0;  // rows of src, and their width (Dq or Dk)
  const float* src = nullptr;   // [rows, width]
  const float* w = nullptr;     // [A, ld_w]
  int64_t ld_w = 0;
  const float* bias = nullptr;  // [A] or nullptr
  float* dst = nullptr;         // [rows, S]
};

// Rows [r0, r0 + kProjectionChunk) of a projection. Called from an OpenMP loop over chunks:
// the GEMMs run in parallel on single-threaded OpenBLAS (the caller's SingleThreadedBlas), and
// each thread first writes, so page-faults in, the rows it computes; nothing else touches the
// buffers before (no zero fill of the whole buffer).
void project_chunk(const ProjectionRows& p, int64_t A, int64_t S, int64_t r0) {
  const int64_t n = std::min(kProjectionChunk, p.rows - r0);
  float* dst = p.dst + r0 * S;
  // The bias first, then the GEMM accumulates onto it; the pad columns zero.
  for (int64_t r = 0; r < n; ++r) {
    float* row = dst + r * S;
    if (p.bias != nullptr)
      for (int64_t e = 0; e < A; ++e) row[e] = kTwoLog2e * p.bias[e];
    std::fill(row + A, row + S, 0.0f);
  }
  gemm(false, true, n, A, p.width, kTwoLog2e, p.src + r0 * p.width, p.width, p.w, p.ld_w,
       p.bias != nullptr ? 1.0f : 0.0f, dst, S);
}

// One GEMM C = op(A) op(B) (beta 0), row-major as in gemm().
struct GemmCall {
  bool trans_a = false;  // op(A) = A^T: A is [k, m]
  int64_t m = 0, n = 0, k = 0;
  const float* a = nullptr;
  int64_t lda = 0;
  const float* b = nullptr;  // [k, n]
  int64_t ldb = 0;
  float* c = nullptr;  // [m, n]
  int64_t ldc = 0;
};

// Rows of dW_q or dW_k per call (A rows in all): a few calls per weight gradient, each a full
// reduction over the query or key rows.
constexpr int64_t kWeightChunk = 32;

// Appends g split into calls of at most `rows` rows of C. The split is fixed, not per thread,
// so every element comes from the same call for any thread count.
void split_rows(const GemmCall& g, int64_t rows, std::vector<GemmCall>& calls) {
  for (int64_t r0 = 0; r0 < g.m; r0 += rows) {
    GemmCall part = g;
    part.m = std::min(rows, g.m - r0);
    part.a = g.a + (g.trans_a ? r0 : r0 * g.lda);
    part.c = g.c + r0 * g.ldc;
    calls.push_back(part);
  }
}

// The calls over the OpenMP threads, each on single-threaded OpenBLAS (the caller's
// SingleThreadedBlas).
void run_parallel(const std::vector<GemmCall>& calls) {
  const int64_t count = static_cast<int64_t>(calls.size());
#pragma omp parallel for schedule(dynamic, 1) if (count > 1)
  for (int64_t x = 0; x < count; ++x) {
    const GemmCall& g = calls[static_cast<size_t>(x)];
    gemm(g.trans_a, false, g.m, g.n, g.k, 1.0f, g.a, g.lda, g.b, g.ldb, 0.0f, g.c, g.ldc);
  }
}

// Scaled, padded projections and the kernel arguments that point into them.
struct Projections {
  hwy::AlignedFreeUniquePtr<float[]> q, k;
  std::vector<float> slopes;
  Tensor bias;  // the mask's bias, contiguous (args.bias points into it)
  AdditiveAttentionArgs args;
};

Projections project(const detail::AttentionDims& d, const Tensor& q, const Tensor& k,
                    const Tensor& v, const AttentionParams& params, const AdditiveWeights& w) {
  Projections p;
  const int64_t A = w.hidden;
  const int64_t S = (A + kAdditiveRowPad - 1) / kAdditiveRowPad * kAdditiveRowPad;
  const int64_t q_rows = d.B * d.Hq * d.Tq, k_rows = d.B * d.Hkv * d.Tk;
  p.q = hwy::AllocateAligned<float>(static_cast<size_t>(std::max<int64_t>(1, q_rows * S)));
  p.k = hwy::AllocateAligned<float>(static_cast<size_t>(std::max<int64_t>(1, k_rows * S)));
  // 1. Qp' = 2 log2(e) (Q W_q^T + b).  2. Kp' = 2 log2(e) K W_k^T.
  const ProjectionRows qp{q_rows, d.Dq, q.data<float>(), w.wq, w.ld_wq, w.bias, p.q.get()};
  const ProjectionRows kp{k_rows, d.Dk, k.data<float>(), w.wk, w.ld_wk, nullptr, p.k.get()};
  const int64_t q_chunks = (q_rows + kProjectionChunk - 1) / kProjectionChunk;
  const int64_t k_chunks = (k_rows + kProjectionChunk - 1) / kProjectionChunk;
#pragma omp parallel for schedule(static) if (q_chunks + k_chunks > 1)
  for (int64_t c = 0; c < q_chunks + k_chunks; ++c) {
    if (c < q_chunks)
      project_chunk(qp, A, S, c * kProjectionChunk);
    else
      project_chunk(kp, A, S, (c - q_chunks) * kProjectionChunk);
  }

  AdditiveAttentionArgs& a = p.args;
  a.q_proj = p.q.get(), a.k_proj = p.k.get(), a.proj_stride = S;
  a.score_v = w.v;
  a.v = v.data<float>();
  const Mask& mask = params.mask;
  fill_problem(a, a, d, mask);
  a.hidden = A, a.value_dim = d.Dv;
  p.slopes.assign(mask.alibi_slopes.begin(), mask.alibi_slopes.end());
  if (!p.slopes.empty()) a.alibi_slopes = p.slopes.data();
  if (mask.bias.defined()) {
    // Contiguous, so that a dbias of the bias's shape is addressed by the same strides.
    p.bias = mask.bias.contiguous();
    a.bias = broadcast_bias(p.bias, d);
  }
  if (mask.allowed.defined()) a.allowed = broadcast_allowed(mask.allowed, d);
  a.dropout = FlashDropout{params.dropout.p, params.dropout.seed};
  return p;
}

}  // namespace

AttentionOutput additive_attention_forward(const detail::AttentionDims& dims, const Tensor& q,
                                           const Tensor& k, const Tensor& v,
                                           const AttentionParams& params) {
  // The projection GEMMs run split over our OpenMP threads (project_chunk); OpenBLAS's own
  // threads would leave workers spinning on the cores the kernel's OpenMP threads need.
  const detail::SingleThreadedBlas one_blas_thread;
  const AdditiveWeights w = weights_of(params.score, dims);
  const Projections p = project(dims, q, k, v, params, w);
  AttentionOutput result;
  result.out = Tensor::empty({dims.B, dims.Hq, dims.Tq, dims.Dv}, DType::f32);
  result.lse = Tensor::empty({dims.B, dims.Hq, dims.Tq}, DType::f32);
  float* weights = nullptr;
  if (params.return_weights) {
    result.weights = Tensor::empty({dims.B, dims.Hq, dims.Tq, dims.Tk}, DType::f32);
    weights = result.weights.data<float>();
  }
  additive_attention_forward_kernel(p.args, result.out.data<float>(), result.lse.data<float>(),
                                    weights);
  if (params.return_weights) result.mean_weights = mean_over_heads(result.weights);
  return result;
}

AttentionGrads additive_attention_backward(const detail::AttentionDims& dims, const Tensor& q,
                                           const Tensor& k, const Tensor& v,
                                           const AttentionParams& params,
                                           const AttentionOutput& forward, const Tensor& dout) {
  const detail::SingleThreadedBlas one_blas_thread;
  const AdditiveWeights w = weights_of(params.score, dims);
  const Projections p = project(dims, q, k, v, params, w);
  const int64_t A = w.hidden, S = p.args.proj_stride;
  const int64_t q_rows = dims.B * dims.Hq * dims.Tq, k_rows = dims.B * dims.Hkv * dims.Tk;

  AttentionGrads grads;
  grads.dq = Tensor::empty(q.shape(), DType::f32);
  grads.dk = Tensor::empty(k.shape(), DType::f32);
  grads.dv = Tensor::empty(v.shape(), DType::f32);
  auto dqp = hwy::AllocateAligned<float>(static_cast<size_t>(std::max<int64_t>(1, q_rows * S)));
  auto dkp = hwy::AllocateAligned<float>(static_cast<size_t>(std::max<int64_t>(1, k_rows * S)));
  std::vector<float> dsv(static_cast<size_t>(A));

  // 3. The fused kernel.
  AdditiveAttentionGradArgs g;
  g.out = forward.out.data<float>();
  g.lse = forward.lse.data<float>();
  g.dout = dout.data<float>();
  g.d_q_proj = dqp.get(), g.d_k_proj = dkp.get(), g.d_score_v = dsv.data();
  g.dv = grads.dv.data<float>();
  if (params.mask.bias.defined()) {
    grads.dbias = Tensor::empty(params.mask.bias.shape(), DType::f32);
    g.dbias = grads.dbias.data<float>();
    g.dbias_size = grads.dbias.numel();
  }
  additive_attention_backward_kernel(p.args, g);

  // 4.-5. Through the projections. dW_q and dW_k land in their own tensors (additive) or in the
  // column blocks of dW (concat, leading dimension Dq + Dk).
  Tensor dwq, dwk, dw;
  float* dwq_ptr = nullptr;
  float* dwk_ptr = nullptr;
  int64_t ld_dw = 0;
  if (std::holds_alternative<AdditiveScore>(params.score)) {
    const auto& s = std::get<AdditiveScore>(params.score);
    dwq = Tensor::empty(s.w_query.shape(), DType::f32);
    dwk = Tensor::empty(s.w_key.shape(), DType::f32);
    dwq_ptr = dwq.data<float>(), dwk_ptr = dwk.data<float>(), ld_dw = 0;
  } else {
    dw = Tensor::empty(std::get<ConcatScore>(params.score).weight.shape(), DType::f32);
    dwq_ptr = dw.data<float>(), dwk_ptr = dw.data<float>() + dims.Dq;
    ld_dw = dims.Dq + dims.Dk;
  }
  // Split into independent calls over our threads: dQ, dK by rows; dW_q, dW_k by their A rows
  // (each element still one reduction over all query or key rows).
  std::vector<GemmCall> calls;
  split_rows({.m = q_rows, .n = dims.Dq, .k = A, .a = dqp.get(), .lda = S, .b = w.wq,
              .ldb = w.ld_wq, .c = grads.dq.data<float>(), .ldc = dims.Dq},
             kProjectionChunk, calls);
  split_rows({.trans_a = true, .m = A, .n = dims.Dq, .k = q_rows, .a = dqp.get(), .lda = S,
              .b = q.data<float>(), .ldb = dims.Dq, .c = dwq_ptr,
              .ldc = ld_dw != 0 ? ld_dw : dims.Dq},
             kWeightChunk, calls);
  split_rows({.m = k_rows, .n = dims.Dk, .k = A, .a = dkp.get(), .lda = S, .b = w.wk,
              .ldb = w.ld_wk, .c = grads.dk.data<float>(), .ldc = dims.Dk},
             kProjectionChunk, calls);
  split_rows({.trans_a = true, .m = A, .n = dims.Dk, .k = k_rows, .a = dkp.get(), .lda = S,
              .b = k.data<float>(), .ldb = dims.Dk, .c = dwk_ptr,
              .ldc = ld_dw != 0 ? ld_dw : dims.Dk},
             kWeightChunk, calls);
  run_parallel(calls);

  if (std::holds_alternative<AdditiveScore>(params.score)) {
    const auto& s = std::get<AdditiveScore>(params.score);
    AdditiveScore d;
    d.w_query = dwq;
    d.w_key = dwk;
    if (s.bias.defined()) {
      // db = sum over query rows of dQp, accumulated in double in row order.
      d.bias = Tensor::empty(s.bias.shape(), DType::f32);
      std::vector<double> db(static_cast<size_t>(A), 0.0);
      for (int64_t r = 0; r < q_rows; ++r)
        for (int64_t e = 0; e < A; ++e)
          db[static_cast<size_t>(e)] += dqp[static_cast<size_t>(r * S + e)];
      for (int64_t e = 0; e < A; ++e)
        d.bias.data<float>()[e] = static_cast<float>(db[static_cast<size_t>(e)]);
    }
    d.v = Tensor::from(dsv, s.v.shape());
    grads.dscore = d;
  } else {
    ConcatScore d;
    d.weight = dw;
    d.v = Tensor::from(dsv, std::get<ConcatScore>(params.score).v.shape());
    grads.dscore = d;
  }
  return grads;
}

}  // namespace attn::kernels
#endif  // HWY_ONCE
