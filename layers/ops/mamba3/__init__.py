"""Mamba-3 SSM op, SISO and MIMO: exponential-trapezoidal recurrence with data-dependent rotary angles.

``mamba3(x, q, k, a, dt, lam, dtheta, state=None, w_x=None, *, pairing, chunk_size) -> (y, state)``

Shapes (B batch, T length, R MIMO rank (1 for SISO), H heads, P head dim, N state dim, S rotary angles)::

    x       (B, T, H, P)      the layer's x (the value); v_{t,r} = x_t ⊙ w_x[r]
    q, k    (B, T, R, H, N)   C and B after RMSNorm + per-head bias, before rotation
    a       (B, T, H)         log-decay A_t·Δ_t (<= 0)
    dt      (B, T, H)         Δ_t after softplus
    lam     (B, T, H)         trapezoid gate λ_t = σ(trap_t)
    dtheta  (B, T, H, S)      angle increments Δ_t·φ_t
    w_x     (R, H, P) | None  MIMO up-projection of x (None: v = x, R must be 1)
    state   dict | None       the decode cache (zeros when None):
                              angle (B, H, S) fp32, ssm (B, H, P, N) fp32,
                              k (B, R, H, N) rotated k of the previous token, v (B, H, P) previous x
    -> y (B, T, R, H, P) = H_t q_{t,r} (the layer adds D·v, the gate and the W_o contraction), new state

``pairing`` is ``"interleaved"`` (SISO convention) or ``"half"`` (MIMO convention); see ``naive.rotate``.
Backends (``BACKENDS``): ``naive`` (token loop in fp32, the oracle), ``chunked`` (SSD form) and ``triton`` where
triton is installed; ``backend=`` or :mod:`layers.ops.dispatch` picks one.
"""

from __future__ import annotations

from typing import Any

import torch

from layers.ops import dispatch
from layers.ops.mamba3.chunked import mamba3_chunked, pairs_adjacent
from layers.ops.mamba3.naive import mamba3_naive, rotate, zero_state

__all__ = ["BACKENDS", "mamba3", "mamba3_chunked", "mamba3_naive", "pairs_adjacent", "rotate", "zero_state"]

BACKENDS: dict[str, Any] = {"naive": mamba3_naive, "chunked": mamba3_chunked}
BACKENDS.update(dispatch.triton_backend("layers.ops.mamba3.triton", "mamba3_triton"))  # where triton is installed


def probe(device: torch.device, dtype: torch.dtype) -> tuple[tuple, dict]:
    """A tiny input for the Triton self-check (MIMO rank 2, two chunks, the second partial)."""
    g = torch.Generator().manual_seed(0)
    b, t, r, h, p, n, s = 1, 20, 2, 2, 16, 16, 8
    dt = torch.nn.functional.softplus(torch.randn(b, t, h, generator=g) - 1.5)
    x = torch.randn(b, t, h, p, generator=g)
    q, k = torch.randn(b, t, r, h, n, generator=g), torch.randn(b, t, r, h, n, generator=g)
    a = -2 * torch.rand(b, t, h, generator=g) * dt
    lam, dtheta = torch.rand(b, t, h, generator=g), 0.5 * torch.randn(b, t, h, s, generator=g)
    w_x = torch.randn(r, h, p, generator=g)
    cast = [v.to(device=device, dtype=dtype) for v in (x, q, k, a, dt, lam, dtheta)]
    return (*cast, None, w_x.to(device=device, dtype=dtype)), {"pairing": "half", "chunk_size": 16}


dispatch.register("mamba3", BACKENDS, probe)


def mamba3(x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, a: torch.Tensor, dt: torch.Tensor,
           lam: torch.Tensor, dtheta: torch.Tensor, state: dict | None = None, w_x: torch.Tensor | None = None,
           *, pairing: str = "interleaved", chunk_size: int = 64,
           backend: str | None = None) -> tuple[torch.Tensor, dict]:
    """The backend chosen by :mod:`layers.ops.dispatch` (forced > env > ``backend`` > auto)."""
    return dispatch.run("mamba3", BACKENDS, x, q, k, a, dt, lam, dtheta, state, w_x, pairing=pairing,
                        chunk_size=chunk_size, backend=backend)
