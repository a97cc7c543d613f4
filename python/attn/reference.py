"""attn's float64 oracle from Python: plain-loop implementations that materialise every score and
follow the equations literally (src/reference/). Same signatures as the fast functions in attn;
every result is float64. For checking, never for speed."""

from __future__ import annotations

import dataclasses

from . import (AttentionOutput, MultiHeadConfig, MultiHeadGrads, MultiHeadOutput,
               MultiHeadWeights, _core, _grads, _multihead_output, _spec)


def attention(q, k, v, **kwargs) -> AttentionOutput:
    return AttentionOutput(*_core.attention(q, k, v, _spec(**kwargs), reference=True))


def attention_backward(q, k, v, forward: AttentionOutput, dout, **kwargs):
    return _grads(_core.attention_backward(q, k, v, _spec(**kwargs), forward.out, forward.lse,
                                           dout, reference=True), kwargs)


def matmul(a, b):
    return _core.matmul(a, b, reference=True)


def matmul_backward(a, b, dout):
    return _core.matmul_backward(a, b, dout, reference=True)


def multihead_attention(config: MultiHeadConfig, weights: MultiHeadWeights, query, key, value,
                        **kwargs) -> MultiHeadOutput:
    return _multihead_output(_core.multihead_attention(
        dataclasses.asdict(config), weights._dict(), query, key, value, _spec(**kwargs),
        reference=True))


def multihead_attention_backward(config, weights, query, key, value, saved, doutput,
                                 **kwargs) -> MultiHeadGrads:
    raw = _core.multihead_attention_backward(
        dataclasses.asdict(config), weights._dict(), query, key, value, _spec(**kwargs),
        (saved.output, saved.attention.out, saved.attention.lse, saved.q, saved.k, saved.v),
        doutput, reference=True)
    dquery, dkey, dvalue, dweights, att = raw
    return MultiHeadGrads(dquery, dkey, dvalue, MultiHeadWeights(**dweights), _grads(att, kwargs))
