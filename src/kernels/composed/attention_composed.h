// The composed attention path (internal): for each (batch, head) it materialises one Tq x Tk
// score tile in a per-thread buffer, builds it with BLAS GEMMs (or the score's own loops),
// applies the masks, softmax, dropout, and multiplies by V with BLAS. Memory beyond inputs and
// outputs is O(threads * Tq * Tk). It is the general fallback for every scoring function and
// mask, and the oracle for the fused kernels.
//
// Kernels never validate: the front-end (src/attention.cpp) has already checked every shape and
// converted q, k, v and every parameter tensor to T and made them contiguous.
#pragma once

#include "attention_validate.h"
#include "attn/attention.h"

namespace attn::kernels {

template <class T>
AttentionOutput composed_attention_forward(const detail::AttentionDims& dims, const Tensor& q,
                                           const Tensor& k, const Tensor& v,
                                           const AttentionParams& params);

template <class T>
AttentionGrads composed_attention_backward(const detail::AttentionDims& dims, const Tensor& q,
                                           const Tensor& k, const Tensor& v,
                                           const AttentionParams& params,
                                           const AttentionOutput& forward, const Tensor& dout);

}  // namespace attn::kernels
