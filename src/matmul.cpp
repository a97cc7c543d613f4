// matmul: front-end (validation, 1-D promotion, broadcasting) and the BLAS driver that runs a
// batch of products as GEMM / GEMV calls, threaded over the batch or inside OpenBLAS.
#include "attn/matmul.h"
#include "attn/profile.h"
#include "blas_kernel.h"
#include "blas_threads.h"

#include <cblas.h>
#include <omp.h>

#include <algorithm>
#include <climits>
#include <cstddef>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace attn {

namespace {

// ---------------------------------------------------------------------------------------------
// Shapes

// "a [2, 3], b [3, 4]": every shape message names both operands.
std::string operands_str(const Shape& a, const Shape& b) {
  return "a " + shape_str(a) + ", b " + shape_str(b);
}

MatmulShape resolve_shape(const Shape& a, const Shape& b, const char* op) {
  const std::string operands = operands_str(a, b);
  ATTN_CHECK(!a.empty(), op, "a must have at least 1 dimension, got a rank-0 tensor (", operands,
             ")");
  ATTN_CHECK(!b.empty(), op, "b must have at least 1 dimension, got a rank-0 tensor (", operands,
             ")");
  const std::size_t ra = a.size(), rb = b.size();
  MatmulShape s;
  s.k = a[ra - 1];
  const int64_t b_k = rb == 1 ? b[0] : b[rb - 2];
  ATTN_CHECK(s.k == b_k, op, "inner dimensions differ: a has K = ", s.k,
             " (its last dimension), b has K = ", b_k,
             rb == 1 ? " (its only dimension)" : " (its second-to-last dimension)", " (",
             operands, ")");
  s.m = ra >= 2 ? a[ra - 2] : 1;
  s.n = rb >= 2 ? b[rb - 1] : 1;

  // Batch dimensions broadcast right-aligned; a missing dimension counts as size 1.
  const Shape a_batch(a.begin(), a.end() - static_cast<std::ptrdiff_t>(std::min<std::size_t>(ra, 2)));
  const Shape b_batch(b.begin(), b.end() - static_cast<std::ptrdiff_t>(std::min<std::size_t>(rb, 2)));
  const std::size_t rank = std::max(a_batch.size(), b_batch.size());
  s.batch.assign(rank, 1);
  for (std::size_t d = 0; d < rank; ++d) {
    const std::size_t from_right = rank - d;
    const int64_t sa = from_right <= a_batch.size() ? a_batch[a_batch.size() - from_right] : 1;
    const int64_t sb = from_right <= b_batch.size() ? b_batch[b_batch.size() - from_right] : 1;
    ATTN_CHECK(sa == sb || sa == 1 || sb == 1, op,
               "batch dimensions do not broadcast: a has batch ", shape_str(a_batch),
               ", b has batch ", shape_str(b_batch), "; sizes ", sa, " and ", sb,
               " meet in the batch dimension ", from_right, " from the right (", operands, ")");
    s.batch[d] = sa == 1 ? sb : sa;
  }
  // OpenBLAS takes 32-bit sizes.
  for (int64_t size : {s.m, s.k, s.n})
    ATTN_CHECK(size <= INT_MAX, op, "matrix dimension ", size, " exceeds the BLAS size limit ",
               INT_MAX, " (", operands, ")");

  s.out = s.batch;
  if (ra >= 2) s.out.push_back(s.m);
  if (rb >= 2) s.out.push_back(s.n);
  return s;
}

// ---------------------------------------------------------------------------------------------
// Strided matrices and how BLAS reads them

// One operand of a batched product: a rows x cols matrix per batch element; element (i, j) of
// batch element `e` sits at data + (offset of e) + i * row_stride + j * col_stride elements.
struct StridedMatrix {
  std::byte* data = nullptr;
  int64_t rows = 0, cols = 0;
  int64_t row_stride = 0, col_stride = 0;
  Shape batch_strides;  // one per dimension of the job's batch; 0 where this operand repeats
};

StridedMatrix transposed(StridedMatrix m) {
  std::swap(m.rows, m.cols);
  std::swap(m.row_stride, m.col_stride);
  return m;
}

// c[e] = a[e] @ b[e] for every batch index e. Where c's batch stride is 0 on a dimension of
// size > 1, that dimension is reduced: its products are summed into one c matrix (backward).
struct BatchedGemm {
  Shape batch;
  StridedMatrix a, b, c;
};

// How row-major BLAS reads a matrix in place: as stored (NoTrans: rows x cols, leading stride
// ld) or as the transpose of a stored cols x rows matrix (Trans).
struct BlasLayout {
  CBLAS_TRANSPOSE trans = CblasNoTrans;
  int64_t ld = 1;
};

std::optional<BlasLayout> blas_layout(const StridedMatrix& m) {
  // A dimension of size 0 or 1 is never stepped along, so its stride does not matter.
  const bool row_major = (m.cols <= 1 || m.col_stride == 1) &&
                         (m.rows <= 1 || m.row_stride >= std::max<int64_t>(1, m.cols));
  if (row_major) {
    const int64_t ld = m.rows <= 1 ? std::max<int64_t>(1, m.cols) : m.row_stride;
    if (ld <= INT_MAX) return BlasLayout{CblasNoTrans, ld};
  }
  const bool col_major = (m.rows <= 1 || m.row_stride == 1) &&
                         (m.cols <= 1 || m.col_stride >= std::max<int64_t>(1, m.rows));
  if (col_major) {
    const int64_t ld = m.cols <= 1 ? std::max<int64_t>(1, m.rows) : m.col_stride;
    if (ld <= INT_MAX) return BlasLayout{CblasTrans, ld};
  }
  return std::nullopt;
}

// The last two dimensions of `t` (rank >= 2) as a StridedMatrix over the broadcast `batch`
// (t's batch dimensions right-aligned into it; size-1 dimensions repeat with stride 0).
StridedMatrix matrix_view(const Tensor& t, const Shape& batch) {
  StridedMatrix m;
  m.data = static_cast<std::byte*>(t.raw_data());
  m.rows = t.size(-2);
  m.cols = t.size(-1);
  m.row_stride = t.stride(-2);
  m.col_stride = t.stride(-1);
  m.batch_strides.assign(batch.size(), 0);
  const std::size_t own = static_cast<std::size_t>(t.dim() - 2);
  for (std::size_t d = 0; d < own; ++d)
    if (t.shape()[d] != 1) m.batch_strides[batch.size() - own + d] = t.strides()[d];
  return m;
}

// Whether BLAS can read every matrix of `t` (rank >= 2) in place.
bool blas_readable(const Tensor& t) {
  const Shape own_batch(t.shape().begin(), t.shape().end() - 2);
  return blas_layout(matrix_view(t, own_batch)).has_value();
}

// A contiguous result tensor of shape own_batch + [rows, cols] (either of the two possibly
// dropped from its shape, which leaves the layout unchanged), viewed over the broadcast batch:
// on the dimensions where own_batch has size 1 the stride is 0, so those are reduced.
StridedMatrix result_view(Tensor& t, const Shape& own_batch, int64_t rows, int64_t cols,
                          const Shape& batch) {
  StridedMatrix m;
  m.data = static_cast<std::byte*>(t.raw_data());
  m.rows = rows;
  m.cols = cols;
  m.row_stride = cols;
  m.col_stride = 1;
  m.batch_strides.assign(batch.size(), 0);
  int64_t step = rows * cols;
  for (std::size_t d = own_batch.size(); d-- > 0;) {
    if (own_batch[d] != 1) m.batch_strides[batch.size() - own_batch.size() + d] = step;
    step *= own_batch[d];
  }
  return m;
}

// 1-D operands become matrices (a [K] -> [1, K], b [K] -> [K, 1], as torch.matmul reads them);
// a matrix BLAS cannot read in place (e.g. every other column, zero strides) is copied.
enum class Side { left, right };
Tensor blas_operand(const Tensor& t, Side side) {
  const Tensor m = t.dim() == 1 ? t.unsqueeze(side == Side::left ? 0 : 1) : t;
  return blas_readable(m) ? m : m.contiguous();
}

// Folds every batch dimension into the rows (or columns) of m, when the batch and that matrix
// dimension step through memory as one arithmetic progression (e.g. a contiguous [B, T, C]
// read as [B*T, C]).
std::optional<StridedMatrix> fold_batch(const StridedMatrix& m, const Shape& batch,
                                        bool into_rows) {
  int64_t extent = into_rows ? m.rows : m.cols;
  int64_t step = into_rows ? m.row_stride : m.col_stride;
  for (std::size_t d = batch.size(); d-- > 0;) {
    if (batch[d] == 1) continue;
    if (extent == 1) {
      step = m.batch_strides[d];
    } else if (m.batch_strides[d] != extent * step) {
      return std::nullopt;
    }
    extent *= batch[d];
  }
  if (extent > INT_MAX) return std::nullopt;
  StridedMatrix folded = m;
  (into_rows ? folded.rows : folded.cols) = extent;
  (into_rows ? folded.row_stride : folded.col_stride) = step;
  folded.batch_strides.clear();
  if (!blas_layout(folded)) return std::nullopt;
  return folded;
}

bool all_zero(const Shape& strides) {
  return std::all_of(strides.begin(), strides.end(), [](int64_t s) { return s == 0; });
}

// Rewrites a batched job as one larger GEMM where memory allows: fewer, bigger BLAS calls
// amortise packing and thread start-up.
//   rows:  b is one matrix for the whole batch; a and c stack their rows (x [B, T, C] @ W).
//   inner: the whole batch sums into one c; a stacks columns, b rows (dW = x^T dy).
//   cols:  a is one matrix for the whole batch; b and c stack their columns.
std::optional<BatchedGemm> fold_into_one_gemm(const BatchedGemm& job) {
  const auto single = [&](std::optional<StridedMatrix> a, std::optional<StridedMatrix> b,
                          std::optional<StridedMatrix> c) -> std::optional<BatchedGemm> {
    if (!a || !b || !c) return std::nullopt;
    const auto c_layout = blas_layout(*c);
    if (!c_layout || c_layout->trans != CblasNoTrans) return std::nullopt;  // c is written row-major
    return BatchedGemm{{}, *a, *b, *c};
  };
  const auto unbatched = [](StridedMatrix m) {
    m.batch_strides.clear();
    return std::optional<StridedMatrix>(m);
  };
  if (job.batch.empty()) return std::nullopt;
  if (all_zero(job.b.batch_strides)) {
    if (auto j = single(fold_batch(job.a, job.batch, true), unbatched(job.b),
                        fold_batch(job.c, job.batch, true)))
      return j;
  }
  if (all_zero(job.c.batch_strides)) {
    if (auto j = single(fold_batch(job.a, job.batch, false), fold_batch(job.b, job.batch, true),
                        unbatched(job.c)))
      return j;
  }
  if (all_zero(job.a.batch_strides)) {
    if (auto j = single(unbatched(job.a), fold_batch(job.b, job.batch, false),
                        fold_batch(job.c, job.batch, false)))
      return j;
  }
  return std::nullopt;
}

// Element offsets of every index of `sizes` (row-major order), given per-dimension strides.
std::vector<int64_t> batch_offsets(const Shape& sizes, const Shape& strides) {
  std::vector<int64_t> offsets(static_cast<std::size_t>(shape_numel(sizes)));
  std::vector<int64_t> index(sizes.size(), 0);
  int64_t offset = 0;
  for (int64_t& out : offsets) {
    out = offset;
    for (std::size_t d = sizes.size(); d-- > 0;) {
      if (++index[d] < sizes[d]) {
        offset += strides[d];
        break;
      }
      offset -= strides[d] * (sizes[d] - 1);
      index[d] = 0;
    }
  }
  return offsets;
}

// ---------------------------------------------------------------------------------------------
// BLAS calls

void blas_gemm(CBLAS_TRANSPOSE ta, CBLAS_TRANSPOSE tb, int m, int n, int k, const float* a,
               int lda, const float* b, int ldb, float beta, float* c, int ldc) {
  ATTN_PROFILE_GEMM(profile::gemm_phase(ta == CblasTrans, tb == CblasTrans), m, n, k);
  detail::ensure_blas_kernel();
  cblas_sgemm(CblasRowMajor, ta, tb, m, n, k, 1.0f, a, lda, b, ldb, beta, c, ldc);
}
void blas_gemm(CBLAS_TRANSPOSE ta, CBLAS_TRANSPOSE tb, int m, int n, int k, const double* a,
               int lda, const double* b, int ldb, double beta, double* c, int ldc) {
  detail::ensure_blas_kernel();
  cblas_dgemm(CblasRowMajor, ta, tb, m, n, k, 1.0, a, lda, b, ldb, beta, c, ldc);
}
void blas_gemv(CBLAS_TRANSPOSE t, int rows, int cols, const float* a, int lda, const float* x,
               int incx, float beta, float* y, int incy) {
  ATTN_PROFILE_GEMM("gemv", rows, cols, 1);
  detail::ensure_blas_kernel();
  cblas_sgemv(CblasRowMajor, t, rows, cols, 1.0f, a, lda, x, incx, beta, y, incy);
}
void blas_gemv(CBLAS_TRANSPOSE t, int rows, int cols, const double* a, int lda, const double* x,
               int incx, double beta, double* y, int incy) {
  detail::ensure_blas_kernel();
  cblas_dgemv(CblasRowMajor, t, rows, cols, 1.0, a, lda, x, incx, beta, y, incy);
}

// Everything about one product that is the same for every batch element.
struct GemmGeometry {
  int m, k, n;
  BlasLayout a, b;
  int ldc;
  int a_row_inc;     // step between a's elements when a is one row (m == 1)
  int b_column_inc;  // step between b's elements when b is one column (n == 1)
};

// c = a @ b + beta * c for one batch element.
template <class T>
void gemm_one(const GemmGeometry& g, const T* a, const T* b, T* c, T beta) {
  const int a_stored_rows = g.a.trans == CblasNoTrans ? g.m : g.k;
  const int a_stored_cols = g.a.trans == CblasNoTrans ? g.k : g.m;
  const int b_stored_rows = g.b.trans == CblasNoTrans ? g.k : g.n;
  const int b_stored_cols = g.b.trans == CblasNoTrans ? g.n : g.k;
  const int lda = static_cast<int>(g.a.ld), ldb = static_cast<int>(g.b.ld);
  if (g.n == 1) {
    // Matrix-vector products are memory bound: GEMV streams a once, without GEMM's packing.
    blas_gemv(g.a.trans, a_stored_rows, a_stored_cols, a, lda, b, g.b_column_inc, beta, c, g.ldc);
  } else if (g.m == 1) {
    // c^T = b^T a^T: read b through the opposite transpose.
    const CBLAS_TRANSPOSE flipped = g.b.trans == CblasNoTrans ? CblasTrans : CblasNoTrans;
    blas_gemv(flipped, b_stored_rows, b_stored_cols, b, ldb, a, g.a_row_inc, beta, c, 1);
  } else {
    blas_gemm(g.a.trans, g.b.trans, g.m, g.n, g.k, a, lda, b, ldb, beta, c, g.ldc);
  }
}

using detail::SingleThreadedBlas;

// Below about 128^3 multiply-adds one GEMM is too short for OpenBLAS's own threads to pay off,
// so a batch of such products is better split across threads even if there are fewer
// products than threads.
constexpr int64_t kSmallGemmWork = int64_t{1} << 21;
// Below about 64k multiply-adds in the whole batch (a few microseconds), starting a parallel
// region and switching the BLAS thread count cost more than the threads save.
constexpr int64_t kMinParallelWork = int64_t{1} << 16;

template <class T>
void run_gemms(const BatchedGemm& unfolded) {
  const BatchedGemm job = fold_into_one_gemm(unfolded).value_or(unfolded);
  const auto a_layout = blas_layout(job.a), b_layout = blas_layout(job.b);
  const auto c_layout = blas_layout(job.c);
  ATTN_CHECK(a_layout && b_layout && c_layout && c_layout->trans == CblasNoTrans, "matmul",
             "internal: operand layout not readable by BLAS");
  const GemmGeometry g{static_cast<int>(job.a.rows),
                       static_cast<int>(job.a.cols),
                       static_cast<int>(job.b.cols),
                       *a_layout,
                       *b_layout,
                       static_cast<int>(c_layout->ld),
                       static_cast<int>(job.a.cols <= 1 ? 1 : job.a.col_stride),
                       static_cast<int>(job.b.rows <= 1 ? 1 : job.b.row_stride)};

  // Batch dimensions on which c repeats (stride 0) are summed into one c: they form the inner
  // loop; the others (one c each) form the outer loop, which is safe to run in parallel.
  Shape outer_sizes, inner_sizes, a_outer, b_outer, c_outer, a_inner, b_inner;
  for (std::size_t d = 0; d < job.batch.size(); ++d) {
    const bool reduced = job.batch[d] > 1 && job.c.batch_strides[d] == 0;
    (reduced ? inner_sizes : outer_sizes).push_back(job.batch[d]);
    (reduced ? a_inner : a_outer).push_back(job.a.batch_strides[d]);
    (reduced ? b_inner : b_outer).push_back(job.b.batch_strides[d]);
    if (!reduced) c_outer.push_back(job.c.batch_strides[d]);
  }
  const std::vector<int64_t> a_out = batch_offsets(outer_sizes, a_outer);
  const std::vector<int64_t> b_out = batch_offsets(outer_sizes, b_outer);
  const std::vector<int64_t> c_out = batch_offsets(outer_sizes, c_outer);
  const std::vector<int64_t> a_in = batch_offsets(inner_sizes, a_inner);
  const std::vector<int64_t> b_in = batch_offsets(inner_sizes, b_inner);

  const T* a = reinterpret_cast<const T*>(job.a.data);
  const T* b = reinterpret_cast<const T*>(job.b.data);
  T* c = reinterpret_cast<T*>(job.c.data);
  const auto product = [&](std::size_t o) {
    for (std::size_t i = 0; i < a_in.size(); ++i)
      gemm_one<T>(g, a + a_out[o] + a_in[i], b + b_out[o] + b_in[i], c + c_out[o],
                  i == 0 ? T(0) : T(1));
  };

  const auto outer = static_cast<int64_t>(a_out.size());
  const int64_t work = int64_t{g.m} * g.n * g.k;  // multiply-adds per product
  const auto products = static_cast<int64_t>(a_out.size() * a_in.size());
  const bool parallel_batch = outer > 1 && !omp_in_parallel() &&
                              work * products >= kMinParallelWork &&
                              (outer >= omp_get_max_threads() || work <= kSmallGemmWork);
  if (parallel_batch) {
    const SingleThreadedBlas one_blas_thread;
#pragma omp parallel for schedule(static)
    for (int64_t o = 0; o < outer; ++o) product(static_cast<std::size_t>(o));
  } else {
    // One product (or a few large ones): OpenBLAS threads each GEMM itself.
    for (int64_t o = 0; o < outer; ++o) product(static_cast<std::size_t>(o));
  }
}

// Runs `job`, writing every element of `c` (the tensor job.c views).
void execute(const BatchedGemm& job, Tensor& c) {
  if (c.numel() == 0) return;
  // K == 0, or nothing broadcast into c (a reduced dimension of size 0): empty sums are 0.
  if (job.a.cols == 0 || shape_numel(job.batch) == 0) {
    c.fill(0.0);
    return;
  }
  if (c.dtype() == DType::f32)
    run_gemms<float>(job);
  else
    run_gemms<double>(job);
}

// ---------------------------------------------------------------------------------------------
// Front-end checks of `out`

// First and one-past-last byte a tensor's elements can touch (numel > 0).
std::pair<const std::byte*, const std::byte*> byte_span(const Tensor& t) {
  const auto* base = static_cast<const std::byte*>(t.raw_data());
  const auto elem = static_cast<int64_t>(dtype_size(t.dtype()));
  int64_t lo = 0, hi = 0;
  for (int64_t d = 0; d < t.dim(); ++d) {
    const int64_t extent = (t.size(d) - 1) * t.stride(d);
    (extent < 0 ? lo : hi) += extent;
  }
  return {base + lo * elem, base + (hi + 1) * elem};
}

// Conservative: spans that intersect count as overlapping, even if the elements interleave.
bool overlaps(const Tensor& x, const Tensor& y) {
  if (x.numel() == 0 || y.numel() == 0) return false;
  const auto [x_lo, x_hi] = byte_span(x);
  const auto [y_lo, y_hi] = byte_span(y);
  return x_lo < y_hi && y_lo < x_hi;
}

void check_out(const Tensor& a, const Tensor& b, const Tensor& out, const MatmulShape& s) {
  const std::string operands = operands_str(a.shape(), b.shape());
  ATTN_CHECK(out.defined(), "matmul", "out is undefined (", operands, ")");
  ATTN_CHECK(out.shape() == s.out, "matmul", "out has shape ", out.shape_str(), ", expected ",
             shape_str(s.out), " (", operands, ")");
  ATTN_CHECK(out.dtype() == a.dtype(), "matmul", "out is ", dtype_name(out.dtype()), ", expected ",
             dtype_name(a.dtype()), " like a and b (", operands, ")");
  // An empty out has no layout to get wrong (and Tensor::is_contiguous() says false for some
  // freshly allocated empty tensors, e.g. [2, 0]).
  ATTN_CHECK(out.numel() == 0 || out.is_contiguous(), "matmul", "out must be contiguous, got shape ", out.shape_str(),
             " with strides ", shape_str(out.strides()), " (", operands, ")");
  ATTN_CHECK(!overlaps(out, a), "matmul", "out ", out.shape_str(), " overlaps a in memory (",
             operands, ")");
  ATTN_CHECK(!overlaps(out, b), "matmul", "out ", out.shape_str(), " overlaps b in memory (",
             operands, ")");
}

void multiply_into(const MatmulShape& s, const Tensor& a, const Tensor& b, Tensor& out) {
  const Tensor am = blas_operand(a, Side::left), bm = blas_operand(b, Side::right);
  const BatchedGemm job{s.batch, matrix_view(am, s.batch), matrix_view(bm, s.batch),
                        result_view(out, s.batch, s.m, s.n, s.batch)};
  execute(job, out);
}

}  // namespace

