"""Diagonal S4 (S4D) sequence op: ``s4d_conv(u, dt, A, C, state=None, *, want_state=True) -> (y, state)``.

Shapes (B batch, T length, H channels, M = N/2 stored complex modes, one of each conjugate pair)::

    u      (B, T, H)   real input (the layer adds D·u itself)
    dt     (H,)        step Δ > 0 (ZOH)
    A, C   (H, M)      complex; Re A < 0; B = 1 is folded into C
    state  (B, H, M)   complex initial state or None (zeros)
    -> y (B, T, H) in u's dtype, the state after the last token (complex64; None unless want_state)

Backends (``BACKENDS``): ``naive`` (the recurrence token by token, the oracle) and ``chunked`` (the FFT
convolution with a Vandermonde kernel, zero-padded to 2T; the carried state in and out exactly; its FFT
convolution, kernel and final state have hand-written backwards); no Triton kernel. ``backend=`` or
:mod:`layers.ops.dispatch` picks one. :mod:`layers.ops.s4_kernel.hippo` holds HiPPO-LegS (:func:`hippo_legs`) and
the S4D initialisations.
"""

from __future__ import annotations

from typing import Any

import torch

from layers.ops import dispatch
from layers.ops.s4_kernel.chunked import (
    fft_causal_conv,
    lag_factors,
    s4d_fft,
    s4d_kernel,
    vandermonde,
)
from layers.ops.s4_kernel.hippo import INITS, hippo_legs, legs_normal_part, s4d_init
from layers.ops.s4_kernel.naive import discretize, s4d_naive

__all__ = ["BACKENDS", "INITS", "discretize", "fft_causal_conv", "hippo_legs", "lag_factors", "legs_normal_part",
           "s4d_conv", "s4d_fft", "s4d_init", "s4d_kernel", "s4d_naive", "vandermonde"]

BACKENDS: dict[str, Any] = {"naive": s4d_naive, "chunked": s4d_fft}
dispatch.register("s4_kernel", BACKENDS)


def s4d_conv(u: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, C: torch.Tensor,
             state: torch.Tensor | None = None, *, want_state: bool = True,
             backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The backend chosen by :mod:`layers.ops.dispatch` (forced > env > ``backend`` > auto)."""
    return dispatch.run("s4_kernel", BACKENDS, u, dt, A, C, state, want_state=want_state, backend=backend)
