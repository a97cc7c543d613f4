"""Shared set-up of the Python tests: float64 references written with NumPy, finite differences,
and comparisons that report the worst element."""

from __future__ import annotations

import numpy as np

U32 = np.finfo(np.float32).eps / 2  # unit roundoff of float32
U64 = np.finfo(np.float64).eps / 2


def gamma(n: int, u: float) -> float:
    """gamma_n = n u / (1 - n u): the worst-case relative error of an n-term sum (Higham)."""
    return n * u / (1 - n * u)


def assert_close(actual, expected, tol, what=""):
    """Elementwise |actual - expected| <= tol (tol a scalar or an array broadcast to the shape);
    the failure names the worst element."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    if actual.size == 0:
        return
    err = np.abs(actual - expected)
    excess = err - np.broadcast_to(tol, err.shape)
    worst = np.unravel_index(np.argmax(excess), err.shape)
    assert excess[worst] <= 0, (
        f"{what}: worst element {tuple(int(i) for i in worst)}: {actual[worst]!r} vs "
        f"{expected[worst]!r}, error {err[worst]:.3e} > bound "
        f"{np.broadcast_to(tol, err.shape)[worst]:.3e}")


def scores(q, k, score):
    """Raw scores [B, Hq, Tq, Tk] of a score object in float64 (q [B,Hq,Tq,D], k [B,Hq,Tk,D],
    k already repeated to the query heads)."""
    kind = getattr(score, "kind", score)
    if kind == "dot":
        return q @ np.swapaxes(k, -1, -2)
    if kind == "scaled_dot":
        scale = getattr(score, "scale", None)
        scale = 1 / np.sqrt(k.shape[-1]) if scale is None else scale
        return scale * (q @ np.swapaxes(k, -1, -2))
    if kind == "general":
        w = score.weight if score.weight is not None else score.u.T @ score.v
        return q @ w @ np.swapaxes(k, -1, -2)
    if kind == "additive":
        hq = q @ score.w_query.T  # [B,H,Tq,A]
        hk = k @ score.w_key.T    # [B,H,Tk,A]
        pre = hq[..., :, None, :] + hk[..., None, :, :]
        if score.bias is not None:
            pre = pre + score.bias
        return np.tanh(pre) @ score.v
    if kind == "concat":
        dq = q.shape[-1]
        hq = q @ score.weight[:, :dq].T
        hk = k @ score.weight[:, dq:].T
        return np.tanh(hq[..., :, None, :] + hk[..., None, :, :]) @ score.v
    if kind == "cosine":
        nq = np.maximum(np.linalg.norm(q, axis=-1), score.eps)
        nk = np.maximum(np.linalg.norm(k, axis=-1), score.eps)
        return score.tau[0] * (q @ np.swapaxes(k, -1, -2)) / (nq[..., :, None] * nk[..., None, :])
    if kind == "location":
        tk = k.shape[-2]
        return (q @ score.weight.T)[..., :tk]
    if kind == "trilinear":
        d = q.shape[-1]
        w1, w2, w3 = score.weight[:d], score.weight[d:2 * d], score.weight[2 * d:]
        return ((q @ w1)[..., :, None] + (k @ w2)[..., None, :] +
                (q * w3) @ np.swapaxes(k, -1, -2))
    raise ValueError(kind)


def attention(q, k, v, score="scaled_dot", causal=False, key_lengths=None, query_lengths=None,
              allowed=None, bias=None, window=None, alignment="top_left"):
    """softmax(scores + masks) v in float64 with attn's conventions (True = may attend; fully
    masked rows give 0). Returns (out, weights)."""
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    B, Hq, Tq, _ = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    k = np.repeat(k, Hq // Hkv, axis=1)
    v = np.repeat(v, Hq // Hkv, axis=1)
    s = scores(q, k, score)
    ok = np.ones((B, Hq, Tq, Tk), dtype=bool)
    klen = np.full(B, Tk) if key_lengths is None else np.asarray(key_lengths)
    qlen = np.full(B, Tq) if query_lengths is None else np.asarray(query_lengths)
    j = np.arange(Tk)
    for b in range(B):
        ok[b, :, :, klen[b]:] = False
        ok[b, :, qlen[b]:, :] = False
        pos = np.arange(Tq) + (klen[b] - qlen[b] if alignment == "bottom_right" else 0)
        if causal:
            ok[b] &= (j[None, :] <= pos[:, None])[None]
        if window is not None:
            left = np.inf if window[0] is None else window[0]
            right = np.inf if window[1] is None else window[1]
            ok[b] &= ((j[None, :] >= pos[:, None] - left) &
                      (j[None, :] <= pos[:, None] + right))[None]
    if allowed is not None:
        ok &= np.broadcast_to(np.asarray(allowed), ok.shape)
    if bias is not None:
        s = s + np.asarray(bias, dtype=np.float64)
    s = np.where(ok, s, -np.inf)
    m = np.max(s, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0)
    e = np.where(ok, np.exp(s - m), 0)
    z = e.sum(-1, keepdims=True)
    p = np.divide(e, z, out=np.zeros_like(e), where=z > 0)
    return p @ v, p


def numeric_gradient(f, x, eps=1e-6):
    """Central differences of the scalar f() with respect to every element of x (modified in
    place and restored)."""
    g = np.zeros_like(x, dtype=np.float64)
    for idx in np.ndindex(x.shape):
        old = x[idx]
        x[idx] = old + eps
        hi = f()
        x[idx] = old - eps
        lo = f()
        x[idx] = old
        g[idx] = (hi - lo) / (2 * eps)
    return g
