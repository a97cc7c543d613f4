#include "seq2seq/models/tensor_ops.h"

#include <cmath>
#include <cstring>

#include "attn/activations.h"
#include "attn/error.h"
#include "nn/linear.h"

namespace attn::seq2seq {
namespace {

constexpr const char* kOp = "seq2seq";

void check_matrix(const Tensor& x, const char* what) {
  ATTN_CHECK(x.defined() && x.dim() == 2, kOp, what, " must be a matrix [N, C], got ",
             x.defined() ? x.shape_str() : "undefined");
}

}  // namespace

Tensor concat_columns(const std::vector<Tensor>& parts) {
  ATTN_CHECK(!parts.empty(), kOp, "concat_columns needs at least one part");
  check_matrix(parts[0], "concat part 0");
  const int64_t N = parts[0].size(0);
  const DType dtype = parts[0].dtype();
  int64_t C = 0;
  for (std::size_t i = 0; i < parts.size(); ++i) {
    check_matrix(parts[i], "concat part");
    ATTN_CHECK(parts[i].size(0) == N && parts[i].dtype() == dtype, kOp, "concat part ", i, " is ",
               parts[i].shape_str(), " ", dtype_name(parts[i].dtype()), ", part 0 has ", N,
               " rows of ", dtype_name(dtype));
    C += parts[i].size(1);
  }
  Tensor out = Tensor::empty({N, C}, dtype);
  int64_t offset = 0;
  for (const Tensor& part : parts) {
    out.slice(1, offset, offset + part.size(1)).copy_from(part);
    offset += part.size(1);
  }
  return out;
}

Tensor columns(const Tensor& x, int64_t begin, int64_t end) {
  check_matrix(x, "columns input");
  ATTN_CHECK(0 <= begin && begin <= end && end <= x.size(1), kOp, "columns [", begin, ", ", end,
             ") out of range for ", x.shape_str());
  return x.slice(1, begin, end).clone();
}

void accumulate(Tensor& acc, const Tensor& x) {
  if (!acc.defined()) {
    acc = x.clone();
    return;
  }
  ATTN_CHECK(acc.shape() == x.shape() && acc.dtype() == x.dtype() && acc.is_contiguous(), kOp,
             "accumulate: ", x.shape_str(), " into ", acc.shape_str());
  const Tensor xc = x.contiguous();
  const int64_t n = acc.numel();
  nn::visit_float(acc.dtype(), kOp, "accumulate", [&](auto tag) {
    using T = decltype(tag);
    T* a = acc.data<T>();
    const T* b = xc.data<T>();
    for (int64_t i = 0; i < n; ++i) a[i] += b[i];
  });
}

Tensor tanh_forward(const Tensor& x) {
  Tensor y = x.clone();
  const int64_t n = y.numel();
  nn::visit_float(y.dtype(), kOp, "tanh input", [&](auto tag) {
    using T = decltype(tag);
    tanh_array(y.data<T>(), y.data<T>(), n);
  });
  return y;
}

Tensor tanh_backward(const Tensor& y, const Tensor& dy) {
  ATTN_CHECK(y.shape() == dy.shape() && y.dtype() == dy.dtype(), kOp, "tanh backward: dy ",
             dy.shape_str(), ", y ", y.shape_str());
  const Tensor yc = y.contiguous();
  Tensor dx = dy.clone();
  const int64_t n = dx.numel();
  nn::visit_float(dx.dtype(), kOp, "tanh dy", [&](auto tag) {
    using T = decltype(tag);
    const T* yp = yc.data<T>();
    T* d = dx.data<T>();
    for (int64_t i = 0; i < n; ++i) d[i] *= T(1) - yp[i] * yp[i];
  });
  return dx;
}

Tensor gather_rows(const Tensor& x, const std::vector<int64_t>& index) {
  ATTN_CHECK(x.defined() && x.dim() >= 1, kOp, "gather_rows needs a tensor of rank >= 1");
  const Tensor xc = x.contiguous();
  Shape shape = x.shape();
  const int64_t rows = shape[0];
  shape[0] = static_cast<int64_t>(index.size());
  Tensor out = Tensor::empty(shape, x.dtype());
  const std::size_t row_bytes =
      static_cast<std::size_t>(rows == 0 ? 0 : xc.numel() / rows) * dtype_size(x.dtype());
  const auto* src = static_cast<const std::byte*>(xc.raw_data());
  auto* dst = static_cast<std::byte*>(out.raw_data());
  for (std::size_t i = 0; i < index.size(); ++i) {
    ATTN_CHECK(0 <= index[i] && index[i] < rows, kOp, "gather_rows index ", index[i],
               " out of range for ", rows, " rows");
    if (row_bytes) std::memcpy(dst + i * row_bytes, src + index[i] * row_bytes, row_bytes);
  }
  return out;
}

double squared_norm(const Tensor& x) {
  const Tensor xc = x.contiguous();
  const int64_t n = xc.numel();
  return nn::visit_float(xc.dtype(), kOp, "norm input", [&](auto tag) {
    using T = decltype(tag);
    const T* p = xc.data<T>();
    double s = 0.0;
    for (int64_t i = 0; i < n; ++i) s += static_cast<double>(p[i]) * static_cast<double>(p[i]);
    return s;
  });
}

}  // namespace attn::seq2seq
