"""Depthwise causal conv + activation as Mamba-1/2 ran it: ``F.conv1d(groups=C)`` on the channel-major
concatenation of the carried state and the input, then SiLU: the oracle. Shapes as in :mod:`layers.ops.causal_conv1d`.

    y[:, t] = act(bias + Σ_k w[:, k] · xpad[:, t + k]),   xpad = [state | x] along time (K - 1 + T steps)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_conv1d_naive(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                        state: torch.Tensor | None = None, *,
                        activation: str | None = "silu") -> tuple[torch.Tensor, torch.Tensor]:
    """``x (B, T, C)``, ``weight (C, K)``, ``bias (C,)``, ``state (B, C, K - 1)`` -> ``y (B, T, C)``, the new
    state ``(B, C, K - 1)`` (the last K - 1 inputs, the old state's tail when T < K - 1)."""
    b, _, c = x.shape
    k = weight.shape[-1]
    if state is None:
        state = x.new_zeros(b, c, k - 1)
    seq = torch.cat((state, x.transpose(1, 2)), dim=2)  # (B, C, K - 1 + T)
    y = F.conv1d(seq, weight[:, None, :], bias, groups=c)
    if activation == "silu":
        y = F.silu(y)
    return y.transpose(1, 2), seq[:, :, seq.shape[2] - (k - 1):].clone()
