"""attn: attention for NumPy and PyTorch, computed by attn's C++ kernels.

Every function takes NumPy arrays (float32, float64) or CPU torch tensors (float32, float64,
bfloat16) of any strides, reads them in place where attn can describe their memory, releases the
GIL while it computes, and returns results of the kind it was given (NumPy in, NumPy out; torch
in, torch out), sharing attn's memory rather than copying it. Bad input raises attn.Error, a
ValueError whose message names the op, the argument and the shapes.

Shapes (as in the C++ API, include/attn/attention.h):
    q [B, Hq, Tq, Dq]   k [B, Hkv, Tk, Dk]   v [B, Hkv, Tk, Dv]   ->   out [B, Hq, Tq, Dv]
with Hq a multiple of Hkv (grouped-query attention: query head h reads key/value head
h // (Hq // Hkv)).

Masks have ONE polarity everywhere in attn: True means "may attend". Fully masked rows give an
output of 0, an lse of -inf and gradients of 0 (PyTorch gives NaN there).

    >>> import numpy as np, attn
    >>> q = np.random.randn(1, 8, 128, 64).astype(np.float32)
    >>> k = v = np.random.randn(1, 2, 128, 64).astype(np.float32)
    >>> out = attn.attention(q, k, v, causal=True).out          # [1, 8, 128, 64]

attn.torch has the autograd-aware versions, scaled_dot_product_attention and a drop-in
MultiheadAttention.
"""

from __future__ import annotations

import dataclasses
from typing import Any, List, NamedTuple, Optional, Sequence, Tuple, Union

from . import _core
from ._core import Error, KVCache as _CoreKVCache

Error.__module__ = "attn"  # shown as attn.Error

__all__ = [
    "Error", "DotScore", "ScaledDotScore", "GeneralScore", "AdditiveScore", "ConcatScore",
    "CosineScore", "LocationScore", "TrilinearScore", "LocalAttention", "AttentionOutput",
    "AttentionGrads", "attention", "attention_backward", "alibi_slopes", "matmul",
    "matmul_backward", "MultiHeadConfig", "MultiHeadWeights", "MultiHeadOutput", "MultiHeadGrads",
    "multihead_attention", "multihead_attention_backward", "KVCache", "multihead_attention_step",
    "Translator", "Translation", "runtime_info", "runtime_summary", "set_num_threads", "reference",
]

__version__ = "0.1.0"

# ------------------------------------------------------------------------------------------------
# Scoring functions. Each holds its learnable parameters as arrays; the gradient of a score comes
# back as the same class with gradients in the same fields. A is the hidden width of additive and
# concat scoring, r the rank of a low-rank general score.


@dataclasses.dataclass
class DotScore:
    """s = q . k  (Dq == Dk)."""
    kind = "dot"


@dataclasses.dataclass
class ScaledDotScore:
    """s = scale * q . k, scale = 1 / sqrt(Dk) unless given  (Dq == Dk)."""
    scale: Optional[float] = None
    kind = "scaled_dot"


@dataclasses.dataclass
class GeneralScore:
    """Luong "general" / bilinear: s = q^T W k. Full: weight [Dq, Dk]; low rank: W = u^T v with
    u [r, Dq], v [r, Dk] (leave weight None)."""
    weight: Any = None
    u: Any = None
    v: Any = None
    kind = "general"


@dataclasses.dataclass
class AdditiveScore:
    """Bahdanau: s = v^T tanh(W_q q + W_k k + bias); w_query [A, Dq], w_key [A, Dk], v [A],
    bias [A] or None."""
    w_query: Any
    w_key: Any
    v: Any
    bias: Any = None
    kind = "additive"


@dataclasses.dataclass
class ConcatScore:
    """Luong concat: s = v^T tanh(W [q; k]); weight [A, Dq + Dk], v [A]."""
    weight: Any
    v: Any
    kind = "concat"