MatmulShape detail::check_matmul_operands(const Tensor& a, const Tensor& b, const char* op) {
  ATTN_CHECK(a.defined(), op, "a is undefined");
  ATTN_CHECK(b.defined(), op, "b is undefined");
  const std::string operands = operands_str(a.shape(), b.shape());
  for (const auto& [name, t] : {std::pair{"a", &a}, std::pair{"b", &b}})
    ATTN_CHECK(t->dtype() == DType::f32 || t->dtype() == DType::f64, op, name, " is ",
               dtype_name(t->dtype()), ", expected float32 or float64 (", operands, ")");
  ATTN_CHECK(a.dtype() == b.dtype(), op, "dtypes differ: a is ", dtype_name(a.dtype()), ", b is ",
             dtype_name(b.dtype()), " (", operands, ")");
  return resolve_shape(a.shape(), b.shape(), op);
}

void detail::check_matmul_dout(const Tensor& a, const Tensor& b, const Tensor& dout,
                               const MatmulShape& shape) {
  const char* op = "matmul_backward";
  const std::string operands = operands_str(a.shape(), b.shape());
  ATTN_CHECK(dout.defined(), op, "dout is undefined (", operands, ")");
  ATTN_CHECK(dout.shape() == shape.out, op, "dout has shape ", dout.shape_str(), ", expected ",
             shape_str(shape.out), ", the shape of matmul(a, b) (", operands, ")");
  ATTN_CHECK(dout.dtype() == a.dtype(), op, "dout is ", dtype_name(dout.dtype()), ", expected ",
             dtype_name(a.dtype()), " like a and b (", operands, ")");
}

