"""Mamba-1 selective scan (per-channel diagonal A, input-dependent Δ, B, C):
``selective_scan(u, delta, A, B, C, state=None, *, chunk_size=16) -> (y, state)``.

Shapes (B batch, T length, D channels = d_inner, N state size per channel)::

    u      (B, T, D)   input after the conv (the layer adds D·u and the gate itself)
    delta  (B, T, D)   Δ after softplus
    A      (D, N)      negative; the step's log-decay is Δ_t[d]·A[d, n]
    B, C   (B, T, N)   shared by all D channels (one group)
    state  (B, D, N)   fp32 initial state or None (zeros)
    -> y (B, T, D) in u's dtype, final state (B, D, N) fp32

Backends (``BACKENDS``): ``naive`` (token loop with plain indexing, the fp32 oracle) and ``chunked`` (the CPU path:
:func:`selective_scan_blocked`, a sequential scan run in blocks of 16 tokens with all six gradients derived by hand,
so autograd never sees a ``(B, T, D, N)`` tensor; 20-29x the naive loop and 7-14x the plain sequential scan
(:func:`selective_scan_seq`) at B 8, T 1024, D 256, N 16 on a shared 2-core machine; see ``chunked.py``) and
``triton`` where triton is installed (``triton.py``: one program per batch and block of channels walks the tokens
with its state tile in registers, checkpointing the state every ``chunk_size`` tokens for a hand-derived
backward kernel; the default on CUDA, checked against ``chunked`` on first use). ``backend=`` or
:mod:`layers.ops.dispatch` picks one.
"""

from __future__ import annotations

from typing import Any

import torch

from layers.ops import dispatch
from layers.ops.selective_scan.chunked import (
    selective_scan_blocked,
    selective_scan_chunked_form,
    selective_scan_seq,
)
from layers.ops.selective_scan.naive import selective_scan_naive

__all__ = ["BACKENDS", "selective_scan", "selective_scan_blocked", "selective_scan_chunked_form",
           "selective_scan_naive", "selective_scan_seq"]

BACKENDS: dict[str, Any] = {"naive": selective_scan_naive, "chunked": selective_scan_blocked}
BACKENDS.update(dispatch.triton_backend("layers.ops.selective_scan.triton", "selective_scan_triton"))


def probe(device: torch.device, dtype: torch.dtype) -> tuple[tuple, dict]:
    """A tiny input for the Triton self-check: two chunks (the second partial), two channel blocks (the second
    partial), an initial state."""
    g = torch.Generator().manual_seed(0)
    bsz, t_len, d, n = 1, 20, 20, 8
    u = torch.randn(bsz, t_len, d, generator=g)
    delta = torch.nn.functional.softplus(torch.randn(bsz, t_len, d, generator=g) - 1.0)
    A = -torch.rand(d, n, generator=g) * torch.arange(1, n + 1)
    B, C = (torch.randn(bsz, t_len, n, generator=g) for _ in range(2))
    state = torch.randn(bsz, d, n, generator=g)
    cast = [x.to(device=device, dtype=dtype) for x in (u, delta, A, B, C)]
    return (*cast, state.to(device)), {"chunk_size": 16}


dispatch.register("selective_scan", BACKENDS, probe)


def selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   state: torch.Tensor | None = None, *, chunk_size: int = 16,
                   backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The backend chosen by :mod:`layers.ops.dispatch` (forced > env > ``backend`` > auto)."""
    return dispatch.run("selective_scan", BACKENDS, u, delta, A, B, C, state, chunk_size=chunk_size,
                        backend=backend)
