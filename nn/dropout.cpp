#include "nn/dropout.h"

#include <algorithm>
#include <bit>
#include <cstdint>
#include <type_traits>

#include "attn/profile.h"
#include "attn/random.h"
#include "nn/linear.h"

namespace attn::nn {

namespace {
constexpr const char* kOp = "dropout";

// The row key of the segment holding flat position i: random.h's (b, h, i) = (stream, 0, segment).
uint64_t segment_key(const DropoutSpec& spec, int64_t i) {
  return dropout_row_key(spec.seed, spec.stream, 0, static_cast<uint64_t>(i / kDropoutRowLength));
}

// `kept ? x : +0` as an AND with an all-ones or all-zeros mask: dropped inf and NaN become
// exactly 0 (a multiply by 0 would keep NaN), and GCC 12 vectorises the integer AND where it
// does not if-convert a floating-point select on an integer compare.
template <class T>
T zero_unless(bool kept, T x) {
  using Bits = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
  static_assert(sizeof(Bits) == sizeof(T));
  return std::bit_cast<T>(std::bit_cast<Bits>(x) & (Bits{0} - static_cast<Bits>(kept)));
}

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
  const uint32_t threshold = dropout_threshold(spec.p);
  visit_float(xc.dtype(), kOp, what, [&](auto tag) {
    using T = decltype(tag);
    const T scale = T(1.0 / (1.0 - spec.p));
    const T* px = xc.data<T>();
    T* py = y.data<T>();
    const int64_t n = xc.numel();
    // Segment by segment: one row key, then a branch-free loop of 32-bit lane operations and a
    // bit-mask select per element, which the compiler vectorises.
    for (int64_t start = 0; start < n; start += kDropoutRowLength) {
      const uint64_t key = segment_key(spec, start);
      const auto len = static_cast<uint32_t>(std::min(kDropoutRowLength, n - start));
      const T* __restrict src = px + start;
      T* __restrict dst = py + start;
      for (uint32_t j = 0; j < len; ++j)
        dst[j] = zero_unless(dropout_bits(key, j) >= threshold, src[j] * scale);
    }
  });
  return y;
}
}  // namespace

bool dropout_keeps(const DropoutSpec& spec, int64_t i) {
  if (spec.p <= 0.0) return true;
  const auto j = static_cast<uint32_t>(i % kDropoutRowLength);
  return dropout_bits(segment_key(spec, i), j) >= dropout_threshold(spec.p);
}

Tensor dropout_forward(const Tensor& x, const DropoutSpec& spec) {
  ATTN_PROFILE_SCOPE("dropout.forward");
  return apply_mask(x, spec, "input");
}

Tensor dropout_backward(const Tensor& dout, const DropoutSpec& spec) {
  ATTN_PROFILE_SCOPE("dropout.backward");
  return apply_mask(dout, spec, "dout");
}

}  // namespace attn::nn
