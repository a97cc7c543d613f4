"""attn for PyTorch: autograd-aware attention, ``scaled_dot_product_attention``, a drop-in
``MultiheadAttention`` and nn.Modules for every scoring function.

Everything here runs attn's C++ kernels (through the NumPy-level API in :mod:`attn`) on CPU
torch tensors and connects them to autograd: the forward keeps only ``out`` and the row
log-sum-exp ``lse`` (never the [Tq, Tk] weights), and the backward hands them to
:func:`attn.attention_backward`, which recomputes the weights tile by tile. That is what keeps
the memory linear in the sequence length.

Differences from PyTorch, all from attn's documented policy:

* A fully masked row (every key hidden by the masks, or every visible score -inf) gives output
  0, weights 0 and gradient 0; PyTorch gives NaN.
* Returned attention weights are the softmax *before* dropout (PyTorch's MultiheadAttention
  returns them after dropout). They are differentiable for the dot and scaled-dot scores (so
  for MultiheadAttention and scaled_dot_product_attention); for the other scoring functions
  they are constants and gradients flow through the attention output only.
* Dropout draws its keep decisions from attn's counter-based generator, seeded from torch's
  default generator (``torch.manual_seed`` makes a run reproducible), not from torch's stream.
* bfloat16 inputs are computed in float32 (softmax and accumulation); :func:`attention`
  returns float32 for them, :func:`scaled_dot_product_attention` and the modules cast back to
  the input dtype.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

import attn as _attn

__all__ = [
    "attention",
    "scaled_dot_product_attention",
    "MultiheadAttention",
    "DotAttention",
    "GeneralAttention",
    "AdditiveAttention",
    "ConcatAttention",
    "CosineAttention",
    "LocationAttention",
    "TrilinearAttention",
]


def _error(message: str):
    """attn.Error (a ValueError) with attn's "[op] message" form."""
    return _attn.Error(message)


def _as_torch(x):
    if x is None or isinstance(x, torch.Tensor):
        return x
    return torch.as_tensor(x)


def _replace(obj, **fields):
    if dataclasses.is_dataclass(obj):
        return dataclasses.replace(obj, **fields)
    for name, value in fields.items():  # pragma: no cover - attn's classes are dataclasses
        setattr(obj, name, value)
    return obj


def _tensor_fields(obj) -> Dict[str, Any]:
    if obj is None or isinstance(obj, str):
        return {}
    if hasattr(obj, "tensors"):
        return dict(obj.tensors())
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)
            if getattr(obj, f.name) is not None and not isinstance(getattr(obj, f.name),
                                                                  (int, float, str))}


# ---------------------------------------------------------------------------------------------
# The autograd function.


class _Spec:
    """Everything about one call that is not a differentiable tensor, and where each
    differentiable parameter tensor (score fields, head-score fields, local-p's w_p / v_p)
    goes back when the score objects are rebuilt."""

    def __init__(self, score, head_scores, local, kwargs, return_weights):
        self.score = score
        self.head_scores = list(head_scores) if head_scores is not None else None
        self.local = local
        self.kwargs = kwargs
        self.return_weights = return_weights
        self.slots: List[Tuple[Any, str]] = []  # (owner, field): owner "score", "local" or int
        self.tensors: List[torch.Tensor] = []
        self._collect("score", score)
        if self.head_scores is not None:
            for h, s in enumerate(self.head_scores):
                self._collect(h, s)
        if local is not None:
            for name in ("w_p", "v_p"):
                value = getattr(local, name, None)
                if isinstance(value, torch.Tensor):
                    self.slots.append(("local", name))
                    self.tensors.append(value)

    def _collect(self, owner, obj):
        for name, value in _tensor_fields(obj).items():
            if isinstance(value, torch.Tensor):
                self.slots.append((owner, name))
                self.tensors.append(value)

    def build(self, params):
        """Score, head scores and local with the slots filled by `params` (detached)."""
        fields: Dict[Any, Dict[str, Any]] = {}
        for (owner, name), t in zip(self.slots, params):
            fields.setdefault(owner, {})[name] = t.detach()
        score = _replace(self.score, **fields["score"]) if "score" in fields else self.score
        head_scores = None
        if self.head_scores is not None:
            head_scores = [_replace(s, **fields[h]) if h in fields else s
                           for h, s in enumerate(self.head_scores)]
        local = _replace(self.local, **fields["local"]) if "local" in fields else self.local
        return score, head_scores, local

    def gradients(self, grads, params):
        """The gradient of each slot's tensor from attn's AttentionGrads."""
        out = []
        for (owner, name), p in zip(self.slots, params):
            if owner == "score":
                holder = grads.dscore
            elif owner == "local":
                holder = grads.dlocal
            else:
                holder = grads.dhead_scores[owner] if grads.dhead_scores is not None else None
            g = getattr(holder, name, None) if holder is not None else None
            out.append(None if g is None else _as_torch(g).to(p.dtype).reshape(p.shape))
        return out


