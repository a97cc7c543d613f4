// Layer normalisation over the last dimension (Ba, Kiros & Hinton 2016).
//
// Letters: N rows (all leading dimensions), C normalised features.
//
//   x [..., C]  ->  y [..., C],   y = (x - mean) * rstd * gamma + beta,
//   mean and var over the C features of each row (biased variance), rstd = 1 / sqrt(var + eps)
//
// Statistics are accumulated in float64 even for float32 inputs: a row of 1e4-offset values
// would otherwise lose most of the variance's digits to cancellation.
#pragma once

#include <cstdint>
#include <string>

#include "attn/tensor.h"
#include "nn/parameters.h"

namespace attn::nn {

struct LayerNormConfig {
  int64_t dim = 0;  // C
  double eps = 1e-5;
  bool affine = true;  // learn gamma and beta (PyTorch elementwise_affine)
  DType dtype = DType::f32;
};

struct LayerNormParams {
  Tensor gamma;  // [C], undefined when not affine
  Tensor beta;   // [C], undefined when not affine
};

struct LayerNormCache {
  Tensor x;     // input, contiguous
  Tensor mean;  // [N] in the input dtype
  Tensor rstd;  // [N]
};

struct LayerNormForward {
  Tensor out;
  LayerNormCache cache;
};

struct LayerNorm {
  LayerNormParams params;
  LayerNormParams grads;
  int64_t dim = 0;
  double eps = 1e-5;

  // PyTorch's initialisation: gamma = 1, beta = 0.
  static LayerNorm create(const LayerNormConfig& config);

  LayerNormForward forward(const Tensor& x) const;
  // dout [..., C] -> dx [..., C]; adds dgamma and dbeta into grads.
  Tensor backward(const LayerNormCache& cache, const Tensor& dout);

  void parameters(const std::string& prefix, ParameterList& list) const;
  void zero_grad();
};

}  // namespace attn::nn
