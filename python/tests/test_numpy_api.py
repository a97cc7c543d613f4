"""attn from NumPy: every scoring function and mask kind against a NumPy float64 reference written
here (tests/support.py), gradients by finite differences, the float32 paths against the
reference within float32 bounds, errors, and the arguments' mapping onto attn's parameters."""

import numpy as np
import pytest

import attn
from support import U32, U64, assert_close, attention as np_attention, gamma, numeric_gradient

RNG = np.random.default_rng(7)


def randn(*shape, dtype=np.float64):
    return RNG.standard_normal(shape).astype(dtype)


B, HQ, HKV, TQ, TK, D, A = 2, 4, 2, 5, 7, 6, 5


def make_scores(d=D, tk=TK):
    """One of each scoring function, parameters in float64."""
    return {
        "dot": attn.DotScore(),
        "scaled_dot": attn.ScaledDotScore(),
        "scaled_dot_0.3": attn.ScaledDotScore(scale=0.3),
        "general": attn.GeneralScore(weight=randn(d, d) * 0.4),
        "general_low_rank": attn.GeneralScore(u=randn(3, d) * 0.5, v=randn(3, d) * 0.5),
        "additive": attn.AdditiveScore(randn(A, d) * 0.5, randn(A, d) * 0.5, randn(A),
                                       bias=randn(A)),
        "additive_no_bias": attn.AdditiveScore(randn(A, d) * 0.5, randn(A, d) * 0.5, randn(A)),
        "concat": attn.ConcatScore(randn(A, 2 * d) * 0.5, randn(A)),
        "cosine": attn.CosineScore(np.array([3.0])),
        "location": attn.LocationScore(randn(tk + 2, d) * 0.5),
        "trilinear": attn.TrilinearScore(randn(3 * d) * 0.5),
    }


SCORES = make_scores()


def qkv(dtype=np.float64, b=B, hq=HQ, hkv=HKV, tq=TQ, tk=TK, d=D):
    return randn(b, hq, tq, d, dtype=dtype), randn(b, hkv, tk, d, dtype=dtype), \
        randn(b, hkv, tk, d, dtype=dtype)


@pytest.mark.parametrize("name", sorted(SCORES))
def test_every_score_matches_numpy_reference_float64(name):
    q, k, v = qkv()
    score = SCORES[name]
    got = attn.attention(q, k, v, score=score, return_weights=True)
    want_out, want_p = np_attention(q, k, v, score)
    assert got.out.dtype == np.float64 and got.out.shape == (B, HQ, TQ, D)
    assert_close(got.out, want_out, 1e-12 * (1 + np.abs(want_out)), f"{name} out")
    assert_close(got.weights, want_p, 1e-12, f"{name} weights")
    assert_close(got.mean_weights, want_p.mean(axis=1), 1e-12, f"{name} mean_weights")


MASKS = {
    "causal": dict(causal=True),
    "causal_bottom_right": dict(causal=True, alignment="bottom_right"),
    "key_lengths": dict(key_lengths=[7, 3]),
    "query_lengths": dict(query_lengths=[5, 2]),
    "lengths_causal_bottom_right": dict(key_lengths=[6, 4], query_lengths=[3, 5], causal=True,
                                        alignment="bottom_right"),
    "window": dict(window=(2, 1)),
    "window_left_only": dict(window=(1, None)),
    "allowed": dict(allowed=RNG.random((B, 1, TQ, TK)) < 0.6),
    "bias": dict(bias=randn(1, HQ, TQ, TK)),
    "everything": dict(causal=True, key_lengths=[7, 5], window=(3, 0),
                       allowed=RNG.random((TQ, TK)) < 0.8, bias=randn(B, 1, 1, TK)),
}


@pytest.mark.parametrize("name", sorted(MASKS))
def test_every_mask_matches_numpy_reference(name):
    q, k, v = qkv()
    got = attn.attention(q, k, v, return_weights=True, **MASKS[name])
    want_out, want_p = np_attention(q, k, v, **MASKS[name])
    assert_close(got.out, want_out, 1e-12 * (1 + np.abs(want_out)), f"{name} out")
    assert_close(got.weights, want_p, 1e-12, f"{name} weights")


def test_fully_masked_rows_give_zero_output_and_gradients():
    q, k, v = qkv()
    kw = dict(key_lengths=[0, 7], query_lengths=[5, 3])
    out = attn.attention(q, k, v, **kw)
    assert np.all(out.out[0] == 0) and np.all(out.out[1, :, 3:] == 0)
    assert np.all(np.isneginf(out.lse[0]))
    g = attn.attention_backward(q, k, v, out, np.ones_like(out.out), **kw)
    assert np.all(g.dq[0] == 0) and np.all(g.dk[0] == 0) and np.all(g.dv[0] == 0)
    assert np.all(g.dq[1, :, 3:] == 0)


