// Attention front-end: validates, normalises (dtype, contiguity) and dispatches to a kernel.
#include "attn/attention.h"

#include <cmath>

#include "attention_dot_form.h"
#include "attention_validate.h"
#include "kernels/additive_attention.h"
#include "kernels/attention_composed.h"
#include "kernels/decode_attention.h"
#include "kernels/flash_attention.h"
#include "kernels/flash_attention_bf16.h"
#include "kernels/flash_backward.h"

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

}  // namespace

AttentionOutput attention(const Tensor& q, const Tensor& k, const Tensor& v,
                          const AttentionParams& params) {
  const detail::AttentionDims dims = detail::validate_attention("attention", q, k, v, params);
  if (q.dtype() == DType::bf16) {
    // bf16 inputs: the bf16 dot-product kernel when the CPU and the params allow it; otherwise
    // widen (exactly) to float32 and take the float32 paths. Output and lse are float32.
    const AttentionParams params32 = detail::convert_params(params, DType::f32);
    if (kernels::flash_attention_bf16_supported(params32))
      return kernels::flash_attention_bf16(dims, q.contiguous(), k.contiguous(), v.contiguous(),
                                           params32);
    return attention(q.to(DType::f32), k.to(DType::f32), v.to(DType::f32), params);
  }
  const Normalised n = normalise(q, k, v, params);
  // Additive/concat: project q and k once, stream v . tanh(qp_i + kp_j) into an online softmax.
  if (kernels::additive_attention_supported(q.dtype(), n.params))
    return kernels::additive_attention_forward(dims, n.q, n.k, n.v, n.params);
  if (dims.Tq >= kMinFusedQueryRows && kernels::flash_attention_supported(q.dtype(), n.params))
    return kernels::flash_attention(dims, n.q, n.k, n.v, n.params);
  // Few queries against many keys (decoder steps): split over the keys, merged by log-sum-exp.
  if (kernels::decode_attention_supported(q.dtype(), dims, n.params))
    return kernels::decode_attention(dims, n.q, n.k, n.v, n.params);
  // General, cosine, trilinear and location scores: transform q and k once, then the fused
  // dot-product kernel, or the decode kernel for decoder steps (a Luong-general step, Tq = 1).
  // (The transform is skipped when neither kernel could take the result.)
  AttentionParams as_dot = n.params;
  as_dot.score = DotScore{};
  const bool many_queries = dims.Tq >= kMinFusedQueryRows;
  if (many_queries ? kernels::flash_attention_supported(q.dtype(), as_dot)
                   : kernels::decode_attention_supported(q.dtype(), dims, as_dot)) {
    if (auto form = detail::to_dot_form(dims, n.q, n.k, n.params)) {
      if (many_queries)
        return kernels::flash_attention(form->dims, form->q, form->k, n.v, form->params);
      return kernels::decode_attention(form->dims, form->q, form->k, n.v, form->params);
    }
  }
  if (q.dtype() == DType::f32)
    return kernels::composed_attention_forward<float>(dims, n.q, n.k, n.v, n.params);
  return kernels::composed_attention_forward<double>(dims, n.q, n.k, n.v, n.params);
}

AttentionGrads attention_backward(const Tensor& q, const Tensor& k, const Tensor& v,
                                  const AttentionParams& params, const AttentionOutput& forward,
                                  const Tensor& dout) {
  const char* op = "attention_backward";
  const detail::AttentionDims dims = detail::validate_attention(op, q, k, v, params);
  detail::validate_attention_backward(op, dims, forward, dout);
  if (q.dtype() == DType::bf16)  // float32 gradients of the (exactly) widened inputs
    return attention_backward(q.to(DType::f32), k.to(DType::f32), v.to(DType::f32), params,
                              forward, dout);
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
