// Small row-major tensor helpers the seq2seq models need between layers: column concatenation
// and its split, row gathers (beam search), element-wise tanh and accumulation.
//
// Letters: N rows, C columns. Every function accepts float32 or float64 tensors, returns owning
// contiguous tensors, and names "[seq2seq]" in its errors.
#pragma once

#include <cstdint>
#include <vector>

#include "attn/tensor.h"

namespace attn::seq2seq {

// [N, C1], [N, C2], ... -> [N, C1 + C2 + ...]. Inputs may be strided.
Tensor concat_columns(const std::vector<Tensor>& parts);
// Columns [begin, end) of a [N, C] tensor, as an owning contiguous copy.
Tensor columns(const Tensor& x, int64_t begin, int64_t end);
// acc += x, same shape (x may be strided; acc must be contiguous). An undefined acc becomes a
// copy of x.
void accumulate(Tensor& acc, const Tensor& x);
// y = tanh(x), and the backward dx = dy * (1 - y^2) from the saved output.
Tensor tanh_forward(const Tensor& x);
Tensor tanh_backward(const Tensor& y, const Tensor& dy);
// Rows `index` of dimension 0 (any rank): out[i] = x[index[i]].
Tensor gather_rows(const Tensor& x, const std::vector<int64_t>& index);
// Sum of squares of every element, in float64 (gradient norms).
double squared_norm(const Tensor& x);

}  // namespace attn::seq2seq