def test_alibi_slopes_bias_keys_by_distance():
    q, k, v = qkv(hkv=HQ)
    slopes = attn.alibi_slopes(HQ)
    assert len(slopes) == HQ and slopes[0] == pytest.approx(2 ** -2)  # 2^(-8/4)
    dist = np.abs(np.arange(TQ)[:, None] - np.arange(TK)[None, :])
    bias = -np.asarray(slopes)[None, :, None, None] * dist
    got = attn.attention(q, k, v, alibi_slopes=slopes, causal=True)
    want, _ = np_attention(q, k, v, bias=bias, causal=True)
    assert_close(got.out, want, 1e-12 * (1 + np.abs(want)), "alibi")


def test_local_monotonic_is_a_window_around_the_position():
    q, k, v = qkv()
    got = attn.attention(q, k, v, local=attn.LocalAttention("monotonic", 1))
    want, _ = np_attention(q, k, v, window=(1, 1))
    assert_close(got.out, want, 1e-12 * (1 + np.abs(want)), "local-m")


def loss_and_grads(q, k, v, dout, **kw):
    out = attn.attention(q, k, v, **kw)
    return out, attn.attention_backward(q, k, v, out, dout, **kw)


@pytest.mark.parametrize("name", sorted(SCORES))
def test_gradients_of_every_score_by_finite_differences(name):
    q, k, v = qkv(b=1, hq=2, hkv=1, tq=3, tk=4, d=3)
    score = make_scores(d=3, tk=4)[name]
    dout = randn(*q.shape[:-1], v.shape[-1])
    kw = dict(score=score, causal=True)
    _, g = loss_and_grads(q, k, v, dout, **kw)

    def loss():
        return float(np.sum(attn.attention(q, k, v, **kw).out * dout))

    for arr, grad, what in [(q, g.dq, "dq"), (k, g.dk, "dk"), (v, g.dv, "dv")]:
        assert_close(grad, numeric_gradient(loss, arr), 1e-6, f"{name} {what}")
    for field, param in score.tensors().items():
        assert_close(getattr(g.dscore, field), numeric_gradient(loss, param), 1e-6,
                     f"{name} d{field}")
    if name in ("dot", "scaled_dot", "scaled_dot_0.3"):
        assert g.dscore is None
    else:
        assert type(g.dscore) is type(score)


def test_gradients_of_bias_and_local_p_by_finite_differences():
    q, k, v = qkv(b=1, hq=2, hkv=2, tq=3, tk=5, d=3)
    bias = randn(1, 2, 3, 5)
    local = attn.LocalAttention("predictive", 2, w_p=randn(4, 3), v_p=randn(4))
    dout = randn(1, 2, 3, 3)
    kw = dict(bias=bias, local=local, key_lengths=[5])
    _, g = loss_and_grads(q, k, v, dout, **kw)

    def loss():
        return float(np.sum(attn.attention(q, k, v, **kw).out * dout))

    assert_close(g.dbias, numeric_gradient(loss, bias), 1e-6, "dbias")
    assert_close(g.dlocal.w_p, numeric_gradient(loss, local.w_p), 1e-6, "dw_p")
    assert_close(g.dlocal.v_p, numeric_gradient(loss, local.v_p), 1e-6, "dv_p")
    assert_close(g.dq, numeric_gradient(loss, q), 1e-6, "dq")


def test_head_scores_give_one_score_per_head():
    q, k, v = qkv(hq=2, hkv=2)
    heads = [attn.DotScore(), SCORES["additive"]]
    got = attn.attention(q, k, v, head_scores=heads)
    for h, s in enumerate(heads):
        want, _ = np_attention(q[:, h:h + 1], k[:, h:h + 1], v[:, h:h + 1], s)
        assert_close(got.out[:, h:h + 1], want, 1e-12 * (1 + np.abs(want)), f"head {h}")
    g = attn.attention_backward(q, k, v, got, np.ones_like(got.out), head_scores=heads)
    assert g.dhead_scores[0] is None and g.dhead_scores[1].w_query.shape == (A, D)


