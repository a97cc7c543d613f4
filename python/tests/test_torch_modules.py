"""attn.torch.MultiheadAttention against torch.nn.MultiheadAttention loaded with the same
state_dict (outputs, weights, every gradient), and the scoring-function modules against the
torch-ops reference of test_torch_functional.py.

Tolerances as in test_torch_functional.py: float64 within 16 eps64 sqrt(n) times the magnitude;
float32 within that at eps32 or 4x the error of torch's own float32 module against float64.
"""

import math

import pytest

torch = pytest.importorskip("torch")

import attn  # noqa: E402
import attn.torch as at  # noqa: E402
from test_torch_functional import assert_close, randn, ref_attention  # noqa: E402

nn = torch.nn
F64, F32 = torch.float64, torch.float32


# ---------------------------------------------------------------------------------------------
# MultiheadAttention.


def make_pair(dtype=F64, seed=0, **cfg):
    """(attn's module, torch's module) with the same state_dict (torch's loaded from attn's)."""
    torch.manual_seed(seed)
    ours = at.MultiheadAttention(dtype=dtype, **cfg)
    if ours.in_proj_bias is not None:  # torch initialises biases to 0: make them matter
        with torch.no_grad():
            ours.in_proj_bias.normal_()
            ours.out_proj.bias.normal_()
    theirs = nn.MultiheadAttention(dtype=dtype, **cfg)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def mha_inputs(cfg, N=2, L=4, S=5, dtype=F64, self_attention=False, batched=True):
    E = cfg["embed_dim"]
    kdim, vdim = cfg.get("kdim") or E, cfg.get("vdim") or E

    def shape(T, D):
        if not batched:
            return (T, D)
        return (N, T, D) if cfg.get("batch_first") else (T, N, D)

    q = randn(*shape(L, E), dtype=dtype, seed=201)
    if self_attention:
        return q, q, q
    return q, randn(*shape(S, kdim), dtype=dtype, seed=202), \
        randn(*shape(S, vdim), dtype=dtype, seed=203)


def padding_mask(kind, N=2, S=5, dtype=F64):
    if kind is None:
        return None
    if kind == "bool_suffix":  # padding at the end: attn's key_lengths path
        return torch.arange(S).unsqueeze(0) >= torch.tensor([S, 3]).unsqueeze(1)
    if kind == "bool_scattered":
        m = randn(N, S, seed=204) > 0.3
        m[:, 0] = False
        return m
    if kind == "float":
        return randn(N, S, dtype=dtype, seed=205)
    raise ValueError(kind)


def attention_mask(kind, N=2, H=2, L=4, S=5, dtype=F64):
    if kind is None:
        return None
    if kind == "bool2d":  # PyTorch's polarity: True = NOT allowed
        m = randn(L, S, seed=206) > 0.4
        m[:, :2] = False
        return m
    if kind == "bool3d":
        m = randn(N * H, L, S, seed=207) > 0.4
        m[..., 0] = False
        return m
    if kind == "float2d":
        return randn(L, S, dtype=dtype, seed=208)
    if kind == "float3d":
        return randn(N * H, L, S, dtype=dtype, seed=209)
    if kind == "causal":
        return torch.ones(L, S, dtype=torch.bool).triu(1)
    raise ValueError(kind)