MatmulShape matmul_shape(const Shape& a, const Shape& b) { return resolve_shape(a, b, "matmul"); }

Tensor matmul(const Tensor& a, const Tensor& b) {
  const MatmulShape s = detail::check_matmul_operands(a, b, "matmul");
  Tensor out = Tensor::empty(s.out, a.dtype());
  multiply_into(s, a, b, out);
  return out;
}

void matmul(const Tensor& a, const Tensor& b, Tensor& out) {
  const MatmulShape s = detail::check_matmul_operands(a, b, "matmul");
  check_out(a, b, out, s);
  multiply_into(s, a, b, out);
}

MatmulGrads matmul_backward(const Tensor& a, const Tensor& b, const Tensor& dout) {
  const MatmulShape s = detail::check_matmul_operands(a, b, "matmul_backward");
  detail::check_matmul_dout(a, b, dout, s);

  // Forward (1): out[e] = a[e] @ b[e] for every batch index e, a and b broadcast over e.
  // dout in the promoted shape [batch..., M, N]: put back the dimensions 1-D operands dropped.
  Tensor dout_m = dout;
  if (b.dim() == 1) dout_m = dout_m.unsqueeze(dout_m.dim());
  if (a.dim() == 1) dout_m = dout_m.unsqueeze(dout_m.dim() - 1);
  if (!blas_readable(dout_m)) dout_m = dout_m.contiguous();
  const Tensor am = blas_operand(a, Side::left), bm = blas_operand(b, Side::right);
  const Shape a_batch(am.shape().begin(), am.shape().end() - 2);
  const Shape b_batch(bm.shape().begin(), bm.shape().end() - 2);

  MatmulGrads grads{Tensor::empty(a.shape(), a.dtype()), Tensor::empty(b.shape(), b.dtype())};
  // Backward (1), first factor: da[e] = dout[e] @ b[e]^T, summed over the e that share a[e].
  const BatchedGemm da_job{s.batch, matrix_view(dout_m, s.batch),
                           transposed(matrix_view(bm, s.batch)),
                           result_view(grads.da, a_batch, s.m, s.k, s.batch)};
  execute(da_job, grads.da);
  // Backward (1), second factor: db[e] = a[e]^T @ dout[e], summed over the e that share b[e].
  const BatchedGemm db_job{s.batch, transposed(matrix_view(am, s.batch)),
                           matrix_view(dout_m, s.batch),
                           result_view(grads.db, b_batch, s.k, s.n, s.batch)};
  execute(db_job, grads.db);
  return grads;
}

}  // namespace attn
