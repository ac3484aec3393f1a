"""S4D's causal FFT convolution as one autograd Function whose backward reuses the forward spectra: against the
direct causal sum (forward and both gradients), float64 gradcheck, and only the needed gradients computed."""

from __future__ import annotations

import pytest
import torch

from layers.ops.s4_kernel.chunked import fft_causal_conv


def direct(u: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """y[b, h, t] = Σ_{s <= t} K[h, t - s] u[b, h, s], as a plain loop over lags."""
    t_len = u.shape[-1]
    y = torch.zeros_like(u)
    for lag in range(t_len):
        y[..., lag:] = y[..., lag:] + K[:, lag, None] * u[..., :t_len - lag]
    return y


@pytest.mark.parametrize("t_len", [1, 2, 9, 64, 100])
def test_matches_direct_sum_forward_and_gradients(t_len):
    g = torch.Generator().manual_seed(t_len)
    u = torch.randn(3, 4, t_len, generator=g, dtype=torch.float64, requires_grad=True)
    K = torch.randn(4, t_len, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 4, t_len, generator=g, dtype=torch.float64)
    y0 = direct(u, K)
    g0 = torch.autograd.grad((y0 * w).sum(), (u, K))
    y1 = fft_causal_conv(u, K)
    g1 = torch.autograd.grad((y1 * w).sum(), (u, K))
    assert y1.shape == y0.shape and y1.dtype == torch.float64
    assert torch.allclose(y1, y0, atol=1e-10)
    for a, b in zip(g1, g0):
        assert torch.allclose(a, b, atol=1e-10)


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(1)
    u = torch.randn(2, 3, 11, generator=g, dtype=torch.float64, requires_grad=True)
    K = torch.randn(3, 11, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fft_causal_conv, (u, K))


def test_fp32_and_one_sided_gradients():
    g = torch.Generator().manual_seed(2)
    u = torch.randn(2, 5, 300, generator=g)
    K = torch.randn(5, 300, generator=g, requires_grad=True) * 0.1
    y = fft_causal_conv(u, K)
    assert y.dtype == torch.float32 and y.is_contiguous()
    y0 = direct(u.double(), K.double())
    assert ((y.double() - y0).norm() / y0.norm()).item() <= 1e-6
    (gk,) = torch.autograd.grad(y.sum(), K)  # u needs no gradient: only K's is formed
    (gk0,) = torch.autograd.grad(direct(u, K).sum(), K)
    assert ((gk - gk0).norm() / gk0.norm()).item() <= 1e-5
