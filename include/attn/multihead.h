// Multi-head attention (Vaswani et al. 2017, section 3.2.2) with grouped-query heads
// (Ainslie et al. 2023) and a KV cache for incremental decoding, forward and backward.
//
// Letters (as in attention.h, plus):
//   E   d_model, the width of the query input and of the output
//   Ek  key_input_dim, Ev value_input_dim: widths of the key / value inputs (cross-attention
//       memory may differ from the decoder width)
//   Dk  head_dim (query and key width per head), Dv value_head_dim
//
//   query [B, Tq, E]  key [B, Tk, Ek]  value [B, Tk, Ev]  ->  output [B, Tq, E]
//
//   1. q = split_heads(query W_q^T + b_q)   [B, Hq,  Tq, Dk]    W_q [Hq  * Dk, E]
//   2. k = split_heads(key   W_k^T + b_k)   [B, Hkv, Tk, Dk]    W_k [Hkv * Dk, Ek]
//   3. v = split_heads(value W_v^T + b_v)   [B, Hkv, Tk, Dv]    W_v [Hkv * Dv, Ev]
//   4. a = attention(q, k, v, params)       [B, Hq,  Tq, Dv]    query head h reads kv head
//                                                               h / (Hq / Hkv)
//   5. c = merge_heads(a)                   [B, Tq, Hq * Dv]
//   6. output = c W_o^T + b_o               [B, Tq, E]          W_o [E, Hq * Dv]
//
// Everything about the scores lives in AttentionParams (attention.h): any scoring function
// (one for all heads, or one per head through head_scores, with widths Dq = Dk = head_dim), every
// mask, dropout and the returned alignment weights apply to step 4 unchanged.
//
// Computation runs in the dtype of `query` (float32 or float64); key and value must share it and
// the weights are converted to it. The projections are BLAS GEMMs over all B * T rows at once.
//
// Self-attention passes the same tensor as query, key and value; its input gradient is then
// dquery + dkey + dvalue.
#pragma once

#include <cstdint>

#include "attn/attention.h"
#include "attn/quantized.h"
#include "attn/tensor.h"

namespace attn {

struct MultiHeadConfig {
  int64_t d_model = 0;          // E
  int64_t num_heads = 0;        // Hq
  int64_t num_kv_heads = 0;     // Hkv; 0 means num_heads (plain multi-head); must divide Hq
  int64_t head_dim = 0;         // Dk; 0 means d_model / num_heads (num_heads must divide d_model)
  int64_t value_head_dim = 0;   // Dv; 0 means head_dim
  int64_t key_input_dim = 0;    // Ek; 0 means d_model
  int64_t value_input_dim = 0;  // Ev; 0 means d_model
  bool bias = true;             // projections carry biases b_q, b_k, b_v, b_o
};

// The weights of the four projections, row-major [out, in] like torch.nn.Linear. Biases are
// defined exactly when config.bias is true. Gradients come back in the same struct.
struct MultiHeadWeights {
  Tensor w_q;  // [Hq * Dk, E]
  Tensor b_q;  // [Hq * Dk]
  Tensor w_k;  // [Hkv * Dk, Ek]
  Tensor b_k;  // [Hkv * Dk]
  Tensor w_v;  // [Hkv * Dv, Ev]
  Tensor b_v;  // [Hkv * Dv]
  Tensor w_o;  // [E, Hq * Dv]
  Tensor b_o;  // [E]

