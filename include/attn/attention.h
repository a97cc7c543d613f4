// Attention: scores every key against each query, normalises with a softmax, returns the
// weighted sum of the values.
//
// Shape contract (letters used throughout attn):
//   B  batch        Hq  query heads      Hkv  key/value heads (Hq % Hkv == 0: grouped-query;
//   Tq query length Tk  key length            query head h reads key/value head h / (Hq / Hkv))
//   Dq, Dk, Dv feature widths of queries, keys, values
//
//   q [B, Hq, Tq, Dq]   k [B, Hkv, Tk, Dk]   v [B, Hkv, Tk, Dv]   ->   out [B, Hq, Tq, Dv]
//
// Dtypes: q, k and v share one dtype (float32, float64 or bf16), or, mixed precision, k and v
// are bf16 (a bf16 KV cache) and q is float32 or float64. Computation runs in q's dtype, float32
// for a bf16 q: parameters are converted to it, and out, lse, weights and gradients have it
// (float32 for bf16 inputs: bf16 is a storage format, softmax and accumulation run in float32).
// bf16 values are widened exactly (a bf16 is the upper half of a float32), so the only rounding
// bf16 adds is the caller's, when the values were stored; a float32 query is never rounded to
// bf16. Where bf16 K and V are read:
//   Tq <= 16 with a dot or scaled-dot score (decoder steps): read in place, row by row, by the
//     decode kernel (no copy or widened copy of the cache per call), any strides;
//   all-bf16 inputs, otherwise: the AVX512_BF16 dot-product kernel where it is chosen for this
//     CPU (attn/runtime.h; P is rounded to bf16 there), else widened to float32;
//   a float32 / float64 query, otherwise (prefill): K and V widened to the query's dtype once
//     per call (O(Tk D) against the O(Tq Tk D) of the attention), then the float paths.
// The backward widens bf16 inputs and returns float32 gradients (float64 for a float64 query).
// Any strides are accepted. Empty sequences are allowed: Tq == 0 gives an empty output; Tk == 0
// makes every row fully masked.
//
// Masks: ONE polarity everywhere in attn — true means "may attend". Every mask kind below
// composes with every other (a key is visible only if every mask allows it):
//   key_lengths[b]    keys j >= key_lengths[b] are hidden (padding)
//   query_lengths[b]  query rows i >= query_lengths[b] are fully masked (output 0)
//   causal            key j is visible to query i only if j <= pos(i)
//   window            pos(i) - left <= j <= pos(i) + right  (sizes must be >= 0;
//                     Window::unbounded means no limit on that side)
//   allowed           boolean tensor broadcastable to [B, Hq, Tq, Tk]
//   bias              additive float tensor broadcastable to [B, Hq, Tq, Tk] (learnable)
//   alibi_slopes      per query head: adds -slope[h] * |pos(i) - j|
//   local             Luong local attention (local-m / local-p), see LocalAttention
// pos(i) is query i's position among the keys: i with Alignment::top_left, and
// i + (key_len[b] - query_len[b]) with Alignment::bottom_right (the last query sees the last
// key: incremental decoding against a KV cache, and Tq != Tk causal à la FlashAttention-2).
//
// Fully masked rows (and rows of a sequence with no keys): output 0, weights 0, lse = -inf, and
// every gradient that flows through them is exactly 0. The same on every path.
//
// Rows whose visible scores are all -inf (e.g. through a -inf bias) count as fully masked too.
//
// Softmax is computed with the row maximum subtracted, so scores of +-1e4 do not overflow.
// A NaN in one query row stays in that row's output; values of hidden keys are never read, so
// NaN in padding does not leak. Returned weights are softmax x (local-p Gaussian), before dropout.
#pragma once

#include <cstdint>
#include <optional>
#include <variant>
#include <vector>

#include "attn/tensor.h"

