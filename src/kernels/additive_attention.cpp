// Dispatch and front-end glue of the fused additive / concat attention; the SIMD bodies are in
// additive_attention-inl.h, compiled here once per Highway target.
//
// The glue owns the GEMMs (OpenBLAS, called outside the kernels' OpenMP regions, so it may use
// its own threads):
//   forward   1. Qp' = 2 log2(e) (Q W_q^T + b)   2. Kp' = 2 log2(e) K W_k^T   3. fused kernel
//   backward  1.-2. the same projections         3. fused kernel -> dQp, dKp, dv, dV
//             4. dQ = dQp W_q, dW_q = dQp^T Q, db = sum_rows dQp      (differentiates 1.)
//             5. dK = dKp W_k, dW_k = dKp^T K                          (differentiates 2.)
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "kernels/additive_attention.cpp"
#include "hwy/foreach_target.h"  // IWYU pragma: keep

#include "hwy/highway.h"
#include "kernels/additive_attention-inl.h"

#if HWY_ONCE
#include <cblas.h>

#include <cmath>
#include <variant>
#include <vector>

#include "blas_threads.h"
#include "hwy/aligned_allocator.h"
#include "kernels/fused_args.h"
#include "kernels/simd_target.h"

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
      for (int64_t col = 0; col < n; ++col) c[r * ldc + col] = beta == 0.0f ? 0.0f : beta * c[r * ldc + col];
    return;
  }
  cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans,
              trans_b ? CblasTrans : CblasNoTrans, static_cast<blasint>(m),
              static_cast<blasint>(n), static_cast<blasint>(k), alpha, a,
              static_cast<blasint>(lda), b, static_cast<blasint>(ldb), beta, c,
              static_cast<blasint>(ldc));
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
  std::fill_n(p.q.get(), q_rows * S, 0.0f);
  std::fill_n(p.k.get(), k_rows * S, 0.0f);
  // 1. Qp' = 2 log2(e) (Q W_q^T + b): the bias first, then the GEMM accumulates onto it.
  if (w.bias != nullptr)
    for (int64_t r = 0; r < q_rows; ++r)
      for (int64_t e = 0; e < A; ++e) p.q[static_cast<size_t>(r * S + e)] = kTwoLog2e * w.bias[e];
  gemm(false, true, q_rows, A, d.Dq, kTwoLog2e, q.data<float>(), d.Dq, w.wq, w.ld_wq, 1.0f,
       p.q.get(), S);
  // 2. Kp' = 2 log2(e) K W_k^T.
  gemm(false, true, k_rows, A, d.Dk, kTwoLog2e, k.data<float>(), d.Dk, w.wk, w.ld_wk, 0.0f,
       p.k.get(), S);

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
  // The projection GEMMs are small next to the kernel; multithreaded OpenBLAS would leave its
  // workers spinning on the cores the kernel's OpenMP threads need.
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
  gemm(false, false, q_rows, dims.Dq, A, 1.0f, dqp.get(), S, w.wq, w.ld_wq, 0.0f,
       grads.dq.data<float>(), dims.Dq);
  gemm(true, false, A, dims.Dq, q_rows, 1.0f, dqp.get(), S, q.data<float>(), dims.Dq, 0.0f,
       dwq_ptr, ld_dw != 0 ? ld_dw : dims.Dq);
  gemm(false, false, k_rows, dims.Dk, A, 1.0f, dkp.get(), S, w.wk, w.ld_wk, 0.0f,
       grads.dk.data<float>(), dims.Dk);
  gemm(true, false, A, dims.Dk, k_rows, 1.0f, dkp.get(), S, k.data<float>(), dims.Dk, 0.0f,
       dwk_ptr, ld_dw != 0 ? ld_dw : dims.Dk);

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
        for (int64_t e = 0; e < A; ++e) db[static_cast<size_t>(e)] += dqp[static_cast<size_t>(r * S + e)];
      for (int64_t e = 0; e < A; ++e) d.bias.data<float>()[e] = static_cast<float>(db[static_cast<size_t>(e)]);
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
