"""Mamba-1 selective scan for CPU: the blocked scan with every gradient derived by hand (:func:`selective_scan_blocked`,
the ``chunked`` backend), the plain sequential scan it replaced (:func:`selective_scan_seq`) and the chunked
per-channel-decay form both were measured against (:func:`selective_scan_chunked_form`). Shapes as in
:mod:`layers.ops.selective_scan`.

Where the time went in the plain sequential scan (forward + backward at B 8, T 1024, D 256, N 16): not the
1024-step loop but full ``(B, T, D, N)`` tensors (33.5 M floats, 134 MB each) made and read many times (log a, exp,
b, the stack of states, g_local, G, the shifted states, ∂a, then autograd through exp and the broadcasts), each pass
out of cache. :class:`_BlockedScan` takes ``(u, Δ, A, B, C, h0)`` directly, makes a block of 16 tokens' a and b at a
time into reused cache-sized buffers, keeps one state per block for the backward and recomputes the rest, and
derives all six gradients by hand, so no ``(B, T, D, N)`` tensor exists and autograd sees none. Measured on the
shared 2-core development machine (other sessions' jobs running, load average 6-7; one thread; forward + backward
of ``mean(y²)``, medians of interleaved rounds in one run, ``experiments/ssm_lineage``): the blocked scan 7-14x
faster than the plain sequential scan and 20-29x faster than the naive token loop (the committed idle-core
figures of the old path were 3.4x the naive loop, at 2 threads). Also measured, same conditions: blocks of 8, 16
and 32 tokens at 256, 239 and 270 ms, 64 about twice as slow (16 kept); ``exp2`` 4x faster than ``exp`` per
element (a is formed as ``exp2(Δ·A·log2 e)``, relative error 1.7e-7 against float64, ``exp``'s own 0.9e-7); a
fresh multi-MB tensor per block instead of a reused buffer several times slower than the arithmetic in it (page
faults); the block operations reading the batch-major inputs through strided views 1.4x slower than after one
time-major copy of each input; ``∂C_t = Σ_d gy_t[d] h_t[:, d]`` as ``h_t (N x D) @ gy_t (D x 1)`` per token 9x
slower than as ``gy_t (1 x D) @ h_tᵀ (D x N)`` (``∂C`` and ``∂B`` use the second form).

The chunked per-channel-decay form, measured earlier (``nice -n 10``, one thread, busy machine; best of 3): at
B=8, T=256, D=64, N=16 the sequential scan took 0.058 s, the chunked form 1.34 s at Q=16 (23x slower) and 2.86 s
at Q=32; at B=4, T=128, D=32, N=8, 0.0081 s vs 0.109 s (Q=16) and 0.065 s (Q=32), 8-13x. With a decay per
(channel, state) pair there is no matmul form inside a chunk, so chunking only adds the (Q, Q) pairwise work; the
loop wins, as ``ssm_lineage.md`` §9.2 found. It stays as a tested alternative.

The plain sequential scan runs the recurrence over ``unbind``-ed time slices (indexing a big tensor inside the loop
makes autograd's backward quadratic) in a custom ``autograd.Function`` whose backward is the reverse loop::

    G_t = g_t ⊗ C_t + a_{t+1} ⊙ G_{t+1}      (G_T includes the final-state gradient)
    ∂b_t = G_t,  ∂a_t = G_t ⊙ h_{t-1},  ∂C_t = Σ_d g_t[d]·h_t[d, :],  ∂h_0 = a_1 ⊙ G_1

with ``a_t = exp(Δ_t A)`` and ``b_t = Δ_t B_t u_t``; autograd takes the gradients on to Δ, A, B and u.
"""

from __future__ import annotations

import math

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


#: tokens per block of the blocked scan: a block's a_t and b_t are (BLOCK, B, N, D) buffers, cache-sized at the
#: benchmark shape (B 8, D 256, N 16: 2 MB each at 16)
BLOCK = 16
LOG2E = 1.0 / math.log(2.0)


