"""Multi-head attention from Python: the forward against a NumPy float64 composition (projections,
heads, grouped heads, output projection), every gradient by finite differences, and KV-cache
decoding token by token against the causal forward."""

import dataclasses

import numpy as np
import pytest

import attn
from support import assert_close, attention as np_attention, numeric_gradient

RNG = np.random.default_rng(5)


def numpy_multihead(config, w, query, key, value, **mask):
    """The six steps of include/attn/multihead.h in NumPy float64."""
    hq = config.num_heads
    hkv = config.num_kv_heads or hq
    dk = config.head_dim or config.d_model // hq
    dv = config.value_head_dim or dk

    def proj(x, weight, bias):
        y = x @ weight.T
        return y if bias is None else y + bias

    def split(x, h, d):
        return x.reshape(x.shape[0], x.shape[1], h, d).transpose(0, 2, 1, 3)

    q = split(proj(query, w.w_q, w.b_q), hq, dk)
    k = split(proj(key, w.w_k, w.b_k), hkv, dk)
    v = split(proj(value, w.w_v, w.b_v), hkv, dv)
    a, p = np_attention(q, k, v, **mask)
    c = a.transpose(0, 2, 1, 3).reshape(query.shape[0], query.shape[1], hq * dv)
    return proj(c, w.w_o, w.b_o), p


CONFIGS = {
    "plain": attn.MultiHeadConfig(d_model=8, num_heads=2),
    "grouped": attn.MultiHeadConfig(d_model=8, num_heads=4, num_kv_heads=2, head_dim=3),
    "cross_widths": attn.MultiHeadConfig(d_model=6, num_heads=2, key_input_dim=5,
                                         value_input_dim=4, value_head_dim=2, bias=False),
}


def inputs(config, b=2, tq=3, tk=4):
    ek = config.key_input_dim or config.d_model
    ev = config.value_input_dim or config.d_model
    return (RNG.standard_normal((b, tq, config.d_model)), RNG.standard_normal((b, tk, ek)),
            RNG.standard_normal((b, tk, ev)))


def random_weights(config):
    w = attn.MultiHeadWeights.init(config, "float64", seed=1)
    if config.bias:  # init gives zero biases; make them count
        w = dataclasses.replace(w, **{n: RNG.standard_normal(getattr(w, n).shape)
                                      for n in ("b_q", "b_k", "b_v", "b_o")})
    return w


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_multihead_forward_matches_numpy(name):
    config = CONFIGS[name]
    w = random_weights(config)
    query, key, value = inputs(config)
    mask = dict(key_lengths=[4, 2])
    out = attn.multihead_attention(config, w, query, key, value, return_weights=True, **mask)
    want, p = numpy_multihead(config, w, query, key, value, **mask)
    assert_close(out.output, want, 1e-12 * (1 + np.abs(want)), f"{name} output")
    assert_close(out.attention.weights, p, 1e-12, f"{name} weights")
    ref = attn.reference.multihead_attention(config, w, query, key, value, **mask)
    assert_close(ref.output, want, 1e-12 * (1 + np.abs(want)), f"{name} reference")


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_multihead_gradients_by_finite_differences(name):
    config = CONFIGS[name]
    w = random_weights(config)
    query, key, value = inputs(config, b=1, tq=2, tk=3)
    dout = RNG.standard_normal((1, 2, config.d_model))
    kw = dict(causal=True, alignment="bottom_right")
    saved = attn.multihead_attention(config, w, query, key, value, **kw)
    g = attn.multihead_attention_backward(config, w, query, key, value, saved, dout, **kw)

    def loss():
        return float(np.sum(attn.multihead_attention(config, w, query, key, value, **kw).output
                            * dout))

    for arr, grad, what in [(query, g.dquery, "dquery"), (key, g.dkey, "dkey"),
                            (value, g.dvalue, "dvalue")]:
        assert_close(grad, numeric_gradient(loss, arr), 1e-6, f"{name} {what}")
    for field, param in w._dict().items():
        assert_close(getattr(g.dweights, field), numeric_gradient(loss, param), 1e-6,
                     f"{name} d{field}")


def test_kv_cache_token_by_token_equals_the_causal_forward():
    config = CONFIGS["grouped"]
    w = attn.MultiHeadWeights.init(config, "float32", seed=3)
    x = RNG.standard_normal((2, 9, config.d_model)).astype(np.float32)
    full = attn.multihead_attention(config, w, x, x, x, causal=True).output
    cache = attn.KVCache(config, batch=2, capacity=2)
    rows = []
    for t in range(9):
        step = x[:, t:t + 1]
        rows.append(attn.multihead_attention_step(config, w, cache, step, step, step,
                                                  causal=True).output)
    assert cache.length == 9 and cache.capacity >= 9
    got = np.concatenate(rows, axis=1)
    tol = 64 * np.finfo(np.float32).eps * (1 + np.abs(full))
    assert_close(got, full, tol, "decoded rows")
    keys = cache.keys()
    assert keys.shape == (2, 2, 9, 3) and not keys.flags.owndata
    again = cache.keys()
    assert again.ctypes.data == keys.ctypes.data  # views of the cache, not copies
    cache.clear()
    assert cache.length == 0


