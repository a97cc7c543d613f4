#include "params.h"

#include <string>

namespace attn::python {

namespace {

template <class... F>
struct Overloaded : F... {
  using F::operator()...;
};
template <class... F>
Overloaded(F...) -> Overloaded<F...>;

Tensor field(const py::dict& tensors, const char* name, KeepAlive& keep) {
  if (!tensors.contains(name)) return {};
  return to_tensor(tensors[name], name, keep).tensor;
}

void put(py::dict& out, const char* name, const Tensor& t, ArrayKind kind) {
  if (t.defined()) out[name] = to_python(t, kind);
}

}  // namespace

Score to_score(py::handle spec, KeepAlive& keep) {
  const py::tuple s = py::reinterpret_borrow<py::tuple>(spec);
  ATTN_CHECK(s.size() == 4, "python", "score: expected (kind, tensors, scale, eps)");
  const std::string kind = s[0].cast<std::string>();
  const py::dict t = s[1].cast<py::dict>();
  if (kind == "dot") return DotScore{};
  if (kind == "scaled_dot") {
    ScaledDotScore score;
    if (!s[2].is_none()) score.scale = s[2].cast<double>();
    return score;
  }
  if (kind == "general")
    return GeneralScore{field(t, "weight", keep), field(t, "u", keep), field(t, "v", keep)};
  if (kind == "additive")
    return AdditiveScore{field(t, "w_query", keep), field(t, "w_key", keep), field(t, "bias", keep),
                         field(t, "v", keep)};
  if (kind == "concat") return ConcatScore{field(t, "weight", keep), field(t, "v", keep)};
  if (kind == "cosine") return CosineScore{field(t, "tau", keep), s[3].cast<double>()};
  if (kind == "location") return LocationScore{field(t, "weight", keep)};
  if (kind == "trilinear") return TrilinearScore{field(t, "weight", keep)};
  throw Error("python", "score: unknown scoring function '" + kind +
                            "' (dot, scaled_dot, general, additive, concat, cosine, location, "
                            "trilinear)");
}

py::tuple from_score(const Score& score, ArrayKind kind) {
  py::dict d;
  std::visit(Overloaded{[](const DotScore&) {}, [](const ScaledDotScore&) {},
                        [&](const GeneralScore& g) {
                          put(d, "weight", g.weight, kind);
                          put(d, "u", g.u, kind);
                          put(d, "v", g.v, kind);
                        },
                        [&](const AdditiveScore& a) {
                          put(d, "w_query", a.w_query, kind);
                          put(d, "w_key", a.w_key, kind);
                          put(d, "bias", a.bias, kind);
                          put(d, "v", a.v, kind);
                        },
                        [&](const ConcatScore& c) {
                          put(d, "weight", c.weight, kind);
                          put(d, "v", c.v, kind);
                        },
                        [&](const CosineScore& c) { put(d, "tau", c.tau, kind); },
                        [&](const LocationScore& l) { put(d, "weight", l.weight, kind); },
                        [&](const TrilinearScore& t) { put(d, "weight", t.weight, kind); }},
             score);
  return py::make_tuple(score_name(score), d);
}

AttentionParams to_params(const py::dict& spec, KeepAlive& keep) {
  AttentionParams params;
  params.score = to_score(spec["score"], keep);
  if (!spec["head_scores"].is_none())
    for (py::handle s : spec["head_scores"]) params.head_scores.push_back(to_score(s, keep));
  Mask& mask = params.mask;
  mask.key_lengths = to_int_vector(spec["key_lengths"], "key_lengths");
  mask.query_lengths = to_int_vector(spec["query_lengths"], "query_lengths");
  mask.causal = spec["causal"].cast<bool>();
  const std::string alignment = spec["alignment"].cast<std::string>();
  ATTN_CHECK(alignment == "top_left" || alignment == "bottom_right", "python",
             "alignment: '", alignment, "' (expected 'top_left' or 'bottom_right')");
  mask.alignment = alignment == "top_left" ? Alignment::top_left : Alignment::bottom_right;
  if (!spec["window"].is_none()) {
    const py::tuple w = spec["window"].cast<py::tuple>();
    ATTN_CHECK(w.size() == 2, "python", "window: expected (left, right), got ", w.size(),
               " values");
    Window window;
    if (!w[0].is_none()) window.left = w[0].cast<int64_t>();
    if (!w[1].is_none()) window.right = w[1].cast<int64_t>();
    mask.window = window;
  }
  mask.allowed = to_tensor(spec["allowed"], "allowed", keep).tensor;
  mask.bias = to_tensor(spec["bias"], "bias", keep).tensor;
  mask.alibi_slopes = to_double_vector(spec["alibi_slopes"], "alibi_slopes");
  if (!spec["local"].is_none()) {
    const py::tuple l = spec["local"].cast<py::tuple>();
    const std::string kind = l[0].cast<std::string>();
    ATTN_CHECK(kind == "monotonic" || kind == "predictive", "python", "local: kind '", kind,
               "' (expected 'monotonic' or 'predictive')");
    mask.local.kind = kind == "monotonic" ? LocalKind::monotonic : LocalKind::predictive;
    mask.local.half_width = l[1].cast<int64_t>();
    mask.local.w_p = to_tensor(l[2], "local.w_p", keep).tensor;
    mask.local.v_p = to_tensor(l[3], "local.v_p", keep).tensor;
  }
  params.dropout.p = spec["dropout"].cast<double>();
  params.dropout.seed = spec["seed"].cast<uint64_t>();
  params.return_weights = spec["return_weights"].cast<bool>();
  return params;
}

py::tuple from_attention_output(const AttentionOutput& out, ArrayKind kind) {
  return py::make_tuple(to_python(out.out, kind), to_python(out.lse, kind),
                        to_python(out.weights, kind), to_python(out.mean_weights, kind));
}

py::tuple from_attention_grads(const AttentionGrads& grads, const AttentionParams& params,
                               ArrayKind kind) {
  py::object head = py::none();
  if (!params.head_scores.empty()) {
    py::list list;
    for (const Score& s : grads.dhead_scores) list.append(from_score(s, kind));
    head = list;
  }
  py::object local = py::none();
  if (params.mask.local.kind == LocalKind::predictive)
    local = py::make_tuple(to_python(grads.dlocal.w_p, kind), to_python(grads.dlocal.v_p, kind));
  return py::make_tuple(to_python(grads.dq, kind), to_python(grads.dk, kind),
                        to_python(grads.dv, kind), to_python(grads.dbias, kind),
                        from_score(grads.dscore, kind), head, local);
}

}  // namespace attn::python