@dataclasses.dataclass
class CosineScore:
    """s = tau * q.k / (max(|q|, eps) max(|k|, eps)); tau [1] is learnable  (Dq == Dk)."""
    tau: Any
    eps: float = 1e-8
    kind = "cosine"


@dataclasses.dataclass
class LocationScore:
    """Luong location: s_j = (W q)_j, independent of the keys; weight [S_max, Dq], Tk <= S_max."""
    weight: Any
    kind = "location"


@dataclasses.dataclass
class TrilinearScore:
    """BiDAF / QANet: s = w^T [q; k; q * k]; weight [3 D]  (Dq == Dk == D)."""
    weight: Any
    kind = "trilinear"


_SCORE_CLASSES = {cls.kind: cls for cls in (DotScore, ScaledDotScore, GeneralScore, AdditiveScore,
                                            ConcatScore, CosineScore, LocationScore,
                                            TrilinearScore)}
Score = Union[str, DotScore, ScaledDotScore, GeneralScore, AdditiveScore, ConcatScore,
              CosineScore, LocationScore, TrilinearScore]


def _score_tensors(score) -> dict:
    return {f.name: getattr(score, f.name) for f in dataclasses.fields(score)
            if f.name not in ("scale", "eps") and getattr(score, f.name) is not None}


# tensors() on every score class: its arrays by field name (the fields that are set).
for _cls in _SCORE_CLASSES.values():
    _cls.tensors = _score_tensors


def _as_score(score: Score):
    if isinstance(score, str):
        if score not in ("dot", "scaled_dot"):
            raise Error(f"[attention] score: '{score}' names no parameter-free scoring function "
                        "(use 'dot' or 'scaled_dot', or a score object such as AdditiveScore)")
        return _SCORE_CLASSES[score]()
    if type(score) not in _SCORE_CLASSES.values():
        raise Error(f"[attention] score: expected a score object (DotScore, AdditiveScore, ...) or "
                    f"'dot' / 'scaled_dot', got {type(score).__name__}")
    return score


def _score_spec(score: Score) -> tuple:
    s = _as_score(score)
    return (s.kind, s.tensors(), getattr(s, "scale", None), getattr(s, "eps", 1e-8))


def _score_from(spec, like) -> Any:
    """A score object of `like`'s class holding the gradients in `spec` = (kind, {field: grad})."""
    kind, grads = spec
    cls = _SCORE_CLASSES[kind]
    if kind in ("dot", "scaled_dot"):
        return None
    fields = {f.name: grads.get(f.name) for f in dataclasses.fields(cls) if f.name != "eps"}
    if kind == "cosine":
        fields["eps"] = like.eps
    return cls(**fields)


@dataclasses.dataclass
class LocalAttention:
    """Luong et al. 2015 local attention: query i sees keys |j - p_i| <= half_width.
    kind "monotonic" (local-m: p_i = pos(i)) or "predictive" (local-p: p_i predicted from q_i by
    w_p [A, Dq] and v_p [A], weights multiplied by a Gaussian of sigma = half_width / 2)."""
    kind: str
    half_width: int
    w_p: Any = None
    v_p: Any = None


class AttentionOutput(NamedTuple):
    out: Any                 # [B, Hq, Tq, Dv]
    lse: Any                 # [B, Hq, Tq]: log-sum-exp of the masked scores; -inf when fully masked
    weights: Any = None      # [B, Hq, Tq, Tk] (return_weights), before dropout
    mean_weights: Any = None  # [B, Tq, Tk], the mean over query heads (return_weights)


class AttentionGrads(NamedTuple):
    dq: Any
    dk: Any
    dv: Any
    dbias: Any = None         # the bias's shape, when a bias was given
    dscore: Any = None        # the score's class with gradients in its fields (None for dot)
    dhead_scores: Any = None  # list, when head_scores were given
    dlocal: Any = None        # LocalAttention with the gradients of w_p and v_p (local-p)


