// matmul: the matrix product with torch.matmul's semantics, forward and backward.
//
// Shape contract. The last two dimensions are the matrices, every dimension before them is a
// batch dimension:
//
//   a [..., M, K]   b [..., K, N]   ->   out [broadcast(a..., b...), M, N]
//
//   1-D x 1-D   a [K]   b [K]          -> out []  (dot product: a rank-0 tensor, numel 1)
//   2-D x 2-D   a [M, K]   b [K, N]    -> out [M, N]
//   1-D x 2-D   a [K]   b [K, N]       -> out [N]  (a is read as [1, K]; that 1 is removed)
//   2-D x 1-D   a [M, K]   b [K]       -> out [M]  (b is read as [K, 1]; that 1 is removed)
//   N-D         batch dimensions broadcast: right-aligned, equal sizes match and a size of 1
//               repeats against any size (including 0). A 1-D argument is promoted as above and
//               its dimension removed from the result, e.g. [5, 2, 3] x [3] -> [5, 2] and
//               [3] x [5, 3, 4] -> [5, 4]; [6, 1, 2, 3] x [5, 3, 4] -> [6, 5, 2, 4].
//
// Sizes of 0 are allowed anywhere; K == 0 gives zeros. Both operands share one dtype, float32 or
// float64 (no promotion). Any strides are accepted: matrices that are row- or column-major with
// a leading stride BLAS accepts are read in place, others are first copied to contiguous memory.
// Rank-0 operands are refused (torch refuses them too).
//
// Threading: a single product is one BLAS GEMM that OpenBLAS threads itself. Several products
// (a batch) run in an OpenMP loop with OpenBLAS set to one thread for its duration and restored
// after. Called inside an OpenMP parallel region, matmul runs on the calling thread and leaves
// the OpenBLAS thread count alone: the caller should have set it to 1.
//
// Errors (attn::Error, "[matmul] ..." naming the argument and both shapes): undefined or rank-0
// operand, dtype other than float32/float64 or differing dtypes, inner dimensions that differ,
// batch dimensions that do not broadcast, an `out` of the wrong shape or dtype, non-contiguous,
// or overlapping an operand. matmul_backward reports its own checks as "[matmul_backward] ...".
#pragma once

#include <cstdint>

#include "attn/tensor.h"

namespace attn {

// The shape of matmul(a, b) as the front-end resolves it, in the letters above.
struct MatmulShape {
  Shape batch;    // the broadcast batch dimensions
  int64_t m = 1;  // rows of a (1 when a is 1-D)
  int64_t k = 0;  // the contracted dimension
  int64_t n = 1;  // columns of b (1 when b is 1-D)
  Shape out;      // batch + [M if a.dim() >= 2] + [N if b.dim() >= 2]
};

// Validates two operand shapes (ranks, inner and batch dimensions; throws like matmul) and
// returns the shape of their product, e.g. to allocate an `out` argument.
MatmulShape matmul_shape(const Shape& a, const Shape& b);

// out = a @ b, a new contiguous tensor of matmul_shape(a, b).out in a's dtype.
Tensor matmul(const Tensor& a, const Tensor& b);

// The same product written into `out`, which must be defined, contiguous, of the result's shape
// and dtype, and must not overlap a or b. Every element of `out` is overwritten.
void matmul(const Tensor& a, const Tensor& b, Tensor& out);

// Gradients of a scalar loss L with respect to a and b, given dout = dL/dout (out's shape and
// dtype, any strides): da = dout @ b^T and db = a^T @ dout per batch element, summed over the
// batch dimensions that a (or b) broadcast, so that da has a's shape and db has b's shape. Both
// are new contiguous tensors in the operands' dtype.
struct MatmulGrads {
  Tensor da;
  Tensor db;
};
MatmulGrads matmul_backward(const Tensor& a, const Tensor& b, const Tensor& dout);

namespace reference {

// The float64 oracle: plain loops over every output element and every k, never optimised.
// Inputs are validated like matmul (same messages) and converted to float64; results are float64.
Tensor matmul(const Tensor& a, const Tensor& b);
MatmulGrads matmul_backward(const Tensor& a, const Tensor& b, const Tensor& dout);

}  // namespace reference

namespace detail {
// The front-end's operand checks (defined, rank >= 1, float dtypes that agree, shapes), with
// `op` naming the calling op in messages. Shared by matmul, matmul_backward and the reference.
MatmulShape check_matmul_operands(const Tensor& a, const Tensor& b, const char* op);
// The check of dout against the product's shape and dtype, shared with the reference.
void check_matmul_dout(const Tensor& a, const Tensor& b, const Tensor& dout,
                       const MatmulShape& shape);
}  // namespace detail

}  // namespace attn
