#include "nn/linear.h"

#include <cblas.h>

#include <cmath>

#include "attn/profile.h"

namespace attn::nn {

template <>
void gemm<float>(bool transpose_a, bool transpose_b, int64_t m, int64_t n, int64_t k, float alpha,
                 const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c,
                 int64_t ldc) {
  ATTN_PROFILE_GEMM(profile::gemm_phase(transpose_a, transpose_b), m, n, k);
  if (m == 0 || n == 0) return;
  if (k == 0) {  // BLAS would also just scale C, but some builds reject lda < 1
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) c[i * ldc + j] = beta == 0.0f ? 0.0f : beta * c[i * ldc + j];
    return;
  }
  cblas_sgemm(CblasRowMajor, transpose_a ? CblasTrans : CblasNoTrans,
              transpose_b ? CblasTrans : CblasNoTrans, static_cast<blasint>(m),
              static_cast<blasint>(n), static_cast<blasint>(k), alpha, a, static_cast<blasint>(lda),
              b, static_cast<blasint>(ldb), beta, c, static_cast<blasint>(ldc));
}

template <>
void gemm<double>(bool transpose_a, bool transpose_b, int64_t m, int64_t n, int64_t k, double alpha,
                  const double* a, int64_t lda, const double* b, int64_t ldb, double beta,
                  double* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) {
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) c[i * ldc + j] = beta == 0.0 ? 0.0 : beta * c[i * ldc + j];
    return;
  }
  cblas_dgemm(CblasRowMajor, transpose_a ? CblasTrans : CblasNoTrans,
              transpose_b ? CblasTrans : CblasNoTrans, static_cast<blasint>(m),
              static_cast<blasint>(n), static_cast<blasint>(k), alpha, a, static_cast<blasint>(lda),
              b, static_cast<blasint>(ldb), beta, c, static_cast<blasint>(ldc));
}

namespace {

constexpr const char* kOp = "linear";

// Input [..., In] -> (rows, output shape [..., Out]).
std::pair<int64_t, Shape> check_input(const LinearParams& p, const Tensor& x) {
  // The layer's fields are public: re-check what the GEMM relies on.
  ATTN_CHECK(p.weight.defined() && p.weight.dim() == 2 && p.weight.is_contiguous(), kOp,
             "weight must be a contiguous [Out, In] tensor, got ",
             p.weight.defined() ? p.weight.shape_str() : "undefined");
  ATTN_CHECK(!p.bias.defined() || (p.bias.shape() == Shape{p.weight.size(0)} &&
                                   p.bias.dtype() == p.weight.dtype() && p.bias.is_contiguous()),
             kOp, "bias is ", p.bias.shape_str(), ", expected [", p.weight.size(0), "] for weight ",
             p.weight.shape_str());
  ATTN_CHECK(x.defined(), kOp, "input is undefined");
  ATTN_CHECK(x.dim() >= 1, kOp, "input must have at least 1 dimension, got a scalar");
  ATTN_CHECK(x.dtype() == p.weight.dtype(), kOp, "input is ", dtype_name(x.dtype()), ", weight is ",
             dtype_name(p.weight.dtype()));
  const int64_t in = p.weight.size(1);
  ATTN_CHECK(x.size(-1) == in, kOp, "input has ", x.size(-1), " features, weight expects ", in,
             " (input ", x.shape_str(), ", weight ", p.weight.shape_str(), ")");
  Shape out_shape = x.shape();
  out_shape.back() = p.weight.size(0);
  return {in == 0 ? shape_numel(Shape(x.shape().begin(), x.shape().end() - 1)) : x.numel() / in,
          out_shape};
}

template <class T>
Tensor forward_impl(const LinearParams& p, const Tensor& x, int64_t rows, const Shape& out_shape) {
  const int64_t in = p.weight.size(1), out = p.weight.size(0);
  Tensor y = Tensor::empty(out_shape, x.dtype());
  T* py = y.data<T>();
  // Broadcast the bias into y first so the GEMM adds onto it (beta = 1): one pass over y.
  if (p.bias.defined()) {
    const T* pb = p.bias.data<T>();
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t o = 0; o < out; ++o) py[r * out + o] = pb[o];
  }
  gemm<T>(false, true, rows, out, in, T(1), x.data<T>(), in, p.weight.data<T>(), in,
          p.bias.defined() ? T(1) : T(0), py, out);
  return y;
}

