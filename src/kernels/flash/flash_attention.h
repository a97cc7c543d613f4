// Fused FlashAttention-style forward for the dot-product scores (DotScore, ScaledDotScore) in
// float32 (internal). One pass over the keys per query block: scores, masks, an online softmax
// and the weighted sum of the values never leave the per-thread buffers, so memory beyond the
// inputs and outputs is O(threads * block) instead of O(Tq * Tk).
//
// Letters as in attn/attention.h: B batch, Hq query heads, Hkv key/value heads (G = Hq / Hkv
// query heads share one key/value head), Tq query length, Tk key length, D = Dq = Dk, Dv.
//
//   q [B, Hq, Tq, D]   k [B, Hkv, Tk, D]   v [B, Hkv, Tk, Dv]   (contiguous float32)
//   -> out [B, Hq, Tq, Dv], lse [B, Hq, Tq] (natural log; -inf and out = 0 for masked rows)
//
// Query i of batch b may attend key j when every structured mask allows it:
//   j < key_len[b], i < query_len[b], and with pos(i) = i + offset_b
//   (offset_b = 0 top-left, key_len[b] - query_len[b] bottom-right):
//   causal: j <= pos(i); window: pos(i) - left <= j <= pos(i) + right;
//   allowed (when given): allowed[b, h, i, j] is true.
// Scores are scale * q.k + bias[b, h, i, j] - alibi_slope[h] * |pos(i) - j|.
//
// Kernels never validate: the front-end (src/attention.cpp) checks shapes, converts to float32
// and makes q, k, v contiguous. Limits the kernel assumes: Tk < 2^24 (ALiBi distances and key
// indices are held in float / int32 lanes), and a bias row stride (stride_q) below 2^31 / 48.
// Fast for Tq (times G with grouped heads) of a few dozen rows and up: a tile holds 48 query
// rows of one head with AVX-512, so single-query decoding uses 1/48 of the lanes. The SIMD code is compiled for every Highway target and picked at
// run time (HWY_DYNAMIC_DISPATCH); the environment variable ATTN_SIMD_TARGET caps the choice
// (see simd_target.h).
#pragma once

#include <cstdint>

#include "attention_validate.h"
#include "attn/attention.h"
#include "kernels/common/kernel_problem.h"

namespace attn::kernels {

// An additive bias read in place through broadcast strides (elements; 0 = broadcast along that
// dimension), so a [1, 1, 1, Tk] padding bias is never expanded per head or per row.
struct FlashBias {
  const float* data = nullptr;  // nullptr: no bias
  int64_t stride_b = 0, stride_h = 0, stride_q = 0, stride_k = 0;
};

// A boolean `allowed` mask (attention.h: true = may attend) read in place through broadcast
// strides like FlashBias; kernels copy only the [keys][rows] block of the tile they work on.
struct FlashAllowed {
  const bool* data = nullptr;  // nullptr: no mask
  int64_t stride_b = 0, stride_h = 0, stride_q = 0, stride_k = 0;
};

// Dropout on the probabilities (attention.h's Dropout): P_ij kept and scaled by 1 / (1 - p) when
// attn::dropout_keep(seed, p, b, h, i, j) (h the query head), else 0. p == 0: no dropout.
// The log-sum-exp (and returned weights) are those before dropout.
struct FlashDropout {
  double p = 0.0;
  uint64_t seed = 0;
};

struct FlashAttentionArgs : ProblemSizes, IntervalMasks {
  const float* q = nullptr;
  const float* k = nullptr;
  const float* v = nullptr;
  float* out = nullptr;
  float* lse = nullptr;  // may be nullptr when the caller does not need it
  // [B, Hq, Tq, Tk] softmax probabilities, or nullptr (the usual case). When given, a second
  // pass per work item recomputes the scores and writes every element (0 where masked, rows of
  // fully masked queries all 0): O(Tq Tk) output, still no O(Tq Tk) scratch.
  float* weights = nullptr;

  int64_t head_dim = 0, value_dim = 0;
  float scale = 1.0f;

  FlashBias bias;
  const float* alibi_slopes = nullptr;  // [q_heads] or nullptr
  FlashAllowed allowed;
  FlashDropout dropout;
};

// Runs the fused forward on the best SIMD target (threads: OpenMP over batch x kv head x query
// block, dynamic schedule; results are bitwise identical for any thread count).
void flash_attention_forward(const FlashAttentionArgs& args);

// Name of the Highway target flash_attention_forward dispatches to now ("AVX3", "AVX2", ...).
const char* flash_attention_target_name();

// ---------------------------------------------------------------------------------------------
// Glue for the front-end (src/attention.cpp).

// True when the fused kernel computes exactly what attention() specifies for these arguments:
// float32, DotScore or ScaledDotScore (no head_scores), no local attention. key/query lengths,
// causal (both alignments), windows, any broadcastable bias and `allowed` mask, ALiBi slopes,
// dropout and return_weights are supported.
bool flash_attention_supported(DType dtype, const AttentionParams& params);

// Runs the kernel on validated, contiguous float32 tensors (params converted to float32, as
// detail::convert_params returns them); fills out and lse, and weights and mean_weights when
// params.return_weights.
AttentionOutput flash_attention(const detail::AttentionDims& dims, const Tensor& q,
                                const Tensor& k, const Tensor& v, const AttentionParams& params);

}  // namespace attn::kernels
