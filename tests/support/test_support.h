// Helpers shared by the test suite: seeded random tensors, dtype-derived tolerances, closeness
// checks that report the worst element, and central finite differences in float64.
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <functional>
#include <initializer_list>
#include <limits>
#include <string>

#include "attn/attention.h"
#include "attn/tensor.h"

namespace attn::testing {

// Uniform values in [lo, hi), deterministic from `seed`.
Tensor random_tensor(const Shape& shape, DType dtype, uint64_t seed, double lo = -1.0,
                     double hi = 1.0);

// Unit roundoff of a dtype: 2^-24 for float32, 2^-53 for float64.
double unit_roundoff(DType dtype);

// A tolerance from an error bound: |actual - expected| <= atol + rtol * |expected|.
struct Tolerance {
  double atol = 0.0;
  double rtol = 0.0;
};

// gamma_n = n u / (1 - n u): the worst-case relative error of a sum or dot product of n terms
// in `dtype`, whatever the summation order (Higham, Accuracy and Stability of Numerical
// Algorithms, Lemma 3.1 and eq. 3.5): |fl(sum a_i b_i) - sum a_i b_i| <= gamma_n sum |a_i b_i|.
double gamma_n(DType dtype, int64_t n);

// The default of tolerance_for's `safety`: a few reductions chained (scores, softmax, values;
// backward through dP and dS) and a summed magnitude a few times the result's.
inline constexpr double kDefaultSafety = 8.0;

// Tolerance for a result whose every element is a reduction of `terms` products of O(1)
// values computed in `dtype`: safety * gamma_{terms + 1} (the sum and the rounding of its
// result), as both the absolute and the relative tolerance.
//
// A worst-case bound, not a random-walk estimate: it holds for any summation order, blocking
// or vector width, so for every BLAS kernel and SIMD target (an estimate of sqrt(terms) u, as
// used before, failed on a second CPU). It is at least the old 16 sqrt(terms) u at the default
// safety (8 (n + 1) >= 16 sqrt(n)), and grows like sqrt(terms) times that for long sums.
Tolerance tolerance_for(DType dtype, int64_t terms, double safety = kDefaultSafety);

// Passes when every element satisfies the tolerance (NaN only matches NaN, inf only the same
// inf). On failure names the worst element by index with expected, actual and the bound.
::testing::AssertionResult all_close(const Tensor& actual, const Tensor& expected, Tolerance tol,
                                     const std::string& what = "");

// Central finite differences of a scalar function of `param` (float64, modified in place and
// restored). Checks every element, or `max_elements` evenly spread ones, against `analytic`.
// Step h defaults to 1e-6 (float64 central differences: error ~ h^2 f''' + u f / h).
::testing::AssertionResult check_gradient(const std::function<double()>& loss, Tensor param,
                                          const Tensor& analytic, const std::string& what,
                                          int64_t max_elements = 64, double h = 1e-6,
                                          double tol = 1e-6);

// Runs `fn` and expects an attn::Error whose message contains every fragment (op name,
// argument, shapes); reports the message otherwise.
void expect_error(const std::function<void()>& fn, std::initializer_list<std::string> fragments);
inline void expect_error(const std::function<void()>& fn, const std::string& fragment) {
  expect_error(fn, {fragment});
}

// sum(out * weights): a scalar loss whose gradient with respect to out is `weights`.
double weighted_sum(const Tensor& out, const Tensor& weights);

}  // namespace attn::testing
