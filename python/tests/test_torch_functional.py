"""attn.torch.attention and attn.torch.scaled_dot_product_attention against a float64 reference
written with torch ops in this file (materialised scores, masked softmax, weights @ v), and
torch.autograd.gradcheck of every autograd path.

Tolerances: a float64 result must be within 16 eps64 sqrt(n) times its magnitude (n = Tk + D, the
longest sum; magnitude = max|v| (1 + max|score|) for outputs, max|expected| (1 + max|score|) for
gradients); a float32 result within that bound at eps32 or 4x the error of the same computation
done by plain float32 torch ops, whichever is larger. Failures name the worst element.
"""

import math

import pytest

torch = pytest.importorskip("torch")

import attn  # noqa: E402
import attn.torch as at  # noqa: E402

F64 = torch.float64
F32 = torch.float32


# ---------------------------------------------------------------------------------------------
# The reference, in torch ops.


def ref_scores(score, q, k):
    """s [B, H, Tq, Tk] for q [B, H, Tq, Dq], k [B, H, Tk, Dk] (key heads already repeated)."""
    if isinstance(score, str):
        score = {"dot": attn.DotScore(), "scaled_dot": attn.ScaledDotScore()}[score]
    Dq, Dk, Tk = q.shape[-1], k.shape[-1], k.shape[-2]
    kt = k.transpose(-2, -1)
    if isinstance(score, attn.DotScore):
        return q @ kt
    if isinstance(score, attn.ScaledDotScore):
        scale = score.scale if score.scale is not None else 1.0 / math.sqrt(Dk)
        return scale * (q @ kt)
    if isinstance(score, attn.GeneralScore):
        if score.weight is not None:
            return q @ score.weight.to(q.dtype) @ kt
        u, v = score.u.to(q.dtype), score.v.to(q.dtype)
        return (q @ u.T) @ (k @ v.T).transpose(-2, -1)
    if isinstance(score, attn.AdditiveScore):
        h = (q @ score.w_query.to(q.dtype).T).unsqueeze(-2) + \
            (k @ score.w_key.to(q.dtype).T).unsqueeze(-3)
        if score.bias is not None:
            h = h + score.bias.to(q.dtype)
        return torch.tanh(h) @ score.v.to(q.dtype)
    if isinstance(score, attn.ConcatScore):
        w = score.weight.to(q.dtype)
        h = (q @ w[:, :Dq].T).unsqueeze(-2) + (k @ w[:, Dq:].T).unsqueeze(-3)
        return torch.tanh(h) @ score.v.to(q.dtype)
    if isinstance(score, attn.CosineScore):
        nq = q.norm(dim=-1).clamp_min(score.eps).unsqueeze(-1)
        nk = k.norm(dim=-1).clamp_min(score.eps).unsqueeze(-2)
        return score.tau.to(q.dtype) * (q @ kt) / (nq * nk)
    if isinstance(score, attn.LocationScore):
        return (q @ score.weight.to(q.dtype).T)[..., :Tk]
    if isinstance(score, attn.TrilinearScore):
        w1, w2, w3 = score.weight.to(q.dtype).split(Dq)
        return (q @ w1).unsqueeze(-1) + (k @ w2).unsqueeze(-2) + (q * w3) @ kt
    raise TypeError(type(score))


