// The part every fused kernel's argument struct shares (internal): the problem's sizes and its
// interval masks. Letters as in attn/attention.h: B batch, Hq query heads, Hkv key/value heads,
// Tq query length, Tk key length. Filled from a validated problem by fill_interval_masks
// (fused_args.h); the per-row visible keys come from RowInterval (simd_common-inl.h).
#pragma once

#include <cstdint>

#include "attn/attention.h"

namespace attn::kernels {

struct ProblemSizes {
  int64_t batch = 0, q_heads = 0, kv_heads = 0, q_len = 0, k_len = 0;
};

// Query i of batch b may attend key j when j < key_len[b], i < query_len[b] and, with
// pos(i) = i + offset_b (offset_b = key_len[b] - query_len[b] when bottom_right, else 0),
// causal: j <= pos(i); window: pos(i) - window_left <= j <= pos(i) + window_right.
struct IntervalMasks {
  const int64_t* key_lengths = nullptr;    // [batch] or nullptr (all k_len)
  const int64_t* query_lengths = nullptr;  // [batch] or nullptr (all q_len)
  bool causal = false;
  bool bottom_right = false;
  int64_t window_left = Window::unbounded;
  int64_t window_right = Window::unbounded;
};

}  // namespace attn::kernels
