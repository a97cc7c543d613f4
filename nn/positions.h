// Position information: the sinusoidal table of the Transformer and rotary embeddings (RoPE).
//
// Letters: B batch, H heads, T sequence length, D head width, C model width.
//
// Sinusoidal (Vaswani et al. 2017, section 3.5), added to the token embeddings:
//   table [T, C],  table[t, 2i] = sin(p / base^(2i/C)),  table[t, 2i+1] = cos(p / base^(2i/C)),
//   p = offset + t  (odd C: the last column is a sine)
//
// RoPE (Su et al. 2021, RoFormer, section 3.4.2), applied to queries and keys before attention:
//   x [B, H, T, D] (D even) -> y [B, H, T, D]; each pair (a, b) of features i at position p is
//   rotated by the angle p * theta_i, theta_i = base^(-2i/D):
//     a' = a cos - b sin,   b' = a sin + b cos
//   so q_m . k_n depends only on m - n. Pairs are (2i, 2i+1) with RopeLayout::interleaved (the
//   paper) or (i, i + D/2) with RopeLayout::half (GPT-NeoX / LLaMA checkpoints).
//   p = offset + t, or offsets[b] + t when per-batch offsets are given: with a KV cache the new
//   token of step s has offset s.
// Angles are computed in float64: p * theta reaches 1e4 radians and float32 would lose the
// fraction that matters.
#pragma once

#include <cstdint>
#include <vector>

#include "attn/tensor.h"

namespace attn::nn {

Tensor sinusoidal_positions(int64_t length, int64_t dim, DType dtype = DType::f32,
                            int64_t offset = 0, double base = 10000.0);

enum class RopeLayout { interleaved, half };

struct RopeConfig {
  double base = 10000.0;
  RopeLayout layout = RopeLayout::interleaved;
  int64_t offset = 0;            // position of t = 0
  std::vector<int64_t> offsets;  // per batch (size B); overrides `offset` when non-empty
};

Tensor rope_forward(const Tensor& x, const RopeConfig& config = {});
// The rotation is orthogonal, so its backward is the inverse rotation (angle -p theta_i).
Tensor rope_backward(const Tensor& dout, const RopeConfig& config = {});

}  // namespace attn::nn
