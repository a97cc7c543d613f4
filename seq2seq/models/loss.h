// Token-level cross-entropy with label smoothing and a padding mask, forward and backward.
//
// Letters: N predictions (T B decoder steps), V classes.
//
//   logits [N, V], targets (size N)  ->  loss = (1 / M) sum_{n: target != ignore} l_n,
//   l_n = -sum_v q_n(v) log p_n(v),  p_n = softmax(logits_n),
//   q_n = (1 - eps) onehot(target_n) + eps / V   (label smoothing, Szegedy et al. 2016)
// M is the number of non-ignored targets. dlogits_n = (p_n - q_n) / M, and 0 on ignored rows.
// log p is computed as x - max - log sum exp(x - max), so large logits do not overflow.
#pragma once

#include <cstdint>
#include <vector>

#include "attn/tensor.h"

namespace attn::seq2seq {

struct CrossEntropyConfig {
  double label_smoothing = 0.0;  // eps in [0, 1)
  int64_t ignore_id = 0;         // targets equal to it (<pad>) add no loss and no gradient
  bool compute_grad = true;
  // > 0: the loss and gradient are divided by this count instead of M, the targets counted
  // here: a shard of a larger batch divides by the whole batch's count, so that the shards'
  // losses and gradients sum to the whole batch's (data-parallel training, train.h).
  int64_t normalizer = 0;
};

struct CrossEntropyResult {
  double loss = 0.0;  // mean smoothed loss over the M counted targets (0 when M = 0)
  double nll = 0.0;   // mean -log p(target), without smoothing
  int64_t count = 0;  // M
  Tensor dlogits;     // [N, V] when compute_grad
};

// logits may be [N, V] or [T, B, V] (flattened to N = T B rows); targets row-major to match.
CrossEntropyResult cross_entropy(const Tensor& logits, const std::vector<int32_t>& targets,
                                 const CrossEntropyConfig& config = {});

// The same loss for a copy mixture (pointer-generator, model.h) over the extended vocabulary
// (batching.h) of V + X ids, the V words of the vocabulary and X extended ids of source words:
//   p_n(v) = g_n s_n(v) [v < V] + (1 - g_n) copy_n(v),  s_n = softmax(logits_n),
//   l_n = -sum_v q_n(v) log p_n(v)
// logits [N, V] (or [T, B, V]), copy [N, V + X] (or [T, B, V + X]) with rows summing to 1, gate
// [N] (or [T, B, 1]) in (0, 1); targets < V + X. Label smoothing spreads eps over the V words
// only: q_n = (1 - eps) onehot(target_n) + eps / V on v < V. An extended id can have p = 0 (a
// sentence with fewer than X of them), so the sum skips the v with q_n(v) = 0.
// With r_v = -q_v / (M p_v) (0 where q_v = 0):  dgate = sum_v r_v (s_v [v < V] - copy_v),
// dcopy_v = (1 - g) r_v,  dlogits_v = s_v (g r_v - sum_{u < V} s_u g r_u). Computed in float64.
struct CopyMixtureResult {
  double loss = 0.0;
  double nll = 0.0;
  int64_t count = 0;
  Tensor dlogits;  // like logits
  Tensor dcopy;    // like copy (0 where q = 0 and p = 0)
  Tensor dgate;    // like gate
};
CopyMixtureResult copy_mixture_loss(const Tensor& logits, const Tensor& copy, const Tensor& gate,
                                    const std::vector<int32_t>& targets,
                                    const CrossEntropyConfig& config = {});

}  // namespace attn::seq2seq