class _AttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, spec: _Spec, q, k, v, bias, *params):
        score, head_scores, local = spec.build(params)
        res = _attn.attention(q.detach(), k.detach(), v.detach(), score=score,
                              head_scores=head_scores, local=local,
                              bias=None if bias is None else bias.detach(),
                              return_weights=spec.return_weights, **spec.kwargs)
        out, lse = _as_torch(res.out), _as_torch(res.lse)
        ctx.spec = spec
        weights = _as_torch(res.weights) if spec.return_weights else None
        ctx.weights_differentiable = weights is not None and _dot_scale(spec, k) is not None
        ctx.save_for_backward(q, k, v, bias, out, lse,
                              weights if ctx.weights_differentiable else None, *params)
        if weights is not None:
            if not ctx.weights_differentiable:
                ctx.mark_non_differentiable(weights)
            return out, weights
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, *unused):
        spec: _Spec = ctx.spec
        q, k, v, bias, out, lse, weights, *params = ctx.saved_tensors
        score, head_scores, local = spec.build(params)
        forward = _attn.AttentionOutput(out=out, lse=lse, weights=None, mean_weights=None)
        g = _attn.attention_backward(q.detach(), k.detach(), v.detach(), forward,
                                     dout.contiguous(), score=score, head_scores=head_scores,
                                     local=local, bias=None if bias is None else bias.detach(),
                                     **spec.kwargs)
        need = ctx.needs_input_grad

        def cast(grad, like, index):
            if grad is None or not need[index]:
                return None
            return _as_torch(grad).to(like.dtype)

        dq, dk, dv = cast(g.dq, q, 1), cast(g.dk, k, 2), cast(g.dv, v, 3)
        dbias = None
        if bias is not None and need[4] and g.dbias is not None:
            dbias = _as_torch(g.dbias).to(bias.dtype).reshape(bias.shape)
        dparams = spec.gradients(g, params)
        dparams = [d if need[5 + i] else None for i, d in enumerate(dparams)]
        dweights = unused[0] if unused else None
        if weights is not None and dweights is not None and bool(dweights.any()):
            dq, dk, dv, dbias = _add_weights_gradient(
                spec, q, k, bias, weights, dweights, (dq, dk, dv, dbias), need)
        return (None, dq, dk, dv, dbias, *dparams)


def _dot_scale(spec: _Spec, k) -> Optional[float]:
    """The factor c of a (scaled) dot score s = c q.k when the returned weights can be
    differentiated here (dot / scaled dot, one score for every head, no local attention);
    None otherwise."""
    if spec.head_scores is not None or spec.local is not None:
        return None
    score = spec.score
    if score == "dot" or isinstance(score, _attn.DotScore):
        return 1.0
    if score == "scaled_dot":
        return 1.0 / math.sqrt(k.shape[-1])
    if isinstance(score, _attn.ScaledDotScore):
        return score.scale if score.scale is not None else 1.0 / math.sqrt(k.shape[-1])
    return None


