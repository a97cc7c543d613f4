// Dispatch and front-end glue of the fused dot-product attention forward; the SIMD body is in
// flash_attention-inl.h, compiled here once per Highway target.
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "kernels/flash/flash_attention.cpp"
#include "hwy/foreach_target.h"  // IWYU pragma: keep

#include "hwy/highway.h"
#include "kernels/flash/flash_attention-inl.h"

#if HWY_ONCE
#include <cmath>
#include <variant>
#include <vector>

#include "kernels/common/fused_args.h"
#include "kernels/common/simd_target.h"

namespace attn::kernels {

HWY_EXPORT(FlashAttentionForward);
HWY_EXPORT(TargetName);

void flash_attention_forward(const FlashAttentionArgs& args) {
  apply_simd_target_from_env();
  HWY_DYNAMIC_DISPATCH(FlashAttentionForward)(args);
}

const char* flash_attention_target_name() {
  apply_simd_target_from_env();
  return HWY_DYNAMIC_DISPATCH(TargetName)();
}

bool flash_attention_supported(DType dtype, const AttentionParams& params) {
  const bool dot_score = std::holds_alternative<DotScore>(params.score) ||
                         std::holds_alternative<ScaledDotScore>(params.score);
  return dtype == DType::f32 && dot_score && params.head_scores.empty() &&
         params.mask.local.kind == LocalKind::none;
}

AttentionOutput flash_attention(const detail::AttentionDims& dims, const Tensor& q,
                                const Tensor& k, const Tensor& v, const AttentionParams& params) {
  AttentionOutput result;
  result.out = Tensor::empty({dims.B, dims.Hq, dims.Tq, dims.Dv}, DType::f32);
  result.lse = Tensor::empty({dims.B, dims.Hq, dims.Tq}, DType::f32);

  FlashAttentionArgs args;
  args.q = q.data<float>();
  args.k = k.data<float>();
  args.v = v.data<float>();
  args.out = result.out.data<float>();
  args.lse = result.lse.data<float>();
  args.scale = dot_scale(params.score, dims);
  const Mask& mask = params.mask;
  fill_interval_masks(args, dims, mask);
  if (mask.bias.defined()) args.bias = broadcast_bias(mask.bias, dims);
  std::vector<float> slopes(mask.alibi_slopes.begin(), mask.alibi_slopes.end());
  if (!slopes.empty()) args.alibi_slopes = slopes.data();
  if (mask.allowed.defined()) args.allowed = broadcast_allowed(mask.allowed, dims);
  args.dropout = {params.dropout.p, params.dropout.seed};

  if (params.return_weights) {
    result.weights = Tensor::empty({dims.B, dims.Hq, dims.Tq, dims.Tk}, DType::f32);
    args.weights = result.weights.data<float>();
  }

  flash_attention_forward(args);
  if (params.return_weights) result.mean_weights = mean_over_heads(result.weights);
  return result;
}

}  // namespace attn::kernels
#endif  // HWY_ONCE
