#include "attention_validate.h"

#include <cmath>
#include <string>

namespace attn::detail {

namespace {

bool is_float(DType d) { return d == DType::f32 || d == DType::f64; }

// Checks that `t` is a defined float tensor of exactly `shape`.
std::string shape_hint(const Shape& shape) {  // unknown sizes (-1) print as "A"
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i)
    s += (i ? ", " : "") + (shape[i] < 0 ? std::string("A") : std::to_string(shape[i]));
  return s + "]";
}

void expect_param(const char* op, const char* score, const char* name, const Tensor& t,
                  const Shape& shape) {
  ATTN_CHECK(t.defined(), op, score, " score needs ", name, " of shape ", shape_hint(shape));
  ATTN_CHECK(is_float(t.dtype()), op, score, " ", name, " must be float32 or float64, got ",
             dtype_name(t.dtype()));
  ATTN_CHECK(t.shape() == shape, op, score, " ", name, " has shape ", t.shape_str(),
             ", expected ", shape_str(shape));
}

void expect_same_width(const char* op, const char* score, const AttentionDims& d) {
  ATTN_CHECK(d.Dk == d.Dq, op, "key has ", d.Dk, " features, query has ", d.Dq, " (", score,
             " score needs equal widths)");
}

// A vector parameter [A] whose A is taken from the first dimension of a matrix parameter.
int64_t hidden_width(const Tensor& t) { return t.defined() && t.dim() >= 1 ? t.size(0) : -1; }

void validate_score(const char* op, const Score& score, const AttentionDims& d, int64_t head) {
  const std::string where = head >= 0 ? std::string("head ") + std::to_string(head) + " " : "";
  const char* name = score_name(score);
  const std::string label = where + name;
  const char* s = label.c_str();
  std::visit(
      [&](const auto& sc) {
        using S = std::decay_t<decltype(sc)>;
        if constexpr (std::is_same_v<S, DotScore>) {
          expect_same_width(op, s, d);
        } else if constexpr (std::is_same_v<S, ScaledDotScore>) {
          expect_same_width(op, s, d);
          ATTN_CHECK(!sc.scale || std::isfinite(*sc.scale), op, s, " scale must be finite, got ",
                     *sc.scale);
        } else if constexpr (std::is_same_v<S, GeneralScore>) {
          if (sc.weight.defined()) {
            ATTN_CHECK(!sc.u.defined() && !sc.v.defined(), op, s,
                       " score takes either weight (full) or u and v (low rank), not both");
            expect_param(op, s, "weight", sc.weight, {d.Dq, d.Dk});
          } else {
            ATTN_CHECK(sc.u.defined() && sc.v.defined(), op, s,
                       " score needs weight [", d.Dq, ", ", d.Dk, "] or low-rank u [r, ", d.Dq,
                       "] and v [r, ", d.Dk, "]");
            const int64_t r = hidden_width(sc.u);
            expect_param(op, s, "u", sc.u, {r, d.Dq});
            expect_param(op, s, "v", sc.v, {r, d.Dk});
          }
        } else if constexpr (std::is_same_v<S, AdditiveScore>) {
          const int64_t a = hidden_width(sc.w_query);
          expect_param(op, s, "w_query", sc.w_query, {a, d.Dq});
          expect_param(op, s, "w_key", sc.w_key, {a, d.Dk});
          expect_param(op, s, "v", sc.v, {a});
          if (sc.bias.defined()) expect_param(op, s, "bias", sc.bias, {a});
        } else if constexpr (std::is_same_v<S, ConcatScore>) {
          const int64_t a = hidden_width(sc.weight);
          expect_param(op, s, "weight", sc.weight, {a, d.Dq + d.Dk});
          expect_param(op, s, "v", sc.v, {a});
        } else if constexpr (std::is_same_v<S, CosineScore>) {
          expect_same_width(op, s, d);
          ATTN_CHECK(sc.tau.defined() && sc.tau.numel() == 1, op, s,
                     " score needs tau with one element");
          ATTN_CHECK(is_float(sc.tau.dtype()), op, s, " tau must be float32 or float64");
          ATTN_CHECK(sc.eps > 0.0, op, s, " eps must be > 0, got ", sc.eps);
        } else if constexpr (std::is_same_v<S, LocationScore>) {
          const int64_t max_len = hidden_width(sc.weight);
          expect_param(op, s, "weight", sc.weight, {max_len, d.Dq});
          ATTN_CHECK(d.Tk <= max_len, op, s, " score covers ", max_len,
                     " source positions, key has ", d.Tk);
        } else if constexpr (std::is_same_v<S, TrilinearScore>) {
          expect_same_width(op, s, d);
          expect_param(op, s, "weight", sc.weight, {3 * d.Dq});
        }
      },
      score);
}

void validate_mask(const char* op, const Mask& m, const AttentionDims& d, const Shape& full) {
  if (!m.key_lengths.empty()) {
    ATTN_CHECK(static_cast<int64_t>(m.key_lengths.size()) == d.B, op, "key_lengths has ",
               m.key_lengths.size(), " entries, batch is ", d.B);
    for (std::size_t b = 0; b < m.key_lengths.size(); ++b)
      ATTN_CHECK(m.key_lengths[b] >= 0 && m.key_lengths[b] <= d.Tk, op, "key_lengths[", b,
                 "] = ", m.key_lengths[b], " outside [0, ", d.Tk, "] (key length)");
  }
  if (!m.query_lengths.empty()) {
    ATTN_CHECK(static_cast<int64_t>(m.query_lengths.size()) == d.B, op, "query_lengths has ",
               m.query_lengths.size(), " entries, batch is ", d.B);
    for (std::size_t b = 0; b < m.query_lengths.size(); ++b)
      ATTN_CHECK(m.query_lengths[b] >= 0 && m.query_lengths[b] <= d.Tq, op, "query_lengths[", b,
                 "] = ", m.query_lengths[b], " outside [0, ", d.Tq, "] (query length)");
  }
  if (m.window) {
    ATTN_CHECK(m.window->left >= 0 && m.window->right >= 0, op, "window sizes must be >= 0, got left ",
               m.window->left, ", right ", m.window->right);
  }
  if (m.allowed.defined()) {
    ATTN_CHECK(m.allowed.dtype() == DType::b8, op, "allowed mask must be bool, got ",
               dtype_name(m.allowed.dtype()));
    ATTN_CHECK(broadcastable_to(m.allowed.shape(), full), op, "allowed mask of shape ",
               m.allowed.shape_str(), " does not broadcast to scores ", shape_str(full));
  }
  if (m.bias.defined()) {
    ATTN_CHECK(is_float(m.bias.dtype()), op, "bias must be float32 or float64, got ",
               dtype_name(m.bias.dtype()));
    ATTN_CHECK(broadcastable_to(m.bias.shape(), full), op, "bias of shape ", m.bias.shape_str(),
               " does not broadcast to scores ", shape_str(full));
  }
  if (!m.alibi_slopes.empty()) {
    ATTN_CHECK(static_cast<int64_t>(m.alibi_slopes.size()) == d.Hq, op, "alibi_slopes has ",
               m.alibi_slopes.size(), " entries, query heads are ", d.Hq);
  }
  const LocalAttention& local = m.local;
  if (local.kind != LocalKind::none) {
    ATTN_CHECK(local.half_width >= 0, op, "local attention half_width must be >= 0, got ",
               local.half_width);
  }
  if (local.kind == LocalKind::predictive) {
    ATTN_CHECK(local.half_width > 0, op, "local-p needs half_width > 0 (sigma = half_width / 2)");
    const int64_t a = hidden_width(local.w_p);
    expect_param(op, "local-p", "w_p", local.w_p, {a, d.Dq});
    expect_param(op, "local-p", "v_p", local.v_p, {a});
  }
}

}  // namespace

