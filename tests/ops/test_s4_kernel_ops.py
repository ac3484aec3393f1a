"""S4D op: the FFT path against the recurrence (output, state, every gradient, with and without a carried
state), no wrap-around, the Vandermonde phase at long range, HiPPO-LegS and the S4D initialisations."""

from __future__ import annotations

import math

import pytest
import torch

from layers.ops import dispatch
from layers.ops.s4_kernel import (
    discretize,
    hippo_legs,
    lag_factors,
    legs_normal_part,
    s4d_conv,
    s4d_fft,
    s4d_init,
    s4d_naive,
    vandermonde,
)

B, H, N = 2, 3, 8
M = N // 2


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().norm() / b.abs().norm().clamp_min(1e-12)).item()


def real_params(init: str, seed: int = 0) -> list[torch.Tensor]:
    """The layer's real parameters (log_dt, log_A_real, A_imag, C as a real view), off the symmetric init."""
    g = torch.Generator().manual_seed(seed)
    real, imag = s4d_init(init, N)
    log_dt = torch.empty(H).uniform_(math.log(1e-3), math.log(1e-1), generator=g)
    log_a = torch.log(-real).repeat(H, 1) + 0.1 * torch.randn(H, M, generator=g)
    a_imag = imag.repeat(H, 1) + 0.1 * torch.randn(H, M, generator=g)
    c = torch.randn(H, M, 2, generator=g)
    return [t.requires_grad_(True) for t in (log_dt, log_a, a_imag, c)]


