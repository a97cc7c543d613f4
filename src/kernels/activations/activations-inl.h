// Per-target body of the elementwise activations (see activations.h). Included once per Highway
// target by activations.cpp through foreach_target.h.

#if defined(ATTN_KERNELS_ACTIVATIONS_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef ATTN_KERNELS_ACTIVATIONS_INL_H_
#undef ATTN_KERNELS_ACTIVATIONS_INL_H_
#else
#define ATTN_KERNELS_ACTIVATIONS_INL_H_
#endif

#include <algorithm>
#include <cstdint>

#include "hwy/contrib/math/math-inl.h"
#include "hwy/highway.h"

HWY_BEFORE_NAMESPACE();
namespace attn::kernels::HWY_NAMESPACE {
namespace activations {

namespace hn = hwy::HWY_NAMESPACE;
using DF = hn::ScalableTag<float>;
using VF = hn::Vec<DF>;

// Highway's Exp and Expm1 do not propagate NaN (they return finite values for it).
HWY_INLINE VF KeepNaN(VF x, VF y) { return hn::IfThenElse(hn::IsNaN(x), x, y); }

HWY_INLINE VF TanhVec(DF df, VF x) { return KeepNaN(x, hn::Tanh(df, x)); }

HWY_INLINE VF SigmoidVec(DF df, VF x) {
  const VF one = hn::Set(df, 1.0f);
  const VF e = hn::Exp(df, hn::Neg(hn::Abs(x)));  // e^-|x| in (0, 1]: never overflows
  const VF inv = hn::Div(one, hn::Add(one, e));
  // x >= 0: 1 / (1 + e^-x); x < 0: e^x / (1 + e^x), exact in relative terms for tiny results.
  return KeepNaN(x, hn::IfThenElse(hn::Lt(x, hn::Zero(df)), hn::Mul(e, inv), inv));
}

// y[i] = f(x[i]): full vectors, then the tail through a padded copy so that every element takes
// the same vector math (results do not depend on n or on an element's position).
template <class F>
HWY_INLINE void Map(const float* x, float* y, int64_t n, F f) {
  const DF df;
  const int64_t N = static_cast<int64_t>(hn::Lanes(df));
  int64_t i = 0;
  for (; i + N <= n; i += N) hn::StoreU(f(df, hn::LoadU(df, x + i)), df, y + i);
  if (i < n) {
    HWY_ALIGN float tail[HWY_MAX_BYTES / sizeof(float)] = {};
    std::copy(x + i, x + n, tail);
    hn::Store(f(df, hn::Load(df, tail)), df, tail);
    std::copy(tail, tail + (n - i), y + i);
  }
}

}  // namespace activations

// x and y may be the same array: each vector is loaded before its result is stored.
void TanhF32(const float* x, float* y, int64_t n) {
  activations::Map(x, y, n, [](activations::DF df, activations::VF v)
                                HWY_ATTR { return activations::TanhVec(df, v); });
}

void SigmoidF32(const float* x, float* y, int64_t n) {
  activations::Map(x, y, n, [](activations::DF df, activations::VF v)
                                HWY_ATTR { return activations::SigmoidVec(df, v); });
}

// y[i] = e^(x[i] - shift): softmax numerators (x <= shift, so no overflow).
void ExpShiftedF32(const float* x, float shift, float* y, int64_t n) {
  activations::Map(x, y, n, [shift](activations::DF df, activations::VF v) HWY_ATTR {
    namespace hn = hwy::HWY_NAMESPACE;
    return activations::KeepNaN(v, hn::Exp(df, hn::Sub(v, hn::Set(df, shift))));
  });
}

const char* ActivationsTargetName() { return hwy::TargetName(HWY_TARGET); }

}  // namespace attn::kernels::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#endif  // ATTN_KERNELS_ACTIVATIONS_INL_H_
