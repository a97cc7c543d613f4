"""attn from NumPy: grouped-query causal attention with a sliding window, its alignment weights,
and the backward pass; the same call with Bahdanau's additive score."""
import numpy as np

import attn

rng = np.random.default_rng(0)
# q [B, Hq, Tq, D]; k and v [B, Hkv, Tk, D]: 8 query heads share 2 key/value heads.
q = rng.standard_normal((1, 8, 128, 64), dtype=np.float32)
k = rng.standard_normal((1, 2, 128, 64), dtype=np.float32)
v = rng.standard_normal((1, 2, 128, 64), dtype=np.float32)

fwd = attn.attention(q, k, v, causal=True, window=(32, 0), return_weights=True)
grads = attn.attention_backward(q, k, v, fwd, np.ones_like(fwd.out), causal=True, window=(32, 0))
print("out", fwd.out.shape, "weights", fwd.weights.shape, "dq", grads.dq.shape)

additive = attn.AdditiveScore(w_query=rng.standard_normal((32, 64), dtype=np.float32) * 0.1,
                              w_key=rng.standard_normal((32, 64), dtype=np.float32) * 0.1,
                              v=rng.standard_normal(32, dtype=np.float32))
out = attn.attention(q, k, v, score=additive, key_lengths=[100]).out
print("additive", out.shape, "max |difference| from the float64 reference:",
      float(np.abs(out - attn.reference.attention(q, k, v, score=additive,
                                                  key_lengths=[100]).out).max()))
print(attn.runtime_summary())