def ssm(params: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    log_dt, log_a, a_imag, c = params
    return torch.exp(log_dt), torch.complex(-torch.exp(log_a), a_imag), torch.view_as_complex(c)


def run(fn, u, params, state):
    y, s = fn(u, *ssm(params), state)
    g = torch.Generator().manual_seed(9)
    loss = (y * torch.randn(y.shape, generator=g)).sum()
    ws = torch.randn(s.shape, dtype=torch.complex64, generator=g)
    loss = loss + (s.real * ws.real).sum() + (s.imag * ws.imag).sum()
    leaves = [u, *params] + ([state] if state is not None else [])
    return y.detach(), s.detach(), torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("init", ["lin", "inv", "legs"])
@pytest.mark.parametrize("t_len", [1, 2, 6, 17])
@pytest.mark.parametrize("carry", [False, True], ids=["zero-state", "carried-state"])
def test_fft_matches_recurrence_outputs_states_gradients(init, t_len, carry):
    g = torch.Generator().manual_seed(t_len)
    u = torch.randn(B, t_len, H, generator=g).requires_grad_(True)
    state = torch.randn(B, H, M, dtype=torch.complex64, generator=g).requires_grad_(True) if carry else None
    params = real_params(init, seed=t_len)
    y0, s0, g0 = run(s4d_naive, u, params, state)
    y1, s1, g1 = run(s4d_fft, u, params, state)
    assert y1.shape == (B, t_len, H) and s1.shape == (B, H, M) and s1.dtype == torch.complex64
    assert rel(y1, y0) <= 1e-5 and rel(s1, s0) <= 1e-5
    names = ["u", "log_dt", "log_A_real", "A_imag", "C", "state"]
    for name, a, b in zip(names, g1, g0):
        assert rel(a, b) <= 1e-4, f"grad {name}: {rel(a, b):.2e}"


def test_split_with_state_equals_whole_and_want_state():
    u = torch.randn(B, 20, H, generator=torch.Generator().manual_seed(1))
    dt, A, C = (t.detach() for t in ssm(real_params("lin")))
    for fn in (s4d_naive, s4d_fft):
        y, s = fn(u, dt, A, C)
        y1, s1 = fn(u[:, :7], dt, A, C)
        y2, s2 = fn(u[:, 7:], dt, A, C, s1)
        assert rel(torch.cat((y1, y2), dim=1), y) <= 1e-5 and rel(s2, s) <= 1e-5
        y3, none = fn(u, dt, A, C, want_state=False)
        assert none is None and torch.equal(y3, y)


def test_no_wrap_around_and_causal():
    """Zero-padding to 2T: an input at the last position leaves every earlier output unchanged up to FFT
    roundoff, where a circular convolution of size T spreads it over every position."""
    dt, A, C = (t.detach() for t in ssm(real_params("lin")))
    dt = torch.full((H,), 0.01)  # slow decay: the kernel is far from zero at lag T-1
    u = torch.zeros(1, 16, H)
    u[:, -1] = 1.0
    y, _ = s4d_fft(u, dt, A, C)
    scale = y[:, -1].abs().max()
    assert scale > 0 and y[:, :-1].abs().max() <= 1e-6 * scale
    _, dB = discretize(dt, A)
    K = 2 * torch.einsum("hm,hmt->ht", C * dB, vandermonde(dt, A, 16)).real
    circular = torch.fft.irfft(torch.fft.rfft(u[0].T, n=16) * torch.fft.rfft(K, n=16), n=16)
    assert circular[:, :-1].abs().max() > 0.1 * scale  # what the padding prevents
    # and the impulse response is the Vandermonde kernel K_l = 2 Re(Σ C dB dA^l)
    u3 = torch.zeros(1, 16, H)
    u3[:, 0] = 1.0
    assert rel(s4d_fft(u3, dt, A, C)[0][0].T, K) <= 1e-5


def test_vandermonde_phase_accurate_at_long_range():
    """S4D-Inv's fastest mode turns ~128 rad a step at Δ = 0.1: a phase formed in fp32 errs by ~5e-5 against a
    float64 reference; the float64-reduced phase stays at ~3e-7."""
    real, imag = s4d_init("inv", 64)
    A = torch.complex(real, imag)[None]
    for d in (0.1, 0.001):
        dt = torch.tensor([d])
        V = vandermonde(dt, A, 1024)
        steps = torch.arange(1024.0).double()
        ref = torch.exp(dt.double()[:, None, None] * A.to(torch.complex128)[..., None] * steps)
        assert (V.to(torch.complex128) - ref).abs().max() <= 2e-6


def test_hippo_legs_closed_form():
    n_ = 6
    A, Bv = hippo_legs(n_)
    for n in range(n_):
        for k in range(n_):
            want = -math.sqrt(2 * n + 1) * math.sqrt(2 * k + 1) if n > k else (-(n + 1) if n == k else 0.0)
            assert A[n, k].item() == pytest.approx(want, abs=1e-12)
        assert Bv[n].item() == pytest.approx(math.sqrt(2 * n + 1))
    # S4's construction: M_nk = -(2k+1) for n >= k plus n on the diagonal, then A = T M T^-1, T = diag(sqrt(2q+1))
    q = torch.arange(n_, dtype=torch.float64)
    Mm = (-(2 * q + 1)[None, :].expand(n_, n_)).tril() + torch.diag(q)
    T = torch.diag(torch.sqrt(2 * q + 1))
    assert torch.allclose(T @ Mm @ torch.linalg.inv(T), A)


def test_legs_eigenvalues_give_s4d_real_and_s4d_legs():
    A, _ = hippo_legs(N)
    # lower-triangular: eigenvalues -1 ... -N, the S4D-Real spectrum (Mamba-1's A init)
    eig = torch.linalg.eigvals(A).real.sort().values
    assert torch.allclose(eig, -torch.arange(N, 0, -1, dtype=torch.float64))
    # NPLR: A + P Pᵀ = -I/2 + S with S skew-symmetric; S4D-LegS keeps -1/2 + i·w for the positive w
    S, w = legs_normal_part(N)
    assert torch.allclose(S + S.T, torch.zeros(N, N, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(w, torch.tensor([0.427, 1.958, 5.354, 19.857], dtype=torch.float64), atol=1e-3)
    full = torch.linalg.eigvals(S - 0.5 * torch.eye(N, dtype=torch.float64))
    assert torch.allclose(full.real, torch.full((N,), -0.5, dtype=torch.float64), atol=1e-9)
    real, imag = s4d_init("legs", N)
    assert torch.equal(real, torch.full((M,), -0.5)) and torch.allclose(imag.double(), w, atol=1e-5)


def test_s4d_lin_and_inv_values():
    real, imag = s4d_init("lin", 8)
    assert torch.equal(real, torch.full((4,), -0.5)) and torch.allclose(imag, math.pi * torch.arange(4.0))
    _, imag = s4d_init("inv", 64)
    assert imag.shape == (32,)
    assert [round(v, 1) for v in imag[:3].tolist()] == [1283.4, 414.2, 240.4] and round(imag[-1].item(), 2) == 0.32
    with pytest.raises(ValueError):
        s4d_init("fourier", 8)


def test_dispatch_selects_backend():
    u = torch.randn(B, 9, H)
    dt, A, C = (t.detach() for t in ssm(real_params("inv")))
    with dispatch.force("naive"):
        y0, _ = s4d_conv(u, dt, A, C)
    y1, _ = s4d_conv(u, dt, A, C)  # auto on CPU: the FFT path
    assert rel(y1, y0) <= 1e-5


@pytest.mark.parametrize("length", [1, 5, 64, 300])
@pytest.mark.parametrize("block", [None, 1, 8, 64])
@pytest.mark.parametrize("conj", [False, True])
def test_lag_factors_give_the_vandermonde_matrix(length, block, conj):
    """exp(l·ΔA) = P[l % b]·Q[l // b] (lag-major): the factorised form the FFT path contracts over, against the full
    matrix (fast S4D-Inv modes at Δ = 0.1, where the phase turns fastest), conjugated when asked."""
    real, imag = s4d_init("inv", 16)
    A = torch.complex(real, imag).repeat(2, 1)
    dt = torch.tensor([0.1, 0.003])
    P, Q = lag_factors(dt, A, length, block, conj=conj)
    b = P.shape[1]
    assert Q.shape[1] * b >= length > (Q.shape[1] - 1) * b and P.shape == (2, b, 8)
    l = torch.arange(length)
    V = (P[:, l % b] * Q[:, l // b]).transpose(1, 2)
    want = vandermonde(dt, A, length)
    assert (V - (want.conj() if conj else want)).abs().max() <= 1e-6


@pytest.mark.parametrize("carry", [False, True], ids=["zero-state", "carried-state"])
def test_fft_matches_recurrence_over_many_blocks(carry):
    """A length that spans several lag blocks and ends mid-block (T = 150: b = 16, 10 blocks, the last one part
    filled): outputs, state and every gradient against the recurrence."""
    g = torch.Generator().manual_seed(3)
    u = torch.randn(B, 150, H, generator=g).requires_grad_(True)
    state = torch.randn(B, H, M, dtype=torch.complex64, generator=g).requires_grad_(True) if carry else None
    params = real_params("inv", seed=3)
    y0, s0, g0 = run(s4d_naive, u, params, state)
    y1, s1, g1 = run(s4d_fft, u, params, state)
    assert rel(y1, y0) <= 1e-5 and rel(s1, s0) <= 1e-5
    for name, a, b in zip(["u", "log_dt", "log_A_real", "A_imag", "C", "state"], g1, g0):
        assert rel(a, b) <= 1e-4, f"grad {name}: {rel(a, b):.2e}"
