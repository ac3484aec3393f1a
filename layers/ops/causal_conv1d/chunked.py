"""Depthwise causal conv + SiLU, time-major, for the CPU: no transposes of the activations and one autograd node.

``F.conv1d(groups=C)`` wants channel-major input, so the layer used to transpose ``(B, T, C)`` to ``(B, C, T)``,
concatenate the state, convolve and transpose back; its depthwise backward runs at about 2 GFLOP/s on CPU (measured
13-15 ms of a 136 ms Mamba-2 layer fwd+bwd at B 8, T 1024, C 320, K 4), and autograd keeps the conv output and the
SiLU as two more nodes. Here the input stays ``(B, T, C)`` with C innermost: ``xpad = [stateᵀ | x]`` along time, and

    pre = bias + Σ_k w[:, k] ⊙ xpad[:, k:k + T]          (K fused multiply-adds over contiguous (B, T, C) slices)
    y   = silu(pre) = pre · σ(pre)

:class:`_CausalConv` keeps ``xpad`` and ``pre`` and derives the backward by hand, with ``g = gy · σ(pre)·(1 +
pre·(1 - σ(pre)))`` (or ``gy`` without activation)::

    g_xpad[:, k:k + T] += w[:, k] ⊙ g        g_w[:, k] = Σ_{b,t} g ⊙ xpad[:, k:k + T]        g_bias = Σ_{b,t} g

plus the new state's gradient on the last K - 1 rows of ``g_xpad``; ``g_x`` and the incoming state's gradient are
its two parts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


class _CausalConv(torch.autograd.Function):
    """``(x (B, T, C), wT (K, C), bias (C,) | None, state (B, C, K - 1), silu) -> (y (B, T, C), new_state)``."""

    @staticmethod
    def forward(ctx, x, wT, bias, state, silu):
        k_len = wT.shape[0]
        t_len = x.shape[1]
        xpad = torch.cat((state.transpose(1, 2), x), dim=1)  # (B, K - 1 + T, C), contiguous
        pre = torch.mul(xpad[:, :t_len], wT[0])
        for k in range(1, k_len):
            pre.addcmul_(xpad[:, k:k + t_len], wT[k])
        if bias is not None:
            pre.add_(bias)
        y = F.silu(pre) if silu else pre
        new_state = xpad[:, t_len:].transpose(1, 2).contiguous()
        ctx.silu = silu
        ctx.has_bias = bias is not None
        ctx.save_for_backward(xpad, wT, pre)
        return y, new_state

    @staticmethod
    @once_differentiable
    def backward(ctx, gy, g_state):
        xpad, wT, pre = ctx.saved_tensors
        k_len = wT.shape[0]
        t_len = pre.shape[1]
        if gy is None:
            gy = torch.zeros_like(pre)
        if ctx.silu:
            s = torch.sigmoid(pre)
            g = torch.sub(1.0, s).mul_(pre).add_(1.0).mul_(s).mul_(gy)  # silu'(pre) · gy
        else:
            g = gy.contiguous()
        g_xpad = torch.zeros_like(xpad)
        g_wT = wT.new_empty(wT.shape)  # contiguous rows: each is a reduction's `out=`
        prod = torch.empty_like(pre)
        for k in range(k_len):
            g_xpad[:, k:k + t_len].addcmul_(g, wT[k])
            torch.sum(torch.mul(g, xpad[:, k:k + t_len], out=prod), dim=(0, 1), out=g_wT[k])
        if g_state is not None and k_len > 1:
            g_xpad[:, t_len:].add_(g_state.transpose(1, 2))
        g_bias = g.sum((0, 1)) if ctx.has_bias else None
        g_x = g_xpad[:, k_len - 1:]
        g_state0 = g_xpad[:, :k_len - 1].transpose(1, 2)
        return g_x, g_wT, g_bias, g_state0, None


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