def ref_attention(q, k, v, *, score="scaled_dot", head_scores=None, causal=False,
                  alignment="top_left", window=None, key_lengths=None, query_lengths=None,
                  allowed=None, bias=None, alibi_slopes=None, local=None, dropout=0.0,
                  keep=None):
    """(out, weights, lse, scores) of attention in q's dtype, every step a torch op, so autograd
    gives the reference gradients. keep: a 0/1 dropout mask [B, Hq, Tq, Tk]."""
    B, Hq, Tq, _ = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    kr = k.repeat_interleave(Hq // Hkv, dim=1)
    vr = v.repeat_interleave(Hq // Hkv, dim=1)
    if head_scores is not None:
        s = torch.cat([ref_scores(hs, q[:, h:h + 1], kr[:, h:h + 1])
                       for h, hs in enumerate(head_scores)], dim=1)
    else:
        s = ref_scores(score, q, kr)
    klen = torch.tensor(list(key_lengths) if key_lengths is not None else [Tk] * B)
    qlen = torch.tensor(list(query_lengths) if query_lengths is not None else [Tq] * B)
    klen, qlen = klen.view(B, 1, 1, 1), qlen.view(B, 1, 1, 1)
    i = torch.arange(Tq).view(1, 1, Tq, 1)
    j = torch.arange(Tk).view(1, 1, 1, Tk)
    pos = i + (klen - qlen) if alignment == "bottom_right" else i.expand(B, 1, Tq, 1)
    vis = (j < klen) & (i < qlen)
    if causal:
        vis = vis & (j <= pos)
    if window is not None:
        left, right = window
        if left is not None:
            vis = vis & (j - pos >= -left)
        if right is not None:
            vis = vis & (j - pos <= right)
    if allowed is not None:
        vis = vis & allowed
    if bias is not None:
        s = s + bias.to(s.dtype)
    if alibi_slopes is not None:
        slopes = torch.tensor(alibi_slopes, dtype=s.dtype).view(1, Hq, 1, 1)
        s = s - slopes * (pos - j).abs().to(s.dtype)
    gauss = None
    if local is not None:
        if local.kind == "monotonic":
            vis = vis & ((j - pos).abs() <= local.half_width)
        else:
            z = torch.tanh(q @ local.w_p.to(q.dtype).T) @ local.v_p.to(q.dtype)  # [B, Hq, Tq]
            p = (klen.view(B, 1, 1).to(q.dtype) * torch.sigmoid(z)).unsqueeze(-1)
            vis = vis & ~((j.to(q.dtype) - p).abs() > local.half_width)
            sigma = local.half_width / 2.0
            gauss = torch.exp(-(j.to(q.dtype) - p) ** 2 / (2 * sigma * sigma))
    vis = vis.expand(B, Hq, Tq, Tk)
    sm = s.masked_fill(~vis, -math.inf)
    m = sm.amax(dim=-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.where(vis, torch.exp(sm - m), torch.zeros_like(sm))
    total = e.sum(dim=-1, keepdim=True)
    a = e / torch.where(total > 0, total, torch.ones_like(total))
    lse = torch.where(total[..., 0] > 0, m[..., 0] + torch.log(total[..., 0]),
                      torch.full_like(total[..., 0], -math.inf))
    w = a if gauss is None else a * gauss
    P = w if keep is None else w * keep / (1.0 - dropout)
    return P @ vr, w, lse, s.masked_fill(~vis, 0.0)


# ---------------------------------------------------------------------------------------------
# Helpers.


def randn(*shape, dtype=F64, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=F64) * scale).to(dtype)


def assert_close(actual, expected, *, n, mag, what, same_dtype=None, computed_in=None):
    """|actual - expected| <= 16 eps sqrt(n) mag elementwise (eps of actual's dtype, or of
    computed_in), or 4x the error of `same_dtype` (the same computation in plain torch ops at
    actual's precision)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != " \
                                           f"{tuple(expected.shape)}"
    a, e = actual.detach().to(F64), expected.detach().to(F64)
    dtype = computed_in or actual.dtype
    dtype = F32 if dtype == torch.bfloat16 else dtype
    bound = 16 * torch.finfo(dtype).eps * math.sqrt(n) * float(mag)
    if same_dtype is not None:
        bound = max(bound, 4 * float((same_dtype.detach().to(F64) - e).abs().max()))
    both_nan = torch.isnan(a) & torch.isnan(e)
    diff = torch.where(both_nan, torch.zeros_like(a), (a - e).abs())
    diff = torch.where(torch.isnan(diff), torch.full_like(diff, math.inf), diff)
    if diff.numel() == 0:
        return
    worst = int(diff.argmax())
    idx = tuple(int(x) for x in torch.unravel_index(torch.tensor(worst), diff.shape)) \
        if hasattr(torch, "unravel_index") else worst
    assert float(diff.max()) <= bound, (
        f"{what}: worst element {idx}: got {a.reshape(-1)[worst].item():.17g}, expected "
        f"{e.reshape(-1)[worst].item():.17g}, |diff| {float(diff.max()):.3g} > bound {bound:.3g}")


def make_score(kind, Dq, Dk, dtype=F64, seed=1, requires_grad=False):
    """A score object of `kind` whose parameters are torch tensors."""
    A, r = 5, 3

    def p(*shape, scale=0.5, offset=0):
        t = randn(*shape, dtype=dtype, seed=seed + offset, scale=scale)
        return t.requires_grad_(requires_grad)

    if kind == "dot":
        return attn.DotScore()
    if kind == "scaled_dot":
        return attn.ScaledDotScore()
    if kind == "scaled_dot_custom":
        return attn.ScaledDotScore(scale=0.3)
    if kind == "general":
        return attn.GeneralScore(weight=p(Dq, Dk, scale=1 / math.sqrt(Dq)))
    if kind == "general_lowrank":
        return attn.GeneralScore(u=p(r, Dq, offset=1), v=p(r, Dk, offset=2))
    if kind == "additive":
        return attn.AdditiveScore(p(A, Dq, offset=3), p(A, Dk, offset=4), p(A, offset=5),
                                  bias=p(A, offset=6))
    if kind == "additive_nobias":
        return attn.AdditiveScore(p(A, Dq, offset=3), p(A, Dk, offset=4), p(A, offset=5))
    if kind == "concat":
        return attn.ConcatScore(p(A, Dq + Dk, offset=7), p(A, offset=8))
    if kind == "cosine":
        return attn.CosineScore(torch.tensor([3.0], dtype=dtype).requires_grad_(requires_grad))
    if kind == "location":
        return attn.LocationScore(p(9, Dq, offset=9))
    if kind == "trilinear":
        return attn.TrilinearScore(p(3 * Dq, offset=10))
    raise ValueError(kind)


SCORES = ["dot", "scaled_dot", "scaled_dot_custom", "general", "general_lowrank", "additive",
          "additive_nobias", "concat", "cosine", "location", "trilinear"]
SAME_D = {"dot", "scaled_dot", "scaled_dot_custom", "cosine", "trilinear"}


def score_params(score):
    if isinstance(score, str):
        return []
    return [t for t in score.tensors().values() if isinstance(t, torch.Tensor)]


def with_dtype(score, dtype):
    """The score with its tensors converted (e.g. to float32) as new leaves."""
    if isinstance(score, str) or not score.tensors():
        return score
    import dataclasses
    return dataclasses.replace(score, **{n: t.detach().to(dtype).requires_grad_(t.requires_grad)
                                         for n, t in score.tensors().items()})


def check_against_reference(q, k, v, what, dout_seed=7, **kw):
    """Forward (out, weights) and backward (q, k, v, bias, score and local parameters) of
    attn.torch.attention against ref_attention in float64 via torch autograd."""
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    leaves = [q, k, v]
    for name in ("bias",):
        if isinstance(kw.get(name), torch.Tensor) and kw[name].requires_grad:
            leaves.append(kw[name])
    for s in [kw.get("score")] + list(kw.get("head_scores") or []):
        if s is not None:
            leaves += [t for t in score_params(s) if t.requires_grad]
    local = kw.get("local")
    if local is not None and local.w_p is not None:
        leaves += [t for t in (local.w_p, local.v_p) if t.requires_grad]

    out, weights = at.attention(q, k, v, return_weights=True, **kw)
    ref_kw = {n: x for n, x in kw.items() if n not in ("seed",)}
    rout, rw, _, rs = ref_attention(*(t.to(F64) for t in (q, k, v)), **ref_kw)
    D = max(q.shape[-1], v.shape[-1])
    n = k.shape[2] + D
    smax = 1.0 + float(rs.abs().max()) if rs.numel() else 1.0
    mag_out = float(v.detach().abs().max()) * smax
    same = None
    if q.dtype == F32:
        same = ref_attention(q.detach(), k.detach(), v.detach(),
                             **{n_: (with_dtype(x, F32) if n_ == "score" else x)
                                for n_, x in ref_kw.items()})[0]
    assert out.dtype == (F32 if q.dtype == torch.bfloat16 else q.dtype)
    assert_close(out, rout, n=n, mag=mag_out, what=f"{what}: out", same_dtype=same)
    assert_close(weights, rw, n=n, mag=smax, what=f"{what}: weights")

    dout = randn(*out.shape, dtype=out.dtype, seed=dout_seed)
    got = torch.autograd.grad(out, leaves, dout, allow_unused=True)
    want = torch.autograd.grad(rout, leaves, dout.to(F64), allow_unused=True)
    names = ["dq", "dk", "dv"] + [f"param{i}" for i in range(len(leaves) - 3)]
    for name, g, w, leaf in zip(names, got, want, leaves):
        if w is None:
            w = torch.zeros_like(leaf, dtype=F64)
        assert g is not None, f"{what}: no gradient for {name}"
        assert g.dtype == leaf.dtype and g.shape == leaf.shape, f"{what}: {name} dtype/shape"
        mag = (1.0 + float(w.abs().max())) * smax * float(dout.abs().max()) * \
            max(1.0, float(v.detach().abs().max()))
        assert_close(g, w, n=n * max(1, q.shape[2]), mag=mag, what=f"{what}: {name}",
                     computed_in=q.dtype)
    return out


# ---------------------------------------------------------------------------------------------
# Scoring functions.


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("kind", SCORES)
def test_score_against_torch_reference(kind, dtype):
    Dq = 6
    Dk = Dq if kind in SAME_D else 5
    q = randn(2, 3, 5, Dq, dtype=dtype, seed=1)
    k = randn(2, 3, 7, Dk, dtype=dtype, seed=2)
    v = randn(2, 3, 7, 4, dtype=dtype, seed=3)
    score = make_score(kind, Dq, Dk, dtype=dtype, requires_grad=True)
    check_against_reference(q, k, v, f"{kind} {dtype}", score=score)


def test_score_strings_and_head_scores():
    q, k, v = randn(1, 2, 4, 6, seed=1), randn(1, 2, 5, 6, seed=2), randn(1, 2, 5, 3, seed=3)
    check_against_reference(q, k, v, "dot string", score="dot")
    heads = [make_score("additive", 6, 6, requires_grad=True, seed=4),
             make_score("general", 6, 6, requires_grad=True, seed=5)]
    check_against_reference(q, k, v, "head_scores", head_scores=heads)


# ---------------------------------------------------------------------------------------------
# Masks.


def mask_cases():
    B, H, Tq, Tk = 2, 4, 5, 7
    allowed = randn(B, 1, Tq, Tk, seed=11) > -0.5
    allowed[..., 0] = True
    bias_full = randn(B, H, Tq, Tk, seed=12).requires_grad_(True)
    bias_bcast = randn(1, H, 1, Tk, seed=13).requires_grad_(True)
    w_p = randn(3, 6, seed=14, scale=0.5).requires_grad_(True)
    v_p = randn(3, seed=15).requires_grad_(True)
    return {
        "causal": dict(causal=True),
        "causal_bottom_right": dict(causal=True, alignment="bottom_right"),
        "window": dict(window=(1, 2)),
        "window_left_only": dict(window=(2, None), causal=True),
        "window_right_only": dict(window=(None, 1)),
        "key_lengths": dict(key_lengths=[7, 3]),
        "key_lengths_tensor": dict(key_lengths=torch.tensor([4, 6])),
        "query_lengths": dict(query_lengths=[5, 2], key_lengths=[6, 7],
                              alignment="bottom_right", causal=True),
        "allowed": dict(allowed=allowed),
        "bias_full": dict(bias=bias_full),
        "bias_broadcast": dict(bias=bias_bcast),
        "alibi": dict(alibi_slopes=attn.alibi_slopes(H), causal=True),
        "local_m": dict(local=attn.LocalAttention("monotonic", 1)),
        "local_p": dict(local=attn.LocalAttention("predictive", 2, w_p=w_p, v_p=v_p),
                        key_lengths=[7, 5]),
        "everything": dict(causal=True, window=(3, None), key_lengths=[6, 7], allowed=allowed,
                           bias=bias_bcast, alibi_slopes=[0.5, 0.25, 0.1, 0.0]),
    }


@pytest.mark.parametrize("gqa", [False, True], ids=["mha", "gqa"])
@pytest.mark.parametrize("case", list(mask_cases()))
def test_mask_against_torch_reference(case, gqa):
    kw = mask_cases()[case]
    Hkv = 2 if gqa else 4
    q = randn(2, 4, 5, 6, seed=21)
    k = randn(2, Hkv, 7, 6, seed=22)
    v = randn(2, Hkv, 7, 3, seed=23)
    check_against_reference(q, k, v, case, **kw)


@pytest.mark.parametrize("case", ["causal", "key_lengths", "allowed", "bias_broadcast",
                                  "local_p", "everything"])
def test_mask_float32(case):
    kw = mask_cases()[case]
    q, k, v = randn(2, 4, 5, 6, dtype=F32, seed=24), randn(2, 2, 7, 6, dtype=F32, seed=25), \
        randn(2, 2, 7, 3, dtype=F32, seed=26)
    check_against_reference(q, k, v, f"{case} f32", **kw)


def test_fully_masked_rows_give_zero_and_zero_gradients():
    q = randn(2, 2, 4, 3, seed=31).requires_grad_(True)
    k = randn(2, 2, 5, 3, seed=32).requires_grad_(True)
    v = randn(2, 2, 5, 3, seed=33).requires_grad_(True)
    allowed = torch.ones(1, 1, 4, 5, dtype=torch.bool)
    allowed[..., 1, :] = False  # query row 1 sees nothing
    out = at.attention(q, k, v, allowed=allowed, key_lengths=[5, 0])  # batch 1: no keys at all
    assert torch.equal(out[:, :, 1], torch.zeros_like(out[:, :, 1]))
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert torch.equal(q.grad[1], torch.zeros_like(q.grad[1]))
    assert torch.equal(q.grad[:, :, 1], torch.zeros_like(q.grad[:, :, 1]))
    assert torch.equal(k.grad[1], torch.zeros_like(k.grad[1]))
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()


# ---------------------------------------------------------------------------------------------
# Dropout.


def test_dropout_reproducible_and_applied_to_the_weights():
    B, H, Tq, Tk, p = 2, 2, 6, 8, 0.4
    q, k = randn(B, H, Tq, 4, seed=41), randn(B, H, Tk, 4, seed=42)
    eye = torch.eye(Tk, dtype=F64).expand(B, H, Tk, Tk)  # out = dropped weights
    out1, w = at.attention(q, k, eye, dropout=p, seed=5, return_weights=True)
    out2 = at.attention(q, k, eye, dropout=p, seed=5)
    out3 = at.attention(q, k, eye, dropout=p, seed=6)
    assert torch.equal(out1, out2), "same seed must give the same output"
    assert not torch.equal(out1, out3), "another seed must give another mask"
    # Each element is either 0 (dropped) or weight / (1 - p) (kept).
    scaled = w / (1 - p)
    kept = (out1 - scaled).abs() <= 1e-14 * scaled.abs().clamp_min(1)
    dropped = out1 == 0
    assert bool((kept | dropped).all()), "dropout output is neither 0 nor w / (1 - p)"
    frac = float(dropped.double().mean())
    assert 0.15 < frac < 0.65, f"dropped fraction {frac} for p = {p}"

    # The backward regenerates the same mask: compare with the reference given that mask.
    keep = kept.double()
    v = randn(B, H, Tk, 3, seed=43)
    q_, k_, v_ = (t.clone().requires_grad_(True) for t in (q, k, v))
    out = at.attention(q_, k_, v_, dropout=p, seed=5)
    rout = ref_attention(q_, k_, v_, dropout=p, keep=keep)[0]
    assert_close(out, rout, n=Tk + 4, mag=float(v.abs().max()) * 10, what="dropout out")
    dout = randn(*out.shape, seed=44)
    got = torch.autograd.grad(out, (q_, k_, v_), dout)
    want = torch.autograd.grad(rout, (q_, k_, v_), dout)
    for name, g, w_ in zip(("dq", "dk", "dv"), got, want):
        assert_close(g, w_, n=(Tk + 4) * Tq, mag=10 * (1 + float(w_.abs().max())),
                     what=f"dropout {name}")


# ---------------------------------------------------------------------------------------------
# gradcheck (float64).


def gradcheck(fn, inputs, what):
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5,
                                    nondet_tol=1e-12), what


@pytest.mark.parametrize("kind", SCORES)
def test_gradcheck_scores(kind):
    Dq = 3
    Dk = Dq if kind in SAME_D else 4
    q = randn(1, 2, 3, Dq, seed=51).requires_grad_(True)
    k = randn(1, 2, 4, Dk, seed=52).requires_grad_(True)
    v = randn(1, 2, 4, 2, seed=53).requires_grad_(True)
    score = make_score(kind, Dq, Dk, requires_grad=True, seed=54)
    names = list(score.tensors()) if not isinstance(score, str) else []
    params = [score.tensors()[n] for n in names]
    import dataclasses

    def fn(q, k, v, *ps):
        s = dataclasses.replace(score, **dict(zip(names, ps))) if names else score
        return at.attention(q, k, v, score=s, causal=True)

    gradcheck(fn, (q, k, v, *params), kind)


@pytest.mark.parametrize("case", ["bias_full", "bias_broadcast", "local_p", "everything",
                                  "query_lengths", "alibi", "window"])
def test_gradcheck_masks(case):
    kw = dict(mask_cases()[case])
    q = randn(2, 4, 5, 6, seed=61, scale=0.7).requires_grad_(True)
    k = randn(2, 2, 7, 6, seed=62, scale=0.7).requires_grad_(True)
    v = randn(2, 2, 7, 2, seed=63).requires_grad_(True)
    if case == "local_p":
        # Wide window: every key inside |j - p| <= D, so the window edge (a step) is not hit.
        w_p, v_p = kw["local"].w_p, kw["local"].v_p
        kw["local"] = attn.LocalAttention("predictive", 8, w_p=w_p, v_p=v_p)
        extra = [w_p, v_p]

        def fn(q, k, v, w_p, v_p):
            return at.attention(q, k, v, **{**kw, "local": attn.LocalAttention(
                "predictive", 8, w_p=w_p, v_p=v_p)})
    elif "bias" in kw:
        extra = [kw.pop("bias")]

        def fn(q, k, v, bias):
            return at.attention(q, k, v, bias=bias, **kw)
    else:
        extra = []

        def fn(q, k, v):
            return at.attention(q, k, v, **kw)
    gradcheck(fn, (q, k, v, *extra), case)


def test_gradcheck_dropout_gqa():
    q = randn(1, 4, 3, 3, seed=71).requires_grad_(True)
    k = randn(1, 2, 4, 3, seed=72).requires_grad_(True)
    v = randn(1, 2, 4, 2, seed=73).requires_grad_(True)
    gradcheck(lambda q, k, v: at.attention(q, k, v, dropout=0.3, seed=9), (q, k, v),
              "dropout")


def test_weights_are_returned_and_differentiable_for_dot_scores():
    q = randn(1, 2, 3, 4, seed=81).requires_grad_(True)
    k, v = randn(1, 2, 5, 4, seed=82), randn(1, 2, 5, 4, seed=83)
    out, w = at.attention(q, k, v, return_weights=True)
    assert out.requires_grad and w.requires_grad and w.shape == (1, 2, 3, 5)
    assert_close(w.sum(-1), torch.ones(1, 2, 3, dtype=F64), n=5, mag=1, what="weights sum")
    # Other scores: the weights are constants.
    out, w = at.attention(q, k, v, score=make_score("additive", 4, 4, requires_grad=True),
                          return_weights=True)
    assert out.requires_grad and not w.requires_grad


@pytest.mark.parametrize("score", ["dot", "scaled_dot", "scaled_dot_custom"])
def test_weights_gradient_against_reference(score):
    """A loss on the weights and the output: gradients of q, k, v and the bias, GQA, masks."""
    q = randn(2, 4, 5, 6, seed=84).requires_grad_(True)
    k = randn(2, 2, 7, 6, seed=85).requires_grad_(True)
    v = randn(2, 2, 7, 3, seed=86).requires_grad_(True)
    bias = randn(1, 4, 1, 7, seed=87).requires_grad_(True)
    kw = dict(score=make_score(score, 6, 6), causal=True, key_lengths=[7, 4],
              alibi_slopes=[0.5, 0.2, 0.1, 0.0])
    out, w = at.attention(q, k, v, bias=bias, return_weights=True, dropout=0.3, seed=2, **kw)
    rw = ref_attention(q, k, v, bias=bias, **kw)[1]
    R = randn(*w.shape, seed=88)
    loss = (w * R).sum() + out.sum() * 0
    got = torch.autograd.grad(loss, (q, k, v, bias), allow_unused=True)
    want = torch.autograd.grad((rw * R).sum(), (q, k, v, bias), allow_unused=True)
    for name, g, w_, leaf in zip(("dq", "dk", "dv", "dbias"), got, want, (q, k, v, bias)):
        w_ = torch.zeros_like(leaf) if w_ is None else w_
        g = torch.zeros_like(leaf) if g is None else g
        assert_close(g, w_, n=13 * 5, mag=16 * (1 + float(w_.abs().max())),
                     what=f"weights gradient {name}")
    gradcheck(lambda q, k, b: at.attention(q, k, v, bias=b, return_weights=True, **kw),
              (q, k, bias), f"weights {score}")


# ---------------------------------------------------------------------------------------------
# scaled_dot_product_attention.


def ref_sdpa(query, key, value, attn_mask=None, is_causal=False, scale=None):
    """PyTorch 2.x's documented math, in torch ops (NaN for fully masked rows, like PyTorch)."""
    L, S = query.shape[-2], key.shape[-2]
    scale = 1 / math.sqrt(query.shape[-1]) if scale is None else scale
    s = query @ key.transpose(-2, -1) * scale
    if is_causal:
        s = s.masked_fill(~torch.ones(L, S, dtype=torch.bool).tril(), -math.inf)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            s = s.masked_fill(~attn_mask, -math.inf)
        else:
            s = s + attn_mask
    return torch.softmax(s, dim=-1) @ value


SDPA_CASES = {
    "3d": dict(q=(3, 5, 4), k=(3, 6, 4), v=(3, 6, 2)),
    "4d_causal": dict(q=(2, 3, 5, 4), k=(2, 3, 5, 4), v=(2, 3, 5, 4), is_causal=True),
    "4d_causal_rect": dict(q=(2, 3, 4, 4), k=(2, 3, 6, 4), v=(2, 3, 6, 3), is_causal=True),
    "2d_scale": dict(q=(5, 4), k=(6, 4), v=(6, 3), scale=0.7),
    "5d_bool_mask": dict(q=(2, 2, 3, 4, 4), k=(2, 2, 3, 6, 4), v=(2, 2, 3, 6, 2),
                         mask=("bool", (2, 1, 1, 4, 6))),
    "4d_float_mask_bcast": dict(q=(2, 3, 5, 4), k=(2, 3, 6, 4), v=(2, 3, 6, 4),
                                mask=("float", (5, 6))),
    "4d_float_mask_full": dict(q=(2, 3, 5, 4), k=(2, 3, 6, 4), v=(2, 3, 6, 4),
                               mask=("float", (2, 3, 5, 6))),
    "4d_bool_mask_heads": dict(q=(2, 3, 5, 4), k=(2, 3, 6, 4), v=(2, 3, 6, 4),
                               mask=("bool", (3, 5, 6))),
    "broadcast_kv": dict(q=(2, 3, 5, 4), k=(2, 1, 6, 4), v=(2, 1, 6, 3)),
}


def sdpa_inputs(case, dtype=F64):
    c = SDPA_CASES[case]
    q, k, v = (randn(*c[n], dtype=dtype, seed=90 + i).requires_grad_(True)
               for i, n in enumerate("qkv"))
    mask = None
    if "mask" in c:
        kind, shape = c["mask"]
        if kind == "bool":
            mask = randn(*shape, seed=95) > -0.7
            mask[..., 0] = True  # no fully masked row (PyTorch would give NaN)
        else:
            mask = randn(*shape, dtype=dtype, seed=96).requires_grad_(True)
    return q, k, v, mask, dict(is_causal=c.get("is_causal", False), scale=c.get("scale"))


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", list(SDPA_CASES))
def test_sdpa_against_torch_composition(case, dtype):
    q, k, v, mask, kw = sdpa_inputs(case, dtype)
    out = at.scaled_dot_product_attention(q, k, v, attn_mask=mask, **kw)
    up = [t.detach().to(F64).requires_grad_(True) for t in (q, k, v)]
    m64 = None
    if mask is not None:
        m64 = mask if mask.dtype == torch.bool else mask.detach().to(F64).requires_grad_(True)
    ref = ref_sdpa(*up, attn_mask=m64, **kw)
    same = ref_sdpa(q.detach(), k.detach(), v.detach(),
                    attn_mask=None if mask is None else mask.detach(), **kw)
    assert out.dtype == dtype and out.shape == ref.shape
    n = k.shape[-2] + q.shape[-1]
    smax = 1 + float((up[0] @ up[1].transpose(-2, -1)).abs().max())
    if m64 is not None and m64.dtype != torch.bool:
        smax += float(m64.abs().max())
    assert_close(out, ref, n=n, mag=smax * float(v.detach().abs().max()), what=f"sdpa {case}",
                 same_dtype=same)
    dout = randn(*out.shape, dtype=dtype, seed=97)
    leaves = [q, k, v] + ([mask] if mask is not None and mask.requires_grad else [])
    rleaves = up + ([m64] if mask is not None and mask.requires_grad else [])
    got = torch.autograd.grad(out, leaves, dout)
    want = torch.autograd.grad(ref, rleaves, dout.to(F64))
    for name, g, w in zip(("dquery", "dkey", "dvalue", "dmask"), got, want):
        assert g.shape == w.shape and g.dtype == dtype
        mag = (1 + float(w.abs().max())) * smax * float(dout.abs().max()) * \
            max(1.0, float(v.detach().abs().max()))
        assert_close(g, w, n=n * q.shape[-2], mag=mag, what=f"sdpa {case} {name}")


def test_sdpa_matches_pytorch_2_when_available():
    F = torch.nn.functional
    if not hasattr(F, "scaled_dot_product_attention"):
        pytest.skip(f"torch {torch.__version__} has no F.scaled_dot_product_attention")
    for case in SDPA_CASES:
        q, k, v, mask, kw = sdpa_inputs(case)
        if mask is not None and kw["is_causal"]:
            continue
        if case == "broadcast_kv":
            continue
        got = at.scaled_dot_product_attention(q, k, v, attn_mask=mask, **kw)
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **kw)
        assert_close(got, want, n=10, mag=20, what=f"F.sdpa {case}")


@pytest.mark.parametrize("case", ["3d", "4d_causal_rect", "4d_float_mask_bcast",
                                  "5d_bool_mask"])
def test_gradcheck_sdpa(case):
    q, k, v, mask, kw = sdpa_inputs(case)
    if mask is not None and mask.requires_grad:
        gradcheck(lambda q, k, v, m: at.scaled_dot_product_attention(q, k, v, attn_mask=m, **kw),
                  (q, k, v, mask), case)
    else:
        gradcheck(lambda q, k, v: at.scaled_dot_product_attention(q, k, v, attn_mask=mask, **kw),
                  (q, k, v), case)


def test_sdpa_fully_masked_row_is_zero_not_nan():
    q, k, v = randn(1, 3, 4, seed=101), randn(1, 5, 4, seed=102), randn(1, 5, 4, seed=103)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1] = False
    out = at.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.equal(out[0, 1], torch.zeros(4, dtype=F64))
    assert torch.isnan(ref_sdpa(q, k, v, attn_mask=mask)[0, 1]).all()  # PyTorch's NaN


