// AttentionParams and the scoring functions across the Python boundary.
//
// The Python package (python/attn/__init__.py) turns its keyword arguments into one dict:
//   score         (kind, {field: array}, scale or None, eps)     kind as attn::score_name()
//   head_scores   None or a list of score tuples
//   causal, alignment ("top_left" | "bottom_right"), window (None or (left, right), None for an
//   unbounded side), key_lengths, query_lengths, allowed, bias, alibi_slopes,
//   local (None or (kind "monotonic" | "predictive", half_width, w_p, v_p)),
//   dropout, seed, return_weights
// Gradients of scores come back as (kind, {field: gradient array}).
#pragma once

#include <pybind11/pybind11.h>

#include "attn/attention.h"
#include "convert.h"

namespace attn::python {

AttentionParams to_params(const py::dict& spec, KeepAlive& keep);

Score to_score(py::handle spec, KeepAlive& keep);
py::tuple from_score(const Score& score, ArrayKind kind);

// (out, lse, weights, mean_weights)
py::tuple from_attention_output(const AttentionOutput& out, ArrayKind kind);
// (dq, dk, dv, dbias, dscore, dhead_scores or None, dlocal (w_p, v_p) or None)
py::tuple from_attention_grads(const AttentionGrads& grads, const AttentionParams& params,
                               ArrayKind kind);

}  // namespace attn::python
