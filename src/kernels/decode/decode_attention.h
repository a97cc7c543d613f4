// Decode attention (internal): a few new queries per sequence (Tq <= 16, incremental decoding)
// against a long key/value cache, for the dot-product scores. Memory-bound by design: every K
// and V row of a kv head is read exactly once per call, by one thread, for all the G = Hq / Hkv
// query heads that share it (and all their Tq queries).
//
// Letters as in attn/attention.h: B batch, Hq query heads, Hkv key/value heads, Tq query length,
// Tk key length (cache rows considered), D = Dq = Dk, Dv.
//
//   q [B, Hq, Tq, D] float32, contiguous
//   k [B, Hkv, Tk, D], v [B, Hkv, Tk, Dv]: float32 or bf16 (uint16_t bit patterns), addressed
//     through element strides (stride_b, stride_h, stride_t; the feature dimension is
//     contiguous), so a cache allocated with capacity > Tk rows is read in place
//   -> out [B, Hq, Tq, Dv] float32, lse [B, Hq, Tq] (natural log; -inf and out = 0 for fully
//      masked rows), and on request weights [B, Hq, Tq, Tk] (the softmax probabilities: 0 where
//      masked, all 0 in fully masked rows)
//
// Query i of batch b may attend key j when j < key_len[b], i < query_len[b] and, with
// pos(i) = i + offset_b (offset_b = key_len[b] - query_len[b] bottom-right, i.e. the Tq new
// queries are the last Tq positions; 0 top-left), causal: j <= pos(i); window:
// pos(i) - left <= j <= pos(i) + right. Scores are scale * q.k + bias[b, h, i, j]
// - alibi_slope[h] * |pos(i) - j| (natural units; bias and ALiBi optional, as in attention.h).
//
// Work split: OpenMP over (batch, kv head, key split). The split length depends only on the
// problem sizes (never on the thread count), so that B = 1, Hkv = 1 still yields enough items
// for every core, and the per-split (max, sum, accumulator) partials are merged by log-sum-exp
// in a fixed order afterwards. With many (batch, kv head) pairs and short caches (a seq2seq
// decoder step: B = 64, Tk = 50) there is one split per pair: each item then finishes its own
// output rows (out = o / l, lse, weights) with the one-split merge's arithmetic, with no
// partials buffer and no second pass. Either way results are bitwise identical from run to
// run AND across thread counts. Softmax and every accumulation are float32; bf16 K/V are
// widened to float32 exactly (a bf16 is the top half of a float32), so only the cache
// rounding itself costs accuracy.
//
// The SIMD code is compiled for every Highway target and picked at run time
// (HWY_DYNAMIC_DISPATCH); ATTN_SIMD_TARGET caps the choice (see simd_target.h).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "attention_validate.h"
#include "attn/attention.h"
#include "attn/quantized.h"
#include "kernels/common/bf16.h"
#include "kernels/flash/flash_attention.h"  // FlashBias
#include "kernels/common/kernel_problem.h"

namespace attn::kernels {

// bf16 <-> float32 conversions (float_to_bf16, bf16_to_float) live in kernels/common/bf16.h.

// ---------------------------------------------------------------------------------------------
// Raw-pointer entry.

enum class KvType { f32, bf16, int8 };

// One of K or V: element type and element strides (the last dimension is contiguous).
struct KvView {
  const void* data = nullptr;  // float*, uint16_t* (bf16 bits) or int8_t* (attn/quantized.h)
  int64_t stride_b = 0, stride_h = 0, stride_t = 0;
  // int8 only: float32 scales [B, Hkv, Tk, D / 32] (one per block of 32 features), with their
  // own element strides (the last dimension contiguous).
  const float* scales = nullptr;
  int64_t scale_stride_b = 0, scale_stride_h = 0, scale_stride_t = 0;
};

struct DecodeAttentionArgs : ProblemSizes, IntervalMasks {
  const float* q = nullptr;  // [B, Hq, Tq, D] contiguous
  KvView k, v;
  KvType kv_type = KvType::f32;  // of both k and v
  float* out = nullptr;  // [B, Hq, Tq, Dv] contiguous
  float* lse = nullptr;  // [B, Hq, Tq] or nullptr
  // [B, Hq, Tq, Tk] softmax probabilities, or nullptr (the usual case). When given, the items
  // store their raw scores there and the split merge turns each row into e^(s - M) / L with
  // the row's merged max M and sum L (the output's own normalisation): no second read of K.
  float* weights = nullptr;

  // Optional additive bias (natural units), broadcastable to [B, Hq, Tq, Tk] and read in place
  // through its strides (0 along broadcast dimensions): a [Tk] padding bias is never expanded
  // per head or row. A -inf bias masks a key; a row with -inf on every key is fully masked.
  FlashBias bias;
  // Optional ALiBi slopes [q_heads]: the score of query i and key j drops by
  // slope[h] * |pos(i) - j|, pos(i) as above (so it follows the causal alignment).
  const float* alibi_slopes = nullptr;

