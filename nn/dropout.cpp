#include "nn/dropout.h"

#include "attn/random.h"
#include "nn/linear.h"

namespace attn::nn {

namespace {
constexpr const char* kOp = "dropout";

void check_spec(const DropoutSpec& spec) {
  ATTN_CHECK(spec.p >= 0.0 && spec.p < 1.0, kOp, "p must be in [0, 1), got ", spec.p);
}

// Forward and backward are the same map: multiply by keep / (1 - p).
Tensor apply_mask(const Tensor& x, const DropoutSpec& spec, const char* what) {
  check_spec(spec);
  ATTN_CHECK(x.defined(), kOp, what, " is undefined");
  if (spec.p == 0.0) return x;
  const Tensor xc = x.contiguous();
  Tensor y = Tensor::empty(xc.shape(), xc.dtype());
  visit_float(xc.dtype(), kOp, what, [&](auto tag) {
    using T = decltype(tag);
    const T scale = T(1.0 / (1.0 - spec.p));
    const T* px = xc.data<T>();
    T* py = y.data<T>();
    const int64_t n = xc.numel();
    for (int64_t i = 0; i < n; ++i) py[i] = dropout_keeps(spec, i) ? px[i] * scale : T(0);
  });
  return y;
}
}  // namespace

bool dropout_keeps(const DropoutSpec& spec, int64_t i) {
  return spec.p <= 0.0 ||
         counter_uniform(spec.seed, spec.stream, 0, 0, static_cast<uint64_t>(i)) >= spec.p;
}

Tensor dropout_forward(const Tensor& x, const DropoutSpec& spec) {
  return apply_mask(x, spec, "input");
}

Tensor dropout_backward(const Tensor& dout, const DropoutSpec& spec) {
  return apply_mask(dout, spec, "dout");
}

}  // namespace attn::nn
