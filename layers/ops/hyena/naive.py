"""Hyena long convolution, direct and token by token in fp32: the oracle for the FFT path.

    y[b, c, t] = sum_{j <= t} h[c, t - j] * u[b, c, j]  +  skip[c] * u[b, c, t]

Shapes: ``u (B, C, L)``, ``h (C, L')`` with ``L' >= L`` (taps past ``L`` are unused), ``skip (C,)``.
Returns ``y (B, C, L)`` in ``u``'s dtype. Cost ``O(B C L^2)``, ``L`` sequential steps.
"""

from __future__ import annotations

import torch


def long_conv_naive(u: torch.Tensor, h: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    length = u.shape[-1]
    uf, hf = u.float(), h[..., :length].float().flip(-1)  # hf[:, L-1-s] = h[:, s]
    outs = [(uf[..., :t + 1] * hf[..., length - 1 - t:]).sum(dim=-1) for t in range(length)]
    y = torch.stack(outs, dim=-1) if outs else uf.clone()
    return (y + skip.float()[:, None] * uf).to(u.dtype)
