// Input validation shared by the attention front-end and the reference (internal header).
#pragma once

#include "attn/attention.h"

namespace attn::detail {

// Sizes of a validated attention problem.
struct AttentionDims {
  int64_t B = 0, Hq = 0, Hkv = 0, Tq = 0, Tk = 0, Dq = 0, Dk = 0, Dv = 0;
};

// Throws attn::Error naming `op`, the argument and the shapes for anything attention.h forbids:
// ranks, widths, head counts, lengths, mask/bias shapes, window sizes, missing or misshapen
// scoring parameters, dropout probability, local-attention parameters.
AttentionDims validate_attention(const char* op, const Tensor& q, const Tensor& k, const Tensor& v,
                                 const AttentionParams& params);

// Additionally checks the gradient of the output and the saved forward for attention_backward.
void validate_attention_backward(const char* op, const AttentionDims& dims,
                                 const AttentionOutput& forward, const Tensor& dout);

// The score used by query head h.
inline const Score& head_score(const AttentionParams& params, int64_t h) {
  return params.head_scores.empty() ? params.score
                                    : params.head_scores[static_cast<std::size_t>(h)];
}

// Every tensor in `score` converted to `dtype` and made contiguous.
Score convert_score(const Score& score, DType dtype);
// params with q/k/v-independent tensors (scores, bias, local) converted to `dtype`, contiguous.
AttentionParams convert_params(const AttentionParams& params, DType dtype);

// True when b broadcasts to `target` (right-aligned, size-1 dims broadcast).
bool broadcastable_to(const Shape& shape, const Shape& target);

}  // namespace attn::detail