def _sum_to(t: torch.Tensor, shape) -> torch.Tensor:
    """t summed over the dimensions that broadcasting `shape` to t.shape expanded."""
    lead = t.dim() - len(shape)
    if lead > 0:
        t = t.sum(dim=tuple(range(lead)))
    dims = tuple(i for i, n in enumerate(shape) if n == 1 and t.shape[i] != 1)
    return t.sum(dim=dims, keepdim=True) if dims else t


def _add_weights_gradient(spec, q, k, bias, weights, dweights, grads, need):
    """Adds the gradient that flows through the returned weights W = softmax(c q.k + bias + ...)
    (before dropout): dS = W * (dW - sum_j dW W), then dq = c dS k, dk = c dS^T q (summed over
    the query heads of a key/value head), dbias = dS reduced to the bias's shape."""
    dq, dk, dv, dbias = grads
    c = _dot_scale(spec, k)
    W = weights
    dW = dweights.to(W.dtype)
    dS = W * (dW - (dW * W).sum(dim=-1, keepdim=True))
    B, Hq, Tq, Tk = W.shape
    Hkv = k.shape[1]
    group = Hq // Hkv
    qf, kf = q.detach().to(W.dtype), k.detach().to(W.dtype)
    dS5 = dS.reshape(B, Hkv, group, Tq, Tk)

    def add(total, extra, like):
        extra = extra.to(like.dtype)
        return extra if total is None else total + extra

    if need[1]:
        dq = add(dq, (c * (dS5 @ kf.unsqueeze(2))).reshape(q.shape), q)
    if need[2]:
        dk = add(dk, c * (dS5.transpose(-2, -1) @ qf.reshape(B, Hkv, group, Tq, -1)).sum(2), k)
    if bias is not None and need[4]:
        dbias = add(dbias, _sum_to(dS, bias.shape).reshape(bias.shape), bias)
    return dq, dk, dv, dbias


def _lengths(x):
    if isinstance(x, torch.Tensor):
        return [int(n) for n in x.reshape(-1).tolist()]
    return x


def attention(q, k, v, *, score="scaled_dot", head_scores=None, causal=False,
              alignment="top_left", window=None, key_lengths=None, query_lengths=None,
              allowed=None, bias=None, alibi_slopes=None, local=None, dropout=0.0, seed=0,
              return_weights=False):
    """Autograd-aware :func:`attn.attention` on torch tensors.

    q [B, Hq, Tq, Dq], k [B, Hkv, Tk, Dk], v [B, Hkv, Tk, Dv] (Hq % Hkv == 0), the keyword
    arguments of :func:`attn.attention` (one mask polarity: True = may attend). Gradients reach
    q, k, v, a float ``bias``, every torch tensor held by ``score`` / ``head_scores`` (e.g.
    ``attn.AdditiveScore(w_query, w_key, v)`` built from Parameters) and local-p's ``w_p`` and
    ``v_p``. Masks and lengths are not differentiable. With dropout the backward regenerates the
    same keep mask from ``seed``.

    Returns out [B, Hq, Tq, Dv], or (out, weights [B, Hq, Tq, Tk]) with ``return_weights``
    (weights before dropout). The weights are differentiable (to q, k and the bias) for the dot
    and scaled-dot scores without ``head_scores`` or ``local``; for the other scores they are
    returned as constants. bf16 inputs give float32 results.
    """
    if isinstance(allowed, torch.Tensor) and allowed.dtype != torch.bool:
        raise _error(f"[attention] allowed must be a bool tensor, got {allowed.dtype}")
    kwargs = dict(causal=causal, alignment=alignment, window=window,
                  key_lengths=_lengths(key_lengths), query_lengths=_lengths(query_lengths),
                  allowed=allowed, alibi_slopes=alibi_slopes, dropout=dropout, seed=seed)
    if not isinstance(bias, torch.Tensor) and bias is not None:
        kwargs["bias"] = bias  # a NumPy bias is a constant
        bias = None
    spec = _Spec(score, head_scores, local, kwargs, return_weights)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise _error(f"[attention] {name} must be a torch tensor, got {type(t).__name__}")
    result = _AttentionFunction.apply(spec, q, k, v, bias, *spec.tensors)
    return result


