"""Mamba-3 (SISO and MIMO) with the shared Triton chunked scan (:mod:`layers.ops.common.scalar_decay_triton`),
forward and backward.

Shapes as in :mod:`layers.ops.mamba3`. The elementwise preparation (angles, rotation, trapezoid scale and
diagonal correction, the cached previous token in the initial state) is the chunked path's
(:func:`layers.ops.mamba3.chunked.mamba3_with_scan`); only the scan is the Triton one, with the MIMO rank
folded into the chunk inside the kernel.
"""

from __future__ import annotations

import torch

from layers.ops.common.scalar_decay_triton import ssd_scan_triton
from layers.ops.mamba3.chunked import mamba3_with_scan


def _scan(q, k, v, a, scale, shift, h0, chunk_size, w_v=None):
    # the Triton scan takes v already mixed up to rank R: (B, T, 1, H, P) * (R, H, P) -> (B, T, R, H, P)
    return ssd_scan_triton(q, k, v * w_v if w_v is not None else v, a, scale, shift, h0, chunk_size)


def mamba3_triton(x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, a: torch.Tensor, dt: torch.Tensor,
                  lam: torch.Tensor, dtheta: torch.Tensor, state: dict | None = None,
                  w_x: torch.Tensor | None = None, *, pairing: str = "interleaved",
                  chunk_size: int = 64) -> tuple[torch.Tensor, dict]:
    """Same signature and result as :func:`layers.ops.mamba3.naive.mamba3_naive`."""
    return mamba3_with_scan(_scan, x, q, k, a, dt, lam, dtheta, state, w_x, pairing=pairing, chunk_size=chunk_size)