def test_dropout_is_reproducible_from_the_seed():
    q, k, v = qkv()
    a = attn.attention(q, k, v, dropout=0.3, seed=11).out
    b = attn.attention(q, k, v, dropout=0.3, seed=11).out
    c = attn.attention(q, k, v, dropout=0.3, seed=12).out
    assert np.array_equal(a, b) and not np.array_equal(a, c)


@pytest.mark.parametrize("name", ["scaled_dot", "general", "additive", "cosine", "trilinear"])
def test_float32_within_float32_bounds_of_the_float64_reference(name):
    q, k, v = qkv(np.float32, tq=33, tk=65, d=16)
    score = make_scores(d=16, tk=65)[name]
    kw = dict(score=score, causal=True, key_lengths=[65, 40])
    got = attn.attention(q, k, v, **kw)
    assert got.out.dtype == np.float32
    ref = attn.reference.attention(q, k, v, **kw)
    assert ref.out.dtype == np.float64
    # out = sum_j p_j v_j: the sum's error plus the effect of score errors (each at most
    # gamma_D * sum |q||k| through the widths involved) on the weights, times |v|.
    vmax = np.abs(v).max()
    smag = np.abs(q).max() * np.abs(k).max() * 16 * 4
    tol = 8 * (gamma(65, U32) + 2 * gamma(16 + A, U32) * smag) * vmax
    assert_close(got.out, ref.out, tol, f"{name} float32 out")
    dout = randn(*got.out.shape, dtype=np.float32)
    g = attn.attention_backward(q, k, v, got, dout, **kw)
    r = attn.reference.attention_backward(q, k, v, ref, dout, **kw)
    for what in ("dq", "dk", "dv"):
        ref_g = getattr(r, what)
        tol = 64 * gamma(65 + 16, U32) * (1 + smag) * np.abs(ref_g).max() + 1e-6
        assert_close(getattr(g, what), ref_g, tol, f"{name} float32 {what}")


def test_results_have_the_input_dtype_and_reference_is_float64():
    q, k, v = qkv(np.float32)
    assert attn.attention(q, k, v).out.dtype == np.float32
    assert attn.attention(*qkv(np.float64)).out.dtype == np.float64
    assert attn.reference.attention(q, k, v).out.dtype == np.float64


def test_bad_input_raises_attn_error_naming_op_and_shapes():
    q, k, v = qkv(np.float32)
    with pytest.raises(attn.Error, match=r"\[attention\].*key has 4 features, query has 6"):
        attn.attention(q, k[..., :4], v)
    with pytest.raises(ValueError):  # attn.Error is a ValueError
        attn.attention(q, k, v[:, :, :3])
    with pytest.raises(attn.Error, match="float16"):
        attn.attention(q.astype(np.float16), k, v)
    with pytest.raises(attn.Error, match="key_lengths"):
        attn.attention(q, k, v, key_lengths=[1, 2, 3])
    with pytest.raises(attn.Error, match="alignment"):
        attn.attention(q, k, v, alignment="middle")
    with pytest.raises(attn.Error, match="window"):
        attn.attention(q, k, v, window=3)
    with pytest.raises(attn.Error, match="score"):
        attn.attention(q, k, v, score="additive")
    with pytest.raises(attn.Error, match=r"w_query"):
        attn.attention(q, k, v, score=attn.AdditiveScore(randn(A, 3), randn(A, D), randn(A)))
    with pytest.raises(attn.Error, match="dtype"):
        attn.attention(q, k.astype(np.float64), v)


def test_matmul_has_torch_matmul_semantics():
    cases = [((4,), (4,)), ((3, 4), (4, 5)), ((4,), (4, 5)), ((3, 4), (4,)),
             ((5, 2, 3), (3,)), ((3,), (5, 3, 4)), ((6, 1, 2, 3), (5, 3, 4)), ((0, 2, 3), (3, 2))]
    for sa, sb in cases:
        a, b = randn(*sa), randn(*sb)
        got = attn.matmul(a, b)
        want = np.matmul(a, b)
        assert_close(got, want, 1e-12 * (1 + np.abs(want)), f"matmul {sa} x {sb}")
        dout = randn(*np.shape(want))
        da, db = attn.matmul_backward(a, b, dout)
        ra, rb = attn.reference.matmul_backward(a, b, dout)
        assert da.shape == sa and db.shape == sb
        assert_close(da, ra, 1e-12 * (1 + np.abs(ra)), "da")
        assert_close(db, rb, 1e-12 * (1 + np.abs(rb)), "db")
    with pytest.raises(attn.Error, match=r"\[matmul\]"):
        attn.matmul(randn(3, 4), randn(5, 6))