def test_sdpa_dropout_seeded_by_torch():
    q, k, v = randn(2, 4, 8, 4, seed=104), randn(2, 4, 8, 4, seed=105), \
        randn(2, 4, 8, 4, seed=106)
    torch.manual_seed(3)
    a = at.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    torch.manual_seed(3)
    b = at.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    c = at.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.allclose(a, at.scaled_dot_product_attention(q, k, v))


# ---------------------------------------------------------------------------------------------
# Dtypes, layouts, errors.


def test_bf16_inputs():
    q, k, v = (randn(2, 2, 5, 8, seed=110 + i).to(torch.bfloat16).requires_grad_(True)
               for i in range(3))
    out = at.attention(q, k, v, causal=True)
    assert out.dtype == F32
    up = [t.detach().to(F64).requires_grad_(True) for t in (q, k, v)]
    ref = ref_attention(*up, causal=True)[0]
    same = ref_attention(*(t.detach().to(F32) for t in (q, k, v)), causal=True)[0]
    assert_close(out, ref, n=13, mag=4 * float(ref.abs().max()) + 4, what="bf16 out",
                 same_dtype=same)
    dout = randn(*out.shape, dtype=F32, seed=114)
    out.backward(dout)
    want = torch.autograd.grad(ref, up, dout.to(F64))
    for name, t, w in zip(("dq", "dk", "dv"), (q, k, v), want):
        assert t.grad.dtype == torch.bfloat16
        # The gradient is rounded to bf16 at the end: half a bf16 ulp of its magnitude.
        bound = 2 ** -8 * float(w.abs().max()) + 1e-5 * (1 + float(w.abs().max()))
        diff = float((t.grad.to(F64) - w).abs().max())
        assert diff <= bound, f"bf16 {name}: |diff| {diff:.3g} > {bound:.3g}"
    sd = at.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert sd.dtype == torch.bfloat16


