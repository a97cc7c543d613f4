// Linear layer, and the BLAS and dtype helpers every nn/ layer builds on.
//
// Letters: N rows (all leading dimensions of the input flattened), In input features,
// Out output features.
//
//   x [..., In]  ->  y [..., Out],   y = x W^T + b,   W [Out, In], b [Out] (optional)
//
// Layers compute in the dtype of their parameters (float32 for training and inference; float64
// so that tests run finite differences through the same code). Inputs must have that dtype.
#pragma once

#include <cstdint>
#include <string>
#include <utility>

#include "attn/error.h"
#include "attn/tensor.h"
#include "nn/parameters.h"

namespace attn::nn {

// Row-major C[M, N] = alpha * op(A) op(B) + beta * C with op(X) = X or X^T; lda, ldb, ldc are
// row strides in elements. Calls cblas_sgemm / cblas_dgemm; empty products only scale C.
template <class T>
void gemm(bool transpose_a, bool transpose_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a,
          int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc);

// Calls f(float{}) or f(double{}) for the dtype; any other dtype is an error naming `op`.
template <class F>
decltype(auto) visit_float(DType dtype, const char* op, const char* what, F&& f) {
  if (dtype == DType::f32) return std::forward<F>(f)(float{});
  ATTN_CHECK(dtype == DType::f64, op, what, " must be float32 or float64, got ", dtype_name(dtype));
  return std::forward<F>(f)(double{});
}

struct LinearConfig {
  int64_t in_features = 0;
  int64_t out_features = 0;
  bool bias = true;
  DType dtype = DType::f32;
};

struct LinearParams {
  Tensor weight;  // [Out, In]
  Tensor bias;    // [Out], undefined when the layer has no bias
};

struct LinearCache {
  Tensor x;  // the input, contiguous (shares storage with the caller's tensor when it can)
};

struct LinearForward {
  Tensor out;
  LinearCache cache;
};

struct Linear {
  LinearParams params;
  LinearParams grads;  // same shapes; backward accumulates into them

  // PyTorch's nn.Linear initialisation: W and b ~ U(-1/sqrt(In), 1/sqrt(In)).
  static Linear create(const LinearConfig& config, uint64_t seed);
  // Wraps existing weights (gradients start at zero).
  static Linear from_params(LinearParams params);

  int64_t in_features() const { return params.weight.size(1); }
  int64_t out_features() const { return params.weight.size(0); }

  LinearForward forward(const Tensor& x) const;
  // dout [..., Out] -> dx [..., In]; adds dW = dout^T x and db = sum(dout) into grads.
  Tensor backward(const LinearCache& cache, const Tensor& dout);

  void parameters(const std::string& prefix, ParameterList& list) const;
  void zero_grad();
};

}  // namespace attn::nn
