// Position-wise feed-forward block of the Transformer (Vaswani et al. 2017, eq. 2).
//
// Letters: C model width, F hidden width.
//
//   x [..., C]  ->  y [..., C],   y = W2 dropout(act(W1 x + b1)) + b2,   W1 [F, C], W2 [C, F]
//
// act is ReLU, GELU (exact, with erf, as PyTorch's default) or GELU's tanh approximation.
// Dropout (optional) sits after the activation, where PyTorch's Transformer layers put it.
#pragma once

#include <cstdint>
#include <string>

#include "attn/tensor.h"
#include "nn/dropout.h"
#include "nn/linear.h"
#include "nn/parameters.h"

namespace attn::nn {

enum class Activation { relu, gelu, gelu_tanh };

// "relu", "gelu", "gelu_tanh"
const char* activation_name(Activation activation);

// Elementwise activation and its backward (dx = dy * act'(x)), on any float tensor.
Tensor activation_forward(Activation activation, const Tensor& x);
Tensor activation_backward(Activation activation, const Tensor& x, const Tensor& dy);

struct FeedForwardConfig {
  int64_t dim = 0;     // C
  int64_t hidden = 0;  // F (4 C in the paper)
  Activation activation = Activation::relu;
  bool bias = true;
  DType dtype = DType::f32;
};

struct FeedForwardCache {
  LinearCache in_cache;
  Tensor pre_activation;  // W1 x + b1, [..., F]
  DropoutSpec dropout;
  LinearCache out_cache;
};

struct FeedForwardForward {
  Tensor out;
  FeedForwardCache cache;
};

struct FeedForward {
  Linear in;   // C -> F
  Linear out;  // F -> C
  Activation activation = Activation::relu;

  // Each Linear initialised as nn.Linear (seed and seed + 1).
  static FeedForward create(const FeedForwardConfig& config, uint64_t seed);

  FeedForwardForward forward(const Tensor& x, const DropoutSpec& dropout = {}) const;
  Tensor backward(const FeedForwardCache& cache, const Tensor& dout);

  // Names "in.weight", "in.bias", "out.weight", "out.bias" after the prefix.
  void parameters(const std::string& prefix, ParameterList& list) const;
  void zero_grad();
};

}  // namespace attn::nn
