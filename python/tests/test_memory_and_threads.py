"""What crosses the Python boundary: inputs read in place (data pointers), non-contiguous inputs,
results that share attn's memory, the GIL released while attn computes, several Python threads
calling at once."""

import threading
import time

import numpy as np
import pytest

import attn
from attn import _core

RNG = np.random.default_rng(3)


def test_numpy_inputs_are_read_in_place_with_any_strides():
    x = RNG.standard_normal((2, 3, 8, 16)).astype(np.float32)
    info = _core.view_info(x)
    assert info["data_ptr"] == x.ctypes.data and not info["copied"]
    assert info["strides"] == [384, 128, 16, 1]
    t = x.transpose(0, 2, 1, 3)  # a strided view: still no copy
    info = _core.view_info(t)
    assert info["data_ptr"] == t.ctypes.data and not info["copied"]
    assert info["strides"] == [384, 16, 128, 1]
    s = x[:, :, ::2, 1:]  # every other row, an offset
    info = _core.view_info(s)
    assert info["data_ptr"] == s.ctypes.data and not info["copied"]
    assert info["strides"] == [384, 128, 32, 1]
    b = np.broadcast_to(x[:, :1], (2, 3, 8, 16))  # stride 0
    assert not _core.view_info(b)["copied"]


def test_layouts_attn_cannot_view_are_copied_once():
    x = RNG.standard_normal((4, 8)).astype(np.float32)
    assert _core.view_info(x[::-1])["copied"]  # negative strides
    raw = np.zeros(4 * 8 * 4 + 1, dtype=np.uint8)[1:].view(np.float32).reshape(4, 8)
    assert _core.view_info(raw)["copied"] is False  # misaligned but whole-element strides
    assert _core.view_info([[1.0, 2.0]])["copied"]  # a list


def test_non_contiguous_inputs_give_the_contiguous_results():
    q = RNG.standard_normal((1, 16, 2, 8)).astype(np.float32).transpose(0, 2, 1, 3)
    k = RNG.standard_normal((1, 2, 24, 16)).astype(np.float32)[..., ::2]
    v = np.asfortranarray(RNG.standard_normal((1, 2, 24, 8)).astype(np.float32))
    got = attn.attention(q, k, v, causal=True)
    want = attn.attention(*(np.ascontiguousarray(x) for x in (q, k, v)), causal=True)
    assert np.array_equal(got.out, want.out)


def test_results_share_attn_memory():
    q = RNG.standard_normal((1, 2, 4, 8))
    out = attn.attention(q, q, q)
    assert not out.out.flags.owndata  # a view of attn's buffer, not a copy
    assert type(out.out.base).__name__ == "PyCapsule"
    out.out[...] += 1  # writable and alive after the call
    assert np.isfinite(out.out).all()


def test_torch_inputs_are_read_in_place_and_results_are_torch():
    torch = pytest.importorskip("torch")
    x = torch.randn(2, 3, 8, 16)
    assert _core.view_info(x)["data_ptr"] == x.data_ptr()
    t = x.transpose(1, 2)
    info = _core.view_info(t)
    assert info["data_ptr"] == t.data_ptr() and not info["copied"]
    assert info["strides"] == list(t.stride())
    h = x.to(torch.bfloat16)
    info = _core.view_info(h)
    assert info["dtype"] == "bf16" and info["data_ptr"] == h.data_ptr()
    g = x.clone().requires_grad_()
    assert _core.view_info(g)["data_ptr"] == g.data_ptr()
    out = attn.attention(t, t, t)
    assert isinstance(out.out, torch.Tensor) and out.out.dtype == torch.float32
    o64 = attn.attention(t.double(), t.double(), t.double())
    assert o64.out.dtype == torch.float64
    ob = attn.attention(h, h, h)
    assert ob.out.dtype == torch.float32  # bf16 is storage; results are float32
    with pytest.raises(attn.Error, match="int64"):
        attn.attention(x.long(), x, x)


def test_the_gil_is_released_while_attn_computes():
    q = RNG.standard_normal((1, 4, 1024, 64)).astype(np.float32)
    done = threading.Event()
    ticks = 0

    def work():
        attn.attention(q, q, q, score=attn.AdditiveScore(
            RNG.standard_normal((32, 64)).astype(np.float32),
            RNG.standard_normal((32, 64)).astype(np.float32),
            RNG.standard_normal(32).astype(np.float32)))
        done.set()

    thread = threading.Thread(target=work)
    start = time.perf_counter()
    thread.start()
    while not done.is_set():
        ticks += 1  # Python code runs here only while the call has let go of the GIL
        time.sleep(0.0005)
    thread.join()
    elapsed = time.perf_counter() - start
    assert elapsed > 0.01, "the call was too short to show anything"
    assert ticks >= 5, f"the main thread ran {ticks} times in {elapsed:.3f} s"


def test_several_python_threads_at_once_give_the_single_thread_results():
    inputs = [tuple(RNG.standard_normal((2, 4, 33, 16)).astype(np.float32) for _ in range(3))
              for _ in range(8)]
    kw = dict(causal=True, key_lengths=[33, 20])
    want = [attn.attention(*x, **kw).out for x in inputs]
    got = [None] * len(inputs)
    errors = []

    def run(i):
        try:
            for _ in range(5):
                out = attn.attention(*inputs[i], **kw)
                g = attn.attention_backward(*inputs[i], out, out.out, **kw)
                assert g.dq.shape == inputs[i][0].shape
            got[i] = out.out
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for g, w in zip(got, want):
        assert np.array_equal(g, w)
