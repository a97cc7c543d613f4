// The float64 oracle: plain-loop reference implementations of every op, forward and backward.
//
// Written for clarity, never optimised: they materialise every score, loop over every index and
// follow the equations in attention.h literally. Tests compare every fast path against them.
// Inputs of any dtype are converted to float64; every output and gradient is float64. Inputs are
// validated exactly like the public front-ends.
#pragma once

#include "attn/attention.h"

namespace attn::reference {

AttentionOutput attention(const Tensor& q, const Tensor& k, const Tensor& v,
                          const AttentionParams& params = {});

AttentionGrads attention_backward(const Tensor& q, const Tensor& k, const Tensor& v,
                                  const AttentionParams& params, const AttentionOutput& forward,
                                  const Tensor& dout);

}  // namespace attn::reference
