"""attn.torch: the README's Python example, then a drop-in swap of torch.nn.MultiheadAttention and
PyTorch 2.x's scaled_dot_product_attention on PyTorch 1.13."""
import torch

import attn
import attn.torch

q, k, v = torch.randn(1, 8, 128, 64), torch.randn(1, 2, 128, 64), torch.randn(1, 2, 128, 64)
fwd = attn.attention(q, k, v, causal=True, window=(32, 0), return_weights=True)  # same names
mha = attn.torch.MultiheadAttention(512, 8, batch_first=True)   # drop-in for torch.nn's, autograd
x = torch.randn(4, 100, 512, requires_grad=True)
out, weights = mha(x, x, x, key_padding_mask=torch.zeros(4, 100, dtype=torch.bool))
out.sum().backward()
print("attention", tuple(fwd.out.shape), "MHA", tuple(out.shape), "weights", tuple(weights.shape),
      "grad", tuple(x.grad.shape))

# The same parameters in torch.nn.MultiheadAttention give the same output.
ref = torch.nn.MultiheadAttention(512, 8, batch_first=True)
ref.load_state_dict(mha.state_dict())
with torch.no_grad():
    want, _ = ref(x, x, x)
    got, _ = mha(x, x, x)
print("max |attn - torch.nn|:", float((got - want).abs().max()))

qh = torch.randn(2, 4, 256, 32, requires_grad=True)
o = attn.torch.scaled_dot_product_attention(qh, qh, qh, is_causal=True)
o.square().mean().backward()
print("sdpa", tuple(o.shape), "grad norm", float(qh.grad.norm()))
