// Dispatch of the elementwise activations; the SIMD body is in activations-inl.h, compiled here
// once per Highway target.
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "kernels/activations/activations.cpp"
#include "hwy/foreach_target.h"  // IWYU pragma: keep

#include "hwy/highway.h"
#include "kernels/activations/activations-inl.h"

#if HWY_ONCE
#include "kernels/activations/activations.h"
#include "kernels/common/simd_target.h"

namespace attn::kernels {

HWY_EXPORT(TanhF32);
HWY_EXPORT(SigmoidF32);
HWY_EXPORT(ExpShiftedF32);
HWY_EXPORT(ActivationsTargetName);

void tanh_f32(const float* x, float* y, int64_t n) {
  apply_simd_target_from_env();
  HWY_DYNAMIC_DISPATCH(TanhF32)(x, y, n);
}

void sigmoid_f32(const float* x, float* y, int64_t n) {
  apply_simd_target_from_env();
  HWY_DYNAMIC_DISPATCH(SigmoidF32)(x, y, n);
}

void exp_shifted_f32(const float* x, float shift, float* y, int64_t n) {
  apply_simd_target_from_env();
  HWY_DYNAMIC_DISPATCH(ExpShiftedF32)(x, shift, y, n);
}

const char* activations_target_name() {
  apply_simd_target_from_env();
  return HWY_DYNAMIC_DISPATCH(ActivationsTargetName)();
}

}  // namespace attn::kernels
#endif  // HWY_ONCE