def compare_mha(cfg, dtype=F64, kpm=None, am=None, self_attention=False, batched=True,
                need_weights=True, average=True, what=""):
    ours, theirs = make_pair(dtype=dtype, **cfg)
    N, L, S = 2, 4, (4 if self_attention else 5)
    query, key, value = mha_inputs(cfg, N, L, S, dtype, self_attention, batched)
    kpm_t = padding_mask(kpm, N, S, dtype)
    am_t = attention_mask(am, N, cfg["num_heads"], L, S, dtype)
    if not batched:
        kpm_t = None if kpm_t is None else kpm_t[0]
        if am_t is not None and am_t.dim() == 3:
            am_t = am_t[:cfg["num_heads"]]

    def run(module, query, key, value, am_):
        leaves = [query, key, value] if not self_attention else [query]
        leaves = [t.detach().requires_grad_(True) for t in leaves]
        if self_attention:
            q = k = v = leaves[0]
        else:
            q, k, v = leaves
        out, w = module(q, k, v, key_padding_mask=kpm_t, need_weights=need_weights,
                        attn_mask=am_, average_attn_weights=average)
        return out, w, leaves

    am_leaf = am_t.detach().requires_grad_(True) if am_t is not None and \
        am_t.is_floating_point() else am_t
    am_ref = am_t.detach().requires_grad_(True) if am_t is not None and \
        am_t.is_floating_point() else am_t
    out, w, leaves = run(ours, query, key, value, am_leaf)
    rout, rw, rleaves = run(theirs, query, key, value, am_ref)
    # The same computation in float64 by torch: the error scale for float32.
    ref64 = None
    if dtype == F32:
        t64 = nn.MultiheadAttention(dtype=F64, **cfg)
        t64.load_state_dict({n: p.to(F64) for n, p in theirs.state_dict().items()})
        am64 = None if am_t is None else (am_t if am_t.dtype == torch.bool else am_t.to(F64))
        kpm64 = None if kpm_t is None else (kpm_t if kpm_t.dtype == torch.bool
                                            else kpm_t.to(F64))
        ref64 = t64(*(t.to(F64) for t in (query, key, value)), key_padding_mask=kpm64,
                    attn_mask=am64, need_weights=need_weights,
                    average_attn_weights=average)
    E = cfg["embed_dim"]
    n = S + 2 * E + max(cfg.get("kdim") or E, cfg.get("vdim") or E)
    mag = 4 * (1 + float(rout.detach().abs().max())) * (1 + float(query.abs().max()))
    expected = ref64[0] if ref64 is not None else rout
    assert out.shape == rout.shape and out.dtype == rout.dtype, \
        f"{what}: out {tuple(out.shape)} {out.dtype} vs {tuple(rout.shape)} {rout.dtype}"
    assert_close(out, expected, n=n, mag=mag, what=f"{what} out",
                 same_dtype=rout if ref64 is not None else None)
    if need_weights:
        assert w.shape == rw.shape, f"{what}: weights {tuple(w.shape)} vs {tuple(rw.shape)}"
        assert_close(w, ref64[1] if ref64 is not None else rw, n=n, mag=mag,
                     what=f"{what} weights", same_dtype=rw if ref64 is not None else None)
    else:
        assert w is None and rw is None

    # Every gradient: the inputs, a float attn_mask, and every parameter.
    dout = randn(*out.shape, dtype=dtype, seed=210)
    params = [p for _, p in ours.named_parameters()]
    rparams = [p for _, p in theirs.named_parameters()]
    names = [n_ for n_, _ in ours.named_parameters()]
    extra = [am_leaf] if am_leaf is not None and am_leaf.requires_grad else []
    rextra = [am_ref] if am_ref is not None and am_ref.requires_grad else []
    loss, rloss = (out * dout).sum(), (rout * dout).sum()
    if need_weights:  # a loss on the weights too: they are differentiable, as in PyTorch
        dw = randn(*w.shape, dtype=dtype, seed=211)
        loss, rloss = loss + (w * dw).sum(), rloss + (rw * dw).sum()
    got = torch.autograd.grad(loss, leaves + extra + params, allow_unused=True)
    want = torch.autograd.grad(rloss, rleaves + rextra + rparams, allow_unused=True)
    gnames = ["dquery", "dkey", "dvalue"][:len(leaves)] + ["dattn_mask"] * len(extra) + names
    for name, g, wg in zip(gnames, got, want):
        assert (g is None) == (wg is None), f"{what}: gradient {name} missing on one side"
        if g is None:
            continue
        gmag = 4 * (1 + float(wg.abs().max())) * (1 + float(query.abs().max())) ** 2
        if dtype == F32:
            # torch's float32 gradient error is the scale: recompute torch's in float64.
            assert_close(g, wg, n=n * L, mag=gmag * 4, what=f"{what} {name}")
        else:
            assert_close(g, wg, n=n * L, mag=gmag, what=f"{what} {name}")


