#include "attention_dot_form.h"

#include <algorithm>
#include <cmath>

#include "attn/matmul.h"
#include "blas_threads.h"

namespace attn::detail {

namespace {

// Rows of x [..., D] divided by max(|row|, eps) and multiplied by `gain`; norms[r] = |row r|.
Tensor normalise_rows(const Tensor& x, double eps, float gain, std::vector<double>& norms) {
  const int64_t d = x.size(-1), rows = x.numel() / std::max<int64_t>(d, 1);
  Tensor out = Tensor::empty(x.shape(), DType::f32);
  const float* in = x.data<float>();
  float* o = out.data<float>();
  norms.assign(static_cast<std::size_t>(rows), 0.0);
  for (int64_t r = 0; r < rows; ++r) {
    double sq = 0.0;  // in double: a row of 1e20s must not overflow the norm
    for (int64_t c = 0; c < d; ++c) sq += static_cast<double>(in[r * d + c]) * in[r * d + c];
    const double norm = std::sqrt(sq);
    norms[static_cast<std::size_t>(r)] = norm;
    const double f = gain / std::max(norm, eps);
    for (int64_t c = 0; c < d; ++c) o[r * d + c] = static_cast<float>(in[r * d + c] * f);
  }
  return out;
}

// Gradient through y = x / max(|x|, eps): (dy - y (y . dy)) / |x| when |x| > eps, else dy / eps.
// `unit` holds x / max(|x|, eps).
Tensor normalise_rows_backward(const Tensor& unit, const std::vector<double>& norms, double eps,
                               const Tensor& dunit) {
  const int64_t d = unit.size(-1);
  Tensor dx = Tensor::empty(unit.shape(), DType::f32);
  const float* y = unit.data<float>();
  const float* dy = dunit.data<float>();
  float* o = dx.data<float>();
  for (std::size_t r = 0; r < norms.size(); ++r) {
    const int64_t base = static_cast<int64_t>(r) * d;
    const double norm = norms[r];
    if (norm > eps) {
      double dot = 0.0;
      for (int64_t c = 0; c < d; ++c) dot += static_cast<double>(y[base + c]) * dy[base + c];
      for (int64_t c = 0; c < d; ++c)
        o[base + c] = static_cast<float>((dy[base + c] - y[base + c] * dot) / norm);
    } else {
      for (int64_t c = 0; c < d; ++c) o[base + c] = static_cast<float>(dy[base + c] / eps);
    }
  }
  return dx;
}

AttentionDims with_width(AttentionDims dims, int64_t width) {
  dims.Dq = dims.Dk = width;
  return dims;
}

}  // namespace

std::optional<DotForm> to_dot_form(const AttentionDims& dims, const Tensor& q, const Tensor& k,
                                   const AttentionParams& params) {
  if (q.dtype() != DType::f32 || !params.head_scores.empty()) return std::nullopt;
  // Small GEMMs next to the attention: OpenBLAS's spinning workers would otherwise take the cores
  // from the fused kernel that follows (measured, general score, B=1 H=8 T=128 d=64: 1.66 ms with
  // OpenBLAS on 2 threads, 0.25 ms on 1).
  const SingleThreadedBlas one_blas_thread;
  DotForm form;
  form.params = params;
  form.params.score = DotScore{};
  if (const auto* g = std::get_if<GeneralScore>(&params.score)) {
    if (g->weight.defined()) {
      form.q = matmul(q, g->weight);  // [B, Hq, Tq, Dk]
      form.k = k;
      form.dims = with_width(dims, dims.Dk);
    } else {
      form.q = matmul(q, g->u.transpose(0, 1));  // [B, Hq, Tq, r]
      form.k = matmul(k, g->v.transpose(0, 1));  // [B, Hkv, Tk, r]
      form.dims = with_width(dims, g->u.size(0));
    }
    return form;
  }
  if (const auto* c = std::get_if<CosineScore>(&params.score)) {
    // tau goes into q so that its gradient is sum(dq' * q_unit).
    std::vector<double> norms;
    const float tau = c->tau.data<float>()[0];
    form.q = normalise_rows(q, c->eps, tau, norms);
    form.k = normalise_rows(k, c->eps, 1.0f, norms);
    form.dims = dims;
    return form;
  }
  return std::nullopt;
}

AttentionGrads from_dot_form_grads(const Tensor& q, const Tensor& k, const AttentionParams& params,
                                   AttentionGrads grads) {
  const SingleThreadedBlas one_blas_thread;
  if (const auto* g = std::get_if<GeneralScore>(&params.score)) {
    GeneralScore dscore;
    if (g->weight.defined()) {
      MatmulGrads w = matmul_backward(q, g->weight, grads.dq);
      grads.dq = w.da;
      dscore.weight = w.db;
    } else {
      MatmulGrads u = matmul_backward(q, g->u.transpose(0, 1), grads.dq);
      MatmulGrads v = matmul_backward(k, g->v.transpose(0, 1), grads.dk);
      grads.dq = u.da;
      grads.dk = v.da;
      dscore.u = u.db.transpose(0, 1).contiguous();
      dscore.v = v.db.transpose(0, 1).contiguous();
    }
    grads.dscore = dscore;
    return grads;
  }
  const auto& c = std::get<CosineScore>(params.score);
  const float tau = c.tau.data<float>()[0];
  std::vector<double> q_norms, k_norms;
  const Tensor q_unit = normalise_rows(q, c.eps, 1.0f, q_norms);
  const Tensor k_unit = normalise_rows(k, c.eps, 1.0f, k_norms);
  // q' = tau q_unit: dtau = sum(dq' * q_unit), dq_unit = tau dq'.
  double dtau = 0.0;
  Tensor dq_unit = Tensor::empty(q.shape(), DType::f32);
  const float* dqp = grads.dq.data<float>();
  const float* qu = q_unit.data<float>();
  float* dqu = dq_unit.data<float>();
  for (int64_t i = 0; i < q.numel(); ++i) {
    dtau += static_cast<double>(dqp[i]) * qu[i];
    dqu[i] = tau * dqp[i];
  }
  grads.dq = normalise_rows_backward(q_unit, q_norms, c.eps, dq_unit);
  grads.dk = normalise_rows_backward(k_unit, k_norms, c.eps, grads.dk);
  grads.dscore = CosineScore{.tau = Tensor::full(c.tau.shape(), dtau, DType::f32), .eps = c.eps};
  return grads;
}

}  // namespace attn::detail
