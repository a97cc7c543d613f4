// Named parameters: the one list that optimisers, gradient clipping and checkpoints iterate.
//
// A Parameter holds Tensor handles that SHARE storage with the layer's own weight and gradient
// tensors (attn::Tensor copies alias, like torch tensors). An optimiser therefore updates a
// layer by writing through value.data<T>() in place; it must never assign a new Tensor to
// `value`, which would only rebind the list's handle.
//
// Also here: the deterministic initialisers every layer's init uses. They draw from
// attn::counter_uniform, a pure function of (seed, stream, element index), so a model's
// initial weights are the same on every machine and standard library (std::normal_distribution
// is implementation-defined and would not be).
#pragma once

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "attn/error.h"
#include "attn/random.h"
#include "attn/tensor.h"

namespace attn::nn {

struct Parameter {
  std::string name;  // dotted path, e.g. "encoder.rnn.weight_ih_l0"
  Tensor value;
  Tensor grad;  // same shape and dtype as value; gradients accumulate here
};

using ParameterList = std::vector<Parameter>;

// Appends {prefix + name, value, grad} when value is defined (optional biases are skipped).
inline void add_parameter(ParameterList& list, const std::string& prefix, const std::string& name,
                          const Tensor& value, const Tensor& grad) {
  if (!value.defined()) return;
  ATTN_CHECK(grad.defined() && grad.shape() == value.shape() && grad.dtype() == value.dtype(),
             "parameters", "gradient of ", prefix, name, " is ",
             grad.defined() ? grad.shape_str() : "undefined", ", value is ", value.shape_str());
  list.push_back({prefix + name, value, grad});
}

// Sets every gradient in the list to zero (before each backward of a training step).
inline void zero_grads(const ParameterList& list) {
  for (const Parameter& p : list) Tensor(p.grad).fill(0.0);
}

// Total number of scalar weights.
inline int64_t parameter_count(const ParameterList& list) {
  int64_t n = 0;
  for (const Parameter& p : list) n += p.value.numel();
  return n;
}

// A zero tensor shaped like `t` (undefined stays undefined): how layers allocate gradients.
inline Tensor zeros_like(const Tensor& t) {
  return t.defined() ? Tensor::zeros(t.shape(), t.dtype()) : Tensor();
}

// Fills a contiguous float tensor with U(lo, hi). `stream` separates tensors initialised from
// one seed (each layer passes a distinct stream per weight).
inline void init_uniform(Tensor t, double lo, double hi, uint64_t seed, uint64_t stream) {
  ATTN_CHECK(t.is_contiguous(), "init", "tensor must be contiguous, strides ",
             shape_str(t.strides()));
  const int64_t n = t.numel();
  for (int64_t i = 0; i < n; ++i) {
    const double u = counter_uniform(seed, stream, 0, 0, static_cast<uint64_t>(i));
    const double value = lo + (hi - lo) * u;
    if (t.dtype() == DType::f32)
      t.data<float>()[i] = static_cast<float>(value);
    else
      t.data<double>()[i] = value;
  }
}

// Fills a contiguous float tensor with N(mean, stddev^2) by the Box-Muller transform.
inline void init_normal(Tensor t, double mean, double stddev, uint64_t seed, uint64_t stream) {
  ATTN_CHECK(t.is_contiguous(), "init", "tensor must be contiguous, strides ",
             shape_str(t.strides()));
  const int64_t n = t.numel();
  const double two_pi = 6.283185307179586476925286766559;
  for (int64_t i = 0; i < n; ++i) {
    // u1 in (0, 1]: counter_uniform is in [0, 1) with 24 bits, so 1 - u never reaches log(0).
    const double u1 = 1.0 - counter_uniform(seed, stream, 1, 0, static_cast<uint64_t>(i));
    const double u2 = counter_uniform(seed, stream, 2, 0, static_cast<uint64_t>(i));
    const double value = mean + stddev * std::sqrt(-2.0 * std::log(u1)) * std::cos(two_pi * u2);
    if (t.dtype() == DType::f32)
      t.data<float>()[i] = static_cast<float>(value);
    else
      t.data<double>()[i] = value;
  }
}

}  // namespace attn::nn
