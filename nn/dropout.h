// Dropout (Srivastava et al. 2014) with a counter-based mask.
//
//   x [any shape]  ->  y = x * keep / (1 - p),
//   keep[i] = counter_uniform(seed, stream, 0, 0, i) >= p   (i the row-major position)
//
// The keep decision for element i is a pure function of (seed, stream, i) (attn/random.h), so
// the backward regenerates the mask instead of storing it, and a run is reproducible. Give each
// dropout site of a model its own `stream` and each training step its own `seed`.
#pragma once

#include <cstdint>

#include "attn/tensor.h"

namespace attn::nn {

struct DropoutSpec {
  double p = 0.0;       // drop probability in [0, 1); 0 (or inference) is the identity
  uint64_t seed = 0;    // changes every step
  uint64_t stream = 0;  // distinguishes dropout sites that share a seed
};

// Whether element i (row-major position) is kept.
bool dropout_keeps(const DropoutSpec& spec, int64_t i);

// Returns x itself (no copy) when p == 0.
Tensor dropout_forward(const Tensor& x, const DropoutSpec& spec);
// dx = dout * keep / (1 - p), from the same spec; returns dout itself when p == 0.
Tensor dropout_backward(const Tensor& dout, const DropoutSpec& spec);

}  // namespace attn::nn
