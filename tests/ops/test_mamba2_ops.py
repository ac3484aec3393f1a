"""Mamba-2 SSD op: chunked vs the naive oracle (output, final state, every gradient) and state carry."""

from __future__ import annotations

import pytest
import torch

from layers.ops import dispatch
from layers.ops.common.scalar_decay_chunked import segsum
from layers.ops.mamba2 import ssd
from layers.ops.mamba2.chunked import ssd_chunked
from layers.ops.mamba2.naive import ssd_naive

TOL = 1e-4
B, H, P, N = 2, 4, 4, 8


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def inputs(t_len: int, groups: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = [torch.randn(B, t_len, H, P, generator=g),
           torch.nn.functional.softplus(torch.randn(B, t_len, H, generator=g) - 1.5),
           -torch.empty(H).uniform_(1.0, 16.0, generator=g) / 4,
           torch.randn(B, t_len, groups, N, generator=g),
           torch.randn(B, t_len, groups, N, generator=g),
           torch.randn(B, H, P, N, generator=g)]
    return [t.requires_grad_(True) for t in out]


def loss_of(y: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return (y * torch.randn(y.shape, generator=g)).sum() + (state * torch.randn(state.shape, generator=g)).sum()


NAMES = ["x", "dt", "A", "B", "C", "state"]


@pytest.mark.parametrize("groups", [1, H], ids=["G1", f"G{H}"])
@pytest.mark.parametrize("t_len, chunk", [(1, 8), (7, 8), (33, 8), (65, 16)], ids=lambda v: str(v))
def test_chunked_matches_naive(t_len, chunk, groups):
    assert_chunked_matches_naive(inputs(t_len, groups, seed=t_len + groups), chunk)


def assert_chunked_matches_naive(inp: list[torch.Tensor], chunk: int) -> None:
    """Output, final state and every input gradient, chunked against the oracle."""
    y0, s0 = ssd_naive(*inp)
    g0 = torch.autograd.grad(loss_of(y0, s0), inp)
    y1, s1 = ssd_chunked(*inp, chunk_size=chunk)
    g1 = torch.autograd.grad(loss_of(y1, s1), inp)
    assert rel(y1, y0) <= TOL and rel(s1, s0) <= TOL
    for name, a, b in zip(NAMES, g1, g0):
        assert rel(a, b) <= TOL, f"grad {name}: {rel(a, b):.2e}"


@pytest.mark.parametrize("form", ["factored", "segsum"])
def test_intra_forms_and_slicing_match_naive(monkeypatch, form):
    """Both intra-chunk forms of the shared scan without a diagonal shift, one chunk per slice."""
    from layers.ops.common import scalar_decay_chunked as chunked

    monkeypatch.setattr(chunked, "FACTOR_RANGE", 1e9 if form == "factored" else -1.0)
    monkeypatch.setattr(chunked, "SLICE_BYTES", 1)
    assert_chunked_matches_naive(inputs(45, 2, seed=3), chunk=8)


@pytest.mark.parametrize("fn", [ssd_naive, ssd_chunked], ids=["naive", "chunked"])
def test_split_with_state_equals_whole(fn):
    x, dt, A, Bm, Cm, h0 = inputs(30, 1, seed=2)
    with torch.no_grad():
        y, s = fn(x, dt, A, Bm, Cm, h0, chunk_size=8)
        y1, s1 = fn(x[:, :13], dt[:, :13], A, Bm[:, :13], Cm[:, :13], h0, chunk_size=8)
        y2, s2 = fn(x[:, 13:], dt[:, 13:], A, Bm[:, 13:], Cm[:, 13:], s1, chunk_size=8)
    assert rel(torch.cat((y1, y2), dim=1), y) <= TOL and rel(s2, s) <= TOL


def test_segsum_is_the_masked_sum():
    a = torch.randn(3, 6)
    out = segsum(a)
    for i in range(6):
        for j in range(6):
            want = a[:, j + 1:i + 1].sum(-1) if j <= i else torch.full((3,), float("-inf"))
            assert torch.allclose(out[:, i, j], want, atol=1e-6)


def test_dispatch_selects_backend():
    x, dt, A, Bm, Cm, h0 = inputs(10, 1)
    with torch.no_grad(), dispatch.force("naive"):
        y0, _ = ssd(x, dt, A, Bm, Cm, h0, chunk_size=4)
    with torch.no_grad():
        y1, _ = ssd(x, dt, A, Bm, Cm, h0, chunk_size=4)  # auto on CPU: chunked
    assert rel(y1, y0) <= TOL