  // Xavier/Glorot-uniform matrices (limit sqrt(6 / (fan_in + fan_out)), Glorot & Bengio 2010,
  // eq. 16) and zero biases. Deterministic: a pure function of (config, seed).
  static MultiHeadWeights init(const MultiHeadConfig& config, DType dtype, uint64_t seed);
};

// What the forward returns: the output and everything the backward reuses.
struct MultiHeadOutput {
  Tensor output;              // [B, Tq, E]
  AttentionOutput attention;  // step 4: out [B, Hq, Tq, Dv], lse, and the alignment weights
                              // (weights [B, Hq, Tq, Tk], mean_weights [B, Tq, Tk]) when
                              // params.return_weights
  Tensor q;                   // step 1, [B, Hq, Tq, Dk], contiguous
  Tensor k;                   // step 2, [B, Hkv, Tk, Dk]
  Tensor v;                   // step 3, [B, Hkv, Tk, Dv]
};

struct MultiHeadGrads {
  Tensor dquery;              // [B, Tq, E]
  Tensor dkey;                // [B, Tk, Ek]
  Tensor dvalue;              // [B, Tk, Ev]
  MultiHeadWeights dweights;  // every weight and bias gradient (biases only when config.bias)
  AttentionGrads attention;   // step 4's gradients: dq/dk/dv of the projected heads, and the
                              // gradients of the mask bias, the scores and local attention
};

// Forward. Throws attn::Error ("[multihead_attention] ...") on invalid config, inputs or weights.
MultiHeadOutput multihead_attention(const MultiHeadConfig& config, const MultiHeadWeights& weights,
                                    const Tensor& query, const Tensor& key, const Tensor& value,
                                    const AttentionParams& params = {});

// Backward. `saved` is what multihead_attention returned for the same config, weights, inputs and
// params; doutput is the gradient of the loss with respect to saved.output. Gradients come back
// in the dtype of `query`.
MultiHeadGrads multihead_attention_backward(const MultiHeadConfig& config,
                                            const MultiHeadWeights& weights, const Tensor& query,
                                            const Tensor& key, const Tensor& value,
                                            const AttentionParams& params,
                                            const MultiHeadOutput& saved, const Tensor& doutput);

// ---------------------------------------------------------------------------------------------
// KV cache for incremental decoding: the projected keys and values of every position seen so far.
// Rows [0, length) of the capacity dimension are valid. Appending past the capacity reallocates
// to max(2 * capacity, length + n) (amortised O(1) copies per appended row).
//
// dtype: float32 or float64 (the query's dtype), or bf16 (half the memory and half the bytes a
// decoder step reads): appended rows are rounded to bf16 once (nearest, ties to even), and
// multihead_attention_step attends a float32 (or float64) query against them through
// attention()'s mixed precision (attention.h): the query, the projections and the output stay
// in the query's dtype, and the cache rows are widened exactly as they are read.
//
// int8 (options.int8 = true; attn/quantized.h): 8-bit rows with a float32 scale per block of 32
// channels of each key (llama.cpp's q8_0), ~1.125 bytes per element, a quarter of float32.
// Appended rows are quantised once (|x - s q| <= s / 2, s = block max / 127); steps attend the
// query against the dequantised values through attention(q, QuantizedTensor...), which reads
// the int8 rows in place on the decode path. k and v stay undefined; k_int8 and v_int8 hold it.

struct KVCacheOptions {
  int64_t batch = 1;
  int64_t capacity = 0;  // rows allocated up front (positions); grows on demand
  DType dtype = DType::f32;
  bool int8 = false;  // 8-bit storage (then dtype names the queries' dtype: float32 or float64)
};

struct KVCache {
  Tensor k;            // [B, Hkv, capacity, Dk]
  Tensor v;            // [B, Hkv, capacity, Dv]
  QuantizedTensor k_int8;  // [B, Hkv, capacity, Dk], an 8-bit cache only
  QuantizedTensor v_int8;  // [B, Hkv, capacity, Dv]
  int64_t length = 0;  // valid positions

  static KVCache create(const MultiHeadConfig& config, const KVCacheOptions& options);