# ---------------------------------------------------------------------------------------------
# scaled_dot_product_attention (PyTorch 2.x semantics).


def _fold_batch(t: torch.Tensor, batch: Tuple[int, ...]) -> torch.Tensor:
    """t [*b, X, Y] broadcast to batch + [X, Y] and folded to 4-D [B, H, X, Y] (views where
    the layout allows)."""
    tail = tuple(t.shape[-2:])
    t = t.expand(*batch, *tail)
    n = len(batch)
    if n == 0:
        return t.reshape(1, 1, *tail)
    if n == 1:
        return t.unsqueeze(1)
    if n == 2:
        return t
    return t.reshape(-1, batch[-1], *tail)


def _fold_mask(m: torch.Tensor, batch: Tuple[int, ...], L: int, S: int) -> torch.Tensor:
    """A mask broadcastable to batch + [L, S] as a 4-D tensor broadcastable to [B, H, L, S],
    without materialising broadcast dimensions where possible."""
    n = len(batch) + 2
    if m.dim() > n:
        raise _error(f"[scaled_dot_product_attention] attn_mask has {m.dim()} dimensions, "
                     f"more than the {n} of the scores")
    m = m.reshape((1,) * (n - m.dim()) + tuple(m.shape))
    try:
        torch.broadcast_shapes(tuple(m.shape), tuple(batch) + (L, S))
    except RuntimeError:
        raise _error(f"[scaled_dot_product_attention] attn_mask of shape {tuple(m.shape)} is "
                     f"not broadcastable to the scores {tuple(batch) + (L, S)}") from None
    if n == 2:
        return m.reshape(1, 1, *m.shape)
    if n == 3:
        return m.unsqueeze(1)
    if n == 4:
        return m
    lead = tuple(m.shape[:-3])
    if all(s == 1 for s in lead):
        return m.reshape(1, *m.shape[-3:])
    return m.expand(*batch[:-1], *m.shape[-3:]).reshape(-1, *m.shape[-3:])


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0,
                                 is_causal=False, scale=None):
    """``torch.nn.functional.scaled_dot_product_attention`` of PyTorch 2.x, on attn, for any
    PyTorch (1.13 lacks it).

    query [..., L, E], key [..., S, E], value [..., S, Ev] (leading dimensions broadcast);
    ``attn_mask`` broadcastable to [..., L, S]: bool (True = takes part) or float (added to the
    scores, and differentiable); ``is_causal`` masks key j > query i (top-left aligned, like
    PyTorch; it may be combined with ``attn_mask``, where PyTorch refuses); ``scale`` defaults
    to 1/sqrt(E). Dropout is applied whenever ``dropout_p > 0`` (as in PyTorch), seeded from
    torch's default generator. Returns [..., L, Ev] in the dtype of ``query``.

    Difference from PyTorch: a fully masked row gives 0, not NaN.
    """
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise _error(f"[scaled_dot_product_attention] {name} must be a torch tensor")
        if t.dim() < 2:
            raise _error(f"[scaled_dot_product_attention] {name} must have at least 2 "
                         f"dimensions, got {t.dim()}")
    L, S, Ev = query.shape[-2], key.shape[-2], value.shape[-1]
    try:
        batch = tuple(torch.broadcast_shapes(query.shape[:-2], key.shape[:-2],
                                             value.shape[:-2]))
    except RuntimeError:
        raise _error(f"[scaled_dot_product_attention] batch dimensions of query "
                     f"{tuple(query.shape)}, key {tuple(key.shape)} and value "
                     f"{tuple(value.shape)} do not broadcast") from None
    q, k, v = (_fold_batch(t, batch) for t in (query, key, value))
    allowed = bias = None
    if attn_mask is not None:
        m = _fold_mask(attn_mask, batch, L, S)
        if m.dtype == torch.bool:
            allowed = m
        elif m.is_floating_point():
            bias = m
        else:
            raise _error(f"[scaled_dot_product_attention] attn_mask must be bool or float, "
                         f"got {attn_mask.dtype}")
    seed = 0
    if dropout_p > 0.0:
        seed = int(torch.randint(0, 2 ** 62, (), dtype=torch.int64).item())
    score = "scaled_dot" if scale is None else _attn.ScaledDotScore(scale=float(scale))
    out = attention(q, k, v, score=score, causal=bool(is_causal), allowed=allowed, bias=bias,
                    dropout=float(dropout_p), seed=seed)
    return out.reshape(*batch, L, Ev).to(query.dtype)


