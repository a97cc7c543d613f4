// Dropout (Srivastava et al. 2014) with a counter-based mask.
//
//   x [any shape]  ->  y = x * keep / (1 - p),
//   keep[i] = attn::dropout_keep(seed, p, stream, 0, i / kDropoutRowLength, i % kDropoutRowLength)
//   (i the row-major position)
//
// The keep decision for element i is a pure function of (seed, stream, i) (attn/random.h), so
// the backward regenerates the mask instead of storing it, and a run is reproducible. Give each
// dropout site of a model its own `stream` and each training step its own `seed`. The flat
// positions are cut into segments of kDropoutRowLength elements, each one "row" of random.h's
// split hash: one 64-bit row key per segment, then one 32-bit multiply-xorshift round per
// element, a loop the compiler vectorises.
#pragma once

#include <cstdint>

#include "attn/tensor.h"

namespace attn::nn {

// Elements per row key of the split hash: long enough that the per-row mixing (four 64-bit
// rounds) is noise beside the per-element round, short enough that a fresh key starts often.
inline constexpr int64_t kDropoutRowLength = 1024;

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
