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
    // Right-align the (contiguous) bias against [B, Hq, Tq, Tk]; a size-1 dimension gets
    // stride 0, so the kernel reads it in place and sums dbias over it.
    const Tensor& bias = mask.bias;
    int64_t strides[4] = {0, 0, 0, 0};
    const int64_t full[4] = {dims.B, dims.Hq, dims.Tq, dims.Tk};
    for (int64_t d = 0; d < bias.dim(); ++d) {
      const int64_t target = 4 - bias.dim() + d;
      if (bias.size(d) != 1 || full[target] == 1) strides[target] = bias.stride(d);
    }
    args.bias = {bias.data<float>(), strides[0], strides[1], strides[2], strides[3]};
    grads.dbias = Tensor::empty(bias.shape(), DType::f32);
    args.dbias = grads.dbias.data<float>();
    args.bias_elements = bias.numel();
  }
  std::vector<float> slopes(mask.alibi_slopes.begin(), mask.alibi_slopes.end());
  if (!slopes.empty()) args.alibi_slopes = slopes.data();

  flash_backward(args);
  return grads;
}

}  // namespace attn::kernels
#endif  // HWY_ONCE