# ---------------------------------------------------------------------------------------------
# MultiheadAttention.


class MultiheadAttention(nn.MultiheadAttention):
    """A drop-in for :class:`torch.nn.MultiheadAttention` whose attention runs on attn.

    The constructor, parameters (``in_proj_weight`` or ``q/k/v_proj_weight``,
    ``in_proj_bias``, ``bias_k``/``bias_v``, ``out_proj``), their initialisation and the
    state_dict are torch's own (this class derives from it), so weights load both ways. The
    projections run in torch (F.linear); the attention itself (scores, masks, softmax, dropout,
    weights @ values) runs in attn with its memory-linear forward and backward.

    forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
    average_attn_weights=True, is_causal=False) -> (attn_output, attn_weights or None), with
    PyTorch's shapes and mask conventions:

    * ``key_padding_mask`` [N, S] (or [S] unbatched): bool, True = ignore this key; or float,
      added to the scores (PyTorch 2.x).
    * ``attn_mask`` [L, S] or [N * num_heads, L, S]: bool, True = NOT allowed; or float, added.
    * ``is_causal=True`` applies the causal mask itself (key j > query i hidden), with or
      without ``attn_mask`` (in PyTorch 2.x it is only a hint that attn_mask is causal).

    Differences (attn's documented policy): a query whose keys are all masked gets output 0
    (out_proj's bias after the projection) and zero gradients where PyTorch gives NaN; the
    returned weights are taken before dropout; dropout (training
    mode) uses attn's counter-based generator seeded from torch's default generator.
    """

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True,
                attn_mask=None, average_attn_weights=True, is_causal=False):
        op = "[MultiheadAttention]"
        if query.dim() not in (2, 3):
            raise _error(f"{op} query must be 2-D (unbatched) or 3-D (batched), got "
                         f"{query.dim()}-D")
        batched = query.dim() == 3
        self_attention = query is key and key is value
        if key.dim() != query.dim() or value.dim() != query.dim():
            raise _error(f"{op} query, key and value must have the same number of dimensions, "
                         f"got {query.dim()}, {key.dim()} and {value.dim()}")
        # Batch-first layout inside: [N, L, E].
        if not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                if key_padding_mask.dim() != 1:
                    raise _error(f"{op} unbatched key_padding_mask must be 1-D, got "
                                 f"{key_padding_mask.dim()}-D")
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        N, L, E = query.shape
        S = key.shape[1]
        H = self.num_heads
        hd = self.head_dim
        if E != self.embed_dim:
            raise _error(f"{op} query has {E} features, embed_dim is {self.embed_dim}")
        if key.shape[:2] != value.shape[:2] or key.shape[0] != N:
            raise _error(f"{op} key {tuple(key.shape)} and value {tuple(value.shape)} must "
                         f"share batch and length with each other and the batch of query "
                         f"({N})")
        if key.shape[2] != self.kdim or value.shape[2] != self.vdim:
            raise _error(f"{op} key has {key.shape[2]} features and value {value.shape[2]}, "
                         f"expected kdim {self.kdim} and vdim {self.vdim}")

        # In-projections.
        b_q = b_k = b_v = None
        if self.in_proj_bias is not None:
            b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        if self._qkv_same_embed_dim:
            w_q, w_k, w_v = self.in_proj_weight.chunk(3)
            if self_attention:
                qkv = F.linear(query, self.in_proj_weight, self.in_proj_bias)
                q, k, v = qkv.chunk(3, dim=-1)
            else:
                q, k, v = F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), \
                    F.linear(value, w_v, b_v)
        else:
            q = F.linear(query, self.q_proj_weight, b_q)
            k = F.linear(key, self.k_proj_weight, b_k)
            v = F.linear(value, self.v_proj_weight, b_v)

        # Masks in attn's terms: allowed (True = may attend), bias (added), key_lengths.
        kpm = key_padding_mask
        if kpm is not None:
            if kpm.dtype == torch.uint8:
                kpm = kpm.to(torch.bool)
            if kpm.dtype != torch.bool and not kpm.is_floating_point():
                raise _error(f"{op} key_padding_mask must be bool or float, got {kpm.dtype}")
            if tuple(kpm.shape) != (N, S):
                raise _error(f"{op} key_padding_mask has shape {tuple(kpm.shape)}, expected "
                             f"{(N, S)}")
        am = attn_mask
        if am is not None:
            if am.dtype == torch.uint8:
                am = am.to(torch.bool)
            if am.dtype != torch.bool and not am.is_floating_point():
                raise _error(f"{op} attn_mask must be bool or float, got {am.dtype}")
            if am.dim() == 2:
                if tuple(am.shape) != (L, S):
                    raise _error(f"{op} the 2-D attn_mask has shape {tuple(am.shape)}, "
                                 f"expected {(L, S)}")
            elif am.dim() == 3:
                if tuple(am.shape) != (N * H, L, S):
                    raise _error(f"{op} the 3-D attn_mask has shape {tuple(am.shape)}, "
                                 f"expected {(N * H, L, S)}")
                am = am.reshape(N, H, L, S)
            else:
                raise _error(f"{op} attn_mask must be 2-D or 3-D, got {am.dim()}-D")

        extra = 0  # keys appended after the S given ones (bias_k / zero attention)
        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.expand(N, 1, E)], dim=1)
            v = torch.cat([v, self.bias_v.expand(N, 1, E)], dim=1)
            extra += 1
        # Contiguous [N, H, T, hd]: attn reads strided views in place, but its kernels run
        # about 25% faster (forward + backward, d 128, N 2048) on contiguous heads than the copy
        # costs.
        q = q.reshape(N, L, H, hd).transpose(1, 2).contiguous()
        k = k.reshape(N, k.shape[1], H, hd).transpose(1, 2).contiguous()
        v = v.reshape(N, v.shape[1], H, hd).transpose(1, 2).contiguous()
        if self.add_zero_attn:
            zeros = torch.zeros(N, H, 1, hd, dtype=k.dtype, device=k.device)
            k = torch.cat([k, zeros], dim=2)
            v = torch.cat([v, zeros], dim=2)
            extra += 1

        key_lengths = allowed = bias = None
        if kpm is not None:
            if kpm.dtype == torch.bool:
                keep = ~kpm
                lengths = keep.sum(dim=1)
                suffix = torch.arange(S, device=kpm.device).unsqueeze(0) < lengths.unsqueeze(1)
                if extra == 0 and bool(torch.equal(suffix, keep)):
                    key_lengths = lengths.tolist()  # padding at the end: attn's fast path
                else:
                    allowed = F.pad(keep, (0, extra), value=True).reshape(N, 1, 1, S + extra)
            else:
                bias = F.pad(kpm, (0, extra)).reshape(N, 1, 1, S + extra)
        if am is not None:
            if am.dtype == torch.bool:
                a = F.pad(~am, (0, extra), value=True)
                allowed = a if allowed is None else allowed & a
            else:
                a = F.pad(am, (0, extra))
                bias = a if bias is None else bias + a

        p = self.dropout if self.training else 0.0
        seed = int(torch.randint(0, 2 ** 62, (), dtype=torch.int64).item()) if p > 0 else 0
        res = attention(q, k, v, score="scaled_dot", causal=bool(is_causal),
                        key_lengths=key_lengths, allowed=allowed, bias=bias, dropout=float(p),
                        seed=seed, return_weights=bool(need_weights))
        out, weights = res if need_weights else (res, None)
        out = out.to(q.dtype).transpose(1, 2).reshape(N, L, E)
        out = F.linear(out, self.out_proj.weight, self.out_proj.bias)

        if not batched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        if weights is not None:
            weights = weights.to(q.dtype)
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not batched:
                weights = weights.squeeze(0)
        return out, weights


