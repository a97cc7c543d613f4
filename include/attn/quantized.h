// 8-bit block-quantised tensors (the third KV cache storage kind, after float and bf16) and
// attention of a float query against 8-bit K and V.
//
// Format (llama.cpp's q8_0, with the scales in their own array): the last dimension is cut into
// blocks of kInt8Block = 32 consecutive elements (the last block may be shorter); a block holds
// int8 values q_i and one float32 scale s = max_i |x_i| / 127, and stands for x_i ~ s * q_i with
// q_i = round(x_i / s) (nearest, ties away from zero). So |x_i - s q_i| <= s / 2 per element,
// and 1.125 bytes per element at full blocks (a quarter of float32 plus the scales).
// An all-zero block has s = 0. Non-finite inputs are rejected (a block's scale could not
// represent them).
#pragma once

#include <cstdint>
#include <memory>

#include "attn/attention.h"
#include "attn/tensor.h"

namespace attn {

inline constexpr int64_t kInt8Block = 32;

// int8 values [..., D] (element strides, the last one 1; views share the storage) and float32
// scales [..., ceil(D / 32)] (a Tensor with its own strides).
class QuantizedTensor {
 public:
  QuantizedTensor() = default;
  // Zero values and scales, contiguous.
  static QuantizedTensor zeros(const Shape& shape);

  bool defined() const { return static_cast<bool>(values_); }
  int64_t dim() const { return static_cast<int64_t>(shape_.size()); }
  const Shape& shape() const { return shape_; }
  const Shape& strides() const { return strides_; }  // of the int8 values, in elements
  int64_t size(int64_t d) const;
  int64_t stride(int64_t d) const;
  std::string shape_str() const { return attn::shape_str(shape_); }
  const int8_t* values() const { return values_.get(); }
  int8_t* values() { return values_.get(); }
  const Tensor& scales() const { return scales_; }
  Tensor& scales() { return scales_; }

  // Rows [start, end) of dimension d (d not the last): a view.
  QuantizedTensor slice(int64_t d, int64_t start, int64_t end) const;

 private:
  std::shared_ptr<int8_t> values_;  // aliasing pointer to the first element
  Shape shape_, strides_;
  Tensor scales_;
};

// Number of scale blocks of a last dimension of D elements.
inline int64_t int8_blocks(int64_t D) { return (D + kInt8Block - 1) / kInt8Block; }

// Quantises x (float32, float64 or bf16, any strides, rank >= 1) into a new contiguous tensor.
QuantizedTensor quantize_int8(const Tensor& x);
// Writes quantise(src) into dst (same shape; dst may be a view of a larger tensor).
void quantize_int8_into(const Tensor& src, QuantizedTensor& dst);
// s * q per element, in float32 or float64 (float64: exact), contiguous.
Tensor dequantize(const QuantizedTensor& x, DType dtype = DType::f32);

// Attention of q [B, Hq, Tq, Dq] (float32 or float64) against 8-bit k [B, Hkv, Tk, Dk] and
// v [B, Hkv, Tk, Dv], with attention()'s shapes, params and results (out and lse in q's dtype).
// It computes attention(q, dequantize(k), dequantize(v)): decoder steps (Tq <= 16, float32,
// dot-product scores, D and Dv multiples of 32) read the int8 rows in place through the decode
// kernel, scaling each block in registers, so a step reads ~1.125 bytes per cached element;
// other calls dequantise K and V to q's dtype first. Forward only (inference caches).
AttentionOutput attention(const Tensor& q, const QuantizedTensor& k, const QuantizedTensor& v,
                          const AttentionParams& params = {});

}  // namespace attn
