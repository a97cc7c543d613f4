// Fused additive (Bahdanau) and concat (Luong) attention, forward and backward, float32
// (internal). The one score no library fuses: everywhere else tanh(W_q q_i + W_k k_j + b) is
// materialised as [B, Tq, Tk, A]. Here the projections are computed once (BLAS GEMMs) and the
// scores are streamed tile by tile into an online softmax, so memory beyond the inputs and
// outputs is O(N A + N Dv), never O(Tq Tk).
//
// Letters as in attn/attention.h: B batch, Hq query heads, Hkv key/value heads (query head h uses
// kv head h / (Hq / Hkv)), Tq, Tk lengths, Dq, Dk, Dv widths, A the hidden width of the score.
//
//   s_ij = v . tanh(Qp_i + Kp_j),  Qp = Q W_q^T + b [.., Tq, A],  Kp = K W_k^T [.., Tk, A]
//   (concat: W_q, W_k are the column blocks of W [A, Dq + Dk], b = 0)
//
// The SIMD kernels below take the projections pre-scaled by 2 log2(e): with x = 2 log2(e) y,
//   tanh(y) = 1 - 2 r,  r = 1 / (2^x + 1)
// so the score is s = -2 sum_a v_a (r_a - 1/2) (summed from -sum_a v_a / 2, which keeps its
// float32 rounding that of a plain sum of v_a tanh_a at large logits). Since
// 2^(Qp'_ia + Kp'_ja) = 2^Qp'_ia 2^Kp'_ja, the exponentials are taken once per projection
// element (O(N A)), and each (i, j, a) of the scores costs one FMA (d = (eq ek + 1) / v_a, with
// 1 / v_a folded into the operands) and a reciprocal shared by two hidden units with one Newton
// step: about 4 vector operations, the kernel's whole cost (-inl.h, FoldedPairAccumulate, with
// measurements). That split form needs every |Qp'|, |Kp'| <= L, with L = 63 narrowed by the
// spread of |v| (L ~ 56 .. 61 for |v| spread over 2^10; tanh arguments |y| <= L / (2 log2 e)
// ~ 19 .. 21, beyond which tanh is +-1 in float anyway); a call with larger or non-finite
// projections, or a non-finite v, uses the plain form, exp2 (degree-5 polynomial) of Qp' + Kp'
// per element.
//
// Masks supported by the kernels: key/query lengths, causal (both alignments), windows (the same
// interval rule as the fused dot-product kernel, flash_attention.h), ALiBi slopes, an additive
// bias and a boolean `allowed` mask, both read in place through broadcast strides (the bias's
// gradient summed over the broadcast dimensions), and dropout (keep decisions regenerated from
// attn/random.h's counter-based hash, as on the composed path). Fully masked rows give out = 0,
// lse = -inf and zero gradients. Returned weights come from a second pass (see
// additive_attention_forward_kernel). Not supported (the front-end falls back to the composed
// path): local attention, per-head scores.
//
// Threads: the GEMMs run in fixed chunks of rows over the OpenMP threads (the same rows per
// GEMM call for any thread count). The forward's packing passes and work items share one
// OpenMP region; the items are (batch, query head, block of query rows), dynamic schedule (each
// row is computed by one thread in a fixed order: bitwise identical for any thread count). The
// backward runs over (batch, kv head, key block) with a static schedule; dKp and dV rows have
// one writer, dQp, dv and dbias go to per-thread partials summed in thread order: bitwise
// identical run to run at a fixed thread count (not across thread counts).
// The SIMD code is compiled for every Highway target and picked at run time
// (HWY_DYNAMIC_DISPATCH); ATTN_SIMD_TARGET caps the choice (simd_target.h).
#pragma once

#include <cstdint>

#include "attention_validate.h"
#include "attn/attention.h"
#include "kernels/flash/flash_attention.h"
#include "kernels/common/kernel_problem.h"

