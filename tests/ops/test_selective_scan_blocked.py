"""Mamba-1 selective scan, the blocked fast path (``selective_scan_blocked``, the ``chunked`` backend): forward,
final state and all six gradients against the naive oracle (float64 at small shapes, fp32 at a moderate one), T not
a multiple of the block, T = 1 and T = 0, state in and out, and float64 gradcheck of the hand-derived backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from layers.ops.selective_scan import BACKENDS, selective_scan_blocked, selective_scan_naive
from layers.ops.selective_scan.chunked import _BlockedScan

NAMES = ["u", "delta", "A", "B", "C", "state"]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def inputs(b: int, t_len: int, d: int, n: int, seed: int = 0, dtype: torch.dtype = torch.float32,
           with_state: bool = True) -> list[torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    out = [torch.randn(b, t_len, d, generator=g, dtype=torch.float64),
           F.softplus(torch.randn(b, t_len, d, generator=g, dtype=torch.float64) - 1.0),
           -torch.arange(1, n + 1.0, dtype=torch.float64).repeat(d, 1)
           * torch.empty(d, 1, dtype=torch.float64).uniform_(0.5, 1.5, generator=g),
           torch.randn(b, t_len, n, generator=g, dtype=torch.float64),
           torch.randn(b, t_len, n, generator=g, dtype=torch.float64),
           torch.randn(b, d, n, generator=g, dtype=torch.float64) if with_state else None]
    return [x.to(dtype).requires_grad_(True) if x is not None else None for x in out]


def loss_of(y: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    wy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.dtype)
    ws = torch.randn(state.shape, generator=g, dtype=torch.float64).to(state.dtype)
    return (y * wy).sum() + (state * ws).sum()


def run64(fn, inp, **kw):
    """fn's output, final state and the gradients of every input that has one, all in float64."""
    y, s = fn(*inp, **kw)
    leaves = [x for x in inp if x is not None]
    return y, s, torch.autograd.grad(loss_of(y, s), leaves)


def naive64(u, delta, A, B, C, h0):
    """The oracle as written, in float64 (its fp32 casts replaced by the float64 inputs' own dtype)."""
    bsz, t_len, d = u.shape
    h = h0 if h0 is not None else u.new_zeros(bsz, d, A.shape[-1])
    ys = []
    for t in range(t_len):
        h = torch.exp(delta[:, t, :, None] * A) * h + (delta[:, t] * u[:, t])[:, :, None] * B[:, t, None, :]
        ys.append((h * C[:, t, None, :]).sum(-1))
    return (torch.stack(ys, dim=1) if ys else u.new_zeros(bsz, 0, d)), h


def blocked64(u, delta, A, B, C, h0, block):
    """The blocked autograd Function called directly in float64 (the public wrapper computes in fp32)."""
    if h0 is None:
        h0 = u.new_zeros(u.shape[0], u.shape[2], A.shape[-1])
    return _BlockedScan.apply(u, delta, A, B, C, h0, block)


def test_chunked_backend_is_the_blocked_scan():
    assert BACKENDS["chunked"] is selective_scan_blocked


@pytest.mark.parametrize("t_len, block", [(1, 4), (4, 4), (7, 4), (13, 4), (13, 16), (33, 8)])
@pytest.mark.parametrize("with_state", [True, False], ids=["state", "no-state"])
def test_float64_forward_state_and_six_gradients_match_oracle(t_len, block, with_state):
    inp = inputs(2, t_len, 5, 4, seed=t_len + block, dtype=torch.float64, with_state=with_state)
    y0, s0, g0 = run64(naive64, inp)
    y1, s1, g1 = run64(lambda *a: blocked64(*a, block), inp)
    assert y1.dtype == torch.float64 and y1.shape == y0.shape and s1.shape == s0.shape
    assert rel(y1, y0) <= 1e-12 and rel(s1, s0) <= 1e-12
    for name, a, b in zip(NAMES, g1, g0):
        assert rel(a, b) <= 1e-11, f"grad {name}: {rel(a, b):.2e}"


def test_gradcheck_float64():
    """The hand-derived backward of all six inputs against finite differences, blocks of 3 over 7 steps."""
    u, dl, A, Bm, Cm, h0 = inputs(2, 7, 3, 2, seed=5, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda *a: _BlockedScan.apply(*a, 3), (u, dl, A, Bm, Cm, h0))


@pytest.mark.parametrize("t_len", [1, 37, 200])
def test_fp32_public_path_matches_oracle_moderate_shape(t_len):
    """The public function (fp32, default block) against the fp32 oracle at a moderate shape."""
    inp = inputs(3, t_len, 48, 16, seed=1)
    y0, s0 = selective_scan_naive(*inp)
    g0 = torch.autograd.grad(loss_of(y0, s0), inp)
    y1, s1 = selective_scan_blocked(*inp)
    g1 = torch.autograd.grad(loss_of(y1, s1), inp)
    assert y1.dtype == torch.float32 and s1.dtype == torch.float32
    assert rel(y1, y0) <= 1e-5 and rel(s1, s0) <= 1e-5
    for name, a, b in zip(NAMES, g1, g0):
        assert rel(a, b) <= 1e-4, f"grad {name}: {rel(a, b):.2e}"


def test_state_in_and_out_split_equals_whole():
    u, dl, A, Bm, Cm, h0 = inputs(2, 45, 6, 4, seed=3)
    with torch.no_grad():
        y, s = selective_scan_blocked(u, dl, A, Bm, Cm, h0)
        y1, s1 = selective_scan_blocked(u[:, :19], dl[:, :19], A, Bm[:, :19], Cm[:, :19], h0)
        y2, s2 = selective_scan_blocked(u[:, 19:], dl[:, 19:], A, Bm[:, 19:], Cm[:, 19:], s1)
    assert rel(torch.cat((y1, y2), dim=1), y) <= 1e-6 and rel(s2, s) <= 1e-6


def test_zero_length_returns_state_and_empty_output():
    u, dl, A, Bm, Cm, h0 = inputs(2, 0, 5, 4)
    y, s = selective_scan_blocked(u, dl, A, Bm, Cm, h0)
    assert y.shape == (2, 0, 5) and torch.equal(s, h0.float())
    y, s = selective_scan_blocked(u, dl, A, Bm, Cm, None)
    assert torch.equal(s, torch.zeros(2, 5, 4))


def test_low_precision_inputs_give_fp32_state_and_input_dtype_output():
    inp = inputs(2, 9, 5, 4, seed=2)
    low = [x.detach().to(torch.bfloat16) for x in inp[:5]]
    y, s = selective_scan_blocked(*low, inp[5].detach())
    y0, s0 = selective_scan_naive(*low, inp[5].detach())
    assert y.dtype == torch.bfloat16 and s.dtype == torch.float32
    assert rel(s, s0) <= 1e-5 and rel(y.float(), y0.float()) <= 1e-2


def test_large_decays_stay_finite():
    """exp(Δ·A) underflowing to 0 must give finite gradients (no division by the decay anywhere)."""
    u, dl, A, Bm, Cm, h0 = inputs(2, 20, 5, 4, seed=4)
    dl = (dl.detach() * 300).requires_grad_(True)
    y, s = selective_scan_blocked(u, dl, A, Bm, Cm, h0)
    grads = torch.autograd.grad(loss_of(y, s), (u, dl, A, Bm, Cm, h0))
    assert all(torch.isfinite(g_).all() for g_ in grads)
