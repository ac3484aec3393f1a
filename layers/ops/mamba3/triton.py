"""Mamba-3 (SISO and MIMO) with the Triton chunked scan (:mod:`layers.ops.ssd_triton`), forward and backward.

Shapes as in :mod:`layers.ops.mamba3`. The elementwise preparation is PyTorch and mirrors
:func:`layers.ops.mamba3.chunked.mamba3_chunked` step for step: angles accumulated in fp64, rotation of q and k,
the trapezoid as a per-token K scale minus a diagonal correction, the cached previous token folded into the
initial state, MIMO rank folded into the chunk (inside the kernel).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from layers.ops.mamba3.naive import TWO_PI, rotate, zero_state
from layers.ops.ssd_triton import ssd_scan_triton


def mamba3_triton(x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, a: torch.Tensor, dt: torch.Tensor,
                  lam: torch.Tensor, dtheta: torch.Tensor, state: dict | None = None,
                  w_x: torch.Tensor | None = None, *, pairing: str = "interleaved",
                  chunk_size: int = 64) -> tuple[torch.Tensor, dict]:
    """Same signature and result as :func:`layers.ops.mamba3.naive.mamba3_naive`."""
    bsz, t_len, r, h, n = q.shape
    f32 = torch.float32
    st = state if state is not None else zero_state(x, r, n, dtheta.shape[-1])
    if t_len == 0:
        return x.new_zeros(bsz, 0, r, h, x.shape[-1]), st
    xf, af, dtf, lf = x.to(f32), a.to(f32), dt.to(f32), lam.to(f32)

    theta = st["angle"].to(torch.float64)[:, None] + dtheta.to(torch.float64).cumsum(dim=1)
    theta = torch.remainder(theta, TWO_PI).to(f32)  # (B, T, H, S)
    qr = rotate(q.to(f32), theta[:, :, None], pairing)  # (B, T, R, H, N)
    kr = rotate(k.to(f32), theta[:, :, None], pairing)
    wx = w_x.to(f32) if w_x is not None else None
    v = xf[:, :, None] * wx if wx is not None else xf[:, :, None]  # (B, T, R, H, P)

    nxt = (1 - lf) * dtf  # (1-λ_t) Δ_t, used by the token before t
    shift = F.pad(nxt[:, 1:], (0, 0, 0, 1))
    scale = lf * dtf + shift

    v_prev = st["v"].to(f32)[:, None] * (wx if wx is not None else 1.0)
    h0 = st["ssm"].to(f32) + nxt[:, 0, :, None, None] * torch.einsum("brhp,brhn->bhpn", v_prev, st["k"].to(f32))
    y, last = ssd_scan_triton(qr, kr, v, af, scale, shift, h0, chunk_size)
    new_state = {"angle": theta[:, -1], "ssm": last, "k": kr[:, -1].to(x.dtype), "v": x[:, -1]}
    return y.to(x.dtype), new_state