template <class T>
Tensor backward_impl(const LinearParams& p, LinearParams& g, const Tensor& x, const Tensor& dout,
                     int64_t rows) {
  const int64_t in = p.weight.size(1), out = p.weight.size(0);
  const T* pd = dout.data<T>();
  // 1. y = x W^T      ->  dx = dout W,  dW += dout^T x
  Tensor dx = Tensor::empty(x.shape(), x.dtype());
  gemm<T>(false, false, rows, in, out, T(1), pd, out, p.weight.data<T>(), in, T(0), dx.data<T>(),
          in);
  gemm<T>(true, false, out, in, rows, T(1), pd, out, x.data<T>(), in, T(1), g.weight.data<T>(), in);
  // 2. y += b         ->  db += sum over rows of dout
  if (p.bias.defined()) {
    T* db = g.bias.data<T>();
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t o = 0; o < out; ++o) db[o] += pd[r * out + o];
  }
  return dx;
}

}  // namespace

Linear Linear::create(const LinearConfig& config, uint64_t seed) {
  ATTN_CHECK(config.in_features >= 0 && config.out_features >= 0, kOp,
             "feature counts must be >= 0, got in_features ", config.in_features, ", out_features ",
             config.out_features);
  LinearParams p;
  p.weight = Tensor::empty({config.out_features, config.in_features}, config.dtype);
  const double bound = config.in_features > 0 ? 1.0 / std::sqrt(double(config.in_features)) : 0.0;
  init_uniform(p.weight, -bound, bound, seed, 0);
  if (config.bias) {
    p.bias = Tensor::empty({config.out_features}, config.dtype);
    init_uniform(p.bias, -bound, bound, seed, 1);
  }
  return from_params(std::move(p));
}

Linear Linear::from_params(LinearParams params) {
  ATTN_CHECK(params.weight.defined() && params.weight.dim() == 2, kOp,
             "weight must be [Out, In], got ",
             params.weight.defined() ? params.weight.shape_str() : "undefined");
  visit_float(params.weight.dtype(), kOp, "weight", [](auto) {});
  params.weight = params.weight.contiguous();
  if (params.bias.defined()) {
    ATTN_CHECK(params.bias.shape() == Shape{params.weight.size(0)}, kOp, "bias is ",
               params.bias.shape_str(), ", expected [", params.weight.size(0), "] for weight ",
               params.weight.shape_str());
    params.bias = params.bias.to(params.weight.dtype()).contiguous();
  }
  Linear layer;
  layer.grads = {zeros_like(params.weight), zeros_like(params.bias)};
  layer.params = std::move(params);
  return layer;
}

LinearForward Linear::forward(const Tensor& x) const {
  ATTN_PROFILE_SCOPE("linear.forward");
  const auto [rows, out_shape] = check_input(params, x);
  const Tensor xc = x.contiguous();
  // Init-captures: lambdas capturing structured bindings need clang 16 (the fuzz build's is 14).
  Tensor y = visit_float(xc.dtype(), kOp, "input",
                         [&, rows = rows, &out_shape = out_shape](auto tag) {
    return forward_impl<decltype(tag)>(params, xc, rows, out_shape);
  });
  return {y, {xc}};
}

Tensor Linear::backward(const LinearCache& cache, const Tensor& dout) {
  ATTN_PROFILE_SCOPE("linear.backward");
  ATTN_CHECK(cache.x.defined(), kOp, "backward needs the cache of a forward call");
  const auto [rows, out_shape] = check_input(params, cache.x);
  ATTN_CHECK(dout.defined() && dout.shape() == out_shape, kOp, "dout is ",
             dout.defined() ? dout.shape_str() : "undefined", ", output was ",
             shape_str(out_shape));
  ATTN_CHECK(dout.dtype() == params.weight.dtype(), kOp, "dout is ", dtype_name(dout.dtype()),
             ", weight is ", dtype_name(params.weight.dtype()));
  ATTN_CHECK(grads.weight.defined() && grads.weight.shape() == params.weight.shape() &&
                 grads.weight.dtype() == params.weight.dtype() && grads.weight.is_contiguous() &&
                 grads.bias.defined() == params.bias.defined() &&
                 (!grads.bias.defined() ||
                  (grads.bias.shape() == params.bias.shape() &&
                   grads.bias.dtype() == params.bias.dtype() && grads.bias.is_contiguous())),
             kOp, "gradients must be contiguous tensors shaped like the parameters");
  const Tensor dc = dout.contiguous();
  return visit_float(dc.dtype(), kOp, "dout", [&, rows = rows](auto tag) {
    return backward_impl<decltype(tag)>(params, grads, cache.x, dc, rows);
  });
}

void Linear::parameters(const std::string& prefix, ParameterList& list) const {
  add_parameter(list, prefix, "weight", params.weight, grads.weight);
  add_parameter(list, prefix, "bias", params.bias, grads.bias);
}

void Linear::zero_grad() {
  grads.weight.fill(0.0);
  if (grads.bias.defined()) grads.bias.fill(0.0);
}

}  // namespace attn::nn
