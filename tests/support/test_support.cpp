#include "support/test_support.h"

#include <algorithm>
#include <cmath>
#include <random>
#include <sstream>

namespace attn::testing {

Tensor random_tensor(const Shape& shape, DType dtype, uint64_t seed, double lo, double hi) {
  Tensor t = Tensor::empty(shape, dtype);
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> dist(lo, hi);
  const int64_t n = t.numel();
  if (dtype == DType::f32) {
    float* p = t.data<float>();
    for (int64_t i = 0; i < n; ++i) p[i] = static_cast<float>(dist(rng));
  } else if (dtype == DType::f64) {
    double* p = t.data<double>();
    for (int64_t i = 0; i < n; ++i) p[i] = dist(rng);
  } else {
    bool* p = t.data<bool>();
    for (int64_t i = 0; i < n; ++i) p[i] = dist(rng) > 0.5 * (lo + hi);
  }
  return t;
}

double unit_roundoff(DType dtype) {
  return dtype == DType::f64 ? std::ldexp(1.0, -53) : std::ldexp(1.0, -24);
}

double gamma_n(DType dtype, int64_t n) {
  const double nu = static_cast<double>(std::max<int64_t>(n, 0)) * unit_roundoff(dtype);
  return nu < 0.5 ? nu / (1.0 - nu) : INFINITY;  // beyond n u ~ 1 nothing is bounded
}

Tolerance tolerance_for(DType dtype, int64_t terms, double safety) {
  const double bound = safety * gamma_n(dtype, std::max<int64_t>(terms, 1) + 1);
  return {bound, bound};
}

namespace {
std::string index_str(int64_t linear, const Shape& shape) {
  Shape idx(shape.size());
  for (std::size_t d = shape.size(); d-- > 0;) {
    idx[d] = shape[d] ? linear % shape[d] : 0;
    linear = shape[d] ? linear / shape[d] : 0;
  }
  return shape_str(idx);
}
}  // namespace

::testing::AssertionResult all_close(const Tensor& actual, const Tensor& expected, Tolerance tol,
                                     const std::string& what) {
  if (actual.shape() != expected.shape())
    return ::testing::AssertionFailure() << what << ": shape " << actual.shape_str()
                                         << " != expected " << expected.shape_str();
  const std::vector<double> a = actual.to_vector(), e = expected.to_vector();
  int64_t worst = -1, failures = 0;
  double worst_excess = 0.0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    double excess;
    if (std::isnan(e[i]) || std::isnan(a[i])) {
      excess = std::isnan(e[i]) && std::isnan(a[i]) ? 0.0 : INFINITY;
    } else if (std::isinf(e[i]) || std::isinf(a[i])) {
      excess = a[i] == e[i] ? 0.0 : INFINITY;
    } else {
      excess = std::abs(a[i] - e[i]) / (tol.atol + tol.rtol * std::abs(e[i]));
    }
    if (excess > 1.0) ++failures;
    if (excess > 1.0 && (worst < 0 || excess > worst_excess)) {
      worst = static_cast<int64_t>(i);
      worst_excess = excess;
    }
  }
  if (failures == 0) return ::testing::AssertionSuccess();
  const auto w = static_cast<std::size_t>(worst);
  return ::testing::AssertionFailure()
         << what << ": " << failures << " of " << a.size() << " elements out of tolerance; worst at "
         << index_str(worst, expected.shape()) << ": expected " << e[w] << ", actual " << a[w]
         << ", |diff| " << std::abs(a[w] - e[w]) << " > bound "
         << tol.atol + tol.rtol * std::abs(e[w]) << " (atol " << tol.atol << ", rtol " << tol.rtol
         << ")";
}

::testing::AssertionResult check_gradient(const std::function<double()>& loss, Tensor param,
                                          const Tensor& analytic, const std::string& what,
                                          int64_t max_elements, double h, double tol) {
  if (param.dtype() != DType::f64)
    return ::testing::AssertionFailure() << what << ": finite differences need a float64 tensor";
  if (param.shape() != analytic.shape())
    return ::testing::AssertionFailure() << what << ": gradient shape " << analytic.shape_str()
                                         << " != parameter shape " << param.shape_str();
  const int64_t n = param.numel();
  const int64_t step = std::max<int64_t>(1, (n + max_elements - 1) / std::max<int64_t>(max_elements, 1));
  if (!param.is_contiguous())
    return ::testing::AssertionFailure() << what << ": parameter must be contiguous";
  double* p = param.data<double>();
  double worst_err = 0.0;
  int64_t worst = -1;
  double worst_fd = 0.0, worst_an = 0.0;
  for (int64_t i = 0; i < n; i += step) {
    const double saved = p[i];
    p[i] = saved + h;
    const double up = loss();
    p[i] = saved - h;
    const double down = loss();
    p[i] = saved;
    const double fd = (up - down) / (2.0 * h);
    const double an = analytic.get_flat(i);
    const double err = std::abs(fd - an) / std::max(1.0, std::abs(fd));
    if (!(err <= worst_err)) {
      worst_err = err;
      worst = i;
      worst_fd = fd;
      worst_an = an;
    }
  }
  if (worst < 0 || worst_err <= tol) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << what << ": worst element " << index_str(worst, param.shape()) << ": finite difference "
         << worst_fd << ", analytic " << worst_an << ", relative error " << worst_err << " > " << tol;
}

void expect_error(const std::function<void()>& fn, std::initializer_list<std::string> fragments) {
  try {
    fn();
  } catch (const Error& e) {
    const std::string message = e.what();
    for (const std::string& f : fragments)
      EXPECT_NE(message.find(f), std::string::npos)
          << "message \"" << message << "\" lacks \"" << f << "\"";
    return;
  }
  ADD_FAILURE() << "no attn::Error thrown";
}

double weighted_sum(const Tensor& out, const Tensor& weights) {
  const std::vector<double> a = out.to_vector(), w = weights.to_vector();
  double s = 0.0;
  for (std::size_t i = 0; i < a.size(); ++i) s += a[i] * w[i];
  return s;
}

}  // namespace attn::testing
