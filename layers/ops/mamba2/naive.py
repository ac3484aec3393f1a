"""Mamba-2 SSD, token by token in fp32: the oracle. Shapes as in :mod:`layers.ops.mamba2`.

    h_t = exp(Δ_t A_h) h_{t-1} + Δ_t x_t B_tᵀ        h ∈ R^{P×N} per head
    y_t = h_t C_t
"""

from __future__ import annotations

import torch


def ssd_naive(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
              state: torch.Tensor | None = None, *, chunk_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """``x (B, T, H, P)``, ``dt (B, T, H)``, ``A (H,)``, ``B, C (B, T, G, N)`` -> ``y (B, T, H, P)``,
    final ``h (B, H, P, N)`` fp32.

    ``chunk_size`` is accepted (one signature across backends) and ignored.
    """
    bsz, t_len, h, p = x.shape
    n = B.shape[-1]
    rep = h // B.shape[2]
    f32 = torch.float32
    hs = state.to(f32) if state is not None else x.new_zeros(bsz, h, p, n, dtype=f32)
    xf, dtf, Af = x.to(f32), dt.to(f32), A.to(f32)
    Bf = B.to(f32).repeat_interleave(rep, dim=2)
    Cf = C.to(f32).repeat_interleave(rep, dim=2)
    ys = []
    for t in range(t_len):
        decay = torch.exp(dtf[:, t] * Af)[..., None, None]  # (B, H, 1, 1)
        upd = (dtf[:, t, :, None] * xf[:, t])[..., None] * Bf[:, t, :, None, :]  # (B, H, P, N)
        hs = decay * hs + upd
        ys.append((hs * Cf[:, t, :, None, :]).sum(-1))
    y = torch.stack(ys, dim=1) if ys else x.new_zeros(bsz, 0, h, p, dtype=f32)
    return y.to(x.dtype), hs
