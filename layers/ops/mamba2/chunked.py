"""Mamba-2 SSD by chunks: the shared scalar-decay scan (:mod:`layers.ops.common.scalar_decay_chunked`) with
Mamba-2's elementwise preparation around it. Shapes as in :mod:`layers.ops.mamba2`.
"""

from __future__ import annotations

import torch

from layers.ops.common.scalar_decay_chunked import ssd_scan


def ssd_chunked(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                state: torch.Tensor | None = None, *, chunk_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Mamba-2 SSD by chunks; same signature and result as :func:`layers.ops.mamba2.naive.ssd_naive`."""
    return ssd_with_scan(ssd_scan, x, dt, A, B, C, state, chunk_size=chunk_size)


def ssd_with_scan(scan, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                  state: torch.Tensor | None = None, *, chunk_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Mamba-2 SSD as a scalar-decay scan: log-decay ``Δ·A``, groups repeated over heads, ``Δ`` scaling K.

    ``scan`` has :func:`layers.ops.common.scalar_decay_chunked.ssd_scan`'s signature; the PyTorch and Triton
    backends differ only in it.
    """
    bsz, t_len, h, p = x.shape
    n = B.shape[-1]
    rep = h // B.shape[2]
    f32 = torch.float32
    h0 = state.to(f32) if state is not None else x.new_zeros(bsz, h, p, n, dtype=f32)
    if t_len == 0:
        return x.new_zeros(bsz, 0, h, p), h0
    dtf = dt.to(f32)
    a = dtf * A.to(f32)
    q = C.to(f32).repeat_interleave(rep, dim=2)[:, :, None]
    k = B.to(f32).repeat_interleave(rep, dim=2)[:, :, None]
    y, last = scan(q, k, x.to(f32)[:, :, None], a, dtf, None, h0, chunk_size)
    return y[:, :, 0].to(x.dtype), last
