// Dispatch and front-end glue of the fused dot-product attention forward; the SIMD body is in
// flash_attention-inl.h, compiled here once per Highway target.
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "kernels/flash_attention.cpp"
#include "hwy/foreach_target.h"  // IWYU pragma: keep

#include "hwy/highway.h"
#include "kernels/flash_attention-inl.h"

#if HWY_ONCE
#include <cmath>
#include <variant>
#include <vector>

#include "kernels/simd_target.h"

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
         !params.mask.allowed.defined() && params.mask.local.kind == LocalKind::none &&
         params.dropout.p == 0.0 && !params.return_weights;
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
  args.batch = dims.B, args.q_heads = dims.Hq, args.kv_heads = dims.Hkv;
  args.q_len = dims.Tq, args.k_len = dims.Tk, args.head_dim = dims.Dq, args.value_dim = dims.Dv;
  double scale = 1.0;
  if (const auto* scaled = std::get_if<ScaledDotScore>(&params.score))
    scale = scaled->scale.value_or(1.0 / std::sqrt(static_cast<double>(dims.Dk)));
  args.scale = static_cast<float>(scale);

  const Mask& mask = params.mask;
  if (!mask.key_lengths.empty()) args.key_lengths = mask.key_lengths.data();
  if (!mask.query_lengths.empty()) args.query_lengths = mask.query_lengths.data();
  args.causal = mask.causal;
  args.bottom_right = mask.alignment == Alignment::bottom_right;
  if (mask.window) {
    args.window_left = mask.window->left;
    args.window_right = mask.window->right;
  }
  if (mask.bias.defined()) {
    // Right-align the bias against [B, Hq, Tq, Tk]; missing and size-1 dimensions broadcast.
    const Tensor& bias = mask.bias;
    int64_t strides[4] = {0, 0, 0, 0};
    const int64_t full[4] = {dims.B, dims.Hq, dims.Tq, dims.Tk};
    for (int64_t d = 0; d < bias.dim(); ++d) {
      const int64_t target = 4 - bias.dim() + d;
      if (bias.size(d) != 1 || full[target] == 1) strides[target] = bias.stride(d);
    }
    args.bias = {bias.data<float>(), strides[0], strides[1], strides[2], strides[3]};
  }
  std::vector<float> slopes(mask.alibi_slopes.begin(), mask.alibi_slopes.end());
  if (!slopes.empty()) args.alibi_slopes = slopes.data();

  flash_attention_forward(args);
  return result;
}

}  // namespace attn::kernels
#endif  // HWY_ONCE