def test_kv_cache_append_and_views_as_torch():
    torch = pytest.importorskip("torch")
    config = CONFIGS["plain"]
    cache = attn.KVCache(config, batch=1, capacity=4, kind="torch")
    k = torch.randn(1, 2, 3, 4)
    cache.append(k, k * 2)
    assert cache.length == 3
    assert torch.equal(cache.keys(), k) and torch.equal(cache.values(), k * 2)


def test_multihead_errors_name_the_op():
    config = CONFIGS["plain"]
    w = attn.MultiHeadWeights.init(config)
    query, key, value = inputs(config)
    with pytest.raises(attn.Error, match=r"\[multihead_attention\]"):
        attn.multihead_attention(config, w, query[..., :5].astype(np.float32),
                                 key.astype(np.float32), value.astype(np.float32))
    with pytest.raises(attn.Error, match="num_kv_heads"):
        attn.multihead_attention(attn.MultiHeadConfig(d_model=8, num_heads=4, num_kv_heads=3),
                                 w, query, key, value)


def decode_with_caches(config, w, x, dtypes, capacity):
    """Self-attention decoding of x [B, T, E] token by token (causal), once per cache dtype:
    the caches and each dtype's outputs [B, T, E]."""
    caches = {d: attn.KVCache(config, batch=x.shape[0], capacity=capacity, dtype=d) for d in dtypes}
    rows = {d: [] for d in dtypes}
    for t in range(x.shape[1]):
        step = x[:, t:t + 1]
        for d, cache in caches.items():
            rows[d].append(attn.multihead_attention_step(config, w, cache, step, step, step,
                                                         causal=True).output)
    return caches, [np.concatenate(rows[d], axis=1) for d in dtypes]


def test_bf16_kv_cache_decodes_like_the_float32_one_within_bf16_rounding():
    config = CONFIGS["grouped"]
    w = attn.MultiHeadWeights.init(config, "float32", seed=4)
    x = RNG.standard_normal((2, 6, config.d_model)).astype(np.float32)
    caches, (f32, bf16) = decode_with_caches(config, w, x, ("float32", "bfloat16"), capacity=8)
    # NumPy has no bfloat16: the bf16 cache's views come back widened (exactly) to float32.
    keys = caches["bfloat16"].keys()
    assert keys.dtype == np.float32 and keys.shape == (2, 2, 6, 3)
    ref_keys = caches["float32"].keys()
    assert_close(keys, ref_keys, 2 ** -8 * np.abs(ref_keys), "bf16 keys")  # one rounding
    # Rounding K and V to bf16 (relative 2^-9) moves each output by at most about that relative
    # amount of the magnitudes it sums, through the value and output projections.
    mag = np.abs(x).max() * np.abs(w.w_v).sum(axis=1).max() * np.abs(w.w_o).sum(axis=1).max()
    assert_close(bf16, f32, 8 * 2 ** -9 * (1 + mag), "bf16 cache outputs")


def test_float32_query_against_bf16_keys_and_values():
    torch = pytest.importorskip("torch")
    q = torch.randn(1, 4, 2, 16)
    k, v = torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 16)
    kb, vb = k.to(torch.bfloat16), v.to(torch.bfloat16)
    got = attn.attention(q, kb, vb, causal=True, alignment="bottom_right")
    assert got.out.dtype == torch.float32
    want = attn.reference.attention(q.double(), kb.double(), vb.double(), causal=True,
                                    alignment="bottom_right")
    tol = 16 * np.finfo(np.float32).eps * (1 + np.abs(want.out.numpy()))
    assert_close(got.out.numpy(), want.out.numpy(), tol, "f32 query, bf16 K/V")


def test_int8_kv_cache_decodes_like_the_float32_one_within_its_block_scales():
    config = attn.MultiHeadConfig(d_model=64, num_heads=4, num_kv_heads=2)  # head width 16
    w = attn.MultiHeadWeights.init(config, "float32", seed=5)
    x = RNG.standard_normal((2, 5, config.d_model)).astype(np.float32)
    caches, (f32, int8) = decode_with_caches(config, w, x, ("float32", "int8"), capacity=2)
    keys, ref_keys = caches["int8"].keys(), caches["float32"].keys()
    assert keys.dtype == np.float32 and keys.shape == ref_keys.shape == (2, 2, 5, 16)
    # One block of 32 channels holds a whole 16-wide row: its scale is max|row| / 127 and each
    # value is off by at most half of it.
    half_scale = np.abs(ref_keys).max(axis=-1, keepdims=True) / 254
    assert_close(keys, ref_keys, half_scale * (1 + 1e-6) + 1e-30, "int8 keys")
    assert_close(caches["int8"].values(), caches["float32"].values(),
                 np.abs(caches["float32"].values()).max(axis=-1, keepdims=True) / 254 * (1 + 1e-6)
                 + 1e-30, "int8 values")
    # Relative errors of 1/254 in K and V move each output by about that relative amount of the
    # magnitudes summed through the value and output projections (and the scores through K).
    mag = np.abs(x).max() * np.abs(w.w_v).sum(axis=1).max() * np.abs(w.w_o).sum(axis=1).max()
    assert_close(int8, f32, 8 / 254 * (1 + mag), "int8 cache outputs")
    with pytest.raises(attn.Error, match="dtype"):
        attn.KVCache(config, dtype="int4")
