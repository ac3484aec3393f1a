"""Hyena long convolution: FFT (size 2L) against the direct token-by-token convolution, outputs and grads."""

from __future__ import annotations

import pytest
import torch

from layers.ops import dispatch
from layers.ops.hyena import long_conv, long_conv_fft, long_conv_naive

TOL = 1e-4


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def _inputs(b: int, c: int, length: int, taps: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    decay = torch.exp(-0.05 * torch.arange(taps, dtype=torch.float32))  # a filter that decays, as Hyena's do
    return [torch.randn(b, c, length, generator=g), torch.randn(c, taps, generator=g) * decay,
            torch.randn(c, generator=g)]


def _run(fn, inputs):
    xs = [x.clone().requires_grad_(True) for x in inputs]
    y = fn(*xs)
    y.mul(torch.randn(y.shape, generator=torch.Generator().manual_seed(9))).sum().backward()
    return y.detach(), [x.grad for x in xs]


@pytest.mark.parametrize("b, c, length, taps", [
    pytest.param(2, 3, 1, 1, id="L1"),
    pytest.param(2, 5, 7, 7, id="L7"),
    pytest.param(1, 4, 33, 40, id="L33-longer-filter"),
    pytest.param(2, 8, 101, 101, id="L101"),
])
def test_fft_matches_direct_outputs_and_grads(b, c, length, taps):
    inputs = _inputs(b, c, length, taps)
    y_ref, g_ref = _run(long_conv_naive, inputs)
    y, grads = _run(long_conv_fft, inputs)
    assert y.shape == (b, c, length)
    assert rel_err(y, y_ref) <= TOL
    for name, gg, gr in zip(("u", "h", "skip"), grads, g_ref):
        assert rel_err(gg, gr) <= TOL, f"d{name}: {rel_err(gg, gr):.2e}"


def test_causal_and_skip():
    u, h, skip = _inputs(1, 2, 16, 16)
    y = long_conv_fft(u, h, skip)
    u2 = u.clone()
    u2[..., 10:] += 1.0  # changing the future leaves the past unchanged
    assert torch.allclose(long_conv_fft(u2, h, skip)[..., :10], y[..., :10], atol=1e-6)
    delta = torch.zeros(1, 2, 5)
    delta[..., 0] = 1.0  # impulse response = h, plus the skip at lag 0
    resp = long_conv_naive(delta, h, skip)
    assert torch.allclose(resp[0, :, 1:], h[:, 1:5]) and torch.allclose(resp[0, :, 0], h[:, 0] + skip)


def test_dispatch_routes_to_forced_backend():
    inputs = _inputs(1, 2, 9, 9)
    with dispatch.force("naive"):
        assert torch.equal(long_conv(*inputs), long_conv_naive(*inputs))
    with dispatch.force("chunked"):
        assert torch.equal(long_conv(*inputs), long_conv_fft(*inputs))