def _spec(score="scaled_dot", head_scores=None, causal=False, alignment="top_left", window=None,
          key_lengths=None, query_lengths=None, allowed=None, bias=None, alibi_slopes=None,
          local=None, dropout=0.0, seed=0, return_weights=False) -> dict:
    if window is not None:
        if not isinstance(window, (tuple, list)) or len(window) != 2:
            raise Error(f"[attention] window: expected (left, right) with None for an unbounded "
                        f"side, got {window!r}")
        window = tuple(window)
    if local is not None:
        if not isinstance(local, LocalAttention):
            raise Error(f"[attention] local: expected attn.LocalAttention, got "
                        f"{type(local).__name__}")
        local = (local.kind, int(local.half_width), local.w_p, local.v_p)
    return {
        "score": _score_spec(score),
        "head_scores": None if head_scores is None else [_score_spec(s) for s in head_scores],
        "causal": bool(causal), "alignment": alignment, "window": window,
        "key_lengths": key_lengths, "query_lengths": query_lengths, "allowed": allowed,
        "bias": bias, "alibi_slopes": alibi_slopes, "local": local, "dropout": float(dropout),
        "seed": int(seed), "return_weights": bool(return_weights),
    }


def attention(q, k, v, *, score: Score = "scaled_dot", head_scores: Optional[Sequence] = None,
              causal: bool = False, alignment: str = "top_left",
              window: Optional[Tuple[Optional[int], Optional[int]]] = None,
              key_lengths: Optional[Sequence[int]] = None,
              query_lengths: Optional[Sequence[int]] = None, allowed=None, bias=None,
              alibi_slopes: Optional[Sequence[float]] = None,
              local: Optional[LocalAttention] = None, dropout: float = 0.0, seed: int = 0,
              return_weights: bool = False) -> AttentionOutput:
    """Attention forward: softmax(score(q, k) + masks) v.

    score          "scaled_dot" (default), "dot", or a score object (AdditiveScore(...), ...)
    head_scores    one score per query head (overrides score)
    causal         key j visible to query i only if j <= pos(i)
    alignment      "top_left": pos(i) = i; "bottom_right": pos(i) = i + Tk - Tq (decoding)
    window         (left, right): pos(i) - left <= j <= pos(i) + right; None = unbounded side
    key_lengths    per batch row: keys j >= key_lengths[b] are padding
    query_lengths  per batch row: query rows i >= query_lengths[b] give 0
    allowed        bool array broadcastable to [B, Hq, Tq, Tk]; True = may attend
    bias           float array broadcastable to [B, Hq, Tq, Tk], added to the scores
    alibi_slopes   per query head: adds -slope[h] * |pos(i) - j| (see attn.alibi_slopes)
    local          LocalAttention (Luong local-m / local-p)
    dropout, seed  dropout on the weights, reproducible from the seed (the backward regenerates it)
    return_weights fill AttentionOutput.weights and .mean_weights
    """
    spec = _spec(score, head_scores, causal, alignment, window, key_lengths, query_lengths,
                 allowed, bias, alibi_slopes, local, dropout, seed, return_weights)
    return AttentionOutput(*_core.attention(q, k, v, spec))


def _grads(raw, kwargs) -> AttentionGrads:
    dq, dk, dv, dbias, dscore, dhead, dlocal = raw
    score = _as_score(kwargs.get("score", "scaled_dot"))
    heads = kwargs.get("head_scores")
    return AttentionGrads(
        dq, dk, dv, dbias, _score_from(dscore, score),
        None if dhead is None else [_score_from(g, _as_score(s)) for g, s in zip(dhead, heads)],
        None if dlocal is None else LocalAttention(kwargs["local"].kind,
                                                   kwargs["local"].half_width, *dlocal))


def attention_backward(q, k, v, forward: AttentionOutput, dout, **kwargs) -> AttentionGrads:
    """Gradients of a loss L given dout = dL/d(forward.out). `forward` is what attention()
    returned for the same inputs; kwargs are the same keyword arguments."""
    spec = _spec(**kwargs)
    return _grads(_core.attention_backward(q, k, v, spec, forward.out, forward.lse, dout), kwargs)


