#include "nn/feed_forward.h"

#include <cmath>

#include "attn/profile.h"

namespace attn::nn {

namespace {
constexpr const char* kOp = "feed_forward";

constexpr double kInvSqrt2 = 0.70710678118654752440;
constexpr double kInvSqrt2Pi = 0.39894228040143267794;
constexpr double kSqrt2OverPi = 0.79788456080286535588;
constexpr double kGeluCubic = 0.044715;

// Scalar activation and derivative, evaluated in double: the cost is negligible next to the two
// GEMMs, and erf/tanh in double keep float32 results correctly rounded in practice.
double act(Activation a, double x) {
  switch (a) {
    case Activation::relu:
      return x > 0.0 ? x : 0.0;
    case Activation::gelu:
      return 0.5 * x * (1.0 + std::erf(x * kInvSqrt2));
    case Activation::gelu_tanh:
      return 0.5 * x * (1.0 + std::tanh(kSqrt2OverPi * (x + kGeluCubic * x * x * x)));
  }
  return 0.0;
}

double act_derivative(Activation a, double x) {
  switch (a) {
    case Activation::relu:
      return x > 0.0 ? 1.0 : 0.0;  // 0 at the kink, like PyTorch
    case Activation::gelu:         // d/dx x Phi(x) = Phi(x) + x phi(x)
      return 0.5 * (1.0 + std::erf(x * kInvSqrt2)) + x * kInvSqrt2Pi * std::exp(-0.5 * x * x);
    case Activation::gelu_tanh: {
      const double u = kSqrt2OverPi * (x + kGeluCubic * x * x * x);
      const double t = std::tanh(u);
      const double du = kSqrt2OverPi * (1.0 + 3.0 * kGeluCubic * x * x);
      return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du;
    }
  }
  return 0.0;
}
}  // namespace

const char* activation_name(Activation activation) {
  switch (activation) {
    case Activation::relu:
      return "relu";
    case Activation::gelu:
      return "gelu";
    case Activation::gelu_tanh:
      return "gelu_tanh";
  }
  return "unknown";
}

Tensor activation_forward(Activation activation, const Tensor& x) {
  ATTN_CHECK(x.defined(), activation_name(activation), "input is undefined");
  const Tensor xc = x.contiguous();
  Tensor y = Tensor::empty(xc.shape(), xc.dtype());
  visit_float(xc.dtype(), activation_name(activation), "input", [&](auto tag) {
    using T = decltype(tag);
    const T* px = xc.data<T>();
    T* py = y.data<T>();
    const int64_t n = xc.numel();
    if (activation == Activation::relu) {  // the same values, in a loop the compiler vectorises
      for (int64_t i = 0; i < n; ++i) py[i] = px[i] > T(0) ? px[i] : T(0);
      return;
    }
    for (int64_t i = 0; i < n; ++i) py[i] = T(act(activation, px[i]));
  });
  return y;
}

Tensor activation_backward(Activation activation, const Tensor& x, const Tensor& dy) {
  ATTN_CHECK(x.defined() && dy.defined() && x.shape() == dy.shape() && x.dtype() == dy.dtype(),
             activation_name(activation), "dout ", dy.defined() ? dy.shape_str() : "undefined",
             " must match the input ", x.defined() ? x.shape_str() : "undefined",
             " in shape and dtype");
  const Tensor xc = x.contiguous(), dc = dy.contiguous();
  Tensor dx = Tensor::empty(xc.shape(), xc.dtype());
  visit_float(xc.dtype(), activation_name(activation), "input", [&](auto tag) {
    using T = decltype(tag);
    const T* px = xc.data<T>();
    const T* pd = dc.data<T>();
    T* pdx = dx.data<T>();
    const int64_t n = xc.numel();
    if (activation == Activation::relu) {  // dout * 1 or dout * 0 (so inf * 0 stays NaN)
      for (int64_t i = 0; i < n; ++i) pdx[i] = pd[i] * (px[i] > T(0) ? T(1) : T(0));
      return;
    }
    for (int64_t i = 0; i < n; ++i) pdx[i] = T(pd[i] * act_derivative(activation, px[i]));
  });
  return dx;
}

FeedForward FeedForward::create(const FeedForwardConfig& config, uint64_t seed) {
  ATTN_CHECK(config.dim >= 1 && config.hidden >= 1, kOp, "dim and hidden must be >= 1, got dim ",
             config.dim, ", hidden ", config.hidden);
  FeedForward ff;
  ff.in = Linear::create({config.dim, config.hidden, config.bias, config.dtype}, seed);
  ff.out = Linear::create({config.hidden, config.dim, config.bias, config.dtype}, seed + 1);
  ff.activation = config.activation;
  return ff;
}

FeedForwardForward FeedForward::forward(const Tensor& x, const DropoutSpec& dropout) const {
  ATTN_PROFILE_SCOPE("ffn.forward");
  ATTN_CHECK(x.defined() && x.dim() >= 1 && x.size(-1) == in.in_features(), kOp, "input has ",
             x.defined() && x.dim() ? x.size(-1) : 0, " features, the block expects ",
             in.in_features(), " (input ", x.defined() ? x.shape_str() : "undefined", ")");
  // 1. h = W1 x + b1   2. a = act(h)   3. a' = dropout(a)   4. y = W2 a' + b2
  LinearForward first = in.forward(x);
  Tensor hidden = dropout_forward(activation_forward(activation, first.out), dropout);
  LinearForward second = out.forward(hidden);
  return {second.out, {std::move(first.cache), first.out, dropout, std::move(second.cache)}};
}

Tensor FeedForward::backward(const FeedForwardCache& cache, const Tensor& dout) {
  ATTN_PROFILE_SCOPE("ffn.backward");
  // 4. y = W2 a' + b2      ->  da' (and dW2, db2)
  Tensor d = out.backward(cache.out_cache, dout);
  // 3. a' = dropout(a)     ->  da = da' * keep / (1 - p)
  d = dropout_backward(d, cache.dropout);
  // 2. a = act(h)          ->  dh = da * act'(h)
  d = activation_backward(activation, cache.pre_activation, d);
  // 1. h = W1 x + b1       ->  dx (and dW1, db1)
  return in.backward(cache.in_cache, d);
}

void FeedForward::parameters(const std::string& prefix, ParameterList& list) const {
  in.parameters(prefix + "in.", list);
  out.parameters(prefix + "out.", list);
}

void FeedForward::zero_grad() {
  in.zero_grad();
  out.zero_grad();
}

}  // namespace attn::nn
