"""Mamba-2 SSD with the shared Triton chunked scan (:mod:`layers.ops.common.scalar_decay_triton`), forward and
backward.

Shapes as in :mod:`layers.ops.mamba2`; the elementwise preparation is the chunked path's
(:func:`layers.ops.mamba2.chunked.ssd_with_scan`), only the scan is the Triton one.
"""

from __future__ import annotations

import torch

from layers.ops.common.scalar_decay_triton import ssd_scan_triton
from layers.ops.mamba2.chunked import ssd_with_scan


def ssd_triton(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
               state: torch.Tensor | None = None, *, chunk_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Same signature and result as :func:`layers.ops.mamba2.naive.ssd_naive`."""
    return ssd_with_scan(ssd_scan_triton, x, dt, A, B, C, state, chunk_size=chunk_size)
