"""Hyena's long causal convolution with a skip term: ``naive`` (direct, token by token) and ``chunked`` (FFT 2L).

``long_conv(u (B, C, L), h (C, >=L), skip (C,)) -> (B, C, L)``; see ``naive.py`` for the formula.
Backends (``BACKENDS``): ``naive`` and ``chunked`` (no Triton kernel: the FFT is already fast);
``backend=`` or :mod:`layers.ops.dispatch` picks one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from layers.ops import dispatch
from layers.ops.hyena.chunked import long_conv_fft
from layers.ops.hyena.naive import long_conv_naive

__all__ = ["BACKENDS", "long_conv", "long_conv_fft", "long_conv_naive"]

BACKENDS: dict[str, Callable[..., torch.Tensor]] = {"naive": long_conv_naive, "chunked": long_conv_fft}
dispatch.register("hyena_conv", BACKENDS)


def long_conv(u: torch.Tensor, h: torch.Tensor, skip: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """The backend chosen by :mod:`layers.ops.dispatch` (forced > env > ``backend`` > auto)."""
    return dispatch.run("hyena_conv", BACKENDS, u, h, skip, backend=backend)
