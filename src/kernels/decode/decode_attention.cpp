// Dispatch and front-end glue of the decode attention kernel; the SIMD body is in
// decode_attention-inl.h, compiled here once per Highway target.
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "kernels/decode/decode_attention.cpp"
#include "hwy/foreach_target.h"  // IWYU pragma: keep

#include "hwy/highway.h"
#include "kernels/decode/decode_attention-inl.h"

#if HWY_ONCE
#include <algorithm>
#include <cmath>
#include <variant>
#include <vector>

#include "kernels/common/fused_args.h"
#include "kernels/common/simd_target.h"

namespace attn::kernels {

HWY_EXPORT(DecodeAttentionForward);
HWY_EXPORT(DecodeTargetName);

void decode_attention_forward(const DecodeAttentionArgs& args) {
  apply_simd_target_from_env();
  HWY_DYNAMIC_DISPATCH(DecodeAttentionForward)(args);
}

const char* decode_attention_target_name() {
  apply_simd_target_from_env();
  return HWY_DYNAMIC_DISPATCH(DecodeTargetName)();
}

DecodeSplit decode_attention_split(int64_t batch, int64_t kv_heads, int64_t k_len) {
  if (k_len <= 0) return {1, 0};
  const int64_t pairs = std::max<int64_t>(1, batch * kv_heads);
  const int64_t wanted = (kDecodeMinItems + pairs - 1) / pairs;
  const int64_t allowed = std::max<int64_t>(1, k_len / kDecodeMinSplitKeys);
  const int64_t count = std::clamp<int64_t>(wanted, 1, allowed);
  const int64_t keys = (k_len + count - 1) / count;
  return {(k_len + keys - 1) / keys, keys};
}

bool decode_attention_supported(DType dtype, const detail::AttentionDims& dims,
                                const AttentionParams& params) {
  const bool dot_score = std::holds_alternative<DotScore>(params.score) ||
                         std::holds_alternative<ScaledDotScore>(params.score);
  const Mask& mask = params.mask;
  return dtype == DType::f32 && dot_score && params.head_scores.empty() &&
         !mask.allowed.defined() && mask.local.kind == LocalKind::none && params.dropout.p == 0.0 &&
         dims.Tq <= kDecodeMaxQueries && dims.Tk >= kDecodeMinKeys;
}

namespace {

struct Paging {
  const int32_t* table = nullptr;
  int64_t table_stride = 0, page_size = 0;
};

AttentionOutput run_decode(const detail::AttentionDims& dims, const Tensor& q, KvView k, KvView v,
                           KvType kv_type, const AttentionParams& params, Paging paging = {}) {
  AttentionOutput result;
  result.out = Tensor::empty({dims.B, dims.Hq, dims.Tq, dims.Dv}, DType::f32);
  result.lse = Tensor::empty({dims.B, dims.Hq, dims.Tq}, DType::f32);

  DecodeAttentionArgs args;
  args.q = q.data<float>();
  args.k = k;
  args.v = v;
  args.kv_type = kv_type;
  args.page_table = paging.table;
  args.page_table_stride = paging.table_stride;
  args.page_size = paging.page_size;
  args.out = result.out.data<float>();
  args.lse = result.lse.data<float>();
  args.scale = dot_scale(params.score, dims);
  const Mask& mask = params.mask;
  fill_interval_masks(args, dims, mask);
  if (mask.bias.defined()) args.bias = broadcast_bias(mask.bias, dims);  // float32 (converted)
  const std::vector<float> slopes(mask.alibi_slopes.begin(), mask.alibi_slopes.end());
  if (!slopes.empty()) args.alibi_slopes = slopes.data();
  if (params.return_weights) {
    result.weights = Tensor::empty({dims.B, dims.Hq, dims.Tq, dims.Tk}, DType::f32);
    args.weights = result.weights.data<float>();
  }
  decode_attention_forward(args);
  if (params.return_weights) result.mean_weights = mean_over_heads(result.weights);
  return result;
}

}  // namespace

AttentionOutput decode_attention(const detail::AttentionDims& dims, const Tensor& q,
                                 const Tensor& k, const Tensor& v, const AttentionParams& params) {
  // K and V in place through their strides (rows of a cache with spare capacity, any layout
  // whose feature dimension is contiguous), float32 or bf16.
  const auto view = [](const Tensor& t) {
    return KvView{t.raw_data(), t.stride(0), t.stride(1), t.stride(2)};
  };
  return run_decode(dims, q, view(k), view(v),
                    k.dtype() == DType::bf16 ? KvType::bf16 : KvType::f32, params);
}

AttentionOutput decode_attention(const detail::AttentionDims& dims, const Tensor& q,
                                 const QuantizedTensor& k, const QuantizedTensor& v,
                                 const AttentionParams& params) {
  const auto view = [](const QuantizedTensor& t) {
    const Tensor& s = t.scales();
    return KvView{t.values(),         t.stride(0), t.stride(1), t.stride(2), s.data<float>(),
                  s.stride(0),        s.stride(1), s.stride(2)};
  };
  return run_decode(dims, q, view(k), view(v), KvType::int8, params);
}

AttentionOutput decode_attention_paged(const detail::AttentionDims& dims, const Tensor& q,
                                       const Tensor& k_pool, const Tensor& v_pool,
                                       const int32_t* page_table, int64_t table_stride,
                                       const AttentionParams& params) {
  const auto view = [](const Tensor& t) {
    return KvView{t.raw_data(), t.stride(0), t.stride(1), t.stride(2)};
  };
  return run_decode(dims, q, view(k_pool), view(v_pool),
                    k_pool.dtype() == DType::bf16 ? KvType::bf16 : KvType::f32, params,
                    Paging{page_table, table_stride, k_pool.size(2)});
}

}  // namespace attn::kernels
#endif  // HWY_ONCE
