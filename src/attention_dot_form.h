// Scores that are a dot product of transformed inputs (internal header).
//
//   general, full:      q^T W k            = (q W) . k
//   general, low rank:  q^T u^T v k        = (u q) . (v k)
//   cosine:             tau q.k / (|q||k|) = (tau q / |q|) . (k / |k|)
//
// Transforming q and k once (O(T d) work) lets these scores run on the fused dot-product kernels
// instead of the composed path; the backward chains the fused kernel's dq, dk through the
// transform. float32 only, one score for every head.
#pragma once

#include <optional>

#include "attention_validate.h"

namespace attn::detail {

struct DotForm {
  AttentionDims dims;       // with Dq = Dk = the transformed width
  Tensor q, k;              // transformed, contiguous float32
  AttentionParams params;   // params.score = DotScore{}
};

// The dot form of params.score, or nullopt when the score is not one of the above (or per-head
// scores are given). q, k and params are as the front-end normalised them.
std::optional<DotForm> to_dot_form(const AttentionDims& dims, const Tensor& q, const Tensor& k,
                                   const AttentionParams& params);

// Turns the gradients of the dot form (dq, dk of the transformed inputs) into the gradients of
// the original q, k and of the score's parameters. dv, dbias pass through.
AttentionGrads from_dot_form_grads(const Tensor& q, const Tensor& k, const AttentionParams& params,
                                   AttentionGrads dot_grads);

}  // namespace attn::detail