  bool is_int8() const { return k_int8.defined(); }
  int64_t capacity() const {
    return k.defined() ? k.size(2) : k_int8.defined() ? k_int8.size(2) : 0;
  }
  // Views of the valid rows, [B, Hkv, length, Dk] and [B, Hkv, length, Dv] (strided over the
  // capacity dimension; they alias the cache until the next reallocation). keys()/values() are
  // undefined for an 8-bit cache; int8_keys()/int8_values() are its views.
  Tensor keys() const;
  Tensor values() const;
  QuantizedTensor int8_keys() const;
  QuantizedTensor int8_values() const;
  // Appends new_k [B, Hkv, n, Dk] and new_v [B, Hkv, n, Dv] (any dtype, converted).
  void append(const Tensor& new_k, const Tensor& new_v);
  void clear() { length = 0; }
};

// One decoder step: projects key_step [B, n, Ek] and value_step [B, n, Ev] (steps 2-3), appends
// them to `cache`, and attends the n rows of query_step [B, n, E] over all cache.length positions
// (steps 1, 4-6). params.mask.alignment is forced to Alignment::bottom_right, so the new rows sit
// at the end of the sequence: with params.mask.causal, row i sees positions
// <= length - n + i, and decoding a sequence token by token gives the rows of the full causal
// forward. Masks given in params (bias, allowed, ...) must broadcast to [B, Hq, n, length].
// An undefined cache is allocated on the first call (in the query's dtype; create a bf16 or an
// 8-bit cache with KVCache::create). The cache's dtype must be the query's or bf16, or it is
// 8-bit (then out.k and out.v stay undefined: cache.int8_keys() / int8_values() are the views).
// Inference only: there is no backward through the cache (use multihead_attention for
// training). In the returned MultiHeadOutput, k and v are cache.keys() and cache.values(): views
// of all cache.length valid positions in the cache's dtype, strided over its capacity and
// aliasing it (attention() reads them in place: a step copies no cache rows).
MultiHeadOutput multihead_attention_step(const MultiHeadConfig& config,
                                         const MultiHeadWeights& weights, KVCache& cache,
                                         const Tensor& query_step, const Tensor& key_step,
                                         const Tensor& value_step,
                                         const AttentionParams& params = {});

// ---------------------------------------------------------------------------------------------
// Shared validation of the front-end and the float64 reference (not part of the stable API).
namespace detail {

// A config with every 0 default replaced by its meaning.
struct MultiHeadDims {
  int64_t E = 0, Hq = 0, Hkv = 0, Dk = 0, Dv = 0, Ek = 0, Ev = 0;
  bool bias = true;
};
struct MultiHeadProblem {
  MultiHeadDims dims;
  int64_t B = 0, Tq = 0, Tk = 0;
};

// Throws attn::Error naming `op` for an inconsistent config (sizes <= 0, num_kv_heads not
// dividing num_heads, num_heads not dividing d_model when head_dim is 0).
MultiHeadDims resolve_multihead_config(const char* op, const MultiHeadConfig& config);
// Checks weight shapes and dtypes (and that biases are present exactly when config.bias).
void validate_multihead_weights(const char* op, const MultiHeadDims& dims,
                                const MultiHeadWeights& weights);
// Checks config, weights, and the ranks, widths, batch/length agreement and dtypes of the inputs.
MultiHeadProblem validate_multihead(const char* op, const MultiHeadConfig& config,
                                    const MultiHeadWeights& weights, const Tensor& query,
                                    const Tensor& key, const Tensor& value);
// Additionally checks the saved forward and doutput for the backward.
void validate_multihead_backward(const char* op, const MultiHeadProblem& problem,
                                 const MultiHeadOutput& saved, const Tensor& doutput);

}  // namespace detail

// ---------------------------------------------------------------------------------------------
// The float64 oracle (see attn/reference.h): plain-loop projections around
// attn::reference::attention / attention_backward. Validates like the front-end; every output
// and gradient is float64.
namespace reference {

MultiHeadOutput multihead_attention(const MultiHeadConfig& config, const MultiHeadWeights& weights,
                                    const Tensor& query, const Tensor& key, const Tensor& value,
                                    const AttentionParams& params = {});

MultiHeadGrads multihead_attention_backward(const MultiHeadConfig& config,
                                            const MultiHeadWeights& weights, const Tensor& query,
                                            const Tensor& key, const Tensor& value,
                                            const AttentionParams& params,
                                            const MultiHeadOutput& saved, const Tensor& doutput);

}  // namespace reference

}  // namespace attn