# ---------------------------------------------------------------------------------------------
# nn.Modules for the scoring functions.


def _uniform(shape, bound, factory) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, **factory).uniform_(-bound, bound))


def _as_4d(t: torch.Tensor, name: str) -> Tuple[torch.Tensor, int]:
    if t.dim() == 4:
        return t, 4
    if t.dim() == 3:
        return t.unsqueeze(1), 3
    if t.dim() == 2:
        return t.reshape(1, 1, *t.shape), 2
    raise _error(f"[attention] {name} must be 2-D [T, D], 3-D [B, T, D] or 4-D [B, H, T, D], "
                 f"got {t.dim()}-D")


class _ScoreAttention(nn.Module):
    """Base of the scoring modules: forward(q, k, v, return_weights=False, **masks).

    q [B, H, Tq, Dq], k [B, Hkv, Tk, Dk], v [B, Hkv, Tk, Dv]; 3-D [B, T, D] and 2-D [T, D]
    inputs are single-head (and the result has their rank). ``masks`` are the keyword
    arguments of :func:`attention` (causal, window, key_lengths, allowed, bias, local, dropout,
    seed, ...). Returns out, or (out, weights) with return_weights.
    """

    def score(self):  # pragma: no cover - overridden
        raise NotImplementedError

    def forward(self, q, k, v, return_weights=False, **masks):
        q4, rank = _as_4d(q, "q")
        k4, _ = _as_4d(k, "k")
        v4, _ = _as_4d(v, "v")
        res = attention(q4, k4, v4, score=self.score(), return_weights=return_weights, **masks)
        out, weights = res if return_weights else (res, None)
        if rank == 3:
            out = out.squeeze(1)
            weights = weights.squeeze(1) if weights is not None else None
        elif rank == 2:
            out = out[0, 0]
            weights = weights[0, 0] if weights is not None else None
        return (out, weights) if return_weights else out


