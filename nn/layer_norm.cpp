#include "nn/layer_norm.h"

#include <cmath>
#include <utility>

#include "attn/profile.h"
#include "nn/linear.h"

namespace attn::nn {

namespace {
constexpr const char* kOp = "layer_norm";

template <class T>
void forward_impl(const LayerNorm& ln, const Tensor& x, Tensor& y, Tensor& mean, Tensor& rstd,
                  int64_t rows) {
  const int64_t c = ln.dim;
  const T* px = x.data<T>();
  T* py = y.data<T>();
  T* pm = mean.data<T>();
  T* pr = rstd.data<T>();
  const T* g = ln.params.gamma.defined() ? ln.params.gamma.data<T>() : nullptr;
  const T* b = ln.params.beta.defined() ? ln.params.beta.data<T>() : nullptr;
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = px + r * c;
    // Two passes (mean, then squared deviations): no cancellation from E[x^2] - E[x]^2.
    double sum = 0.0;
    for (int64_t j = 0; j < c; ++j) sum += xr[j];
    const double m = c ? sum / double(c) : 0.0;
    double sq = 0.0;
    for (int64_t j = 0; j < c; ++j) sq += (xr[j] - m) * (xr[j] - m);
    const double s = 1.0 / std::sqrt((c ? sq / double(c) : 0.0) + ln.eps);
    pm[r] = T(m);
    pr[r] = T(s);
    for (int64_t j = 0; j < c; ++j) {
      const T xhat = T((xr[j] - m) * s);
      py[r * c + j] = g ? xhat * g[j] + b[j] : xhat;
    }
  }
}

template <class T>
Tensor backward_impl(LayerNorm& ln, const LayerNormCache& cache, const Tensor& dout, int64_t rows) {
  const int64_t c = ln.dim;
  const T* px = cache.x.data<T>();
  const T* pd = dout.data<T>();
  const T* pm = cache.mean.data<T>();
  const T* pr = cache.rstd.data<T>();
  const T* g = ln.params.gamma.defined() ? ln.params.gamma.data<T>() : nullptr;
  T* dg = g ? ln.grads.gamma.data<T>() : nullptr;
  T* db = g ? ln.grads.beta.data<T>() : nullptr;
  Tensor dx = Tensor::empty(cache.x.shape(), cache.x.dtype());
  T* pdx = dx.data<T>();
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = px + r * c;
    const T* dr = pd + r * c;
    const double m = pm[r], s = pr[r];
    // 2. y = xhat * gamma + beta  ->  dxhat = dout * gamma, dgamma += dout * xhat, dbeta += dout
    // 1. xhat = (x - mean) * rstd ->  dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
    double sum_dxhat = 0.0, sum_dxhat_xhat = 0.0;
    for (int64_t j = 0; j < c; ++j) {
      const double xhat = (xr[j] - m) * s;
      const double dxhat = g ? double(dr[j]) * g[j] : double(dr[j]);
      if (g) {
        dg[j] += T(dr[j] * xhat);
        db[j] += dr[j];
      }
      sum_dxhat += dxhat;
      sum_dxhat_xhat += dxhat * xhat;
    }
    const double mean_dxhat = sum_dxhat / double(c), mean_dxhat_xhat = sum_dxhat_xhat / double(c);
    for (int64_t j = 0; j < c; ++j) {
      const double xhat = (xr[j] - m) * s;
      const double dxhat = g ? double(dr[j]) * g[j] : double(dr[j]);
      pdx[r * c + j] = T(s * (dxhat - mean_dxhat - xhat * mean_dxhat_xhat));
    }
  }
  return dx;
}

