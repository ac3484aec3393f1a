"""Mamba-2 SSD op (scalar A per head): ``ssd(x, dt, A, B, C, state=None, *, chunk_size=64) -> (y, state)``.

Shapes (B batch, T length, H heads, P head dim, G groups with H % G == 0, N state dim)::

    x      (B, T, H, P)   input after the conv (the layer adds D·x itself)
    dt     (B, T, H)      Δ after softplus
    A      (H,)           negative decay rate; the step's log-decay is Δ_t·A_h
    B, C   (B, T, G, N)   shared by the H/G heads of a group
    state  (B, H, P, N)   fp32 initial state or None (zeros)
    -> y (B, T, H, P) in x's dtype, final state (B, H, P, N) fp32

Backends (``BACKENDS``): ``naive`` (token loop, the oracle), ``chunked`` (SSD by chunks) and ``triton`` where triton
is installed; ``backend=`` or :mod:`layers.ops.dispatch` picks one.
"""

from __future__ import annotations

from typing import Any

import torch

from layers.ops import dispatch
from layers.ops.mamba2.chunked import ssd_chunked
from layers.ops.mamba2.naive import ssd_naive

BACKENDS: dict[str, Any] = {"naive": ssd_naive, "chunked": ssd_chunked}
BACKENDS.update(dispatch.triton_backend("layers.ops.mamba2.triton", "ssd_triton"))  # where triton is installed


def probe(device: torch.device, dtype: torch.dtype) -> tuple[tuple, dict]:
    """A tiny input for the Triton self-check (two chunks, the second partial)."""
    g = torch.Generator().manual_seed(0)
    b, t, h, p, n = 1, 20, 2, 16, 16
    x, bb, cc = torch.randn(b, t, h, p, generator=g), torch.randn(b, t, 1, n, generator=g), \
        torch.randn(b, t, 1, n, generator=g)
    dt = torch.nn.functional.softplus(torch.randn(b, t, h, generator=g) - 1.5)
    a = -torch.rand(h, generator=g) - 0.1
    state = torch.randn(b, h, p, n, generator=g)
    cast = [v.to(device=device, dtype=dtype) for v in (x, dt, a, bb, cc)]
    return (*cast, state.to(device)), {"chunk_size": 16}


dispatch.register("mamba2", BACKENDS, probe)


def ssd(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
        state: torch.Tensor | None = None, *, chunk_size: int = 64,
        backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The backend chosen by :mod:`layers.ops.dispatch` (forced > env > ``backend`` > auto)."""
    return dispatch.run("mamba2", BACKENDS, x, dt, A, B, C, state, chunk_size=chunk_size, backend=backend)