def test_non_contiguous_inputs():
    base_q = randn(2, 5, 3, 6, seed=121)  # [B, T, H, D]
    base_k = randn(2, 7, 3, 6, seed=122)
    base_v = randn(2, 3, 4, 7, seed=123)  # [B, H, D, T]
    q = base_q.transpose(1, 2).requires_grad_(True)  # [B, H, T, D] views
    k = base_k.transpose(1, 2).requires_grad_(True)
    v = base_v.transpose(2, 3).requires_grad_(True)
    assert not q.is_contiguous() and not v.is_contiguous()
    got = at.attention(q, k, v, causal=True)
    qc, kc, vc = (t.detach().contiguous().requires_grad_(True) for t in (q, k, v))
    want = at.attention(qc, kc, vc, causal=True)
    ref = ref_attention(q.detach(), k.detach(), v.detach(), causal=True)[0]
    assert_close(got, ref, n=13, mag=4 * float(v.abs().max()), what="non-contiguous")
    assert_close(got, want, n=13, mag=4 * float(v.abs().max()), what="non-contiguous vs copy")
    dout = randn(*got.shape, seed=124).transpose(-1, -2).contiguous().transpose(-1, -2)
    got.backward(dout)
    want.backward(dout)
    for a, b, name in ((q, qc, "dq"), (k, kc, "dk"), (v, vc, "dv")):
        assert_close(a.grad, b.grad, n=13 * 5, mag=40, what=f"non-contiguous {name}")