int64_t check_input(const LayerNorm& ln, const Tensor& x, const char* what) {
  ATTN_CHECK(x.defined(), kOp, what, " is undefined");
  ATTN_CHECK(x.dim() >= 1 && x.size(-1) == ln.dim, kOp, what, " has ", x.dim() ? x.size(-1) : 0,
             " features, layer norm expects ", ln.dim, " (", what, " ", x.shape_str(), ")");
  ATTN_CHECK(x.dtype() == ln.params.gamma.dtype() || !ln.params.gamma.defined(), kOp, what, " is ",
             dtype_name(x.dtype()), ", gamma is ", dtype_name(ln.params.gamma.dtype()));
  for (const Tensor* t : {&ln.params.gamma, &ln.params.beta})
    ATTN_CHECK(!t->defined() ||
                   (t->shape() == Shape{ln.dim} && t->is_contiguous() && t->dtype() == x.dtype()),
               kOp, "gamma and beta must be contiguous [", ln.dim, "] ", dtype_name(x.dtype()),
               " tensors, got ", t->shape_str());
  ATTN_CHECK(ln.params.gamma.defined() == ln.params.beta.defined(), kOp,
             "gamma and beta must both be given or both be left out");
  return ln.dim ? x.numel() / ln.dim : 0;
}
}  // namespace

LayerNorm LayerNorm::create(const LayerNormConfig& config) {
  ATTN_CHECK(config.dim >= 1, kOp, "dim must be >= 1, got ", config.dim);
  ATTN_CHECK(config.eps > 0.0, kOp, "eps must be > 0, got ", config.eps);
  visit_float(config.dtype, kOp, "dtype", [](auto) {});
  LayerNorm ln;
  ln.dim = config.dim;
  ln.eps = config.eps;
  if (config.affine) {
    ln.params.gamma = Tensor::full({config.dim}, 1.0, config.dtype);
    ln.params.beta = Tensor::zeros({config.dim}, config.dtype);
    ln.grads = {zeros_like(ln.params.gamma), zeros_like(ln.params.beta)};
  }
  return ln;
}

LayerNormForward LayerNorm::forward(const Tensor& x) const {
  ATTN_PROFILE_SCOPE("layer_norm.forward");
  const int64_t rows = check_input(*this, x, "input");
  const Tensor xc = x.contiguous();
  Shape stat_shape(x.shape().begin(), x.shape().end() - 1);
  Tensor y = Tensor::empty(x.shape(), x.dtype());
  Tensor mean = Tensor::empty(stat_shape, x.dtype()), rstd = Tensor::empty(stat_shape, x.dtype());
  visit_float(x.dtype(), kOp, "input",
              [&](auto tag) { forward_impl<decltype(tag)>(*this, xc, y, mean, rstd, rows); });
  return {y, {xc, mean, rstd}};
}

Tensor LayerNorm::backward(const LayerNormCache& cache, const Tensor& dout) {
  ATTN_PROFILE_SCOPE("layer_norm.backward");
  ATTN_CHECK(cache.x.defined(), kOp, "backward needs the cache of a forward call");
  const int64_t rows = check_input(*this, cache.x, "cached input");
  ATTN_CHECK(dout.defined() && dout.shape() == cache.x.shape(), kOp, "dout is ",
             dout.defined() ? dout.shape_str() : "undefined", ", input was ", cache.x.shape_str());
  ATTN_CHECK(dout.dtype() == cache.x.dtype(), kOp, "dout is ", dtype_name(dout.dtype()),
             ", input was ", dtype_name(cache.x.dtype()));
  for (const auto& [value, grad] :
       {std::pair{&params.gamma, &grads.gamma}, std::pair{&params.beta, &grads.beta}})
    ATTN_CHECK(!value->defined() || (grad->defined() && grad->shape() == value->shape() &&
                                     grad->dtype() == value->dtype() && grad->is_contiguous()),
               kOp, "gradients must be contiguous tensors shaped like gamma and beta");
  const Tensor dc = dout.contiguous();
  return visit_float(dc.dtype(), kOp, "dout", [&](auto tag) {
    return backward_impl<decltype(tag)>(*this, cache, dc, rows);
  });
}

void LayerNorm::parameters(const std::string& prefix, ParameterList& list) const {
  add_parameter(list, prefix, "weight", params.gamma, grads.gamma);
  add_parameter(list, prefix, "bias", params.beta, grads.beta);
}

void LayerNorm::zero_grad() {
  if (grads.gamma.defined()) grads.gamma.fill(0.0);
  if (grads.beta.defined()) grads.beta.fill(0.0);
}

}  // namespace attn::nn
