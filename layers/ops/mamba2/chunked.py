"""Chunked SSD (Mamba-2 "Listing 1", generalised): the PyTorch CPU path and fallback everywhere.

``ssd_scan`` is the shared core, also used by Mamba-3 (trapezoid and MIMO). Per batch and head it computes,
with ``acs`` the cumulative log-decay and ``L[t, s] = exp(acs_t - acs_s)`` (``s <= t``)::

    H_t = exp(a_t) H_{t-1} + scale_t * sum_r v_{t,r} k_{t,r}^T     (+ the diagonal correction below)
    y_{t,r'} = sum_{s<=t} (q_{t,r'}·k_{s,r}) * W[t, s] * v_{s,r}  +  exp(acs_t) q_{t,r'}·H_init
    W[t, s] = L[t, s] * scale_s  -  [s == t] * shift_t

``shift`` is the over-counted diagonal (Mamba-3's ``(1-λ_{t+1}) Δ_{t+1}``; ``None`` for Mamba-2). The rank axis
R (MIMO) is folded into the chunk: one chunk is a ``(R·C) x (R·C)`` masked matmul with the mask
``kron(ones(R, R), W)`` (rows ordered rank-major, so W's blocks stay contiguous). Four steps per chunk:
intra-chunk (masked QKᵀ V), chunk states, a sequential pass over chunks (state passing), state-to-output.
Any length: the tail is padded with ``a = scale = 0`` (decay 1, no contribution), so the final state is exact.

Mamba-2 entry point ``ssd_chunked``; shapes as in :mod:`layers.ops.mamba2`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def segsum(a: torch.Tensor, acs: torch.Tensor | None = None) -> torch.Tensor:
    """``a (..., C)`` -> ``(..., C, C)`` with ``out[i, j] = sum_{j < r <= i} a_r`` for ``j <= i``, ``-inf`` above.

    Computed as a difference of the chunk's cumulative sums (three passes over ``C x C``; the masked-cumsum
    form costs twice that on CPU). Within one chunk that is exact to a few fp32 ulps of ``|cumsum|``: the
    diagonal is exactly 0, and the strong-decay test bounds the error elsewhere.
    """
    c = a.shape[-1]
    acs = a.cumsum(dim=-1) if acs is None else acs
    out = acs[..., :, None] - acs[..., None, :]
    upper = torch.ones(c, c, dtype=torch.bool, device=a.device).triu(1)
    return out.masked_fill_(upper, float("-inf"))


def ssd_scan(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor, scale: torch.Tensor,
             shift: torch.Tensor | None, h0: torch.Tensor, chunk_size: int,
             w_v: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked scan. ``q, k (B, T, R, H, N)``, ``v (B, T, R, H, P)``, ``a, scale, shift (B, T, H)``,
    ``h0 (B, H, P, N)``; all fp32. Returns ``y (B, T, R, H, P)`` and the final state ``(B, H, P, N)``.
    With ``w_v (R, H, P)``, ``v`` is ``(B, T, 1, H, P)`` and the values are ``v ⊙ w_v`` (MIMO's up-projection,
    applied after blocking so the R-times larger tensor is made once, already in block layout)."""
    bsz, t_len, r, h, n = q.shape
    p = v.shape[-1]
    c = max(1, min(chunk_size, t_len))
    pad = (-t_len) % c
    nc = (t_len + pad) // c

    def blocks(x: torch.Tensor) -> torch.Tensor:  # (B, T, R, H, D) -> (B, H, nc, R, C, D): rank-major rows
        xr, d = x.shape[2], x.shape[-1]
        x = F.pad(x, (0, 0, 0, 0, 0, 0, 0, pad)) if pad else x
        return x.reshape(bsz, nc, c, xr, h, d).permute(0, 4, 1, 3, 2, 5).contiguous()

    def scalars(x: torch.Tensor) -> torch.Tensor:  # (B, T, H) -> (B, H, nc, C)
        return (F.pad(x, (0, 0, 0, pad)) if pad else x).view(bsz, nc, c, h).permute(0, 3, 1, 2)

    def rows(x: torch.Tensor) -> torch.Tensor:  # (B, H, nc, R, C, D) -> (B, H, nc, R*C, D)
        return x.reshape(bsz, h, nc, r * c, x.shape[-1])

    qb, kb, vb = blocks(q), blocks(k), blocks(v)
    if w_v is not None:
        vb = (vb * w_v.permute(1, 0, 2)[None, :, None, :, None, :]).contiguous()
    ab, sb = scalars(a), scalars(scale)
    acs = ab.cumsum(dim=-1)  # (B, H, nc, C)

    # 1. intra-chunk: (Q Kᵀ ⊙ kron(ones(R, R), W)) V, rows and columns ordered (rank, time)
    w = torch.exp(segsum(ab, acs)) * sb[..., None, :]
    if shift is not None:  # in place is safe: the product's backward does not need its own output
        w.diagonal(dim1=-2, dim2=-1).sub_(scalars(shift))
    scores = rows(qb) @ rows(kb).transpose(-1, -2)  # (B, H, nc, RC, RC)
    if r > 1:  # W broadcast over the (R, C, R, C) view, one rank axis at a time: W's gradient is then two
        # reductions over contiguous C-blocks (one joint reduction over both small rank axes is slow on CPU)
        wk = w[:, :, :, :, None, :].expand(bsz, h, nc, c, r, c)
        scores = (scores.view(bsz, h, nc, r, c, r, c) * wk[:, :, :, None]).view(scores.shape)
    else:
        scores = scores * w
    y = scores @ rows(vb)  # (B, H, nc, RC, P)

    # 2. each chunk's own state contribution, decayed to its end
    to_end = (torch.exp(acs[..., -1:] - acs) * sb)[:, :, :, None, :, None]  # (B, H, nc, 1, C, 1)
    chunk_states = rows(vb * to_end).transpose(-1, -2) @ rows(kb)  # (B, H, nc, P, N)

    # 3. state passing over chunks (sequential; nc is small)
    chunk_decay = torch.exp(acs[..., -1])  # (B, H, nc)
    state = h0
    starts = []
    for i in range(nc):
        starts.append(state)
        state = chunk_decay[:, :, i, None, None] * state + chunk_states[:, :, i]
    prev = torch.stack(starts, dim=2)  # (B, H, nc, P, N): the state entering each chunk

    # 4. state -> output
    y_off = (qb @ prev[:, :, :, None].transpose(-1, -2)) * torch.exp(acs)[:, :, :, None, :, None]
    y = y.view(bsz, h, nc, r, c, p) + y_off  # (B, H, nc, R, C, P)

    y = y.permute(0, 2, 4, 3, 1, 5).reshape(bsz, nc * c, r, h, p)
    return y[:, :t_len], state


def ssd_chunked(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                state: torch.Tensor | None = None, *, chunk_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Mamba-2 SSD by chunks; same signature and result as :func:`layers.ops.mamba2.naive.ssd_naive`."""
    return ssd_with_scan(ssd_scan, x, dt, A, B, C, state, chunk_size=chunk_size)


def ssd_with_scan(scan, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                  state: torch.Tensor | None = None, *, chunk_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Mamba-2 SSD as a scalar-decay scan: log-decay ``Δ·A``, groups repeated over heads, ``Δ`` scaling K.

    ``scan`` has :func:`ssd_scan`'s signature; the PyTorch and Triton backends differ only in it.
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