bool broadcastable_to(const Shape& shape, const Shape& target) {
  if (shape.size() > target.size()) return false;
  const std::size_t lead = target.size() - shape.size();
  for (std::size_t i = 0; i < shape.size(); ++i)
    if (shape[i] != 1 && shape[i] != target[lead + i]) return false;
  return true;
}

AttentionDims validate_attention(const char* op, const Tensor& q, const Tensor& k, const Tensor& v,
                                 const AttentionParams& params) {
  ATTN_CHECK(q.defined() && k.defined() && v.defined(), op, "query, key and value are required");
  ATTN_CHECK(q.dim() == 4, op, "query must be [B, Hq, Tq, Dq], got ", q.shape_str());
  ATTN_CHECK(k.dim() == 4, op, "key must be [B, Hkv, Tk, Dk], got ", k.shape_str());
  ATTN_CHECK(v.dim() == 4, op, "value must be [B, Hkv, Tk, Dv], got ", v.shape_str());
  // bf16 is a storage format for q, k, v only: scoring parameters, bias and dout stay float.
  ATTN_CHECK(is_float(q.dtype()) || q.dtype() == DType::bf16, op,
             "query must be float32, float64 or bf16, got ", dtype_name(q.dtype()));
  // One dtype for all three, or mixed precision: bf16 K and V (a bf16 KV cache) against a
  // float32 or float64 query.
  const bool same = k.dtype() == q.dtype() && v.dtype() == q.dtype();
  const bool mixed = k.dtype() == DType::bf16 && v.dtype() == DType::bf16 && is_float(q.dtype());
  ATTN_CHECK(same || mixed, op, "query, key and value dtypes differ: ", dtype_name(q.dtype()),
             ", ", dtype_name(k.dtype()), ", ", dtype_name(v.dtype()),
             " (allowed: one dtype for all three, or bf16 key and value with a float32 or float64"
             " query)");
  AttentionDims d;
  d.B = q.size(0);
  d.Hq = q.size(1);
  d.Tq = q.size(2);
  d.Dq = q.size(3);
  d.Hkv = k.size(1);
  d.Tk = k.size(2);
  d.Dk = k.size(3);
  d.Dv = v.size(3);
  ATTN_CHECK(k.size(0) == d.B && v.size(0) == d.B, op, "batch sizes differ: query ", q.shape_str(),
             ", key ", k.shape_str(), ", value ", v.shape_str());
  ATTN_CHECK(v.size(1) == d.Hkv && v.size(2) == d.Tk, op, "value ", v.shape_str(),
             " does not match key ", k.shape_str(), " in heads and length");
  ATTN_CHECK(d.Hq > 0 && d.Hkv > 0, op, "need at least one head: query ", q.shape_str(), ", key ",
             k.shape_str());
  ATTN_CHECK(d.Hq % d.Hkv == 0, op, "key/value heads (", d.Hkv, ") must divide query heads (", d.Hq,
             ")");
  ATTN_CHECK(d.Dq > 0 && d.Dk > 0 && d.Dv > 0, op, "feature widths must be > 0: query ",
             q.shape_str(), ", key ", k.shape_str(), ", value ", v.shape_str());

  if (params.head_scores.empty()) {
    validate_score(op, params.score, d, -1);
  } else {
    ATTN_CHECK(static_cast<int64_t>(params.head_scores.size()) == d.Hq, op, "head_scores has ",
               params.head_scores.size(), " entries, query heads are ", d.Hq);
    for (int64_t h = 0; h < d.Hq; ++h) validate_score(op, head_score(params, h), d, h);
  }
  validate_mask(op, params.mask, d, {d.B, d.Hq, d.Tq, d.Tk});
  ATTN_CHECK(params.dropout.p >= 0.0 && params.dropout.p < 1.0, op,
             "dropout probability must be in [0, 1), got ", params.dropout.p);
  return d;
}