class _BlockedScan(torch.autograd.Function):
    """The whole selective scan ``(u, Δ, A, B, C, h0, block) -> (y, h_T)`` with every gradient derived by hand, so
    autograd never sees a ``(B, T, D, N)`` tensor.

    Time runs in blocks of ``block`` tokens. A block's ``a = exp(Δ A)`` and ``b = Δ u B`` are made vectorised into
    preallocated buffers (a fresh multi-MB tensor per block costs page faults, measured at several times the
    arithmetic), and the per-token loop only does an in-place ``addcmul``. Everything runs time-major with d
    innermost (buffers ``(block, B, N, D)``): each token's state is one contiguous ``(B, N, D)`` slice and the
    broadcasts over n or d run along a 256-wide contiguous row rather than a 16-wide one. ``y`` and the reductions
    over d or n are batched matrix-vector products (``bmm``). Forward keeps only each block's entry state; backward
    recomputes a block's a, b and states from it and runs the reverse loop ``G_t = gy_t ⊗ C_t + a_{t+1} ⊙ G_{t+1}``
    over the same block. With ``X_t = G_t ⊙ a_t ⊙ h_{t-1}`` (the gradient of ``Δ_t A``) and ``S_t = Σ_n G_t B_t``::

        dA = Σ_{b,t} Δ_t X_t        dΔ_t = Σ_n A X_t + u_t S_t     du_t = Δ_t S_t
        dB_t = Σ_d (Δ_t u_t) G_t    dC_t = Σ_d gy_t h_t            dh_0 = a_1 ⊙ G_1

    Works in the inputs' dtype (the public wrapper passes fp32; the tests call it in float64)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, h0, block):
        bsz, t_len, d = u.shape
        n = A.shape[-1]
        uT, dT = u.transpose(0, 1).contiguous(), delta.transpose(0, 1).contiguous()  # (T, B, D)
        BT, CT = B.transpose(0, 1).contiguous(), C.transpose(0, 1).contiguous()  # (T, B, N)
        At = A.t().contiguous()  # (N, D)
        At2 = At * LOG2E  # exp(Δ A) = exp2(Δ A log2 e): torch's exp2 runs about 4x faster than exp on this CPU
        duT = dT * uT
        n_blocks = -(-t_len // block)
        entries = u.new_empty(n_blocks + 1, bsz, n, d)  # the state entering each block, and the final one
        entries[0].copy_(h0.transpose(1, 2))
        yT = u.new_empty(t_len, bsz, d)
        buf_a = u.new_empty(block, bsz, n, d)
        buf_h = u.new_empty(block, bsz, n, d)
        a_rows, h_rows = buf_a.unbind(0), buf_h.unbind(0)
        for i in range(n_blocks):
            s, e = i * block, min((i + 1) * block, t_len)
            k = e - s
            torch.exp2(torch.mul(dT[s:e, :, None, :], At2, out=buf_a[:k]), out=buf_a[:k])
            torch.mul(duT[s:e, :, None, :], BT[s:e, :, :, None], out=buf_h[:k])
            h = entries[i]
            for j in range(k):
                h = h_rows[j].addcmul_(a_rows[j], h)
            torch.bmm(CT[s:e].view(k * bsz, 1, n), buf_h[:k].view(k * bsz, n, d), out=yT[s:e].view(k * bsz, 1, d))
            entries[i + 1].copy_(h)
        ctx.block = block
        ctx.save_for_backward(uT, dT, At, BT, CT, entries)
        return yT.transpose(0, 1).contiguous(), entries[n_blocks].transpose(1, 2).contiguous()

    @staticmethod
    @once_differentiable
    def backward(ctx, gy, g_last):
        uT, dT, At, BT, CT, entries = ctx.saved_tensors
        block = ctx.block
        t_len, bsz, d = uT.shape
        n = At.shape[0]
        n_blocks = entries.shape[0] - 1
        gyT = gy.transpose(0, 1).contiguous() if gy is not None else uT.new_zeros(t_len, bsz, d)
        At2 = At * LOG2E
        duT = dT * uT
        g_uT, g_dT = torch.empty_like(uT), torch.empty_like(dT)
        g_BT, g_CT = torch.empty_like(BT), torch.empty_like(CT)
        acc_A = uT.new_zeros(block, bsz, n, d)  # Σ over blocks of Δ ⊙ X, summed over (token, batch) at the end
        # ∂L/∂h at the block's last token from later tokens: a_{e} ⊙ G_{e}, or the final state's gradient
        carry = g_last.transpose(1, 2).contiguous() if g_last is not None else uT.new_zeros(bsz, n, d)
        buf_a = uT.new_empty(block, bsz, n, d)
        buf_h = uT.new_empty(block + 1, bsz, n, d)  # row 0 the entry state, row j + 1 the state after token j
        buf_g = uT.new_empty(block, bsz, n, d)
        buf_x = uT.new_empty(block, bsz, n, d)
        buf_s = uT.new_empty(block, bsz, d)
        a_rows, h_rows, g_rows = buf_a.unbind(0), buf_h.unbind(0), buf_g.unbind(0)
        for i in range(n_blocks - 1, -1, -1):
            s, e = i * block, min((i + 1) * block, t_len)
            k = e - s
            kb = k * bsz
            a, h_states, h_prev, g, x, s_blk = buf_a[:k], buf_h[1:k + 1], buf_h[:k], buf_g[:k], buf_x[:k], buf_s[:k]
            torch.exp2(torch.mul(dT[s:e, :, None, :], At2, out=a), out=a)
            h_rows[0].copy_(entries[i])
            torch.mul(duT[s:e, :, None, :], BT[s:e, :, :, None], out=h_states)
            for j in range(k):
                h_rows[j + 1].addcmul_(a_rows[j], h_rows[j])
            torch.bmm(gyT[s:e].view(kb, 1, d), h_states.view(kb, n, d).transpose(1, 2), out=g_CT[s:e].view(kb, 1, n))
            torch.mul(gyT[s:e, :, None, :], CT[s:e, :, :, None], out=g)
            g_rows[k - 1].add_(carry)
            for j in range(k - 2, -1, -1):
                g_rows[j].addcmul_(a_rows[j + 1], g_rows[j + 1])
            torch.mul(a_rows[0], g_rows[0], out=carry)
            torch.bmm(BT[s:e].view(kb, 1, n), g.view(kb, n, d), out=s_blk.view(kb, 1, d))  # S = Σ_n B G
            torch.mul(dT[s:e], s_blk, out=g_uT[s:e])
            torch.bmm(duT[s:e].view(kb, 1, d), g.view(kb, n, d).transpose(1, 2), out=g_BT[s:e].view(kb, 1, n))
            torch.mul(g, a, out=x).mul_(h_prev)  # X = G ⊙ a ⊙ h_prev
            acc_A[:k].addcmul_(x, dT[s:e, :, None, :])
            torch.sum(x.mul_(At), dim=-2, out=g_dT[s:e]).addcmul_(uT[s:e], s_blk)
        g_A = acc_A.sum((0, 1)).t()
        return (g_uT.transpose(0, 1), g_dT.transpose(0, 1), g_A, g_BT.transpose(0, 1), g_CT.transpose(0, 1),
                carry.transpose(1, 2), None)


def selective_scan_blocked(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                           state: torch.Tensor | None = None, *,
                           chunk_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Same signature and result as :func:`layers.ops.selective_scan.naive.selective_scan_naive`, computed in fp32
    by :class:`_BlockedScan` in blocks of :data:`BLOCK` tokens; ``chunk_size`` is accepted (one signature across
    backends) and ignored."""
    f32 = torch.float32
    bsz, t_len, d = u.shape
    h0 = state.to(f32) if state is not None else u.new_zeros(bsz, d, A.shape[-1], dtype=f32)
    if t_len == 0:
        return u.new_zeros(u.shape), h0
    y, last = _BlockedScan.apply(u.to(f32), delta.to(f32), A.to(f32), B.to(f32), C.to(f32), h0, BLOCK)
    return y.to(u.dtype), last