CONFIGS = {
    "basic": dict(embed_dim=8, num_heads=2),
    "batch_first": dict(embed_dim=8, num_heads=2, batch_first=True),
    "kdim_vdim": dict(embed_dim=8, num_heads=2, kdim=5, vdim=3),
    "no_bias": dict(embed_dim=8, num_heads=4, bias=False),
    "add_bias_kv": dict(embed_dim=8, num_heads=2, add_bias_kv=True),
    "add_zero_attn": dict(embed_dim=8, num_heads=2, add_zero_attn=True),
    "bias_kv_zero_attn_bf": dict(embed_dim=8, num_heads=2, add_bias_kv=True, add_zero_attn=True,
                                 batch_first=True),
}


@pytest.mark.parametrize("config", list(CONFIGS))
def test_mha_configs(config):
    compare_mha(CONFIGS[config], what=config)


@pytest.mark.parametrize("kpm,am", [
    ("bool_suffix", None), ("bool_scattered", None), ("float", None), (None, "bool2d"),
    (None, "bool3d"), (None, "float2d"), (None, "float3d"), (None, "causal"),
    ("bool_suffix", "float3d"), ("bool_scattered", "bool2d"), ("bool_suffix", "bool3d"),
])
@pytest.mark.parametrize("config", ["basic", "bias_kv_zero_attn_bf"])
def test_mha_masks(config, kpm, am):
    compare_mha(CONFIGS[config], kpm=kpm, am=am, what=f"{config} kpm={kpm} am={am}")


@pytest.mark.parametrize("config", ["basic", "batch_first", "kdim_vdim", "add_bias_kv"])
def test_mha_float32(config):
    compare_mha(CONFIGS[config], dtype=F32, kpm="bool_scattered", am="float2d",
                what=f"{config} f32")


def test_mha_self_attention_per_head_weights_and_no_weights():
    cfg = CONFIGS["basic"]
    compare_mha(cfg, self_attention=True, average=False, am="causal", what="self per-head")
    compare_mha(cfg, self_attention=True, need_weights=False, kpm="bool_suffix",
                what="self no weights")


@pytest.mark.parametrize("config", ["basic", "batch_first", "add_zero_attn"])
def test_mha_unbatched(config):
    compare_mha(CONFIGS[config], batched=False, kpm="bool_scattered", am="bool3d",
                what=f"{config} unbatched")
    compare_mha(CONFIGS[config], batched=False, average=False, what=f"{config} unbatched 2")


def test_mha_is_causal_applies_the_causal_mask():
    ours, theirs = make_pair(**CONFIGS["batch_first"])
    x = randn(2, 5, 8, seed=220)
    got, gw = ours(x, x, x, is_causal=True)
    mask = torch.ones(5, 5, dtype=torch.bool).triu(1)
    want, ww = theirs(x, x, x, attn_mask=mask)
    assert_close(got, want, n=30, mag=50, what="is_causal out")
    assert_close(gw, ww, n=30, mag=50, what="is_causal weights")


def test_mha_fully_padded_rows_give_zero_attention_not_nan():
    ours, theirs = make_pair(**CONFIGS["batch_first"])
    x = randn(2, 4, 8, seed=221)
    x.requires_grad_(True)
    kpm = torch.zeros(2, 4, dtype=torch.bool)
    kpm[1] = True  # batch 1: every key is padding
    out, w = ours(x, x, x, key_padding_mask=kpm)
    rout, _ = theirs(x, x, x, key_padding_mask=kpm)
    assert torch.isnan(rout[1]).all(), "PyTorch gives NaN here (the documented difference)"
    # attention output 0 -> the output projection leaves its bias.
    assert_close(out[1], ours.out_proj.bias.detach().expand(4, 8), n=8, mag=1,
                 what="padded batch = out_proj bias")
    assert torch.equal(w[1], torch.zeros_like(w[1]))
    assert_close(out[0], rout[0], n=30, mag=50, what="the other batch row")
    out.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in ours.parameters())


