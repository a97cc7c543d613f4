// Input validation shared by the attention front-end and the reference (internal header).
#pragma once

#include <type_traits>
#include <variant>

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

// Calls fn(tensor) for every Tensor field of the score (defined or not), in a fixed order:
// general weight, u, v; additive w_query, w_key, bias, v; concat weight, v; cosine tau;
// location / trilinear weight. ScoreT is Score or const Score.
template <class ScoreT, class Fn>
void for_each_score_tensor(ScoreT& score, Fn&& fn) {
  std::visit(
      [&](auto& s) {
        using S = std::decay_t<decltype(s)>;
        if constexpr (std::is_same_v<S, GeneralScore>) {
          fn(s.weight), fn(s.u), fn(s.v);
        } else if constexpr (std::is_same_v<S, AdditiveScore>) {
          fn(s.w_query), fn(s.w_key), fn(s.bias), fn(s.v);
        } else if constexpr (std::is_same_v<S, ConcatScore>) {
          fn(s.weight), fn(s.v);
        } else if constexpr (std::is_same_v<S, CosineScore>) {
          fn(s.tau);
        } else if constexpr (std::is_same_v<S, LocationScore> ||
                             std::is_same_v<S, TrilinearScore>) {
          fn(s.weight);
        }
      },
      score);
}

// Every tensor in `score` converted to `dtype` and made contiguous.
Score convert_score(const Score& score, DType dtype);
// params with q/k/v-independent tensors (scores, bias, local) converted to `dtype`, contiguous.
AttentionParams convert_params(const AttentionParams& params, DType dtype);

// True when b broadcasts to `target` (right-aligned, size-1 dims broadcast).
bool broadcastable_to(const Shape& shape, const Shape& target);

}  // namespace attn::detail
