// Dispatch and front-end glue of the fused dot-product attention backward; the SIMD body is in
// flash_backward-inl.h, compiled here once per Highway target.
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "kernels/flash/flash_backward.cpp"
#include "hwy/foreach_target.h"  // IWYU pragma: keep

#include "hwy/highway.h"
#include "kernels/flash/flash_backward-inl.h"

#if HWY_ONCE
#include <cmath>
#include <variant>
#include <vector>

#include "kernels/common/fused_args.h"
#include "kernels/common/simd_target.h"

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

namespace {

// Query rows past query_lengths are padding and may hold anything, NaN included. The kernel's
// row-blocked products (dV += P^T dO, dK += dS^T Q) would turn their P = 0 times NaN into NaN in
// dK and dV, so those rows are zeroed in a copy of q and dout: O(Tq D) per head, and only when
// some row is hidden.
Tensor without_hidden_query_rows(const Tensor& x, const detail::AttentionDims& dims,
                                 const std::vector<int64_t>& query_lengths) {
  bool any_hidden = false;
  for (int64_t len : query_lengths) any_hidden = any_hidden || len < dims.Tq;
  if (!any_hidden) return x;
  Tensor clean = x.clone();
  const int64_t heads = x.size(1), width = x.size(3);
  float* data = clean.data<float>();
  for (int64_t b = 0; b < dims.B; ++b) {
    const int64_t visible = query_lengths[static_cast<std::size_t>(b)];
    for (int64_t h = 0; h < heads; ++h) {
      float* head = data + ((b * heads + h) * dims.Tq) * width;
      std::fill(head + visible * width, head + dims.Tq * width, 0.0f);
    }
  }
  return clean;
}

}  // namespace

AttentionGrads flash_attention_backward(const detail::AttentionDims& dims, const Tensor& q,
                                        const Tensor& k, const Tensor& v,
                                        const AttentionParams& params,
                                        const AttentionOutput& forward, const Tensor& dout) {
  AttentionGrads grads;
  grads.dq = Tensor::empty({dims.B, dims.Hq, dims.Tq, dims.Dq}, DType::f32);
  grads.dk = Tensor::empty({dims.B, dims.Hkv, dims.Tk, dims.Dk}, DType::f32);
  grads.dv = Tensor::empty({dims.B, dims.Hkv, dims.Tk, dims.Dv}, DType::f32);
  grads.dscore = params.score;  // DotScore / ScaledDotScore: no learnable tensors

  const Mask& mask = params.mask;
  const Tensor q_rows = without_hidden_query_rows(q, dims, mask.query_lengths);
  const Tensor dout_rows = without_hidden_query_rows(dout, dims, mask.query_lengths);

  FlashBackwardArgs args;
  args.q = q_rows.data<float>();
  args.k = k.data<float>();
  args.v = v.data<float>();
  args.out = forward.out.data<float>();
  args.lse = forward.lse.data<float>();
  args.dout = dout_rows.data<float>();
  args.dq = grads.dq.data<float>();
  args.dk = grads.dk.data<float>();
  args.dv = grads.dv.data<float>();
  args.scale = dot_scale(params.score, dims);
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
