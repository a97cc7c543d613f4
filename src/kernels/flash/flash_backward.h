// Fused FlashAttention-2-style backward for the dot-product scores (DotScore, ScaledDotScore) in
// float32 (internal). Probabilities are recomputed tile by tile from the log-sum-exp the forward
// stored, so nothing of size Tq x Tk is ever allocated.
//
// Letters as in attn/attention.h and flash_attention.h (G = Hq / Hkv query heads per kv head):
//
//   q [B, Hq, Tq, D]  k [B, Hkv, Tk, D]  v [B, Hkv, Tk, Dv]  out, dout [B, Hq, Tq, Dv]  lse [B, Hq, Tq]
//   -> dq [B, Hq, Tq, D]  dk [B, Hkv, Tk, D]  dv [B, Hkv, Tk, Dv]  (all contiguous float32)
//
// The backward of  s = scale q.k + bias - alibi,  p = exp(s - lse),  o = sum_j p_j v_j  is
// (Dao 2023, FlashAttention-2, algorithm 2), per query row i and key j:
//   (1) D_i   = dO_i . O_i                          (= sum_j p_ij dP_ij)
//   (2) P_ij  = exp(s_ij - lse_i), 0 where masked
//   (3) dV_j += sum_i P_ij dO_i
//   (4) dP_ij = dO_i . V_j
//   (5) dS_ij = P_ij (dP_ij - D_i)                  (softmax backward)
//   (6) dQ_i += scale sum_j dS_ij K_j
//   (7) dK_j += scale sum_i dS_ij Q_i
//   (8) dbias (reduced to the bias's broadcast shape) += dS_ij
// Fully masked rows have P = 0, so every gradient through them is exactly 0.
//
// Work split: OpenMP over (batch, kv head, key block); an item owns its keys' dK and dV and loops
// over the G query heads and every query tile that sees the block, so dK/dV need no reduction.
// dQ (and dbias) are summed into per-thread accumulators and reduced in thread order at the end:
// one pass (5 GEMM-sized products, not the 7 of a separate dQ pass) and bitwise identical results
// from run to run at a fixed thread count; dK and dV are also identical across thread counts, dQ
// and dbias are not (the per-thread partial sums split differently).
// Memory beyond inputs and outputs: transposed copies of q and dout (2 q-sized arrays; 2 more
// zero-padded row-major copies when D or Dv is not a multiple of the vector length) plus one
// dq-sized (and bias-sized) accumulator per thread.
// Kernels never validate (the front-end does); limits as the forward's: Tk < 2^24, bias row
// stride below 2^31 / 48. Rows of fewer than a few dozen queries (times G) waste lanes: a tile
// is 48 query rows with AVX-512 (measured, one thread, Tk = 4096, d = 64, H = 8: Tq = 1 fused
// 8.5 ms vs composed 6.3 ms; Tq = 16 9.3 vs 10; Tq = 48 10.5 vs 21.5).
#pragma once

#include <cstdint>

#include "attention_validate.h"
#include "attn/attention.h"
#include "kernels/flash/flash_attention.h"
#include "kernels/common/kernel_problem.h"

namespace attn::kernels {

struct FlashBackwardArgs : ProblemSizes, IntervalMasks {
  const float* q = nullptr;
  const float* k = nullptr;
  const float* v = nullptr;
  const float* out = nullptr;   // the forward's output
  const float* lse = nullptr;   // the forward's log-sum-exp (natural log, -inf: masked row)
  const float* dout = nullptr;  // gradient of the loss with respect to out
  float* dq = nullptr;
  float* dk = nullptr;
  float* dv = nullptr;
  // Gradient of the bias, laid out exactly like bias.data (same broadcast strides, so a
  // broadcast dimension is summed over); bias_elements is its number of floats. Both are
  // ignored without a bias; dbias may be nullptr when the caller does not need it.
  float* dbias = nullptr;
  int64_t bias_elements = 0;

  int64_t head_dim = 0, value_dim = 0;
  float scale = 1.0f;

  // Masks, with the meaning of FlashAttentionArgs.
  FlashBias bias;
  const float* alibi_slopes = nullptr;
  FlashAllowed allowed;
  FlashDropout dropout;  // regenerated, never stored: the forward's keep decisions
};

// Runs the fused backward on the best SIMD target (ATTN_SIMD_TARGET caps it, see simd_target.h).
void flash_backward(const FlashBackwardArgs& args);

// Name of the Highway target flash_backward dispatches to now ("AVX3", "AVX2", ...).
const char* flash_backward_target_name();

// ---------------------------------------------------------------------------------------------
// Glue for the front-end (src/attention.cpp).

// True when the fused backward computes exactly what attention_backward() specifies: the same
// conditions as flash_attention_supported (float32, DotScore / ScaledDotScore without
// head_scores, no local attention; `allowed` masks and dropout are supported).
bool flash_backward_supported(DType dtype, const AttentionParams& params);

// Runs the kernel on validated, contiguous float32 tensors (params converted as
// detail::convert_params returns them; forward.out, forward.lse and dout contiguous float32).
// Returns dq, dk, dv, dbias (when params.mask.bias is defined) and dscore = the score kind given
// (DotScore / ScaledDotScore have no learnable tensors).
AttentionGrads flash_attention_backward(const detail::AttentionDims& dims, const Tensor& q,
                                        const Tensor& k, const Tensor& v,
                                        const AttentionParams& params,
                                        const AttentionOutput& forward, const Tensor& dout);

}  // namespace attn::kernels