def alibi_slopes(num_heads: int) -> List[float]:
    """The standard ALiBi slopes (Press et al. 2022) for num_heads heads."""
    return _core.alibi_slopes(num_heads)


def matmul(a, b):
    """a @ b with torch.matmul's semantics (1-D promotion, broadcast batch dimensions)."""
    return _core.matmul(a, b)


def matmul_backward(a, b, dout):
    """(da, db) for out = matmul(a, b), summed over broadcast batch dimensions."""
    return _core.matmul_backward(a, b, dout)


# ------------------------------------------------------------------------------------------------
# Multi-head attention (include/attn/multihead.h): projections, attention, output projection.

@dataclasses.dataclass
class MultiHeadConfig:
    d_model: int                # E
    num_heads: int              # Hq
    num_kv_heads: int = 0       # Hkv (0: num_heads); must divide num_heads
    head_dim: int = 0           # Dk (0: d_model // num_heads)
    value_head_dim: int = 0     # Dv (0: head_dim)
    key_input_dim: int = 0      # Ek (0: d_model)
    value_input_dim: int = 0    # Ev (0: d_model)
    bias: bool = True


_WEIGHT_NAMES = ("w_q", "b_q", "w_k", "b_k", "w_v", "b_v", "w_o", "b_o")


@dataclasses.dataclass
class MultiHeadWeights:
    """Row-major [out, in] projection matrices like torch.nn.Linear; biases None without bias."""
    w_q: Any
    w_k: Any
    w_v: Any
    w_o: Any
    b_q: Any = None
    b_k: Any = None
    b_v: Any = None
    b_o: Any = None

    @staticmethod
    def init(config: MultiHeadConfig, dtype: str = "float32", seed: int = 0,
             kind: str = "numpy") -> "MultiHeadWeights":
        """Xavier-uniform matrices and zero biases, a pure function of (config, seed)."""
        return MultiHeadWeights(**_core.multihead_weights_init(dataclasses.asdict(config), dtype,
                                                               seed, kind))

    def _dict(self) -> dict:
        return {n: getattr(self, n) for n in _WEIGHT_NAMES if getattr(self, n) is not None}


class MultiHeadOutput(NamedTuple):
    output: Any                 # [B, Tq, E]
    attention: AttentionOutput  # the heads' attention (weights when return_weights)
    q: Any                      # projected heads [B, Hq, Tq, Dk]
    k: Any                      # [B, Hkv, Tk, Dk]
    v: Any                      # [B, Hkv, Tk, Dv]


class MultiHeadGrads(NamedTuple):
    dquery: Any
    dkey: Any
    dvalue: Any
    dweights: MultiHeadWeights
    attention: AttentionGrads


def _multihead_output(raw) -> MultiHeadOutput:
    output, att, q, k, v = raw
    return MultiHeadOutput(output, AttentionOutput(*att), q, k, v)


def multihead_attention(config: MultiHeadConfig, weights: MultiHeadWeights, query, key, value,
                        **kwargs) -> MultiHeadOutput:
    """query [B, Tq, E], key [B, Tk, Ek], value [B, Tk, Ev] -> output [B, Tq, E]; kwargs as for
    attention() (masks, score, dropout, return_weights)."""
    return _multihead_output(_core.multihead_attention(
        dataclasses.asdict(config), weights._dict(), query, key, value, _spec(**kwargs)))


def multihead_attention_backward(config: MultiHeadConfig, weights: MultiHeadWeights, query, key,
                                 value, saved: MultiHeadOutput, doutput,
                                 **kwargs) -> MultiHeadGrads:
    """Gradients of every input, weight and bias; `saved` is what multihead_attention returned."""
    raw = _core.multihead_attention_backward(
        dataclasses.asdict(config), weights._dict(), query, key, value, _spec(**kwargs),
        (saved.output, saved.attention.out, saved.attention.lse, saved.q, saved.k, saved.v),
        doutput)
    dquery, dkey, dvalue, dweights, att = raw
    return MultiHeadGrads(dquery, dkey, dvalue, MultiHeadWeights(**dweights), _grads(att, kwargs))