class DotAttention(_ScoreAttention):
    """s = q . k, or scale * q . k with ``scaled`` (scale = 1/sqrt(D) unless given)."""

    def __init__(self, scaled: bool = True, scale: Optional[float] = None):
        super().__init__()
        self.scaled = scaled
        self.scale = scale

    def score(self):
        if not self.scaled:
            return _attn.DotScore()
        return _attn.ScaledDotScore(scale=self.scale)

    def extra_repr(self):
        return f"scaled={self.scaled}, scale={self.scale}"


class GeneralAttention(_ScoreAttention):
    """Luong "general" (bilinear): s = q^T W k, W [query_dim, key_dim]; or low rank
    W = u^T v with u [rank, query_dim], v [rank, key_dim]."""

    def __init__(self, query_dim: int, key_dim: int, rank: Optional[int] = None, device=None,
                 dtype=None):
        super().__init__()
        f = {"device": device, "dtype": dtype}
        self.query_dim, self.key_dim, self.rank = query_dim, key_dim, rank
        if rank is None:
            self.weight = _uniform((query_dim, key_dim), math.sqrt(6 / (query_dim + key_dim)), f)
            self.u = self.v = None
        else:
            self.weight = None
            self.u = _uniform((rank, query_dim), 1 / math.sqrt(query_dim), f)
            self.v = _uniform((rank, key_dim), 1 / math.sqrt(key_dim), f)

    def score(self):
        if self.rank is None:
            return _attn.GeneralScore(weight=self.weight)
        return _attn.GeneralScore(u=self.u, v=self.v)

    def extra_repr(self):
        return f"query_dim={self.query_dim}, key_dim={self.key_dim}, rank={self.rank}"


