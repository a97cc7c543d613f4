// Elementwise activations over contiguous arrays: tanh and the logistic sigmoid
// 1 / (1 + e^-x), the gate functions of recurrent layers.
//
// float32 is vectorised (Highway, compiled for every SIMD target and picked at run time;
// ATTN_SIMD_TARGET caps the choice) and stays within 4 float32 ulps of the float64 functions
// (2.25 measured; tests/ops/test_activations.cpp checks every target). float64 evaluates std::tanh
// and 1 / (1 + std::exp(-x)) element by element, for references and gradient checks. Special
// values: NaN stays NaN, tanh(+-inf) = +-1, sigmoid(-inf) = 0, sigmoid(+inf) = 1; float32
// sigmoids below the smallest normal float (x < -87) may be flushed to zero.
//
// y may equal x (in place); otherwise the two arrays must not overlap. Errors (attn::Error):
// n < 0, or a null array with n > 0.
#pragma once

#include <cstdint>

namespace attn {

// y[i] = tanh(x[i]) for 0 <= i < n.
void tanh_array(const float* x, float* y, int64_t n);
void tanh_array(const double* x, double* y, int64_t n);

// y[i] = 1 / (1 + exp(-x[i])) for 0 <= i < n.
void sigmoid_array(const float* x, float* y, int64_t n);
void sigmoid_array(const double* x, double* y, int64_t n);
// y[i] = exp(x[i] - shift) for 0 <= i < n: softmax numerators (shift = the row's maximum keeps
// every result in [0, 1]). float32 subtracts in float32, then exponentiates within 4 ulps.
void exp_shifted_array(const float* x, float shift, float* y, int64_t n);
void exp_shifted_array(const double* x, double shift, double* y, int64_t n);

}  // namespace attn
