"""Diagonal S4 (S4D), the recurrence token by token: the oracle. Shapes as in :mod:`layers.ops.s4_kernel`.

ZOH with B = 1 folded into C, per channel h and stored complex mode m (one of each conjugate pair)::

    dA = exp(Δ_h A_hm),  dB = (dA - 1) / A_hm
    x_t = dA ⊙ x_{t-1} + dB·u_t            (complex, (B, H, M))
    y_t = 2·Re(Σ_m C_hm x_t[m])            (the conjugate partner contributes the complex conjugate)
"""

from __future__ import annotations

import torch


def discretize(dt: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ZOH for a diagonal complex ``A (H, M)`` with step ``dt (H,)``: ``(dA, dB)`` with ``B = 1``."""
    dtA = dt.to(torch.float32)[:, None] * A.to(torch.complex64)
    dA = torch.exp(dtA)
    return dA, (dA - 1) / A.to(torch.complex64)


def s4d_naive(u: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, C: torch.Tensor, state: torch.Tensor | None = None,
              *, want_state: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``u (B, T, H)`` real, ``dt (H,)``, ``A, C (H, M)`` complex, ``state (B, H, M)`` complex or None ->
    ``y (B, T, H)`` in u's dtype (the D skip not included) and the state after the last token (complex64), or
    None when ``want_state`` is False."""
    bsz, t_len, h = u.shape
    dA, dB = discretize(dt, A)
    Cc = C.to(torch.complex64)
    x = state.to(torch.complex64) if state is not None else torch.zeros(bsz, h, A.shape[-1], dtype=torch.complex64,
                                                                        device=u.device)
    uf = u.to(torch.float32)
    ys = []
    for t in range(t_len):
        x = dA * x + dB * uf[:, t, :, None]
        ys.append(2 * (Cc * x).sum(-1).real)
    y = torch.stack(ys, dim=1) if ys else uf.new_zeros(bsz, 0, h)
    return y.to(u.dtype), (x if want_state else None)
