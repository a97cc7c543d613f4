// Scores that are a dot product of transformed inputs (internal header).
//
//   general, full:      q^T W k            = (q W) . k
//   general, low rank:  q^T u^T v k        = (u q) . (v k)
//   cosine:             tau q.k / (|q||k|) = (tau q / |q|) . (k / |k|)
//   trilinear:          w1.q + w2.k + w3.(q*k) = [w3*q, w1.q, 1] . [k, 1, w2.k]   (width D + 2)
//   location:           (W q)_j            = q . W_j: the "keys" are the rows W[0:Tk], the same
//                                            for every batch and head
//
// Transforming q and k once (O(T d) work) lets these scores run on the fused dot-product kernels
// instead of the composed path; the backward chains the fused kernel's dq, dk through the
// transform. float32 only, one score for every head.
//
// Why trilinear widens the dot product instead of passing its terms as a bias: the row term
// w1.q_i cancels in the softmax but not in the log-sum-exp, which attention() returns and
// attention_backward() receives from the caller. Carried inside the dot product it makes the fused
// kernel's lse (and the P = exp(s - lse) its backward rebuilds) the true score's, with no Tq x Tk
// bias; the column term w2.k_j rides along the same way, per key/value head, so grouped heads and
// a user bias need no special handling.
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
