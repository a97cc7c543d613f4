// Front-end glue shared by the fused kernels (internal header): fills the sizes, the dot-product
// scale and the interval masks (lengths, causal, alignment, window) of a kernel's argument struct
// from a validated problem, and right-aligns a broadcast bias into explicit strides.
#pragma once

#include <cmath>
#include <variant>

#include "attention_validate.h"
#include "kernels/flash/flash_attention.h"
#include "kernels/common/kernel_problem.h"

namespace attn::kernels {

// The sizes and interval masks (lengths, causal, alignment, window) of a validated problem.
inline void fill_problem(ProblemSizes& sizes, IntervalMasks& masks,
                         const detail::AttentionDims& dims, const Mask& mask) {
  sizes.batch = dims.B, sizes.q_heads = dims.Hq, sizes.kv_heads = dims.Hkv;
  sizes.q_len = dims.Tq, sizes.k_len = dims.Tk;
  masks.key_lengths = mask.key_lengths.empty() ? nullptr : mask.key_lengths.data();
  masks.query_lengths = mask.query_lengths.empty() ? nullptr : mask.query_lengths.data();
  masks.causal = mask.causal;
  masks.bottom_right = mask.alignment == Alignment::bottom_right;
  if (mask.window) {
    masks.window_left = mask.window->left;
    masks.window_right = mask.window->right;
  }
}

// fill_problem plus head_dim and value_dim, for the dot-product kernels' argument structs.
template <class Args>
void fill_interval_masks(Args& args, const detail::AttentionDims& dims, const Mask& mask) {
  fill_problem(args, args, dims, mask);
  args.head_dim = dims.Dq, args.value_dim = dims.Dv;
}

// The factor of q.k for a dot-family score: 1 for DotScore, the scaled score's scale (default
// 1/sqrt(Dk)) otherwise.
inline float dot_scale(const Score& score, const detail::AttentionDims& dims) {
  if (const auto* scaled = std::get_if<ScaledDotScore>(&score))
    return static_cast<float>(scaled->scale.value_or(1.0 / std::sqrt(static_cast<double>(dims.Dk))));
  return 1.0f;
}

// The strides (elements) of a mask tensor right-aligned against [B, Hq, Tq, Tk]: missing and
// size-1 dimensions get stride 0, so kernels read it in place (never copied per head).
struct BroadcastStrides {
  int64_t b = 0, h = 0, q = 0, k = 0;
};
inline BroadcastStrides broadcast_strides(const Tensor& t, const detail::AttentionDims& dims) {
  int64_t strides[4] = {0, 0, 0, 0};
  const int64_t full[4] = {dims.B, dims.Hq, dims.Tq, dims.Tk};
  for (int64_t d = 0; d < t.dim(); ++d) {
    const int64_t target = 4 - t.dim() + d;
    if (t.size(d) != 1 || full[target] == 1) strides[target] = t.stride(d);
  }
  return {strides[0], strides[1], strides[2], strides[3]};
}

// A float32 bias read in place through its broadcast strides; the backward sums dbias over the
// broadcast dimensions.
inline FlashBias broadcast_bias(const Tensor& bias, const detail::AttentionDims& dims) {
  const BroadcastStrides s = broadcast_strides(bias, dims);
  return {bias.data<float>(), s.b, s.h, s.q, s.k};
}

// A boolean `allowed` mask read in place through its broadcast strides.
inline FlashAllowed broadcast_allowed(const Tensor& allowed, const detail::AttentionDims& dims) {
  const BroadcastStrides s = broadcast_strides(allowed, dims);
  return {allowed.data<bool>(), s.b, s.h, s.q, s.k};
}

// mean_weights [B, Tq, Tk] of AttentionOutput: the mean of weights [B, Hq, Tq, Tk] over the
// query heads (float32, contiguous), summed in head order so the result is reproducible.
Tensor mean_over_heads(const Tensor& weights);

}  // namespace attn::kernels
