// The float64 plain-loop oracle for matmul: every output element is a loop over k, every batch
// index is mapped to each operand's own index by the broadcast rule, one element at a time.
// Never optimised: it exists to be obviously right.
#include <cstddef>
#include <vector>

#include "attn/matmul.h"

namespace attn::reference {

namespace {

// An operand promoted to [own_batch..., rows, cols] with its values in float64, row-major.
struct Operand {
  std::vector<double> values;
  Shape own_batch;
  int64_t rows = 0, cols = 0;

  // Flat position of element (rows r, column c) for the broadcast batch index `index`:
  // own batch dimensions are right-aligned, and a size-1 dimension always reads index 0.
  std::size_t at(const Shape& index, int64_t r, int64_t c) const {
    const std::size_t skip = index.size() - own_batch.size();
    int64_t linear = 0;
    for (std::size_t d = 0; d < own_batch.size(); ++d)
      linear = linear * own_batch[d] + (own_batch[d] == 1 ? 0 : index[skip + d]);
    return static_cast<std::size_t>((linear * rows + r) * cols + c);
  }
};

// torch.matmul's promotion: a 1-D left operand is a row [1, K], a 1-D right operand a column
// [K, 1]. `shape` overrides t's shape (dout is read in the promoted [batch..., M, N] shape).
Operand promote(const Tensor& t, Shape shape) {
  Operand op;
  op.values = t.to_vector();
  op.rows = shape[shape.size() - 2];
  op.cols = shape[shape.size() - 1];
  op.own_batch.assign(shape.begin(), shape.end() - 2);
  return op;
}

Shape promoted_shape(const Tensor& t, bool left) {
  Shape shape = t.shape();
  if (shape.size() == 1) shape.insert(left ? shape.begin() : shape.end(), 1);
  return shape;
}

// Calls fn(index) for every index of `batch` in row-major order (once for an empty batch).
template <class Fn>
void for_each_index(const Shape& batch, Fn&& fn) {
  const int64_t count = shape_numel(batch);
  Shape index(batch.size(), 0);
  for (int64_t n = 0; n < count; ++n) {
    fn(index);
    for (std::size_t d = batch.size(); d-- > 0;) {
      if (++index[d] < batch[d]) break;
      index[d] = 0;
    }
  }
}

}  // namespace

Tensor matmul(const Tensor& a, const Tensor& b) {
  const MatmulShape s = detail::check_matmul_operands(a, b, "matmul");
  const Operand A = promote(a, promoted_shape(a, true));
  const Operand B = promote(b, promoted_shape(b, false));
  Tensor out = Tensor::zeros(s.out, DType::f64);
  double* o = out.data<double>();
  // out is contiguous [batch..., M, N] (with the dropped 1-D dimensions of size 1): written in
  // the order the loops visit it.
  std::size_t next = 0;
  for_each_index(s.batch, [&](const Shape& e) {
    for (int64_t m = 0; m < s.m; ++m)
      for (int64_t n = 0; n < s.n; ++n) {
        // Forward (1): out[e, m, n] = sum_k a[e, m, k] * b[e, k, n]
        double sum = 0.0;
        for (int64_t k = 0; k < s.k; ++k) sum += A.values[A.at(e, m, k)] * B.values[B.at(e, k, n)];
        o[next++] = sum;
      }
  });
  return out;
}

MatmulGrads matmul_backward(const Tensor& a, const Tensor& b, const Tensor& dout) {
  const MatmulShape s = detail::check_matmul_operands(a, b, "matmul_backward");
  detail::check_matmul_dout(a, b, dout, s);
  const Operand A = promote(a, promoted_shape(a, true));
  const Operand B = promote(b, promoted_shape(b, false));
  Shape dout_shape = s.batch;
  dout_shape.push_back(s.m);
  dout_shape.push_back(s.n);
  const Operand D = promote(dout, dout_shape);

  // da and db are laid out exactly like A.values and B.values, so A.at / B.at index them too.
  MatmulGrads grads{Tensor::zeros(a.shape(), DType::f64), Tensor::zeros(b.shape(), DType::f64)};
  double* da = grads.da.data<double>();
  double* db = grads.db.data<double>();
  for_each_index(s.batch, [&](const Shape& e) {
    for (int64_t m = 0; m < s.m; ++m)
      for (int64_t n = 0; n < s.n; ++n)
        for (int64_t k = 0; k < s.k; ++k) {
          // Backward (1), from out[e, m, n] += a[e, m, k] * b[e, k, n]:
          const double g = D.values[D.at(e, m, n)];
          da[A.at(e, m, k)] += g * B.values[B.at(e, k, n)];
          db[B.at(e, k, n)] += A.values[A.at(e, m, k)] * g;
        }
  });
  return grads;
}

}  // namespace attn::reference