namespace attn {

// ---------------------------------------------------------------------------------------------
// Scoring functions. Each is a typed struct holding its learnable parameters. The gradient of a
// score is returned as the same struct with gradient tensors in the same fields.
// A is the hidden width of additive/concat scoring; r the rank of a low-rank general score.

// s = q . k                                              (Dq == Dk)
struct DotScore {};
// s = scale * q . k, scale = 1/sqrt(Dk) unless given     (Dq == Dk)
struct ScaledDotScore {
  std::optional<double> scale;
};
// General / multiplicative / bilinear (Luong "general"): s = q^T W k.
// Full: weight [Dq, Dk]. Low rank: W = u^T v with u [r, Dq], v [r, Dk] (leave weight undefined).
struct GeneralScore {
  Tensor weight;
  Tensor u;
  Tensor v;
};
// Additive (Bahdanau): s = v^T tanh(W_q q + W_k k + b).
// w_query [A, Dq], w_key [A, Dk], bias [A] (optional), v [A].
struct AdditiveScore {
  Tensor w_query;
  Tensor w_key;
  Tensor bias;
  Tensor v;
};
// Concat (Luong): s = v^T tanh(W [q; k]); weight [A, Dq + Dk], v [A].
struct ConcatScore {
  Tensor weight;
  Tensor v;
};
// Cosine: s = tau * q.k / (max(|q|, eps) * max(|k|, eps)); tau [1] is learnable.  (Dq == Dk)
struct CosineScore {
  Tensor tau;
  double eps = 1e-8;
};
// Location (Luong): s_j = (W_a q)_j, independent of the keys; weight [S_max, Dq], Tk <= S_max.
struct LocationScore {
  Tensor weight;
};
// Trilinear (BiDAF / QANet): s = w^T [q; k; q * k]; weight [3 D]  (Dq == Dk == D)
struct TrilinearScore {
  Tensor weight;
};

using Score = std::variant<DotScore, ScaledDotScore, GeneralScore, AdditiveScore, ConcatScore,
                           CosineScore, LocationScore, TrilinearScore>;

// "dot", "scaled_dot", "general", "additive", "concat", "cosine", "location", "trilinear"
const char* score_name(const Score& score);

// ---------------------------------------------------------------------------------------------
// Masks.

enum class Alignment { top_left, bottom_right };

struct Window {
  static constexpr int64_t unbounded = INT64_MAX;
  int64_t left = unbounded;   // keys allowed before pos(i)
  int64_t right = unbounded;  // keys allowed after pos(i)
};

// Luong et al. 2015, section 3.2. Both kinds restrict query i to keys |j - p_i| <= half_width.
//   monotonic (local-m):  p_i = pos(i)
//   predictive (local-p): p_i = S_b * sigmoid(v_p^T tanh(W_p q_i)), S_b = key_lengths[b], and the
//     softmax weights are multiplied (not renormalised, as in the paper) by
//     exp(-(j - p_i)^2 / (2 sigma^2)), sigma = half_width / 2. w_p [A, Dq] and v_p [A] train.
enum class LocalKind { none, monotonic, predictive };
struct LocalAttention {
  LocalKind kind = LocalKind::none;
  int64_t half_width = 0;
  Tensor w_p;
  Tensor v_p;
};

struct Mask {
  std::vector<int64_t> key_lengths;    // size B, or empty for "all Tk"
  std::vector<int64_t> query_lengths;  // size B, or empty for "all Tq"
  bool causal = false;
  Alignment alignment = Alignment::top_left;
  std::optional<Window> window;
  Tensor allowed;                     // bool, broadcastable to [B, Hq, Tq, Tk]
  Tensor bias;                        // float, broadcastable to [B, Hq, Tq, Tk]
  std::vector<double> alibi_slopes;   // size Hq, or empty
  LocalAttention local;
};

// The standard ALiBi slopes (Press et al. 2022): 2^(-8 h / H) for h = 1..H, with the
// interpolation of the paper for H not a power of two.
std::vector<double> alibi_slopes(int64_t num_heads);

// Dropout on the attention weights. The keep decision for (b, h, i, j) is a counter-based hash
// of (seed, b, h, i, j) (attn/random.h), so a run is reproducible and the backward regenerates the
// mask without storing it. Kept weights are scaled by 1 / (1 - p).
struct Dropout {
  double p = 0.0;
  uint64_t seed = 0;
};

struct AttentionParams {
  Score score = ScaledDotScore{};
  std::vector<Score> head_scores;  // optional, one per query head; overrides `score`
  Mask mask;
  Dropout dropout;
  bool return_weights = false;     // fill AttentionOutput::weights and ::mean_weights
};

struct AttentionOutput {
  Tensor out;           // [B, Hq, Tq, Dv]
  Tensor lse;           // [B, Hq, Tq]: log sum_j exp(masked score); -inf for fully masked rows
  Tensor weights;       // [B, Hq, Tq, Tk], before dropout, when return_weights
  Tensor mean_weights;  // [B, Tq, Tk], mean over query heads, when return_weights
};

struct AttentionGrads {
  Tensor dq;  // like q
  Tensor dk;  // like k
  Tensor dv;  // like v
  Tensor dbias;                     // shape of mask.bias, when a bias was given
  Score dscore;                     // gradients of params.score's tensors
  std::vector<Score> dhead_scores;  // when params.head_scores was given
  LocalAttention dlocal;            // gradients of w_p and v_p, for local-p
};

// Forward. Throws attn::Error on invalid input.
AttentionOutput attention(const Tensor& q, const Tensor& k, const Tensor& v,
                          const AttentionParams& params = {});

// Backward: `forward` is what attention() returned for the same inputs (out and lse are used),
// dout is the gradient of the loss with respect to forward.out.
AttentionGrads attention_backward(const Tensor& q, const Tensor& k, const Tensor& v,
                                  const AttentionParams& params, const AttentionOutput& forward,
                                  const Tensor& dout);

}  // namespace attn
