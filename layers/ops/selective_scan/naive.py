"""Mamba-1 selective scan, token by token in fp32 with plain indexing: the oracle. Shapes as in
:mod:`layers.ops.selective_scan`.

    h_t[d, n] = exp(Δ_t[d]·A[d, n])·h_{t-1}[d, n] + Δ_t[d]·B_t[n]·u_t[d]
    y_t[d]    = Σ_n C_t[n]·h_t[d, n]
"""

from __future__ import annotations

import torch


def selective_scan_naive(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                         state: torch.Tensor | None = None, *,
                         chunk_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """``u, delta (B, T, D)``, ``A (D, N)``, ``B, C (B, T, N)`` -> ``y (B, T, D)`` in u's dtype, final
    ``h (B, D, N)`` fp32. ``chunk_size`` is accepted (one signature across backends) and ignored."""
    f32 = torch.float32
    bsz, t_len, d = u.shape
    h = state.to(f32) if state is not None else u.new_zeros(bsz, d, A.shape[-1], dtype=f32)
    uf, df, Af, Bf, Cf = u.to(f32), delta.to(f32), A.to(f32), B.to(f32), C.to(f32)
    ys = []
    for t in range(t_len):
        decay = torch.exp(df[:, t, :, None] * Af)  # (B, D, N)
        h = decay * h + (df[:, t] * uf[:, t])[:, :, None] * Bf[:, t, None, :]
        ys.append((h * Cf[:, t, None, :]).sum(-1))
    y = torch.stack(ys, dim=1) if ys else u.new_zeros(bsz, 0, d, dtype=f32)
    return y.to(u.dtype), h