def test_mha_dropout_training_only_and_seeded():
    cfg = dict(embed_dim=8, num_heads=2, dropout=0.5, batch_first=True)
    ours, theirs = make_pair(**cfg)
    x = randn(2, 6, 8, seed=222)
    ours.eval()
    theirs.eval()
    assert_close(ours(x, x, x)[0], theirs(x, x, x)[0], n=30, mag=50, what="eval: no dropout")
    ours.train()
    torch.manual_seed(1)
    a = ours(x, x, x, need_weights=False)[0]
    torch.manual_seed(1)
    b = ours(x, x, x, need_weights=False)[0]
    c = ours(x, x, x, need_weights=False)[0]
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.allclose(a, ours.eval()(x, x, x)[0])
    ours.train()

    def fn(q):
        torch.manual_seed(5)  # the same dropout mask on every evaluation
        return ours(q, q, q, need_weights=False)[0]

    assert torch.autograd.gradcheck(fn, (x.clone().requires_grad_(True),), eps=1e-6,
                                    atol=1e-7, rtol=1e-5, nondet_tol=1e-12)


def test_mha_gradcheck_inputs_mask_and_parameters():
    cfg = dict(embed_dim=4, num_heads=2, kdim=3, vdim=5, add_bias_kv=True, add_zero_attn=True)
    ours, _ = make_pair(**cfg)
    q, k, v = mha_inputs(cfg, N=1, L=3, S=2)
    am = randn(3, 2, seed=230)
    kpm = torch.tensor([[False, True]])
    names = [n for n, _ in ours.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for _, p in ours.named_parameters()]
    functional_call = getattr(getattr(torch, "func", None), "functional_call", None) or \
        torch.nn.utils.stateless.functional_call

    def fn(q, k, v, am, *ps):
        return functional_call(ours, dict(zip(names, ps)), (q, k, v),
                               dict(key_padding_mask=kpm, attn_mask=am, need_weights=False))[0]

    inputs = [t.clone().requires_grad_(True) for t in (q, k, v, am)] + params
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5,
                                    nondet_tol=1e-12)


def test_mha_state_dict_and_initialisation_match_torch():
    for cfg in CONFIGS.values():
        torch.manual_seed(3)
        ours = at.MultiheadAttention(**cfg)
        torch.manual_seed(3)
        theirs = nn.MultiheadAttention(**cfg)
        a, b = ours.state_dict(), theirs.state_dict()
        assert list(a) == list(b), f"{cfg}: keys {list(a)} vs {list(b)}"
        for name in a:
            assert a[name].shape == b[name].shape and torch.equal(a[name], b[name]), \
                f"{cfg}: {name} differs (same seed, same initialisation)"
        # Both ways.
        fresh = at.MultiheadAttention(**cfg)
        fresh.load_state_dict(b)
        back = nn.MultiheadAttention(**cfg)
        back.load_state_dict(fresh.state_dict())
        for name, t in back.state_dict().items():
            assert torch.equal(t, b[name]), f"{cfg}: {name} lost in the round trip"
    assert isinstance(at.MultiheadAttention(8, 2), nn.MultiheadAttention)


def test_mha_bf16():
    cfg = dict(embed_dim=16, num_heads=2, batch_first=True)
    ours, theirs = make_pair(dtype=torch.bfloat16, **cfg)
    t64 = nn.MultiheadAttention(dtype=F64, **cfg)
    t64.load_state_dict({n: p.to(F64) for n, p in theirs.state_dict().items()})
    x = randn(2, 6, 16, dtype=torch.bfloat16, seed=240).requires_grad_(True)
    out, w = ours(x, x, x)
    assert out.dtype == torch.bfloat16 and w.dtype == torch.bfloat16
    ref, _ = t64(x.detach().to(F64), x.detach().to(F64), x.detach().to(F64))
    theirs_out, _ = theirs(x, x, x)  # torch's own bf16 module: its error is the scale
    err_ours = float((out.detach().to(F64) - ref).abs().max())
    err_theirs = float((theirs_out.detach().to(F64) - ref).abs().max())
    assert err_ours <= 2 * err_theirs + 2 ** -8 * float(ref.abs().max()), \
        f"bf16: attn error {err_ours:.3g}, torch bf16 error {err_theirs:.3g}"
    out.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad.float()).all()


def test_mha_non_contiguous_inputs():
    ours, theirs = make_pair(**CONFIGS["basic"])
    base = randn(2, 4, 8, seed=250)  # batch-first storage, handed over as seq-first views
    kv = randn(2, 5, 8, seed=251)
    q, k = base.transpose(0, 1), kv.transpose(0, 1)
    assert not q.is_contiguous()
    assert_close(ours(q, k, k)[0], theirs(q, k, k)[0], n=30, mag=50, what="non-contiguous")