void validate_attention_backward(const char* op, const AttentionDims& d,
                                 const AttentionOutput& forward, const Tensor& dout) {
  const Shape out_shape{d.B, d.Hq, d.Tq, d.Dv};
  ATTN_CHECK(forward.out.defined() && forward.out.shape() == out_shape, op,
             "forward.out must be the forward output ", shape_str(out_shape), ", got ",
             forward.out.defined() ? forward.out.shape_str() : "undefined");
  ATTN_CHECK(forward.lse.defined() && forward.lse.shape() == Shape({d.B, d.Hq, d.Tq}), op,
             "forward.lse must be [", d.B, ", ", d.Hq, ", ", d.Tq, "], got ",
             forward.lse.defined() ? forward.lse.shape_str() : "undefined");
  ATTN_CHECK(dout.defined() && dout.shape() == out_shape, op, "dout must match the output ",
             shape_str(out_shape), ", got ", dout.defined() ? dout.shape_str() : "undefined");
  ATTN_CHECK(is_float(dout.dtype()), op, "dout must be float32 or float64");
}

namespace {
Tensor convert(const Tensor& t, DType dtype) {
  return t.defined() ? t.to(dtype).contiguous() : t;
}
}  // namespace

Score convert_score(const Score& score, DType dtype) {
  Score c = score;
  for_each_score_tensor(c, [&](Tensor& t) { t = convert(t, dtype); });
  return c;
}

AttentionParams convert_params(const AttentionParams& params, DType dtype) {
  AttentionParams c = params;
  c.score = convert_score(params.score, dtype);
  for (auto& s : c.head_scores) s = convert_score(s, dtype);
  c.mask.bias = convert(params.mask.bias, dtype);
  c.mask.allowed = params.mask.allowed.defined() ? params.mask.allowed.contiguous() : Tensor();
  c.mask.local.w_p = convert(params.mask.local.w_p, dtype);
  c.mask.local.v_p = convert(params.mask.local.v_p, dtype);
  return c;
}

}  // namespace attn::detail
