#include "attention_dot_form.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "attn/matmul.h"
#include "blas_threads.h"

namespace attn::detail {

namespace {

AttentionDims with_width(AttentionDims dims, int64_t width) {
  dims.Dq = dims.Dk = width;
  return dims;
}

// Rows of a [B, H, T, D] tensor (counted from the shape, so that D = 0 still has rows).
int64_t rows_of(const Tensor& x) { return x.size(0) * x.size(1) * x.size(2); }

Shape with_last(Shape shape, int64_t last) {
  shape.back() = last;
  return shape;
}

// a . b summed in double (a row of 1e20s must not overflow a norm), in four independent
// accumulators so that the loop does not wait on the latency of one chain of adds.
double dot(const float* a, const float* b, int64_t n) {
  double acc[4] = {0.0, 0.0, 0.0, 0.0};
  int64_t c = 0;
  for (; c + 4 <= n; c += 4)
    for (int64_t l = 0; l < 4; ++l) acc[l] += static_cast<double>(a[c + l]) * b[c + l];
  for (; c < n; ++c) acc[0] += static_cast<double>(a[c]) * b[c];
  return (acc[0] + acc[1]) + (acc[2] + acc[3]);
}

// The transforms below run on one thread: they are O(T d) next to the kernel's O(T^2 d)
// (measured, trilinear, B=1 H=8 T=2048 d=64: 1.0 ms before the forward kernel, 1.9 ms after the
// backward one, about 3% of either fused call), and an OpenMP region here would wait for both
// cores, which on a loaded machine cost 10-20 ms per call.

// ---------------------------------------------------------------------------------------------
// Cosine.

// Rows of x [..., D] divided by max(|row|, eps) and multiplied by `gain`; norms[r] = |row r|.
Tensor normalise_rows(const Tensor& x, double eps, float gain, std::vector<double>& norms) {
  const int64_t d = x.size(-1), rows = x.numel() / std::max<int64_t>(d, 1);
  Tensor out = Tensor::empty(x.shape(), DType::f32);
  const float* in = x.data<float>();
  float* o = out.data<float>();
  norms.assign(static_cast<std::size_t>(rows), 0.0);
  for (int64_t r = 0; r < rows; ++r) {
    const double norm = std::sqrt(dot(in + r * d, in + r * d, d));
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
      const double proj = dot(y + base, dy + base, d);
      for (int64_t c = 0; c < d; ++c)
        o[base + c] = static_cast<float>((dy[base + c] - y[base + c] * proj) / norm);
    } else {
      for (int64_t c = 0; c < d; ++c) o[base + c] = static_cast<float>(dy[base + c] / eps);
    }
  }
  return dx;
}

AttentionGrads cosine_grads(const CosineScore& c, const Tensor& q, const Tensor& k,
                            AttentionGrads grads) {
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

// ---------------------------------------------------------------------------------------------
// Trilinear: s_ij = w1.q_i + w2.k_j + w3.(q_i * k_j), weight = [w1; w2; w3], each [D].
//
// Forward, numbered as the backward below:
//   (1) q'_i = [w3 * q_i, w1 . q_i, 1]      [B, Hq, Tq, D + 2]
//   (2) k'_j = [k_j, 1, w2 . k_j]           [B, Hkv, Tk, D + 2]
// so that q'_i . k'_j = (w3 * q_i) . k_j + w1 . q_i + w2 . k_j exactly (the two extra products
// are by 1). Cost: the fused kernels' feature loops run D + 2 instead of D wide.

Tensor trilinear_queries(const Tensor& q, const float* w) {  // (1)
  const int64_t D = q.size(-1), rows = rows_of(q);
  const float* w1 = w;
  const float* w3 = w + 2 * D;
  Tensor out = Tensor::empty(with_last(q.shape(), D + 2), DType::f32);
  const float* in = q.data<float>();
  float* o = out.data<float>();
  for (int64_t r = 0; r < rows; ++r) {
    const float* x = in + r * D;
    float* y = o + r * (D + 2);
    for (int64_t c = 0; c < D; ++c) y[c] = w3[c] * x[c];
    y[D] = static_cast<float>(dot(w1, x, D));
    y[D + 1] = 1.0f;
  }
  return out;
}

Tensor trilinear_keys(const Tensor& k, const float* w) {  // (2)
  const int64_t D = k.size(-1), rows = rows_of(k);
  const float* w2 = w + D;
  Tensor out = Tensor::empty(with_last(k.shape(), D + 2), DType::f32);
  const float* in = k.data<float>();
  float* o = out.data<float>();
  for (int64_t r = 0; r < rows; ++r) {
    const float* x = in + r * D;
    float* y = o + r * (D + 2);
    std::copy_n(x, D, y);
    y[D] = 1.0f;
    y[D + 1] = static_cast<float>(dot(w2, x, D));
  }
  return out;
}

// Backward, given dq' and dk' of the dot form:
//   (1) dq_i = w3 * dq'_i[0:D] + dq'_i[D] w1,   dw3 += q_i * dq'_i[0:D],   dw1 += dq'_i[D] q_i
//       dq'_i[D] = sum_j dS_ij is exactly 0: softmax rows sum to one, so
//       sum_j P_ij (dP_ij - D_i) = D_i - D_i (0 too for fully masked rows, where P = 0). The row
//       term cancels in the softmax; the kernel's value is float32 rounding of that 0, dropped
//       here (the float64 reference's is ~1e-17), so dw1 = 0 and w1 adds nothing to dq.
//   (2) dk_j = dk'_j[0:D] + dk'_j[D + 1] w2,    dw2 += dk'_j[D + 1] k_j
//       (dk'_j[D + 1] = sum_i dS_ij over the rows of every query head that reads key j)
AttentionGrads trilinear_grads(const TrilinearScore& score, const Tensor& q, const Tensor& k,
                               AttentionGrads grads) {
  const int64_t D = q.size(-1), Dp = D + 2;
  const float* w = score.weight.data<float>();
  const float* w2 = w + D;
  const float* w3 = w + 2 * D;
  std::vector<double> dw(static_cast<std::size_t>(3 * D), 0.0);  // [dw1 = 0; dw2; dw3]
  double* dw2 = dw.data() + D;
  double* dw3 = dw.data() + 2 * D;

  Tensor dq = Tensor::empty(q.shape(), DType::f32);
  {  // (1)
    const float* x = q.data<float>();
    const float* dqp = grads.dq.data<float>();
    float* o = dq.data<float>();
    for (int64_t r = 0, rows = rows_of(q); r < rows; ++r)
      for (int64_t c = 0; c < D; ++c) {
        const float g = dqp[r * Dp + c];
        // g = 0 exactly where the row is masked: its q may be NaN padding, and 0 * NaN is NaN.
        dw3[c] += g == 0.0f ? 0.0 : static_cast<double>(g) * x[r * D + c];
        o[r * D + c] = w3[c] * g;
      }
  }
  Tensor dk = Tensor::empty(k.shape(), DType::f32);
  {  // (2)
    const float* x = k.data<float>();
    const float* dkp = grads.dk.data<float>();
    float* o = dk.data<float>();
    for (int64_t r = 0, rows = rows_of(k); r < rows; ++r) {
      const float dcol = dkp[r * Dp + D + 1];
      // dcol = 0 exactly for a hidden key, whose k may be NaN padding (never read).
      for (int64_t c = 0; c < D; ++c) {
        if (dcol != 0.0f) dw2[c] += static_cast<double>(dcol) * x[r * D + c];
        o[r * D + c] = dkp[r * Dp + c] + dcol * w2[c];
      }
    }
  }
  grads.dq = std::move(dq);
  grads.dk = std::move(dk);
  grads.dscore = TrilinearScore{.weight = Tensor::from(dw, score.weight.shape()).to(DType::f32)};
  return grads;
}

// ---------------------------------------------------------------------------------------------
// Location: s_ij = (W q_i)_j = q_i . W_j, W [S_max, Dq], j < Tk <= S_max.
//
// Forward: k'[b, h, j] = W_j for every batch and key/value head, [B, Hkv, Tk, Dq]: the fused
// kernels read k as a contiguous array, and the copy is O(B Hkv Tk Dq), the size of k itself.
// Backward: dq passes through; dk = 0 (the score never reads the keys);
// dW_j = sum over b, h of dk'[b, h, j] for j < Tk, 0 for the rows past Tk.

Tensor location_keys(const Tensor& weight, const AttentionDims& dims) {
  const int64_t D = weight.size(1), block = dims.Tk * D;
  Tensor out = Tensor::empty({dims.B, dims.Hkv, dims.Tk, D}, DType::f32);
  const float* w = weight.data<float>();
  float* o = out.data<float>();
  for (int64_t bh = 0; bh < dims.B * dims.Hkv; ++bh) std::copy_n(w, block, o + bh * block);
  return out;
}

AttentionGrads location_grads(const LocationScore& score, const Tensor& k, AttentionGrads grads) {
  const int64_t D = score.weight.size(1), Tk = grads.dk.size(2);
  const int64_t block = Tk * D, copies = grads.dk.size(0) * grads.dk.size(1);
  std::vector<double> dw(static_cast<std::size_t>(score.weight.numel()), 0.0);
  const float* dkp = grads.dk.data<float>();
  for (int64_t bh = 0; bh < copies; ++bh)
    for (int64_t e = 0; e < block; ++e) dw[static_cast<std::size_t>(e)] += dkp[bh * block + e];
  grads.dk = Tensor::zeros(k.shape(), DType::f32);
  grads.dscore = LocationScore{.weight = Tensor::from(dw, score.weight.shape()).to(DType::f32)};
  return grads;
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
  if (const auto* t = std::get_if<TrilinearScore>(&params.score)) {
    const float* w = t->weight.data<float>();
    form.q = trilinear_queries(q, w);
    form.k = trilinear_keys(k, w);
    form.dims = with_width(dims, dims.Dq + 2);
    return form;
  }
  if (const auto* l = std::get_if<LocationScore>(&params.score)) {
    form.q = q;
    form.k = location_keys(l->weight, dims);
    form.dims = with_width(dims, dims.Dq);  // Dk of the real keys is never read
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
  if (const auto* c = std::get_if<CosineScore>(&params.score))
    return cosine_grads(*c, q, k, std::move(grads));
  if (const auto* t = std::get_if<TrilinearScore>(&params.score))
    return trilinear_grads(*t, q, k, std::move(grads));
  return location_grads(std::get<LocationScore>(params.score), k, std::move(grads));
}

}  // namespace attn::detail