def test_bad_input_raises_attn_error():
    q, k, v = randn(1, 2, 3, 8), randn(1, 2, 4, 6), randn(1, 2, 4, 6)
    with pytest.raises(attn.Error) as info:
        at.attention(q, k, v)
    assert isinstance(info.value, ValueError)
    assert "6" in str(info.value) and "8" in str(info.value), str(info.value)
    with pytest.raises(attn.Error, match=r"\[attention\]"):
        at.attention(randn(1, 3, 3, 4), randn(1, 2, 4, 4), randn(1, 2, 4, 4))  # 3 % 2
    with pytest.raises(attn.Error, match="broadcastable"):
        at.scaled_dot_product_attention(randn(2, 3, 4), randn(2, 5, 4), randn(2, 5, 4),
                                        attn_mask=torch.ones(4, 3, dtype=torch.bool))
    with pytest.raises(ValueError):
        at.attention(randn(1, 1, 3, 4), randn(1, 1, 3, 4), randn(1, 1, 3, 4),
                     bias=randn(1, 1, 3, 5, seed=3).requires_grad_(True))


def test_python_threads_call_at_once():
    """attn releases the GIL; threads running forward + backward at once get the answers of
    one-at-a-time calls, bit for bit."""
    import threading

    inputs = [tuple(randn(1, 2, 16, 8, seed=130 + 3 * t + i) for i in range(3)) for t in range(4)]

    def run(q, k, v):
        q, k, v = (x.clone().requires_grad_(True) for x in (q, k, v))
        out = at.attention(q, k, v, causal=True)
        out.backward(torch.ones_like(out))
        return out.detach(), q.grad, k.grad, v.grad

    expected = [run(*x) for x in inputs]
    results = [None] * len(inputs)

    def worker(t):
        for _ in range(5):
            results[t] = run(*inputs[t])

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(len(inputs))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for t, (got, want) in enumerate(zip(results, expected)):
        for g, w in zip(got, want):
            assert torch.equal(g, w), f"thread {t}: results differ from the serial call"


def test_no_grad_and_leaf_without_grad():
    q, k, v = randn(1, 1, 3, 4, seed=140), randn(1, 1, 5, 4, seed=141), randn(1, 1, 5, 2, seed=142)
    with torch.no_grad():
        out = at.attention(q.requires_grad_(True), k, v)
    assert not out.requires_grad
    assert_close(out, ref_attention(q.detach(), k, v)[0], n=9, mag=8, what="no_grad")