  int64_t head_dim = 0, value_dim = 0;
  float scale = 1.0f;

  // Paged K/V (attn/paged_kv_cache.h), or page_table == nullptr: key t of batch b is row
  // t % page_size of page page_table[b * page_table_stride + t / page_size], and k.stride_b /
  // v.stride_b are then the strides between pages of the pools. The kernel's key blocks stop at
  // page boundaries, so any page size works (64 and up keeps the blocks whole).
  const int32_t* page_table = nullptr;
  int64_t page_table_stride = 0, page_size = 0;
  // Key lengths are clamped to k_len. Decoding usually wants bottom_right = true (the queries
  // are the last Tq positions of the sequence).
};

// Runs the decode kernel on the best SIMD target. No validation (see the Tensor-level glue).
void decode_attention_forward(const DecodeAttentionArgs& args);

// Name of the Highway target decode_attention_forward dispatches to now ("AVX3", "AVX2", ...).
const char* decode_attention_target_name();

// How the keys of each (batch, kv head) are split into work items: `count` splits of `keys`
// keys (the last one shorter). Depends only on the sizes, never on the thread count: at least
// kDecodeMinItems items in all where the keys allow it (both cores busy at B = 1, Hkv = 1, with
// room for dynamic balancing), splits of at least kDecodeMinSplitKeys keys (the merge and the
// per-item setup stay negligible against the split's K/V read).
constexpr int64_t kDecodeMinItems = 16;
constexpr int64_t kDecodeMinSplitKeys = 512;
struct DecodeSplit {
  int64_t count = 1;
  int64_t keys = 0;
};
DecodeSplit decode_attention_split(int64_t batch, int64_t kv_heads, int64_t k_len);

// ---------------------------------------------------------------------------------------------
// Glue for the front-end (src/attention.cpp).

// The decode kernel is used from this many keys on, i.e. always when Tq is small. Measured with
// bench_decode's BM_Crossover (Tq = 1, the 2-core Xeon of BENCHMARKS.md, best call of each path
// over 0.2 s, decode / composed): B = 1, Hq = 8 (serial: below the threading threshold):
// 0.85-0.94 at Tk = 1, 0.73-0.84 at Tk = 4, 0.73-0.83 at Tk = 8, 0.76-0.86 at Tk = 16 (d = 64
// and 128); seq2seq decoder steps, B = 64, Tk = 50, 1 thread: 0.97-0.99 at H = 1, d = 256 (both
// paths then read the 6.5 MB of K and V at the L3 rate, ~27 GB/s) and 0.80-0.81 at H = 8,
// d = 32; drawing the weights as well, 0.98-1.00 and 0.87-0.88. No shape measured was faster on
// the composed path, so there is no lower bound beyond one key.
constexpr int64_t kDecodeMinKeys = 1;
constexpr int64_t kDecodeMaxQueries = 16;

// True when the decode kernel computes exactly what attention() specifies and is the fastest
// path: float32, DotScore or ScaledDotScore (no head_scores), no boolean `allowed` mask, no
// local attention, no dropout; Tq <= 16 and Tk >= kDecodeMinKeys. Key/query lengths, causal
// (both alignments), windows, an additive bias, ALiBi slopes and return_weights are supported.
bool decode_attention_supported(DType dtype, const detail::AttentionDims& dims,
                                const AttentionParams& params);

// Runs the kernel on validated tensors (params as detail::convert_params returns them for
// float32): q float32 contiguous; k and v both float32 or both bf16, any strides with a
// contiguous feature dimension (stride(3) == 1), read in place. Fills out and lse (float32), and
// weights and mean_weights when params.return_weights.
AttentionOutput decode_attention(const detail::AttentionDims& dims, const Tensor& q,
                                 const Tensor& k, const Tensor& v, const AttentionParams& params);

// The same for 8-bit K and V (attn/quantized.h), read in place: D and Dv must be multiples of
// kInt8Block (every SIMD chunk then lies in one scale block).
AttentionOutput decode_attention(const detail::AttentionDims& dims, const Tensor& q,
                                 const QuantizedTensor& k, const QuantizedTensor& v,
                                 const AttentionParams& params);

// The same over paged pools k_pool [pages, Hkv, page_size, Dk], v_pool [pages, Hkv, page_size,
// Dv] (both float32 or both bf16, contiguous) through page_table [B, table_stride] (int32 page
// indices; params.mask.key_lengths give each sequence's length).
AttentionOutput decode_attention_paged(const detail::AttentionDims& dims, const Tensor& q,
                                       const Tensor& k_pool, const Tensor& v_pool,
                                       const int32_t* page_table, int64_t table_stride,
                                       const AttentionParams& params);

}  // namespace attn::kernels
