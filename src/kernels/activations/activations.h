// Elementwise activations of the recurrent and feed-forward layers (internal): tanh and the
// logistic sigmoid over contiguous float32 arrays, vectorised with Highway (compiled for every
// target, picked at run time; ATTN_SIMD_TARGET caps the choice, see simd_target.h).
//
// Why: a GRU step evaluates 2 sigmoids and a tanh per hidden unit, an LSTM step 3 and 2. With
// libm's scalar expf/tanhf they took about a third of the main thread's time when training the
// demo's GRU translator (tanhf alone ~25%: glibc evaluates it through expm1f).
//
// Accuracy (tests/ops/test_activations.cpp measures it on every target against float64): tanh is
// Highway's Tanh (expm1-based), sigmoid is 1 / (1 + e^-x) for x >= 0 and e^x / (1 + e^x) below,
// with e = e^-|x| <= 1, so neither overflows and tiny sigmoids keep their relative accuracy.
// Both are within a few float32 ulps; NaN stays NaN, tanh(+-inf) = +-1, sigmoid(-inf) = 0 and
// sigmoid(+inf) = 1. y may equal x (in place); otherwise the ranges must not overlap.
#pragma once

#include <cstdint>

namespace attn::kernels {

void tanh_f32(const float* x, float* y, int64_t n);
void sigmoid_f32(const float* x, float* y, int64_t n);
// y[i] = e^(x[i] - shift) (Highway's Exp after a float32 subtraction): softmax numerators, as
// the loss over a 4,000-word vocabulary takes them (scalar exp was a tenth of a training step).
void exp_shifted_f32(const float* x, float shift, float* y, int64_t n);

// Name of the Highway target the two dispatch to now ("AVX3", "AVX2", ...).
const char* activations_target_name();

}  // namespace attn::kernels
