"""Mamba-1's and S4D's fast paths trace under ``torch.compile`` without a graph break (``torch._dynamo.explain``,
no code generation): an ``out=`` into a strided slice, for one, makes dynamo break the graph."""

from __future__ import annotations

import pytest
import torch

from layers.ops.s4_kernel import s4d_fft, s4d_init
from layers.ops.selective_scan import selective_scan_blocked


def scan_args():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, 5, 4, generator=g), torch.rand(2, 5, 4, generator=g), -torch.rand(4, 3, generator=g),
            torch.randn(2, 5, 3, generator=g), torch.randn(2, 5, 3, generator=g), torch.randn(2, 4, 3, generator=g))


def s4_args():
    g = torch.Generator().manual_seed(1)
    re, im = s4d_init("lin", 8)
    return (torch.randn(2, 9, 3, generator=g), torch.full((3,), 0.05), torch.complex(re, im).repeat(3, 1),
            torch.randn(3, 4, dtype=torch.complex64, generator=g), torch.randn(2, 3, 4, dtype=torch.complex64,
                                                                               generator=g))


@pytest.mark.parametrize("fn, make", [(selective_scan_blocked, scan_args), (s4d_fft, s4_args)],
                         ids=["selective_scan", "s4d"])
def test_no_graph_break(fn, make):
    torch._dynamo.reset()
    report = torch._dynamo.explain(fn)(*make())
    assert report.graph_break_count == 0, [str(r.reason).splitlines()[0] for r in report.break_reasons]
