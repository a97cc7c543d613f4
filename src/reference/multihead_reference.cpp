// Float64 oracle of multi-head attention: the projections and head reshapes written as plain
// index loops straight from the equations in attn/multihead.h, around the attention oracle
// attn::reference::attention / attention_backward. Never optimised.
#include <cstdint>

#include "attn/multihead.h"
#include "attn/reference.h"

namespace attn::reference {

namespace {

Tensor f64(const Tensor& t) { return t.defined() ? t.to(DType::f64).contiguous() : t; }

// y[b, t, n] = sum_i x[b, t, i] * w[n, i] + bias[n]          (x [B, T, I], w [N, I], bias [N])
Tensor linear(const Tensor& x, const Tensor& w, const Tensor& bias) {
  const int64_t B = x.size(0), T = x.size(1), I = x.size(2), N = w.size(0);
  Tensor y = Tensor::zeros({B, T, N}, DType::f64);
  const double* xp = x.data<double>();
  const double* wp = w.data<double>();
  double* yp = y.data<double>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t n = 0; n < N; ++n) {
        double s = bias.defined() ? bias.data<double>()[n] : 0.0;
        for (int64_t i = 0; i < I; ++i) s += xp[(b * T + t) * I + i] * wp[n * I + i];
        yp[(b * T + t) * N + n] = s;
      }
  return y;
}

// Gradients of linear() given dy [B, T, N]:
//   dx[b, t, i] = sum_n dy[b, t, n] w[n, i]
//   dw[n, i]    = sum_{b, t} dy[b, t, n] x[b, t, i]
//   dbias[n]    = sum_{b, t} dy[b, t, n]
void linear_backward(const Tensor& x, const Tensor& w, const Tensor& dy, bool has_bias, Tensor& dx,
                     Tensor& dw, Tensor& dbias) {
  const int64_t B = x.size(0), T = x.size(1), I = x.size(2), N = w.size(0);
  dx = Tensor::zeros({B, T, I}, DType::f64);
  dw = Tensor::zeros({N, I}, DType::f64);
  dbias = has_bias ? Tensor::zeros({N}, DType::f64) : Tensor();
  const double* xp = x.data<double>();
  const double* wp = w.data<double>();
  const double* gp = dy.data<double>();
  double* dxp = dx.data<double>();
  double* dwp = dw.data<double>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t n = 0; n < N; ++n) {
        const double g = gp[(b * T + t) * N + n];
        if (has_bias) dbias.data<double>()[n] += g;
        for (int64_t i = 0; i < I; ++i) {
          dxp[(b * T + t) * I + i] += g * wp[n * I + i];
          dwp[n * I + i] += g * xp[(b * T + t) * I + i];
        }
      }
}

// heads[b, h, t, d] = y[b, t, h * D + d]
Tensor split_heads(const Tensor& y, int64_t H, int64_t D) {
  const int64_t B = y.size(0), T = y.size(1);
  Tensor heads = Tensor::zeros({B, H, T, D}, DType::f64);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t t = 0; t < T; ++t)
        for (int64_t d = 0; d < D; ++d)
          heads.data<double>()[((b * H + h) * T + t) * D + d] =
              y.data<double>()[(b * T + t) * H * D + h * D + d];
  return heads;
}

// y[b, t, h * D + d] = heads[b, h, t, d]
Tensor merge_heads(const Tensor& heads) {
  const int64_t B = heads.size(0), H = heads.size(1), T = heads.size(2), D = heads.size(3);
  Tensor y = Tensor::zeros({B, T, H * D}, DType::f64);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t t = 0; t < T; ++t)
        for (int64_t d = 0; d < D; ++d)
          y.data<double>()[(b * T + t) * H * D + h * D + d] =
              heads.data<double>()[((b * H + h) * T + t) * D + d];
  return y;
}

}  // namespace

MultiHeadOutput multihead_attention(const MultiHeadConfig& config, const MultiHeadWeights& weights,
                                    const Tensor& query, const Tensor& key, const Tensor& value,
                                    const AttentionParams& params) {
  const detail::MultiHeadProblem p =
      detail::validate_multihead("multihead_attention", config, weights, query, key, value);
  const detail::MultiHeadDims& d = p.dims;
  MultiHeadOutput out;
  out.q = split_heads(linear(f64(query), f64(weights.w_q), f64(weights.b_q)), d.Hq, d.Dk);   // 1
  out.k = split_heads(linear(f64(key), f64(weights.w_k), f64(weights.b_k)), d.Hkv, d.Dk);    // 2
  out.v = split_heads(linear(f64(value), f64(weights.w_v), f64(weights.b_v)), d.Hkv, d.Dv);  // 3
  out.attention = reference::attention(out.q, out.k, out.v, params);                         // 4
  out.output = linear(merge_heads(f64(out.attention.out)), f64(weights.w_o),                 // 5, 6
                      f64(weights.b_o));
  return out;
}

MultiHeadGrads multihead_attention_backward(const MultiHeadConfig& config,
                                            const MultiHeadWeights& weights, const Tensor& query,
                                            const Tensor& key, const Tensor& value,
                                            const AttentionParams& params,
                                            const MultiHeadOutput& saved, const Tensor& doutput) {
  const char* op = "multihead_attention_backward";
  const detail::MultiHeadProblem p =
      detail::validate_multihead(op, config, weights, query, key, value);
  detail::validate_multihead_backward(op, p, saved, doutput);
  const bool bias = p.dims.bias;
  MultiHeadGrads g;
  MultiHeadWeights& dw = g.dweights;
  // 6. output = c W_o^T + b_o,  5. c = merge_heads(a)
  Tensor dc;
  linear_backward(merge_heads(f64(saved.attention.out)), f64(weights.w_o), f64(doutput), bias, dc,
                  dw.w_o, dw.b_o);
  // 5. (backward) da = split_heads(dc)
  const Tensor da = split_heads(dc, p.dims.Hq, p.dims.Dv);
  // 4. a = attention(q, k, v)
  g.attention = reference::attention_backward(f64(saved.q), f64(saved.k), f64(saved.v), params,
                                              saved.attention, da);
  // 3. v = split_heads(value W_v^T + b_v)
  linear_backward(f64(value), f64(weights.w_v), merge_heads(f64(g.attention.dv)), bias, g.dvalue,
                  dw.w_v, dw.b_v);
  // 2. k = split_heads(key W_k^T + b_k)
  linear_backward(f64(key), f64(weights.w_k), merge_heads(f64(g.attention.dk)), bias, g.dkey,
                  dw.w_k, dw.b_k);
  // 1. q = split_heads(query W_q^T + b_q)
  linear_backward(f64(query), f64(weights.w_q), merge_heads(f64(g.attention.dq)), bias, g.dquery,
                  dw.w_q, dw.b_q);
  return g;
}

}  // namespace attn::reference
