"""Mamba-2 SSD with the Triton chunked scan (:mod:`layers.ops.ssd_triton`), forward and backward.

Shapes as in :mod:`layers.ops.mamba2`; the elementwise preparation (log-decay ``Δ·A``, groups repeated over
heads, ``Δ`` as the per-token scale of K) is PyTorch, exactly as in :func:`layers.ops.mamba2.chunked.ssd_chunked`.
"""

from __future__ import annotations

import torch

from layers.ops.ssd_triton import ssd_scan_triton


def ssd_triton(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
               state: torch.Tensor | None = None, *, chunk_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Same signature and result as :func:`layers.ops.mamba2.naive.ssd_naive`."""
    bsz, t_len, h, p = x.shape
    n = B.shape[-1]
    rep = h // B.shape[2]
    f32 = torch.float32
    h0 = state.to(f32) if state is not None else x.new_zeros(bsz, h, p, n, dtype=f32)
    if t_len == 0:
        return x.new_zeros(bsz, 0, h, p), h0
    dtf = dt.to(f32)
    a = dtf * A.to(f32)
    q = C.repeat_interleave(rep, dim=2)[:, :, None]  # the kernel loads any float dtype and computes in fp32
    k = B.repeat_interleave(rep, dim=2)[:, :, None]
    y, last = ssd_scan_triton(q, k, x[:, :, None], a, dtf, None, h0, chunk_size)
    return y[:, :, 0].to(x.dtype), last
