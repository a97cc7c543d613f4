// Dispatch and front-end glue of the fused dot-product attention backward; the SIMD body is in
// flash_backward-inl.h, compiled here once per Highway target.
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "kernels/flash_backward.cpp"
#include "hwy/foreach_target.h"  // IWYU pragma: keep

#include "hwy/highway.h"
#include "kernels/flash_backward-inl.h"

#if HWY_ONCE
#include <cmath>
#include <variant>
#include <vector>

#include "kernels/fused_args.h"
#include "kernels/simd_target.h"

namespace attn::kernels {

HWY_EXPORT(FlashBackward);
HWY_EXPORT(BackwardTargetName);

void flash_backward(const FlashBackwardArgs& args) {
  apply_simd_target_from_env();
  HWY_DYNAMIC_DISPATCH(FlashBackward)(args);
}

const char* flash_backward_target_name() {
  apply_simd_target_from_env();
  return HWY_DYNAMIC_DISPATCH(BackwardTargetName)();
}

bool flash_backward_supported(DType dtype, const AttentionParams& params) {
  // Exactly the forward's domain: the backward recomputes the forward's probabilities.
  return flash_attention_supported(dtype, params);
}

AttentionGrads flash_attention_backward(const detail::AttentionDims& dims, const Tensor& q,
                                        const Tensor& k, const Tensor& v,
                                        const AttentionParams& params,
                                        const AttentionOutput& forward, const Tensor& dout) {
  AttentionGrads grads;
  grads.dq = Tensor::empty({dims.B, dims.Hq, dims.Tq, dims.Dq}, DType::f32);
  grads.dk = Tensor::empty({dims.B, dims.Hkv, dims.Tk, dims.Dk}, DType::f32);
  grads.dv = Tensor::empty({dims.B, dims.Hkv, dims.Tk, dims.Dv}, DType::f32);
  grads.dscore = params.score;  // DotScore / ScaledDotScore: no learnable tensors

  FlashBackwardArgs args;
  args.q = q.data<float>();
  args.k = k.data<float>();
  args.v = v.data<float>();
  args.out = forward.out.data<float>();
  args.lse = forward.lse.data<float>();
  args.dout = dout.data<float>();
  args.dq = grads.dq.data<float>();
  args.dk = grads.dk.data<float>();
  args.dv = grads.dv.data<float>();
  args.scale = dot_scale(params.score, dims);
  const Mask& mask = params.mask;
  fill_interval_masks(args, dims, mask);
  if (mask.bias.defined()) {
    args.bias = broadcast_bias(mask.bias, dims);
    grads.dbias = Tensor::empty(mask.bias.shape(), DType::f32);
    args.dbias = grads.dbias.data<float>();
    args.bias_elements = mask.bias.numel();
  }
  std::vector<float> slopes(mask.alibi_slopes.begin(), mask.alibi_slopes.end());
  if (!slopes.empty()) args.alibi_slopes = slopes.data();
  if (mask.allowed.defined()) args.allowed = broadcast_allowed(mask.allowed, dims);
  args.dropout = {params.dropout.p, params.dropout.seed};

  flash_backward(args);
  return grads;
}

}  // namespace attn::kernels
#endif  // HWY_ONCE