namespace attn::kernels {

// Column padding of the projection rows the kernels read and write: every Highway target's
// float vector (at most 16 lanes) divides it, so rows load as whole vectors.
inline constexpr int64_t kAdditiveRowPad = 16;

// Inputs shared by the forward and backward kernels.
struct AdditiveAttentionArgs : ProblemSizes, IntervalMasks {
  // Scaled projections 2 log2(e) (Q W_q^T + b) [B*Hq*Tq rows] and 2 log2(e) K W_k^T
  // [B*Hkv*Tk rows], row stride proj_stride (a multiple of kAdditiveRowPad, columns >= A zero).
  const float* q_proj = nullptr;
  const float* k_proj = nullptr;
  int64_t proj_stride = 0;
  const float* score_v = nullptr;  // [A]
  const float* v = nullptr;        // values [B, Hkv, Tk, Dv]

  int64_t hidden = 0, value_dim = 0;  // A, Dv

  const float* alibi_slopes = nullptr;  // [q_heads] or nullptr
  // Added to s_ij (natural units) at bias[b, h, i, j] through broadcast strides; data nullptr:
  // none.
  FlashBias bias;
  // Boolean mask (true = may attend) read in place through broadcast strides; data nullptr:
  // none.
  FlashAllowed allowed;
  // Dropout on the probabilities, the keep decisions of attn::dropout_keep (h the query head):
  // out uses P keep / (1 - p), lse and returned weights are those before dropout.
  FlashDropout dropout;
};

// Forward: out [B, Hq, Tq, Dv], lse [B, Hq, Tq] (natural log; -inf and out = 0 for masked rows).
// weights [B, Hq, Tq, Tk] or nullptr: when given, every element is written with the softmax
// probabilities (0 where masked), recomputed by a second pass per row from its final max and sum.
void additive_attention_forward_kernel(const AdditiveAttentionArgs& args, float* out, float* lse,
                                       float* weights = nullptr);

struct AdditiveAttentionGradArgs {
  const float* out = nullptr;   // the forward's out and lse
  const float* lse = nullptr;
  const float* dout = nullptr;  // [B, Hq, Tq, Dv]
  // Outputs, fully overwritten: dL/dQp (rows like q_proj, stride proj_stride, unscaled: the
  // gradient with respect to Q W_q^T + b), dL/dKp (like k_proj), dL/dv of the score [A],
  // dL/dV [B, Hkv, Tk, Dv].
  float* d_q_proj = nullptr;
  float* d_k_proj = nullptr;
  float* d_score_v = nullptr;
  float* dv = nullptr;
  // dL/dbias, or nullptr: dbias_size floats laid out like the bias (args.bias's strides address
  // it, so broadcast dimensions sum): dbias[b, h, i, j] += dS_ij. Fully overwritten.
  float* dbias = nullptr;
  int64_t dbias_size = 0;
};

// Backward in the FlashAttention-2 style: probabilities recomputed from lse, tile by tile.
void additive_attention_backward_kernel(const AdditiveAttentionArgs& args,
                                        const AdditiveAttentionGradArgs& grads);

// Name of the Highway target the kernels dispatch to now ("AVX3", "AVX2", ...).
const char* additive_attention_target_name();

// ---------------------------------------------------------------------------------------------
// Glue for the front-end (src/attention.cpp).

// True when the fused kernels compute exactly what attention() / attention_backward() specify:
// float32, AdditiveScore or ConcatScore in params.score (no head_scores), no local attention
// (return_weights is supported). key/query lengths, causal (both alignments), windows, ALiBi
// slopes, any broadcastable bias or `allowed` tensor and dropout are supported.
bool additive_attention_supported(DType dtype, const AttentionParams& params);

// Validated, contiguous float32 q, k, v and params converted to float32 (as the front-end's
// normalise() gives them). Fills out and lse.
AttentionOutput additive_attention_forward(const detail::AttentionDims& dims, const Tensor& q,
                                           const Tensor& k, const Tensor& v,
                                           const AttentionParams& params);

// The same inputs plus the forward's result (out, lse: contiguous float32) and dout. Returns dq,
// dk, dv and dscore (AdditiveScore / ConcatScore of gradients, bias only when the score has
// one), and dbias (the bias's shape) when the mask has a bias; dhead_scores and dlocal stay
// undefined, as on the composed path.
AttentionGrads additive_attention_backward(const detail::AttentionDims& dims, const Tensor& q,
                                           const Tensor& k, const Tensor& v,
                                           const AttentionParams& params,
                                           const AttentionOutput& forward, const Tensor& dout);

}  // namespace attn::kernels
