// Front-end of the elementwise activations (attn/activations.h): checks, then the vectorised
// float32 kernel (kernels/activations/activations.h) or the float64 loop.
#include "attn/activations.h"

#include <cmath>

#include "attn/error.h"
#include "kernels/activations/activations.h"

namespace attn {
namespace {

template <class T>
void check_arrays(const char* op, const T* x, const T* y, int64_t n) {
  ATTN_CHECK(n >= 0, op, "length is ", n, ", must be >= 0");
  ATTN_CHECK(n == 0 || (x != nullptr && y != nullptr), op, "null array with length ", n);
}

}  // namespace

void tanh_array(const float* x, float* y, int64_t n) {
  check_arrays("tanh_array", x, y, n);
  if (n > 0) kernels::tanh_f32(x, y, n);
}

void tanh_array(const double* x, double* y, int64_t n) {
  check_arrays("tanh_array", x, y, n);
  for (int64_t i = 0; i < n; ++i) y[i] = std::tanh(x[i]);
}

void sigmoid_array(const float* x, float* y, int64_t n) {
  check_arrays("sigmoid_array", x, y, n);
  if (n > 0) kernels::sigmoid_f32(x, y, n);
}

void sigmoid_array(const double* x, double* y, int64_t n) {
  check_arrays("sigmoid_array", x, y, n);
  for (int64_t i = 0; i < n; ++i) y[i] = 1.0 / (1.0 + std::exp(-x[i]));
}

void exp_shifted_array(const float* x, float shift, float* y, int64_t n) {
  check_arrays("exp_shifted_array", x, y, n);
  if (n > 0) kernels::exp_shifted_f32(x, shift, y, n);
}

void exp_shifted_array(const double* x, double shift, double* y, int64_t n) {
  check_arrays("exp_shifted_array", x, y, n);
  for (int64_t i = 0; i < n; ++i) y[i] = std::exp(x[i] - shift);
}

}  // namespace attn
