"""Depthwise causal conv + SiLU, time-major, for the CPU: no transposes of the activations and one autograd node.

``F.conv1d(groups=C)`` wants channel-major input, so the layer used to transpose ``(B, T, C)`` to ``(B, C, T)``,
concatenate the state, convolve and transpose back; its depthwise backward runs at about 2 GFLOP/s on CPU (measured
13-15 ms of a 136 ms Mamba-2 layer fwd+bwd at B 8, T 1024, C 320, K 4), and autograd keeps the conv output and the
SiLU as two more nodes. Here the input stays ``(B, T, C)`` with C innermost and, with ``xpad = [stateᵀ | x]``
along time (never materialised: tap k reads x shifted by ``K - 1 - k`` rows, and the state for the first rows),

    pre = bias + Σ_k w[:, k] ⊙ xpad[:, k:k + T]          (K fused multiply-adds over contiguous (B, T, C) slices)
    y   = silu(pre) = pre · σ(pre)

:class:`_CausalConv` keeps x, ``pre`` and ``σ(pre)`` and derives the backward by hand, with ``g = gy · σ(pre)·(1 +
pre·(1 - σ(pre)))`` (or ``gy`` without activation)::

    g_xpad[:, k:k + T] += w[:, k] ⊙ g        g_w[:, k] = Σ_{b,t} g ⊙ xpad[:, k:k + T]        g_bias = Σ_{b,t} g

plus the new state's gradient on the last K - 1 rows of ``g_xpad``; ``g_x`` and the incoming state's gradient are
its two parts.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable


class _CausalConv(torch.autograd.Function):
    """``(x (B, T, C), wT (K, C), bias (C,) | None, state (B, C, K - 1), silu) -> (y (B, T, C), new_state)``.

    ``xpad`` is never built: with the shift ``s = K - 1 - k``, tap k reads ``x[:, t - s]`` for ``t >= s`` (one
    multiply-add over the slices ``pre[:, s:]`` and ``x[:, :T - s]``) and the state for the first ``s`` rows (a
    ``(B, min(s, T), C)`` fix-up). The backward runs the same slices the other way."""

    @staticmethod
    def forward(ctx, x, wT, bias, state, silu):
        k_len, t_len = wT.shape[0], x.shape[1]
        stT = state.transpose(1, 2)  # (B, K - 1, C), small
        pre = torch.mul(x, wT[k_len - 1])  # contiguous (B, T, C)
        for k in range(k_len - 1):
            sh = k_len - 1 - k
            if t_len > sh:
                pre[:, sh:].addcmul_(x[:, :t_len - sh], wT[k])
            m = min(sh, t_len)
            pre[:, :m].addcmul_(stT[:, k:k + m], wT[k])
        if bias is not None:
            pre.add_(bias)
        if silu:
            sig = torch.sigmoid(pre)
            y = pre * sig
        else:
            sig, y = None, pre
        if t_len >= k_len - 1:
            new_state = x[:, t_len - (k_len - 1):].transpose(1, 2).contiguous()
        else:
            new_state = torch.cat((state[:, :, t_len:], x.transpose(1, 2)), dim=2)
        ctx.silu = silu
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, wT, stT, pre if silu else None, sig)
        return y, new_state

    @staticmethod
    @once_differentiable
    def backward(ctx, gy, g_state):
        x, wT, stT, pre, sig = ctx.saved_tensors
        k_len = wT.shape[0]
        bsz, t_len, c = x.shape
        if gy is None:
            gy = x.new_zeros(bsz, t_len, c)
        if ctx.silu:
            g = torch.sub(1.0, sig).mul_(pre).add_(1.0).mul_(sig).mul_(gy)  # silu'(pre) · gy
        else:
            g = gy.contiguous()
        g_x = torch.mul(g, wT[k_len - 1])
        g_stT = x.new_zeros(bsz, k_len - 1, c)  # the incoming state's gradient, time-major
        g_wT = wT.new_empty(wT.shape)
        flat = x.new_empty(bsz * t_len * c)  # the products g ⊙ x of one tap, reduced over (B, T)
        for k in range(k_len):
            sh = k_len - 1 - k
            n = max(t_len - sh, 0)
            prod = flat[:bsz * n * c].view(bsz, n, c)
            torch.mul(g[:, sh:], x[:, :n], out=prod)
            acc = prod.sum((0, 1))
            if sh:
                if n:
                    g_x[:, :n].addcmul_(g[:, sh:], wT[k])
                m = min(sh, t_len)
                acc.add_((g[:, :m] * stT[:, k:k + m]).sum((0, 1)))
                g_stT[:, k:k + m].addcmul_(g[:, :m], wT[k])
            g_wT[k].copy_(acc)
        if g_state is not None and k_len > 1:
            gsT = g_state.transpose(1, 2)  # rows T .. T + K - 2 of xpad
            if t_len >= k_len - 1:
                g_x[:, t_len - (k_len - 1):].add_(gsT)
            else:
                g_x.add_(gsT[:, k_len - 1 - t_len:])
                g_stT[:, t_len:].add_(gsT[:, :k_len - 1 - t_len])
        g_bias = g.sum((0, 1)) if ctx.has_bias else None
        return g_x, g_wT, g_bias, g_stT.transpose(1, 2), None


def causal_conv1d_chunked(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                          state: torch.Tensor | None = None, *,
                          activation: str | None = "silu") -> tuple[torch.Tensor, torch.Tensor]:
    """Shapes as :func:`layers.ops.causal_conv1d.naive.causal_conv1d_naive`; one :class:`_CausalConv` node."""
    if activation not in ("silu", None):
        raise ValueError(f"causal_conv1d: activation must be 'silu' or None, got {activation!r}")
    b, _, c = x.shape
    k = weight.shape[-1]
    if state is None:
        state = x.new_zeros(b, c, k - 1)
    wT = weight.to(x.dtype).t().contiguous()  # (K, C): row k is a contiguous C-vector
    return _CausalConv.apply(x, wT, bias.to(x.dtype) if bias is not None else None, state.to(x.dtype),
                             activation == "silu")