def test_mha_bad_input_raises_attn_error():
    ours = at.MultiheadAttention(8, 2, dtype=F64)
    with pytest.raises(attn.Error, match="embed_dim"):
        ours(randn(3, 2, 6), randn(3, 2, 6), randn(3, 2, 6))
    with pytest.raises(ValueError, match="key_padding_mask"):
        ours(randn(3, 2, 8), randn(4, 2, 8), randn(4, 2, 8),
             key_padding_mask=torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(attn.Error, match="attn_mask"):
        ours(randn(3, 2, 8), randn(4, 2, 8), randn(4, 2, 8),
             attn_mask=torch.zeros(4, 3, dtype=F64))


# ---------------------------------------------------------------------------------------------
# Scoring-function modules.


MODULES = {
    "dot": lambda: at.DotAttention(scaled=False),
    "scaled_dot": lambda: at.DotAttention(),
    "general": lambda: at.GeneralAttention(6, 5),
    "general_lowrank": lambda: at.GeneralAttention(6, 5, rank=2),
    "additive": lambda: at.AdditiveAttention(6, 5, hidden=7),
    "additive_nobias": lambda: at.AdditiveAttention(6, 5, hidden=7, bias=False),
    "concat": lambda: at.ConcatAttention(6, 5, hidden=7),
    "cosine": lambda: at.CosineAttention(tau=4.0),
    "location": lambda: at.LocationAttention(6, max_keys=9),
    "trilinear": lambda: at.TrilinearAttention(6),
}


@pytest.mark.parametrize("name", list(MODULES))
def test_score_modules(name):
    torch.manual_seed(0)
    module = MODULES[name]().double()
    Dk = 6 if name in ("dot", "scaled_dot", "cosine", "trilinear") else 5
    q = randn(2, 3, 4, 6, seed=260).requires_grad_(True)
    k = randn(2, 3, 7, Dk, seed=261).requires_grad_(True)
    v = randn(2, 3, 7, 3, seed=262).requires_grad_(True)
    params = list(module.parameters())
    out, w = module(q, k, v, return_weights=True, causal=True, key_lengths=[7, 5])
    rout, rw, _, rs = ref_attention(q, k, v, score=module.score(), causal=True,
                                    key_lengths=[7, 5])
    smax = 1 + float(rs.abs().max())
    assert_close(out, rout, n=13, mag=smax * 4, what=f"{name} out")
    assert_close(w, rw, n=13, mag=smax, what=f"{name} weights")
    dout = randn(*out.shape, seed=263)
    leaves = [q, k, v] + params
    got = torch.autograd.grad(out, leaves, dout, allow_unused=True)
    want = torch.autograd.grad(rout, leaves, dout, allow_unused=True)  # location: k unused
    for i, (g, wg, leaf) in enumerate(zip(got, want, leaves)):
        g = torch.zeros_like(leaf) if g is None else g
        wg = torch.zeros_like(leaf) if wg is None else wg
        assert_close(g, wg, n=13 * 4, mag=16 * smax * (1 + float(wg.abs().max())),
                     what=f"{name} gradient {i}")
    # 3-D [B, T, D] single-head input and the plain-output form.
    out3 = module(q[:, 0], k[:, 0], v[:, 0], causal=True, key_lengths=[7, 5])
    assert out3.shape == (2, 4, 3)
    assert_close(out3, rout[:, 0], n=13, mag=smax * 4, what=f"{name} 3-D")
    if params:
        module.zero_grad()
        module(q, k, v).sum().backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)


def test_score_module_trains():
    """A few SGD steps of an additive-attention module reduce a regression loss."""
    torch.manual_seed(0)
    module = at.AdditiveAttention(4, 4, hidden=8)
    q, k, v = randn(4, 3, 4, dtype=F32, seed=270), randn(4, 6, 4, dtype=F32, seed=271), \
        randn(4, 6, 2, dtype=F32, seed=272)
    target = randn(4, 3, 2, dtype=F32, seed=273) * 0.1
    opt = torch.optim.SGD(module.parameters(), lr=0.5)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = ((module(q, k, v) - target) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.9 * losses[0], losses
