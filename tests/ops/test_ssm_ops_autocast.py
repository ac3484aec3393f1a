"""Mamba-1's and S4D's fast paths under CPU bf16 autocast (``train.precision: bf16``): they compute in fp32 inside
(their matmuls are not cast down), forward and backward, whether backward runs inside or outside the autocast
block, and match the same call without autocast."""

from __future__ import annotations

import pytest
import torch

from layers.ops.s4_kernel import s4d_fft, s4d_init
from layers.ops.selective_scan import selective_scan_blocked


def scan_inputs():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, 40, 8, generator=g), torch.rand(2, 40, 8, generator=g), -torch.rand(8, 4, generator=g),
            torch.randn(2, 40, 4, generator=g), torch.randn(2, 40, 4, generator=g), torch.randn(2, 8, 4, generator=g)]


def s4_inputs():
    g = torch.Generator().manual_seed(1)
    re, im = s4d_init("lin", 8)
    return [torch.randn(2, 50, 3, generator=g), torch.full((3,), 0.05), torch.complex(re, im).repeat(3, 1),
            torch.randn(3, 4, dtype=torch.complex64, generator=g), torch.randn(2, 3, 4, dtype=torch.complex64,
                                                                               generator=g)]


def grads(fn, inputs, autocast: bool, backward_inside: bool):
    leaves = [x.clone().requires_grad_(True) for x in inputs]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y, s = fn(*leaves)
        loss = y.float().pow(2).sum() + s.abs().pow(2).sum()
        if backward_inside:
            loss.backward()
    if not backward_inside:
        loss.backward()
    return [y.detach(), s.detach()] + [x.grad for x in leaves]


@pytest.mark.parametrize("fn, make", [(selective_scan_blocked, scan_inputs), (s4d_fft, s4_inputs)],
                         ids=["selective_scan", "s4d"])
@pytest.mark.parametrize("backward_inside", [False, True], ids=["backward-outside", "backward-inside"])
def test_fp32_inside_bf16_autocast(fn, make, backward_inside):
    inputs = make()
    want = grads(fn, inputs, autocast=False, backward_inside=False)
    got = grads(fn, inputs, autocast=True, backward_inside=backward_inside)
    for a, b in zip(got, want):  # bf16 anywhere inside would leave ~1e-2; fp32 summation order ~1e-6
        assert a.dtype == b.dtype and ((a - b).abs().norm() / b.abs().norm()).item() <= 1e-4
