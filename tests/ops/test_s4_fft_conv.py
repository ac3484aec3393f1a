"""S4D's causal FFT convolution as one autograd Function whose backward reuses the forward spectra: against the
direct causal sum (forward and both gradients), float64 gradcheck, and only the needed gradients computed."""

from __future__ import annotations

import pytest
import torch

from layers.ops.s4_kernel import s4d_init
from layers.ops.s4_kernel.chunked import fft_causal_conv


def direct(u: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """y[b, h, t] = Σ_{s <= t} K[h, t - s] u[b, h, s], as a plain loop over lags."""
    t_len = u.shape[-1]
    y = torch.zeros_like(u)
    for lag in range(t_len):
        y[..., lag:] = y[..., lag:] + K[:, lag, None] * u[..., :t_len - lag]
    return y


@pytest.mark.parametrize("t_len", [1, 2, 9, 64, 100])
@pytest.mark.parametrize("batch", [1, 3])
def test_matches_direct_sum_forward_and_gradients(t_len, batch):
    g = torch.Generator().manual_seed(t_len)
    u = torch.randn(batch, 4, t_len, generator=g, dtype=torch.float64, requires_grad=True)
    K = torch.randn(4, t_len, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(batch, 4, t_len, generator=g, dtype=torch.float64)
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


def _modes(h: int = 2, m: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    dt = torch.empty(h, dtype=torch.float64).uniform_(0.01, 0.2, generator=g)
    A = torch.complex(-torch.rand(h, m, generator=g, dtype=torch.float64) - 0.1,
                      3 * torch.randn(h, m, generator=g, dtype=torch.float64))
    return dt, A


@pytest.mark.parametrize("length, block", [(11, 4), (16, 4), (5, 8), (1, 1), (9, 2)])
def test_s4d_kernel_matches_vandermonde_and_gradcheck(length, block):
    """K_l = 2 Re Σ_m W_m exp(l·ΔA_m) from lag-major factors and one real matmul per channel, its fused backward
    (∂W, ∂Δ, ∂A) by hand, against finite differences in float64."""
    from layers.ops.s4_kernel.chunked import s4d_kernel, vandermonde

    dt, A = _modes(seed=length)
    g = torch.Generator().manual_seed(1)
    W = torch.randn(2, 3, generator=g, dtype=torch.complex128)
    K = s4d_kernel(dt, A, W, length, block)
    want = 2 * torch.einsum("hm,hml->hl", W, vandermonde(dt, A, length)).real
    assert K.shape == (2, length) and torch.allclose(K, want, atol=1e-12)
    args = tuple(x.clone().requires_grad_(True) for x in (dt, A, W))
    assert torch.autograd.gradcheck(lambda d, a, w: s4d_kernel(d, a, w, length, block), args)


def test_s4d_kernel_one_sided_gradients_and_fp32():
    """Only the inputs that ask for a gradient get one; fp32 kernels and their gradients against float64."""
    from layers.ops.s4_kernel.chunked import s4d_kernel

    dt, A = _modes(h=3, m=4, seed=5)
    g = torch.Generator().manual_seed(2)
    W = torch.randn(3, 4, generator=g, dtype=torch.complex128)
    gk = torch.randn(3, 300, generator=g, dtype=torch.float64)
    w32 = W.to(torch.complex64).requires_grad_(True)
    K32 = s4d_kernel(dt.float(), A.to(torch.complex64), w32, 300)
    (g32,) = torch.autograd.grad((K32 * gk.float()).sum(), w32)
    w64 = W.clone().requires_grad_(True)
    a64 = A.clone().requires_grad_(True)
    K64 = s4d_kernel(dt, a64, w64, 300)
    g64w, g64a = torch.autograd.grad((K64 * gk).sum(), (w64, a64))
    assert K32.dtype == torch.float32 and ((K32.double() - K64).norm() / K64.norm()).item() <= 1e-6
    assert ((g32.to(torch.complex128) - g64w).norm() / g64w.norm()).item() <= 1e-6
    d32 = dt.float().requires_grad_(True)
    a32 = A.to(torch.complex64).requires_grad_(True)
    gd, ga = torch.autograd.grad((s4d_kernel(d32, a32, W.to(torch.complex64), 300) * gk.float()).sum(), (d32, a32))
    assert ((ga.to(torch.complex128) - g64a).norm() / g64a.norm()).item() <= 1e-5
    assert gd.shape == (3,) and torch.isfinite(gd).all()


@pytest.mark.parametrize("bsz, length", [(1, 16), (2, 11), (3, 5), (1, 1), (2, 64)])
def test_s4d_state_sum_matches_direct_sum_and_gradcheck(bsz, length):
    """Σ_l u_l exp((T-1-l)·ΔA) from front-padded input and reversed lag-major factors, its backward (∂u, ∂Δ, ∂A) by
    hand, against the direct sum and finite differences in float64."""
    from layers.ops.s4_kernel.chunked import s4d_state_sum

    dt, A = _modes(seed=length + bsz)
    g = torch.Generator().manual_seed(3)
    u = torch.randn(bsz, length, 2, generator=g, dtype=torch.float64)
    powers = torch.exp(dt[:, None, None] * A[..., None] * torch.arange(length - 1, -1, -1, dtype=torch.float64))
    want = torch.einsum("blh,hml->bhm", u.to(torch.complex128), powers)
    got = s4d_state_sum(dt, A, u)
    assert got.shape == (bsz, 2, 3) and torch.allclose(got, want, atol=1e-12)
    args = tuple(x.clone().requires_grad_(True) for x in (dt, A, u))
    assert torch.autograd.gradcheck(s4d_state_sum, args)


def test_lag_major_factors_accurate_against_float64_at_long_range():
    """The kernel's factors (one float64-phase exponential, powers of two by squaring, doubling in complex128):
    P[t]·Q[s] within 1.5e-7 of a float64 exp(l·ΔA) over 8192 lags for S4D-Inv's fastest modes, conjugated when asked;
    a block that is not a power of two is refused."""
    from layers.ops.s4_kernel.chunked import _time_major_powers

    real, imag = s4d_init("inv", 64)
    A = torch.complex(real, imag)[None].repeat(3, 1)
    dt = torch.tensor([0.1, 0.01, 0.001])
    lags = torch.arange(8192)
    ref = torch.exp(dt.double()[:, None, None] * A.to(torch.complex128)[:, None, :] * lags.double()[:, None])
    for conj in (False, True):
        P, Q = _time_major_powers(dt, A, 64, 128, conj=conj)
        assert P.shape == (3, 64, 32) and Q.shape == (3, 128, 32) and P.dtype == torch.complex64
        V = P[:, lags % 64].to(torch.complex128) * Q[:, lags // 64].to(torch.complex128)
        assert (V - (ref.conj() if conj else ref)).abs().max().item() <= 1.5e-7
    with pytest.raises(ValueError, match="power of two"):
        _time_major_powers(dt, A, 6, 3, conj=False)


def test_s4d_kernel_with_a_w_per_row_and_gradcheck():
    """W (B, H, M) gives one kernel per row (the carried state's contribution, W = C·dA·x0): each equals the kernel
    of its own W, and the fused backward (∂W per row, ∂Δ and ∂A summed over rows) passes gradcheck."""
    from layers.ops.s4_kernel.chunked import s4d_kernel

    dt, A = _modes(seed=7)
    g = torch.Generator().manual_seed(4)
    W = torch.randn(3, 2, 3, generator=g, dtype=torch.complex128)
    K = s4d_kernel(dt, A, W, 13, 4)
    assert K.shape == (3, 2, 13)
    for r in range(3):
        assert torch.allclose(K[r], s4d_kernel(dt, A, W[r], 13, 4), atol=1e-13)
    args = tuple(x.clone().requires_grad_(True) for x in (dt, A, W))
    assert torch.autograd.gradcheck(lambda d, a, w: s4d_kernel(d, a, w, 13, 4), args)
