"""Mamba-1 selective scan for CPU: a sequential scan with a hand-written backward (the ``chunked`` backend), and
the chunked per-channel-decay form it was measured against. Shapes as in :mod:`layers.ops.selective_scan`.

Measured (``nice -n 10``, one thread, on the busy 2-core development machine; forward + backward of
``mean(y²)``, best of 3): at B=8, T=256, D=64, N=16 the sequential scan took 0.058 s, the chunked form 1.34 s at
Q=16 (23x slower) and 2.86 s at Q=32; at B=4, T=128, D=32, N=8, 0.0081 s vs 0.109 s (Q=16) and 0.065 s (Q=32),
8-13x. With a decay per (channel, state) pair there is no matmul form inside a chunk, so chunking only adds the
(Q, Q) pairwise work; the loop wins, as ``ssm_lineage.md`` §9.2 found. The backend table points ``chunked`` at
:func:`selective_scan_seq`; :func:`selective_scan_chunked_form` stays as a tested alternative.

The sequential scan runs the recurrence over ``unbind``-ed time slices (indexing a big tensor inside the loop
makes autograd's backward quadratic) in a custom ``autograd.Function`` whose backward is the reverse loop::

    G_t = g_t ⊗ C_t + a_{t+1} ⊙ G_{t+1}      (G_T includes the final-state gradient)
    ∂b_t = G_t,  ∂a_t = G_t ⊙ h_{t-1},  ∂C_t = Σ_d g_t[d]·h_t[d, :],  ∂h_0 = a_1 ⊙ G_1

with ``a_t = exp(Δ_t A)`` and ``b_t = Δ_t B_t u_t``; autograd takes the gradients on to Δ, A, B and u.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable


class _LinearScan(torch.autograd.Function):
    """``h_t = a_t ⊙ h_{t-1} + b_t``, ``y_t = Σ_n C_t[n] h_t[:, n]``; a, b (B, T, D, N), C (B, T, N), h0 (B, D, N)."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor, C: torch.Tensor, h0: torch.Tensor):
        h = h0
        hs = []
        for a_t, b_t in zip(a.unbind(1), b.unbind(1)):
            h = torch.addcmul(b_t, a_t, h)
            hs.append(h)
        hs_t = torch.stack(hs, dim=1)
        y = torch.einsum("btdn,btn->btd", hs_t, C)
        ctx.save_for_backward(a, C, h0, hs_t)
        return y, h

    @staticmethod
    @once_differentiable
    def backward(ctx, gy: torch.Tensor, g_last: torch.Tensor):
        a, C, h0, hs = ctx.saved_tensors
        g_local = gy[..., None] * C[:, :, None, :]  # (B, T, D, N)
        if g_last is not None:
            g_local[:, -1] += g_last
        G = torch.empty_like(g_local)
        carry = None
        for t in range(a.shape[1] - 1, -1, -1):
            carry = g_local[:, t] if carry is None else torch.addcmul(g_local[:, t], a[:, t + 1], carry)
            G[:, t] = carry
        h_prev = torch.cat((h0[:, None], hs[:, :-1]), dim=1)
        g_a = G * h_prev
        g_C = torch.einsum("btdn,btd->btn", hs, gy)
        g_h0 = a[:, 0] * G[:, 0]
        return g_a, G, g_C, g_h0


def _prepare(u, delta, A, B, state):
    f32 = torch.float32
    bsz, _, d = u.shape
    h0 = state.to(f32) if state is not None else u.new_zeros(bsz, d, A.shape[-1], dtype=f32)
    df = delta.to(f32)
    log_a = df[..., None] * A.to(f32)  # (B, T, D, N), <= 0 for A < 0
    b = (df * u.to(f32))[..., None] * B.to(f32)[:, :, None, :]
    return h0, log_a, b


def selective_scan_seq(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                       state: torch.Tensor | None = None, *,
                       chunk_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Same signature and result as :func:`layers.ops.selective_scan.naive.selective_scan_naive`; ``chunk_size``
    is ignored (the scan is sequential, see the module docstring)."""
    h0, log_a, b = _prepare(u, delta, A, B, state)
    if u.shape[1] == 0:
        return u.new_zeros(u.shape), h0
    y, last = _LinearScan.apply(torch.exp(log_a), b, C.to(torch.float32), h0)
    return y.to(u.dtype), last


def selective_scan_chunked_form(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                                C: torch.Tensor, state: torch.Tensor | None = None, *,
                                chunk_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunked form with per-channel decay (``ssm_lineage.md`` §9.3), plain autograd. Within a chunk
    ``Λ_t = Σ_{s<=t} Δ_s A`` and ``h_t = exp(Λ_t) h_in + Σ_{s<=t} exp(Λ_t - Λ_s) b_s``; the exponent is masked
    to -inf above the diagonal before ``exp`` (masking after gives NaN gradients), and never factorised as
    ``exp(Λ_t)·exp(-Λ_s)``. Chunks are carried sequentially."""
    h, log_a, b = _prepare(u, delta, A, B, state)
    Cf = C.to(torch.float32)
    t_len = u.shape[1]
    ys = []
    for start in range(0, t_len, chunk_size):
        la, bb, cc = (v[:, start:start + chunk_size] for v in (log_a, b, Cf))
        q = la.shape[1]
        lam = la.cumsum(dim=1)  # (B, Q, D, N)
        seg = lam[:, :, None] - lam[:, None, :]  # (B, Qt, Qs, D, N)
        causal = torch.ones(q, q, dtype=torch.bool, device=u.device).tril()
        seg = seg.masked_fill(~causal[None, :, :, None, None], float("-inf"))
        hs = torch.einsum("btsdn,bsdn->btdn", seg.exp(), bb) + lam.exp() * h[:, None]
        ys.append(torch.einsum("btdn,btn->btd", hs, cc))
        h = hs[:, -1]
    y = torch.cat(ys, dim=1) if ys else u.new_zeros(u.shape, dtype=torch.float32)
    return y.to(u.dtype), h
