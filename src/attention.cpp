// Attention front-end: validates, normalises (dtype, contiguity) and dispatches to a kernel.
#include "attn/attention.h"

#include <cmath>

#include "attn/profile.h"

#include "attention_dot_form.h"
#include "attention_validate.h"
#include "kernels/additive/additive_attention.h"
#include "kernels/composed/attention_composed.h"
#include "kernels/decode/decode_attention.h"
#include "kernels/flash/flash_attention.h"
#include "kernels/flash/flash_attention_bf16.h"
#include "kernels/flash/flash_backward.h"

namespace attn {

const char* score_name(const Score& score) {
  static constexpr const char* names[] = {"dot",    "scaled_dot", "general",  "additive",
                                          "concat", "cosine",     "location", "trilinear"};
  return names[score.index()];
}

std::vector<double> alibi_slopes(int64_t num_heads) {
  ATTN_CHECK(num_heads > 0, "alibi_slopes", "num_heads must be > 0, got ", num_heads);
  // Geometric sequence starting at 2^(-8/n) for n a power of two (Press et al. 2022, section 3).
  auto power_of_two_slopes = [](int64_t n) {
    std::vector<double> s(static_cast<std::size_t>(n));
    const double start = std::exp2(-8.0 / static_cast<double>(n));
    for (int64_t i = 0; i < n; ++i) s[static_cast<std::size_t>(i)] = std::pow(start, i + 1);
    return s;
  };
  int64_t closest = 1;
  while (closest * 2 <= num_heads) closest *= 2;
  std::vector<double> slopes = power_of_two_slopes(closest);
  if (closest < num_heads) {
    // The paper's interpolation: every other slope of the next power of two.
    const std::vector<double> extra = power_of_two_slopes(2 * closest);
    for (int64_t i = 0; static_cast<int64_t>(slopes.size()) < num_heads; i += 2)
      slopes.push_back(extra[static_cast<std::size_t>(i)]);
  }
  return slopes;
}

namespace {

// The fused kernels tile 48 query rows per head; below 16 rows (decoder steps) the composed
// path's GEMMs are faster. Measured, Tk=4096, d=64, H=8: forward Tq=1 1.2 ms composed vs 3.3 ms
// fused; backward Tq=1 6.3 ms vs 8.5 ms, Tq=48 21.5 ms vs 10.5 ms.
constexpr int64_t kMinFusedQueryRows = 16;

struct Normalised {
  Tensor q, k, v;
  AttentionParams params;
};

Normalised normalise(const Tensor& q, const Tensor& k, const Tensor& v,
                     const AttentionParams& params) {
  const DType dtype = q.dtype();
  return {q.contiguous(), k.contiguous(), v.contiguous(), detail::convert_params(params, dtype)};
}

// K or V as the decode kernel reads it: in place (a KV cache's strided rows, a bf16 cache
// without widening) whenever the feature dimension is contiguous; otherwise a packed copy.
Tensor readable_in_place(const Tensor& t) { return t.stride(3) == 1 ? t : t.contiguous(); }

// The dtype that bf16 K and V are widened to for a query of dtype `q` (a bf16 query computes
// in float32).
DType widened(DType q) { return q == DType::f64 ? DType::f64 : DType::f32; }

// bf16 K and V (a bf16 KV cache) against a query of any float dtype. Decoder steps (Tq <= 16,
// dot-product scores) read K and V in place through the decode kernel, widening each row in
// registers; a bf16 query may take the vdpbf16ps kernel where it is chosen for this CPU;
// everything else widens K and V (exactly) to the query's precision and takes the float paths.
AttentionOutput attention_bf16_kv(const detail::AttentionDims& dims, const Tensor& q,
                                  const Tensor& k, const Tensor& v, const AttentionParams& params) {
  if (q.dtype() != DType::f64) {
    const AttentionParams params32 = detail::convert_params(params, DType::f32);
    const bool fused_prefill =
        dims.Tq >= kMinFusedQueryRows && kernels::flash_attention_supported(DType::f32, params32);
    if (!fused_prefill && !kernels::additive_attention_supported(DType::f32, params32) &&
        kernels::decode_attention_supported(DType::f32, dims, params32))
      return kernels::decode_attention(dims, q.to(DType::f32).contiguous(), readable_in_place(k),
                                       readable_in_place(v), params32);
    if (q.dtype() == DType::bf16 && kernels::flash_attention_bf16_supported(params32))
      return kernels::flash_attention_bf16(dims, q.contiguous(), k.contiguous(), v.contiguous(),
                                           params32);
  }
  // (contiguous() first: the packed bf16 -> float32 conversion is the fast one.)
  const DType wide = widened(q.dtype());
  return attention(q.contiguous().to(wide), k.contiguous().to(wide), v.contiguous().to(wide),
                   params);
}

}  // namespace

AttentionOutput attention(const Tensor& q, const Tensor& k, const Tensor& v,
                          const AttentionParams& params) {
  ATTN_PROFILE_SCOPE("attention.forward");
  const detail::AttentionDims dims = detail::validate_attention("attention", q, k, v, params);
  if (k.dtype() == DType::bf16) return attention_bf16_kv(dims, q, k, v, params);
  const DType dtype = q.dtype();
  const AttentionParams converted = detail::convert_params(params, dtype);
  // Additive/concat: project q and k once, stream v . tanh(qp_i + kp_j) into an online softmax.
  const bool additive = kernels::additive_attention_supported(dtype, converted);
  const bool fused = dims.Tq >= kMinFusedQueryRows && kernels::flash_attention_supported(dtype, converted);
  // Few queries against many keys (decoder steps): split over the keys, merged by log-sum-exp,
  // K and V read in place (a KV cache's rows strided over its capacity are not packed first).
  if (!additive && !fused && kernels::decode_attention_supported(dtype, dims, converted))
    return kernels::decode_attention(dims, q.contiguous(), readable_in_place(k),
                                     readable_in_place(v), converted);
  const Normalised n{q.contiguous(), k.contiguous(), v.contiguous(), converted};
  if (additive) return kernels::additive_attention_forward(dims, n.q, n.k, n.v, n.params);
  if (fused) return kernels::flash_attention(dims, n.q, n.k, n.v, n.params);
  // General, cosine, trilinear and location scores: transform q and k once, then the fused
  // dot-product kernel, or the decode kernel for decoder steps (a Luong-general step, Tq = 1).
  // (The transform is skipped when neither kernel could take the result.)
  AttentionParams as_dot = n.params;
  as_dot.score = DotScore{};
  const bool many_queries = dims.Tq >= kMinFusedQueryRows;
  if (many_queries ? kernels::flash_attention_supported(dtype, as_dot)
                   : kernels::decode_attention_supported(dtype, dims, as_dot)) {
    if (auto form = detail::to_dot_form(dims, n.q, n.k, n.params)) {
      if (many_queries)
        return kernels::flash_attention(form->dims, form->q, form->k, n.v, form->params);
      return kernels::decode_attention(form->dims, form->q, form->k, n.v, form->params);
    }
  }
  if (dtype == DType::f32)
    return kernels::composed_attention_forward<float>(dims, n.q, n.k, n.v, n.params);
  return kernels::composed_attention_forward<double>(dims, n.q, n.k, n.v, n.params);
}

AttentionGrads attention_backward(const Tensor& q, const Tensor& k, const Tensor& v,
                                  const AttentionParams& params, const AttentionOutput& forward,
                                  const Tensor& dout) {
  ATTN_PROFILE_SCOPE("attention.backward");
  const char* op = "attention_backward";
  const detail::AttentionDims dims = detail::validate_attention(op, q, k, v, params);
  detail::validate_attention_backward(op, dims, forward, dout);
  // bf16 inputs (all three, or K and V of a mixed-precision call): gradients of the exactly
  // widened inputs, in float32 (float64 for a float64 query).
  if (q.dtype() == DType::bf16 || k.dtype() == DType::bf16) {
    const DType wide = widened(q.dtype());
    return attention_backward(q.to(wide), k.to(wide), v.to(wide), params, forward, dout);
  }
  const Normalised n = normalise(q, k, v, params);
  const DType dtype = q.dtype();
  AttentionOutput saved = forward;
  saved.out = forward.out.to(dtype).contiguous();
  saved.lse = forward.lse.to(dtype).contiguous();
  const Tensor g = dout.to(dtype).contiguous();
  if (kernels::additive_attention_supported(dtype, n.params))
    return kernels::additive_attention_backward(dims, n.q, n.k, n.v, n.params, saved, g);
  if (dims.Tq >= kMinFusedQueryRows && kernels::flash_backward_supported(dtype, n.params))
    return kernels::flash_attention_backward(dims, n.q, n.k, n.v, n.params, saved, g);
  if (dims.Tq >= kMinFusedQueryRows) {
    if (auto form = detail::to_dot_form(dims, n.q, n.k, n.params);
        form && kernels::flash_backward_supported(dtype, form->params)) {
      AttentionGrads dot_grads = kernels::flash_attention_backward(form->dims, form->q, form->k,
                                                                   n.v, form->params, saved, g);
      return detail::from_dot_form_grads(n.q, n.k, n.params, std::move(dot_grads));
    }
  }
  if (dtype == DType::f32)
    return kernels::composed_attention_backward<float>(dims, n.q, n.k, n.v, n.params, saved, g);
  return kernels::composed_attention_backward<double>(dims, n.q, n.k, n.v, n.params, saved, g);
}

}  // namespace attn
