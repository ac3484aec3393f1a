"""Depthwise causal conv of Mamba-1/2 with its activation:
``causal_conv1d(x, weight, bias=None, state=None, *, activation="silu") -> (y, new_state)``.

Shapes (B batch, T length, C channels, K kernel width)::

    x       (B, T, C)        time-major (a split view of the in_proj output is fine)
    weight  (C, K)           ``nn.Conv1d(C, C, K, groups=C).weight[:, 0]``
    bias    (C,) or None
    state   (B, C, K - 1)    the last K - 1 inputs before x, or None (zeros)
    -> y (B, T, C) = act(bias + Σ_k weight[:, k]·xpad[:, t + k]) with xpad = [state | x], new state (B, C, K - 1)

Backends (``BACKENDS``): ``naive`` (``F.conv1d`` on the channel-major concatenation, then SiLU: the oracle) and
``chunked`` (time-major fused multiply-adds and SiLU in one autograd node with a hand-written backward; see
``chunked.py``). No Triton kernel: a Triton request runs ``chunked``. ``backend=`` or :mod:`layers.ops.dispatch`
picks one.
"""

from __future__ import annotations

from typing import Any

import torch

from layers.ops import dispatch
from layers.ops.causal_conv1d.chunked import causal_conv1d_chunked
from layers.ops.causal_conv1d.naive import causal_conv1d_naive

__all__ = ["BACKENDS", "causal_conv1d", "causal_conv1d_chunked", "causal_conv1d_naive"]

BACKENDS: dict[str, Any] = {"naive": causal_conv1d_naive, "chunked": causal_conv1d_chunked}
dispatch.register("causal_conv1d", BACKENDS)


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  state: torch.Tensor | None = None, *, activation: str | None = "silu",
                  backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The backend chosen by :mod:`layers.ops.dispatch` (forced > env > ``backend`` > auto). There is no Triton
    kernel: a Triton request (the layer's key, ``HYBRIDNAS_BACKEND`` or a forced one, meant for the scan) runs the
    chunked path rather than failing."""
    if dispatch.requested(backend) == "triton" and "triton" not in BACKENDS:
        return BACKENDS["chunked"](x, weight, bias, state, activation=activation)
    return dispatch.run("causal_conv1d", BACKENDS, x, weight, bias, state, activation=activation, backend=backend)