class AdditiveAttention(_ScoreAttention):
    """Bahdanau: s = v . tanh(W_q q + W_k k + b); w_query [hidden, query_dim],
    w_key [hidden, key_dim], v [hidden], bias [hidden] (with ``bias``)."""

    def __init__(self, query_dim: int, key_dim: int, hidden: int, bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        f = {"device": device, "dtype": dtype}
        self.query_dim, self.key_dim, self.hidden = query_dim, key_dim, hidden
        self.w_query = _uniform((hidden, query_dim), 1 / math.sqrt(query_dim), f)
        self.w_key = _uniform((hidden, key_dim), 1 / math.sqrt(key_dim), f)
        self.v = _uniform((hidden,), 1 / math.sqrt(hidden), f)
        self.bias = nn.Parameter(torch.zeros(hidden, **f)) if bias else None

    def score(self):
        return _attn.AdditiveScore(self.w_query, self.w_key, self.v, bias=self.bias)

    def extra_repr(self):
        return (f"query_dim={self.query_dim}, key_dim={self.key_dim}, hidden={self.hidden}, "
                f"bias={self.bias is not None}")


class ConcatAttention(_ScoreAttention):
    """Luong "concat": s = v . tanh(W [q; k]); weight [hidden, query_dim + key_dim],
    v [hidden]."""

    def __init__(self, query_dim: int, key_dim: int, hidden: int, device=None, dtype=None):
        super().__init__()
        f = {"device": device, "dtype": dtype}
        self.query_dim, self.key_dim, self.hidden = query_dim, key_dim, hidden
        self.weight = _uniform((hidden, query_dim + key_dim), 1 / math.sqrt(query_dim + key_dim),
                               f)
        self.v = _uniform((hidden,), 1 / math.sqrt(hidden), f)

    def score(self):
        return _attn.ConcatScore(self.weight, self.v)

    def extra_repr(self):
        return f"query_dim={self.query_dim}, key_dim={self.key_dim}, hidden={self.hidden}"


class CosineAttention(_ScoreAttention):
    """s = tau * cos(q, k) with a learnable temperature tau [1] (initialised to ``tau``)."""

    def __init__(self, tau: float = 10.0, eps: float = 1e-8, learnable: bool = True,
                 device=None, dtype=None):
        super().__init__()
        t = torch.full((1,), float(tau), device=device, dtype=dtype)
        if learnable:
            self.tau = nn.Parameter(t)
        else:
            self.register_buffer("tau", t)
        self.eps = eps

    def score(self):
        return _attn.CosineScore(self.tau, eps=self.eps)

    def extra_repr(self):
        return f"eps={self.eps}"


class LocationAttention(_ScoreAttention):
    """Luong "location": s_j = (W q)_j, independent of the keys; weight [max_keys, query_dim]
    (Tk <= max_keys)."""

    def __init__(self, query_dim: int, max_keys: int, device=None, dtype=None):
        super().__init__()
        f = {"device": device, "dtype": dtype}
        self.query_dim, self.max_keys = query_dim, max_keys
        self.weight = _uniform((max_keys, query_dim), 1 / math.sqrt(query_dim), f)

    def score(self):
        return _attn.LocationScore(self.weight)

    def extra_repr(self):
        return f"query_dim={self.query_dim}, max_keys={self.max_keys}"


class TrilinearAttention(_ScoreAttention):
    """BiDAF / QANet: s = w . [q; k; q * k]; weight [3 dim]."""

    def __init__(self, dim: int, device=None, dtype=None):
        super().__init__()
        f = {"device": device, "dtype": dtype}
        self.dim = dim
        self.weight = _uniform((3 * dim,), 1 / math.sqrt(3 * dim), f)

    def score(self):
        return _attn.TrilinearScore(self.weight)

    def extra_repr(self):
        return f"dim={self.dim}"