class KVCache:
    """The projected keys and values of every position decoded so far (grows on demand).
    dtype: "float32", "float64", "bfloat16" or "int8" (8 bits per value and a float32 scale per
    block of 32 channels, as llama.cpp's q8_0; for float32 queries). keys() and values() are
    views of the valid rows, [B, Hkv, length, D], sharing the cache's memory until it next grows
    (an int8 cache's are dequantised copies; its steps return no k and v)."""

    def __init__(self, config: MultiHeadConfig, batch: int = 1, capacity: int = 0,
                 dtype: str = "float32", kind: str = "numpy"):
        self._cache = _CoreKVCache(dataclasses.asdict(config), batch, capacity, dtype)
        self.kind = kind

    @property
    def length(self) -> int:
        return self._cache.length

    @property
    def capacity(self) -> int:
        return self._cache.capacity

    def keys(self):
        return self._cache.keys(self.kind)

    def values(self):
        return self._cache.values(self.kind)

    def append(self, new_k, new_v) -> None:
        self._cache.append(new_k, new_v)

    def clear(self) -> None:
        self._cache.clear()


def multihead_attention_step(config: MultiHeadConfig, weights: MultiHeadWeights, cache: KVCache,
                             query_step, key_step, value_step, **kwargs) -> MultiHeadOutput:
    """One decoder step: projects and appends key_step/value_step [B, n, E*] to the cache, then
    attends query_step [B, n, E] over every cached position (bottom-right aligned)."""
    return _multihead_output(_core.multihead_attention_step(
        dataclasses.asdict(config), weights._dict(), cache._cache, query_step, key_step,
        value_step, _spec(**kwargs)))


# ------------------------------------------------------------------------------------------------
# The translator.

class Translation(NamedTuple):
    text: str                  # the output, tokens joined by spaces
    tokens: List[str]
    source_tokens: List[str]   # the alignment's columns (the source tokens, then <eos>)
    target_tokens: List[str]   # the alignment's rows (tokens, then <eos> when it was emitted)
    alignment: Any             # float64 NumPy array [rows, columns]; None without attention
    log_prob: float
    score: float               # log_prob / length^length_penalty
    finished: bool             # emitted <eos> within max_length


class Translator:
    """A model trained by `attn train` (a model directory or a .safetensors checkpoint)."""

    def __init__(self, path: str):
        self._translator = _core.Translator.load(str(path))

    @property
    def max_source_tokens(self) -> int:
        return self._translator.max_source_tokens

    def translate(self, sentences: Union[str, Sequence[str]], beam: int = 1,
                  length_penalty: float = 1.0, max_length: int = 0):
        """Translations of the sentences (a blank one gives an empty Translation); one sentence
        in, one Translation out."""
        single = isinstance(sentences, str)
        raw = self._translator.translate([sentences] if single else list(sentences), beam,
                                         length_penalty, max_length)
        out = [Translation("", [], [], [], None, 0.0, 0.0, True) if r is None
               else Translation(**r) for r in raw]
        return out[0] if single else out

    @staticmethod
    def heatmap(translation: Translation) -> str:
        """The alignment as the terminal heatmap `attn translate` prints."""
        if translation.alignment is None:
            return ""
        return _core.terminal_heatmap(translation.source_tokens, translation.target_tokens,
                                      translation.alignment.tolist())


# ------------------------------------------------------------------------------------------------
# The process.

def runtime_info() -> dict:
    """The SIMD target, BLAS library and kernel, and thread counts attn runs with."""
    return _core.runtime_info()


def runtime_summary() -> str:
    """The lines `attn --version` prints about the runtime."""
    return _core.runtime_summary()


def set_num_threads(threads: int) -> None:
    """Threads of attn's kernels (OpenMP) and of its BLAS products, process-wide."""
    _core.set_num_threads(threads)


from . import reference  # noqa: E402  (needs the definitions above)
