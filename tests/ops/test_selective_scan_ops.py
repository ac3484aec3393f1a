"""Mamba-1 selective scan op: the sequential and chunked-form paths against the naive oracle (output, final
state, every gradient), float64 gradcheck of the hand-written backward, state carry, dispatch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from layers.ops import dispatch
from layers.ops.selective_scan import (
    selective_scan,
    selective_scan_chunked_form,
    selective_scan_naive,
    selective_scan_seq,
)

TOL = 1e-5
B, D, N = 2, 5, 4
NAMES = ["u", "delta", "A", "B", "C", "state"]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def inputs(t_len: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = [torch.randn(B, t_len, D, generator=g),
           F.softplus(torch.randn(B, t_len, D, generator=g) - 1.0),
           -torch.arange(1, N + 1.0).repeat(D, 1) * torch.empty(D, 1).uniform_(0.5, 1.5, generator=g),
           torch.randn(B, t_len, N, generator=g),
           torch.randn(B, t_len, N, generator=g),
           torch.randn(B, D, N, generator=g)]
    return [t.to(dtype).requires_grad_(True) for t in out]


def loss_of(y: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    wy = torch.randn(y.shape, generator=g).to(y.dtype)
    ws = torch.randn(state.shape, generator=g).to(state.dtype)
    return (y * wy).sum() + (state * ws).sum()


@pytest.mark.parametrize("fn, chunk", [(selective_scan_seq, 16), (selective_scan_chunked_form, 4),
                                       (selective_scan_chunked_form, 16)], ids=["seq", "chunked-q4", "chunked-q16"])
@pytest.mark.parametrize("t_len", [1, 7, 18])
def test_matches_naive_outputs_and_gradients(fn, chunk, t_len):
    inp = inputs(t_len, seed=t_len)
    y0, s0 = selective_scan_naive(*inp)
    g0 = torch.autograd.grad(loss_of(y0, s0), inp)
    y1, s1 = fn(*inp, chunk_size=chunk)
    g1 = torch.autograd.grad(loss_of(y1, s1), inp)
    assert y1.shape == (B, t_len, D) and s1.shape == (B, D, N) and s1.dtype == torch.float32
    assert rel(y1, y0) <= TOL and rel(s1, s0) <= TOL
    for name, a, b in zip(NAMES, g1, g0):
        assert rel(a, b) <= 1e-4, f"grad {name}: {rel(a, b):.2e}"


def test_sequential_backward_gradcheck_float64():
    """The hand-written reverse-loop backward of the linear-scan core against finite differences, in float64."""
    from layers.ops.selective_scan.chunked import _LinearScan

    g = torch.Generator().manual_seed(3)
    a = torch.rand(1, 5, 3, 2, generator=g, dtype=torch.float64).requires_grad_(True)
    b = torch.randn(1, 5, 3, 2, generator=g, dtype=torch.float64).requires_grad_(True)
    c = torch.randn(1, 5, 2, generator=g, dtype=torch.float64).requires_grad_(True)
    h0 = torch.randn(1, 3, 2, generator=g, dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(_LinearScan.apply, (a, b, c, h0))


@pytest.mark.parametrize("fn", [selective_scan_naive, selective_scan_seq, selective_scan_chunked_form],
                         ids=["naive", "seq", "chunked"])
def test_split_with_state_equals_whole(fn):
    u, dl, A, Bm, Cm, h0 = inputs(20, seed=2)
    with torch.no_grad():
        y, s = fn(u, dl, A, Bm, Cm, h0, chunk_size=4)
        y1, s1 = fn(u[:, :9], dl[:, :9], A, Bm[:, :9], Cm[:, :9], h0, chunk_size=4)
        y2, s2 = fn(u[:, 9:], dl[:, 9:], A, Bm[:, 9:], Cm[:, 9:], s1, chunk_size=4)
    assert rel(torch.cat((y1, y2), dim=1), y) <= TOL and rel(s2, s) <= TOL


def test_chunked_form_gradients_finite_for_large_decays():
    """Masking the exponent (not the exponential) keeps the gradients finite when Δ·A is large."""
    u, dl, A, Bm, Cm, h0 = inputs(16, seed=4)
    dl = (dl.detach() * 200).requires_grad_(True)
    y, s = selective_scan_chunked_form(u, dl, A, Bm, Cm, h0, chunk_size=8)
    grads = torch.autograd.grad(loss_of(y, s), (u, dl, A, Bm, Cm, h0))
    assert all(torch.isfinite(g_).all() for g_ in grads)


def test_zero_length_and_dispatch():
    u, dl, A, Bm, Cm, h0 = inputs(0)
    y, s = selective_scan_seq(u, dl, A, Bm, Cm, h0)
    assert y.shape == (B, 0, D) and torch.equal(s, h0.float())
    inp = inputs(6)
    with torch.no_grad(), dispatch.force("naive"):
        y0, _ = selective_scan(*inp)
    with torch.no_grad():
        y1, _ = selective_scan(*inp)  # auto on CPU: the sequential scan
    assert rel(y1, y0) <= TOL
