"""The depthwise causal conv (+ SiLU) of Mamba-1/2: the time-major chunked path against the F.conv1d oracle,
forward, new state and every gradient (x, weight, bias, incoming state), in float64 (gradcheck) and fp32."""

from __future__ import annotations

import pytest
import torch

from layers.ops.causal_conv1d import BACKENDS, causal_conv1d
from layers.ops.causal_conv1d.chunked import causal_conv1d_chunked
from layers.ops.causal_conv1d.naive import causal_conv1d_naive


def _inputs(b, t, c, k, dtype, *, state, bias, split=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    if split:  # a split view of a bigger projection, as in the layer: strides (T·3C, 3C, 1)
        big = torch.randn(b, t, 3 * c, generator=g, dtype=dtype)
        x = big.split((c, c, c), dim=-1)[1]
        assert b * t == 1 or not x.is_contiguous()
    else:
        x = torch.randn(b, t, c, generator=g, dtype=dtype)
    w = torch.randn(c, k, generator=g, dtype=dtype) / k ** 0.5
    bb = torch.randn(c, generator=g, dtype=dtype) if bias else None
    s = torch.randn(b, c, k - 1, generator=g, dtype=dtype) if state else None
    return x, w, bb, s


CASES = [(2, 7, 5, 4), (2, 3, 5, 4), (1, 1, 3, 4), (2, 6, 4, 1), (1, 2, 3, 2)]  # (B, T, C, K): T < K, T = 1, K = 1


@pytest.mark.parametrize("b,t,c,k", CASES)
@pytest.mark.parametrize("activation", ["silu", None])
@pytest.mark.parametrize("state", [False, True])
def test_gradcheck_float64(b, t, c, k, activation, state):
    x, w, bb, s = _inputs(b, t, c, k, torch.float64, state=state, bias=True)
    leaves = [v.clone().requires_grad_(True) for v in (x, w, bb)] + ([s.clone().requires_grad_(True)] if state else [])

    def f(*args):
        xs, ws, bs = args[:3]
        st = args[3] if state else None
        return causal_conv1d_chunked(xs, ws, bs, st, activation=activation)

    assert torch.autograd.gradcheck(f, tuple(leaves))


@pytest.mark.parametrize("b,t,c,k", CASES + [(3, 33, 16, 4)])
@pytest.mark.parametrize("activation", ["silu", None])
@pytest.mark.parametrize("state", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_and_gradients_match_naive(b, t, c, k, activation, state, bias, split, dtype):
    x, w, bb, s = _inputs(b, t, c, k, dtype, state=state, bias=bias, split=split, seed=1)
    outs, grads = [], []
    for fn in (causal_conv1d_naive, causal_conv1d_chunked):
        leaves = [v.detach().clone().requires_grad_(True) if v is not None else None for v in (x, w, bb, s)]
        y, ns = fn(*leaves, activation=activation)
        assert y.shape == (b, t, c) and ns.shape == (b, c, k - 1) and y.dtype == dtype
        g = torch.Generator().manual_seed(2)
        gy, gs = torch.randn(y.shape, generator=g, dtype=dtype), torch.randn(ns.shape, generator=g, dtype=dtype)
        ((y * gy).sum() + (ns * gs).sum()).backward()
        outs.append((y.detach(), ns.detach()))
        grads.append([v.grad if v is not None else None for v in leaves])
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(outs[1][0], outs[0][0], **tol)
    torch.testing.assert_close(outs[1][1], outs[0][1], **tol)
    for got, want in zip(grads[1], grads[0]):
        assert (got is None) == (want is None)
        if got is not None:
            torch.testing.assert_close(got, want, **tol)


def test_new_state_keeps_the_last_inputs_when_t_is_shorter_than_the_window():
    x, w, bb, s = _inputs(1, 2, 3, 4, torch.float64, state=True, bias=True)
    _, ns = causal_conv1d_chunked(x, w, bb, s, activation="silu")
    torch.testing.assert_close(ns, torch.cat((s[:, :, 2:], x.transpose(1, 2)), dim=2))


def test_entry_dispatches_and_prefill_then_steps_equal_the_whole_sequence():
    assert set(BACKENDS) >= {"naive", "chunked"}
    x, w, bb, _ = _inputs(2, 9, 6, 4, torch.float64, state=False, bias=True)
    y_all, s_all = causal_conv1d(x, w, bb, None, activation="silu", backend="chunked")
    y0, st = causal_conv1d(x[:, :5], w, bb, None, activation="silu", backend="chunked")
    ys = [y0]
    for t in range(5, 9):
        yt, st = causal_conv1d(x[:, t:t + 1], w, bb, st, activation="silu", backend="chunked")
        ys.append(yt)
    torch.testing.assert_close(torch.cat(ys, dim=1), y_all)
    torch.testing.assert_close(st, s_all)


@pytest.mark.parametrize("variant", ["mamba2", "mamba1"])
def test_mamba_layer_runs_its_conv_through_the_op(variant, monkeypatch):
    """Mamba-1/2 call ``causal_conv1d`` with the layer's backend key; the chunked node shows in the graph, and
    the forced naive oracle gives the same output through the whole layer."""
    from layers.mamba import Mamba
    from layers.ops import dispatch

    torch.manual_seed(0)
    layer = Mamba(32, Mamba.Config(variant=variant, d_state=8, headdim=16, chunk_size=8), n_layers=2)
    u = torch.randn(2, 11, 32)
    calls = []
    real = BACKENDS["chunked"]
    monkeypatch.setitem(BACKENDS, "chunked", lambda *a, **k: calls.append(1) or real(*a, **k))
    y, st = layer.prefill(u)
    assert calls and st["conv"].shape == (2, layer.conv.weight.shape[0], layer.config.d_conv - 1)
    names, seen, todo = set(), set(), [y.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is not None and id(fn) not in seen:
            seen.add(id(fn))
            names.add(type(fn).__name__)
            todo.extend(f for f, _ in fn.next_functions)
    assert "_CausalConvBackward" in names and "ConvolutionBackward0" not in names
    with dispatch.force("naive"):
        y_ref, st_ref = layer.prefill(u)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(st["conv"], st_ref["conv"])


def test_a_triton_request_runs_the_chunked_path(monkeypatch):
    """The conv has no kernel: a layer configured (or a run forced) to Triton for its scan still gets its conv,
    from the chunked path, instead of a BackendError."""
    from layers.ops import dispatch

    x, w, bb, s = _inputs(2, 5, 4, 4, torch.float64, state=True, bias=True)
    want = causal_conv1d_chunked(x, w, bb, s, activation="silu")
    torch.testing.assert_close(causal_conv1d(x, w, bb, s, activation="silu", backend="triton")[0], want[0])
    with dispatch.force("triton"):
        got = causal_conv1d(x, w, bb, s, activation="silu")
    torch.testing.assert_close(got[0], want[0])
    monkeypatch.setenv(dispatch.ENV, "triton")
    torch.testing.assert_close(causal_conv1d(x, w, bb, s, activation="silu")[1], want[1])
