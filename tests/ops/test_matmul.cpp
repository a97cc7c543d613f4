// matmul: torch.matmul's shape rules (every rank combination, broadcasting, sizes 0 and 1),
// values against the float64 plain-loop reference with dtype-derived tolerances, any strides,
// the `out` argument, threading, gradients against finite differences and the reference, and
// one test per validation check with the op and the shapes in its message.
#include "attn/matmul.h"

#include <dlfcn.h>
#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <functional>
#include <initializer_list>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include "support/test_support.h"

namespace attn {
namespace {

using attn::testing::expect_error;

using testing::all_close;
using testing::check_gradient;
using testing::random_tensor;
using testing::Tolerance;
using testing::tolerance_for;
using testing::weighted_sum;

constexpr DType kDtypes[] = {DType::f32, DType::f64};

// One product: operand shapes and the result shape torch.matmul gives for them.
struct ShapeCase {
  Shape a, b, out;
};

std::string case_name(const ShapeCase& c, DType dtype) {
  return shape_str(c.a) + " @ " + shape_str(c.b) + " " + dtype_name(dtype);
}

// Every rank combination from 1-D to 5-D, broadcasting from either side, and sizes 0 and 1 in
// every position. The expected shapes are torch.matmul's.
const std::vector<ShapeCase> kShapeCases = {
    // 1-D and 2-D
    {{3}, {3}, {}},                // dot product: rank-0 result
    {{2, 3}, {3, 4}, {2, 4}},      // matrix product
    {{3}, {3, 4}, {4}},            // vector-matrix: the prepended 1 is removed
    {{2, 3}, {3}, {2}},            // matrix-vector
    // N-D with a 1-D operand
    {{5, 2, 3}, {3}, {5, 2}},
    {{3}, {5, 3, 4}, {5, 4}},
    {{2, 3, 2, 3}, {3}, {2, 3, 2}},
    // N-D x N-D, batch broadcast both ways
    {{5, 2, 3}, {3, 4}, {5, 2, 4}},           // b shared by the batch
    {{2, 3}, {5, 3, 4}, {5, 2, 4}},           // a shared by the batch
    {{5, 2, 3}, {5, 3, 4}, {5, 2, 4}},        // same batch
    {{1, 2, 3}, {7, 3, 4}, {7, 2, 4}},        // size-1 batch on a
    {{7, 2, 3}, {1, 3, 4}, {7, 2, 4}},        // size-1 batch on b
    {{5, 1, 2, 3}, {4, 3, 6}, {5, 4, 2, 6}},  // 4-D x 3-D, each side broadcasts one dimension
    {{6, 1, 2, 3}, {1, 5, 3, 4}, {6, 5, 2, 4}},
    {{2, 3, 4, 5}, {2, 3, 5, 2}, {2, 3, 4, 2}},
    {{2, 1, 3, 2, 3}, {4, 1, 3, 5}, {2, 4, 3, 2, 5}},
    // sizes of 1
    {{1}, {1}, {}},
    {{1, 1}, {1, 1}, {1, 1}},
    {{1}, {1, 5}, {5}},
    {{4, 1}, {1, 6}, {4, 6}},  // K = 1: outer product
    {{1, 3}, {3, 1}, {1, 1}},
    {{4, 1, 1, 3}, {2, 3, 1}, {4, 2, 1, 1}},
    {{3, 1, 3}, {3, 3, 1}, {3, 1, 1}},
    // sizes of 0
    {{0}, {0}, {}},  // empty dot product: 0
    {{0, 3}, {3, 4}, {0, 4}},
    {{2, 0}, {0, 4}, {2, 4}},  // K = 0: zeros
    {{2, 3}, {3, 0}, {2, 0}},
    {{0, 2, 3}, {3, 4}, {0, 2, 4}},
    {{1, 2, 3}, {0, 3, 4}, {0, 2, 4}},  // size-1 batch against 0
    {{3, 2, 0}, {3, 0, 4}, {3, 2, 4}},
    {{3, 2, 0}, {0}, {3, 2}},
};

// Batch elements of a product: a bound on how many batch elements one gradient element sums
// over (da sums N products per batch element sharing it, db sums M).
int64_t batch_count(const ShapeCase& c) { return shape_numel(matmul_shape(c.a, c.b).batch); }

// ---------------------------------------------------------------------------------------------
// Shapes and values

TEST(MatmulShapes, FollowTorchMatmulForEveryRankCombination) {
  for (const ShapeCase& c : kShapeCases) {
    SCOPED_TRACE(case_name(c, DType::f32));
    EXPECT_EQ(matmul_shape(c.a, c.b).out, c.out);
    const Tensor out = matmul(random_tensor(c.a, DType::f32, 1), random_tensor(c.b, DType::f32, 2));
    EXPECT_EQ(out.shape(), c.out);
    EXPECT_EQ(out.dtype(), DType::f32);
    // (Tensor::is_contiguous() is false for some freshly allocated empty tensors, e.g. [2, 0].)
    EXPECT_TRUE(out.numel() == 0 || out.is_contiguous());
  }
}

TEST(MatmulShapes, ReportsTheLetters) {
  const MatmulShape s = matmul_shape({5, 1, 2, 3}, {4, 3, 6});
  EXPECT_EQ(s.batch, (Shape{5, 4}));
  EXPECT_EQ(s.m, 2);
  EXPECT_EQ(s.k, 3);
  EXPECT_EQ(s.n, 6);
  const MatmulShape dot = matmul_shape({7}, {7});
  EXPECT_EQ(dot.batch, Shape{});
  EXPECT_EQ(dot.m, 1);
  EXPECT_EQ(dot.k, 7);
  EXPECT_EQ(dot.n, 1);
}

TEST(MatmulForward, MatchesReferenceForEveryRankCombination) {
  for (DType dtype : kDtypes) {
    for (const ShapeCase& c : kShapeCases) {
      const Tensor a = random_tensor(c.a, dtype, 3), b = random_tensor(c.b, dtype, 4);
      const int64_t k = matmul_shape(c.a, c.b).k;
      EXPECT_TRUE(all_close(matmul(a, b), reference::matmul(a, b), tolerance_for(dtype, k),
                            case_name(c, dtype)));
    }
  }
}

TEST(MatmulForward, DotProductIsRankZero) {
  const Tensor a = Tensor::from(std::vector<double>{1, 2, 3}, {3});
  const Tensor b = Tensor::from(std::vector<double>{4, -5, 6}, {3});
  const Tensor out = matmul(a, b);
  ASSERT_EQ(out.dim(), 0);
  ASSERT_EQ(out.numel(), 1);
  EXPECT_EQ(out.get({}), 1 * 4 - 2 * 5 + 3 * 6);
}

TEST(MatmulForward, EmptyInnerDimensionGivesZeros) {
  for (DType dtype : kDtypes) {
    const Tensor out = matmul(Tensor::empty({3, 2, 0}, dtype), Tensor::empty({3, 0, 4}, dtype));
    ASSERT_EQ(out.shape(), (Shape{3, 2, 4}));
    for (double v : out.to_vector()) EXPECT_EQ(v, 0.0);
  }
}

// Sizes around a SIMD/blocking boundary in every one of M, K and N; GEMM, and the GEMV paths
// when M or N is 1.
TEST(MatmulForward, AwkwardSizes) {
  const int64_t sizes[] = {1, 2, 3, 127, 128, 129};
  for (DType dtype : kDtypes) {
    for (int64_t m : sizes)
      for (int64_t k : sizes)
        for (int64_t n : sizes) {
          if (dtype == DType::f64 && m * k * n > 128 * 128 * 128) continue;  // keep the run short
          const Tensor a = random_tensor({m, k}, dtype, 5), b = random_tensor({k, n}, dtype, 6);
          // Built with a stream: GCC 12 warns (-Wrestrict, a false positive, PR 105329) on
          // "[" + std::to_string(m) inlined here.
          std::ostringstream label;
          label << "[" << m << ", " << k << "] @ [" << k << ", " << n << "] " << dtype_name(dtype);
          EXPECT_TRUE(all_close(matmul(a, b), reference::matmul(a, b), tolerance_for(dtype, k),
                                label.str()));
        }
  }
}

// Batches large and small, so that both the OpenMP loop over the batch and the folded single
// GEMM (b shared: the batch stacks into rows) run.
TEST(MatmulForward, BatchedAndFoldedProducts) {
  const std::vector<ShapeCase> cases = {
      {{17, 33, 65}, {17, 65, 31}, {17, 33, 31}},  // many products, OpenMP over the batch
      {{3, 129, 64}, {3, 64, 130}, {3, 129, 130}},  // few large products
      {{4, 33, 65}, {65, 31}, {4, 33, 31}},          // folds into one [132, 65] @ [65, 31]
      {{65}, {4, 65, 31}, {4, 31}},                  // vector against a batch (GEMV)
      {{2, 3, 33, 65}, {3, 65, 1}, {2, 3, 33, 1}},
  };
  for (DType dtype : kDtypes)
    for (const ShapeCase& c : cases) {
      const Tensor a = random_tensor(c.a, dtype, 7), b = random_tensor(c.b, dtype, 8);
      const Tensor out = matmul(a, b);
      ASSERT_EQ(out.shape(), c.out);
      EXPECT_TRUE(all_close(out, reference::matmul(a, b),
                            tolerance_for(dtype, matmul_shape(c.a, c.b).k), case_name(c, dtype)));
    }
}

// ---------------------------------------------------------------------------------------------
// Strides

// A strided view (with its owner kept alive) for layouts Tensor's view methods cannot make.
struct StridedView {
  Tensor owner;
  Tensor view;
};

// Elements of `owner` read with the given shape and strides.
StridedView strided(const Shape& owner_shape, DType dtype, uint64_t seed, const Shape& shape,
                    const Shape& strides) {
  StridedView s{random_tensor(owner_shape, dtype, seed), {}};
  s.view = dtype == DType::f32 ? Tensor::wrap(s.owner.data<float>(), shape, strides)
                               : Tensor::wrap(s.owner.data<double>(), shape, strides);
  return s;
}

struct LayoutCase {
  std::string name;
  Tensor a, b;
  std::vector<Tensor> owners;  // memory the wrapped views read
};

std::vector<LayoutCase> layout_cases(DType dtype) {
  std::vector<LayoutCase> cases;
  const auto r = [&](const Shape& shape, uint64_t seed) { return random_tensor(shape, dtype, seed); };
  // Column-major operands (BLAS reads them with a transpose flag).
  cases.push_back({"a transposed", r({5, 4}, 1).transpose(0, 1), r({5, 6}, 2), {}});
  cases.push_back({"b transposed", r({4, 5}, 1), r({6, 5}, 2).transpose(0, 1), {}});
  cases.push_back({"both transposed, batched", r({3, 5, 4}, 1).transpose(1, 2),
                   r({3, 6, 5}, 2).transpose(1, 2), {}});
  // Rows further apart than their length (leading dimension > columns).
  cases.push_back({"row slices", r({4, 9}, 1).slice(1, 2, 7), r({5, 8}, 2).slice(1, 1, 7), {}});
  cases.push_back({"column slice of a transposed", r({9, 4}, 1).slice(0, 3, 8).transpose(0, 1),
                   r({5, 3}, 2), {}});
  // Batch dimensions out of order, and a batch broadcast by a zero stride.
  cases.push_back({"permuted batch", r({4, 3, 2, 5}, 1).transpose(0, 1), r({5, 6}, 2), {}});
  {
    StridedView a = strided({4, 5}, dtype, 1, {3, 4, 5}, {0, 5, 1});
    cases.push_back({"zero batch stride", a.view, r({3, 5, 2}, 2), {a.owner}});
  }
  // Layouts BLAS cannot read: every other column, a repeated row (copied first).
  {
    StridedView a = strided({4, 10}, dtype, 1, {4, 5}, {10, 2});
    cases.push_back({"every other column", a.view, r({5, 3}, 2), {a.owner}});
  }
  {
    StridedView b = strided({6}, dtype, 2, {5, 6}, {0, 1});
    cases.push_back({"zero row stride", r({4, 5}, 1), b.view, {b.owner}});
  }
  // Strided vectors: a column of a matrix.
  cases.push_back({"strided vector a", r({5, 3}, 1).select(1, 2), r({5, 4}, 2), {}});
  cases.push_back({"strided vector b", r({4, 5}, 1), r({5, 3}, 2).select(1, 1), {}});
  cases.push_back({"strided vectors, batched b", r({5, 3}, 1).select(1, 0),
                   r({2, 4, 5}, 2).transpose(1, 2), {}});
  return cases;
}

TEST(MatmulForward, AnyStridesMatchReference) {
  for (DType dtype : kDtypes)
    for (const LayoutCase& c : layout_cases(dtype)) {
      const int64_t k = c.a.size(-1);
      EXPECT_TRUE(all_close(matmul(c.a, c.b), reference::matmul(c.a, c.b), tolerance_for(dtype, k),
                            c.name + " " + dtype_name(dtype)));
    }
}

// ---------------------------------------------------------------------------------------------
// The out argument

TEST(MatmulOut, OverwritesEveryElement) {
  for (DType dtype : kDtypes)
    for (const ShapeCase& c : kShapeCases) {
      const Tensor a = random_tensor(c.a, dtype, 9), b = random_tensor(c.b, dtype, 10);
      // NaN everywhere first: an element the product forgets, or scales by beta = 0 instead of
      // overwriting, stays NaN.
      Tensor out = Tensor::full(c.out, std::numeric_limits<double>::quiet_NaN(), dtype);
      matmul(a, b, out);
      EXPECT_TRUE(all_close(out, reference::matmul(a, b),
                            tolerance_for(dtype, matmul_shape(c.a, c.b).k), case_name(c, dtype)));
    }
}

TEST(MatmulOut, AcceptsAViewOfLargerMemory) {
  Tensor storage = Tensor::zeros({3, 2, 4}, DType::f64);
  Tensor out = storage.select(0, 1);  // contiguous [2, 4] in the middle of the buffer
  const Tensor a = random_tensor({2, 3}, DType::f64, 1), b = random_tensor({3, 4}, DType::f64, 2);
  matmul(a, b, out);
  EXPECT_TRUE(all_close(out, reference::matmul(a, b), tolerance_for(DType::f64, 3), "out"));
  for (int64_t i : {0, 2})
    for (double v : storage.select(0, i).to_vector()) EXPECT_EQ(v, 0.0) << "wrote outside out";
}

// ---------------------------------------------------------------------------------------------
// Threading

// OpenBLAS's thread count is process-wide, so the batched path must put it back. Looked up at
// run time so the test does not need OpenBLAS's headers (the library links it).
TEST(MatmulThreads, RestoresTheOpenBlasThreadCount) {
  using GetThreads = int (*)();
  const auto get_threads =
      reinterpret_cast<GetThreads>(dlsym(RTLD_DEFAULT, "openblas_get_num_threads"));
  ASSERT_NE(get_threads, nullptr) << "openblas_get_num_threads not found";
  const int before = get_threads();
  // Eight 32^3 products: enough work for the OpenMP loop over the batch.
  const Tensor out =
      matmul(random_tensor({8, 32, 32}, DType::f32, 1), random_tensor({8, 32, 32}, DType::f32, 2));
  EXPECT_EQ(out.shape(), (Shape{8, 32, 32}));
  EXPECT_EQ(get_threads(), before);
}

// Inside an OpenMP region matmul runs on the calling thread; results must not depend on it.
TEST(MatmulThreads, CallableFromAnOpenMpRegion) {
  constexpr int kCalls = 8;
  std::vector<Tensor> a(kCalls), b(kCalls), out(kCalls);
  for (int i = 0; i < kCalls; ++i) {
    a[i] = random_tensor({3, 9, 17}, DType::f64, 100 + i);
    b[i] = random_tensor({17, 5}, DType::f64, 200 + i);
  }
#pragma omp parallel for schedule(static)
  for (int i = 0; i < kCalls; ++i) out[i] = matmul(a[i], b[i]);
  for (int i = 0; i < kCalls; ++i)
    EXPECT_TRUE(all_close(out[i], reference::matmul(a[i], b[i]), tolerance_for(DType::f64, 17),
                          "call " + std::to_string(i)));
}

// ---------------------------------------------------------------------------------------------
// Backward

TEST(MatmulBackward, MatchesFiniteDifferences) {
  for (const ShapeCase& c : kShapeCases) {
    SCOPED_TRACE(case_name(c, DType::f64));
    Tensor a = random_tensor(c.a, DType::f64, 11), b = random_tensor(c.b, DType::f64, 12);
    const Tensor weights = random_tensor(c.out, DType::f64, 13);
    const MatmulGrads grads = matmul_backward(a, b, weights);
    ASSERT_EQ(grads.da.shape(), c.a);
    ASSERT_EQ(grads.db.shape(), c.b);
    const auto loss = [&] { return weighted_sum(matmul(a, b), weights); };
    // An empty operand has no element to perturb (MatchesReference checks its empty gradient).
    if (a.numel() > 0) {
      EXPECT_TRUE(check_gradient(loss, a, grads.da, "da"));
    }
    if (b.numel() > 0) {
      EXPECT_TRUE(check_gradient(loss, b, grads.db, "db"));
    }
  }
}

TEST(MatmulBackward, MatchesReference) {
  for (DType dtype : kDtypes)
    for (const ShapeCase& c : kShapeCases) {
      const Tensor a = random_tensor(c.a, dtype, 14), b = random_tensor(c.b, dtype, 15);
      const Tensor dout = random_tensor(c.out, dtype, 16);
      const MatmulGrads grads = matmul_backward(a, b, dout);
      const MatmulGrads expected = reference::matmul_backward(a, b, dout);
      EXPECT_EQ(grads.da.dtype(), dtype);
      EXPECT_EQ(grads.db.dtype(), dtype);
      // Each da element sums N products per batch element that shares it; db sums M.
      const MatmulShape s = matmul_shape(c.a, c.b);
      EXPECT_TRUE(all_close(grads.da, expected.da, tolerance_for(dtype, s.n * batch_count(c)),
                            "da " + case_name(c, dtype)));
      EXPECT_TRUE(all_close(grads.db, expected.db, tolerance_for(dtype, s.m * batch_count(c)),
                            "db " + case_name(c, dtype)));
    }
}

// Larger batches: the OpenMP loop, the accumulation over a broadcast batch (a shared: da sums
// 9 products), and the folded GEMMs (b shared: da stacks rows, db contracts over B*M).
TEST(MatmulBackward, BatchedAndFoldedProducts) {
  const std::vector<ShapeCase> cases = {
      {{9, 33, 20}, {9, 20, 31}, {9, 33, 31}},
      {{33, 20}, {9, 20, 31}, {9, 33, 31}},
      {{9, 33, 20}, {20, 31}, {9, 33, 31}},
      {{2, 1, 33, 20}, {5, 20, 31}, {2, 5, 33, 31}},
  };
  for (DType dtype : kDtypes)
    for (const ShapeCase& c : cases) {
      const Tensor a = random_tensor(c.a, dtype, 17), b = random_tensor(c.b, dtype, 18);
      const Tensor dout = random_tensor(c.out, dtype, 19);
      const MatmulGrads grads = matmul_backward(a, b, dout);
      const MatmulGrads expected = reference::matmul_backward(a, b, dout);
      const MatmulShape s = matmul_shape(c.a, c.b);
      EXPECT_TRUE(all_close(grads.da, expected.da, tolerance_for(dtype, s.n * batch_count(c)),
                            "da " + case_name(c, dtype)));
      EXPECT_TRUE(all_close(grads.db, expected.db, tolerance_for(dtype, s.m * batch_count(c)),
                            "db " + case_name(c, dtype)));
    }
}

TEST(MatmulBackward, AnyStridesMatchReference) {
  for (DType dtype : kDtypes)
    for (const LayoutCase& c : layout_cases(dtype)) {
      const MatmulShape s = matmul_shape(c.a.shape(), c.b.shape());
      // dout itself transposed when it is a matrix.
      Shape dout_shape = s.out;
      if (dout_shape.size() >= 2) std::swap(dout_shape[dout_shape.size() - 1], dout_shape[dout_shape.size() - 2]);
      Tensor dout = random_tensor(dout_shape, dtype, 20);
      if (dout.dim() >= 2) dout = dout.transpose(-1, -2);
      const MatmulGrads grads = matmul_backward(c.a, c.b, dout);
      const MatmulGrads expected = reference::matmul_backward(c.a, c.b, dout);
      const int64_t batch = shape_numel(s.batch);
      EXPECT_TRUE(all_close(grads.da, expected.da, tolerance_for(dtype, s.n * batch),
                            "da " + c.name + " " + dtype_name(dtype)));
      EXPECT_TRUE(all_close(grads.db, expected.db, tolerance_for(dtype, s.m * batch),
                            "db " + c.name + " " + dtype_name(dtype)));
    }
}

// The reference itself against finite differences, so that the oracle is checked too.
TEST(MatmulBackward, ReferenceMatchesFiniteDifferences) {
  Tensor a = random_tensor({5, 1, 2, 3}, DType::f64, 21), b = random_tensor({4, 3, 6}, DType::f64, 22);
  const Tensor weights = random_tensor({5, 4, 2, 6}, DType::f64, 23);
  const MatmulGrads grads = reference::matmul_backward(a, b, weights);
  const auto loss = [&] { return weighted_sum(reference::matmul(a, b), weights); };
  EXPECT_TRUE(check_gradient(loss, a, grads.da, "reference da"));
  EXPECT_TRUE(check_gradient(loss, b, grads.db, "reference db"));
}

// ---------------------------------------------------------------------------------------------
// Errors: one test per check, each message naming the op and the shapes.


Tensor f32(const Shape& shape) { return random_tensor(shape, DType::f32, 1); }
Tensor f64(const Shape& shape) { return random_tensor(shape, DType::f64, 1); }

TEST(MatmulErrors, UndefinedOperand) {
  expect_error([] { matmul(Tensor(), f32({3})); }, {"[matmul]", "a is undefined"});
  expect_error([] { matmul(f32({3}), Tensor()); }, {"[matmul]", "b is undefined"});
}

TEST(MatmulErrors, RankZeroA) {
  expect_error([] { matmul(Tensor::zeros({}), f32({3})); },
               {"[matmul]", "a must have at least 1 dimension", "a [], b [3]"});
}

TEST(MatmulErrors, RankZeroB) {
  expect_error([] { matmul(f32({2, 3}), Tensor::zeros({})); },
               {"[matmul]", "b must have at least 1 dimension", "a [2, 3], b []"});
}

TEST(MatmulErrors, DtypesDiffer) {
  expect_error([] { matmul(f32({2, 3}), f64({3, 4})); },
               {"[matmul]", "dtypes differ", "a is float32", "b is float64", "a [2, 3], b [3, 4]"});
}

TEST(MatmulErrors, BoolOperand) {
  expect_error([] { matmul(Tensor::zeros({2, 3}, DType::b8), f32({3})); },
               {"[matmul]", "a is bool", "float32 or float64", "a [2, 3], b [3]"});
}

TEST(MatmulErrors, InnerDimensionsDiffer) {
  expect_error([] { matmul(f32({2, 3}), f32({4, 5})); },
               {"[matmul]", "inner dimensions differ", "a has K = 3", "b has K = 4",
                "a [2, 3], b [4, 5]"});
}

TEST(MatmulErrors, InnerDimensionsDifferWithVectors) {
  expect_error([] { matmul(f32({3}), f32({4})); },
               {"[matmul]", "inner dimensions differ", "(its only dimension)", "a [3], b [4]"});
  expect_error([] { matmul(f32({2, 5, 3}), f32({4})); },
               {"[matmul]", "a has K = 3", "b has K = 4", "a [2, 5, 3], b [4]"});
}

TEST(MatmulErrors, BatchDimensionsDoNotBroadcast) {
  expect_error([] { matmul(f32({2, 4, 3}), f32({5, 3, 6})); },
               {"[matmul]", "batch dimensions do not broadcast", "a has batch [2]",
                "b has batch [5]", "a [2, 4, 3], b [5, 3, 6]"});
  expect_error([] { matmul(f32({3, 2, 4, 3}), f32({5, 1, 3, 6})); },
               {"[matmul]", "sizes 3 and 5", "a [3, 2, 4, 3], b [5, 1, 3, 6]"});
}

TEST(MatmulErrors, OutUndefined) {
  Tensor out;
  expect_error([&] { matmul(f32({2, 3}), f32({3, 4}), out); },
               {"[matmul]", "out is undefined", "a [2, 3], b [3, 4]"});
}

TEST(MatmulErrors, OutWrongShape) {
  Tensor out = Tensor::empty({4, 2});
  expect_error([&] { matmul(f32({2, 3}), f32({3, 4}), out); },
               {"[matmul]", "out has shape [4, 2], expected [2, 4]", "a [2, 3], b [3, 4]"});
}

TEST(MatmulErrors, OutWrongDtype) {
  Tensor out = Tensor::empty({2, 4}, DType::f64);
  expect_error([&] { matmul(f32({2, 3}), f32({3, 4}), out); },
               {"[matmul]", "out is float64, expected float32", "a [2, 3], b [3, 4]"});
}

TEST(MatmulErrors, OutNotContiguous) {
  Tensor out = Tensor::empty({4, 2}).transpose(0, 1);
  expect_error([&] { matmul(f32({2, 3}), f32({3, 4}), out); },
               {"[matmul]", "out must be contiguous", "strides [1, 2]", "a [2, 3], b [3, 4]"});
}

TEST(MatmulErrors, OutOverlapsAnOperand) {
  Tensor a = f32({3, 3});
  const Tensor b = f32({3, 3});
  expect_error([&] { matmul(a, b, a); }, {"[matmul]", "overlaps a", "a [3, 3], b [3, 3]"});
  Tensor b_rows = b.slice(0, 0, 2);  // shares b's memory
  expect_error([&] { matmul(f32({2, 3}), b, b_rows); },
               {"[matmul]", "overlaps b", "a [2, 3], b [3, 3]"});
}

TEST(MatmulErrors, BackwardNamesItsOwnOp) {
  expect_error([] { matmul_backward(f32({2, 3}), f32({4, 5}), f32({2, 5})); },
               {"[matmul_backward]", "inner dimensions differ", "a [2, 3], b [4, 5]"});
}

TEST(MatmulErrors, BackwardDoutUndefined) {
  expect_error([] { matmul_backward(f32({2, 3}), f32({3, 4}), Tensor()); },
               {"[matmul_backward]", "dout is undefined", "a [2, 3], b [3, 4]"});
}

TEST(MatmulErrors, BackwardDoutWrongShape) {
  expect_error([] { matmul_backward(f32({5, 2, 3}), f32({3}), f32({2, 5})); },
               {"[matmul_backward]", "dout has shape [2, 5], expected [5, 2]",
                "a [5, 2, 3], b [3]"});
}

TEST(MatmulErrors, BackwardDoutWrongDtype) {
  expect_error([] { matmul_backward(f32({2, 3}), f32({3, 4}), f64({2, 4})); },
               {"[matmul_backward]", "dout is float64, expected float32", "a [2, 3], b [3, 4]"});
}

TEST(MatmulErrors, ReferenceValidatesLikeTheFrontEnd) {
  expect_error([] { reference::matmul(f32({2, 4, 3}), f32({5, 3, 6})); },
               {"[matmul]", "batch dimensions do not broadcast", "a [2, 4, 3], b [5, 3, 6]"});
  expect_error([] { reference::matmul_backward(f32({2, 3}), f32({3, 4}), f32({4, 2})); },
               {"[matmul_backward]", "dout has shape [4, 2]", "a [2, 3], b [3, 4]"});
}

}  // namespace
}  // namespace attn
