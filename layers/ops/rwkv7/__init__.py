"""RWKV-7 generalized delta rule (diagonal-plus-low-rank state update), two entry points:

- :func:`rwkv7` - the whole sequence, through one of ``BACKENDS``: ``naive`` (token loop, fp32 oracle),
  ``chunked`` (WY chunked form) and ``triton`` where triton is installed; ``backend=`` or
  :mod:`layers.ops.dispatch` picks one.
- :func:`rwkv7_step` - one decoding token from a state.

Shapes: ``r, w, k, a, b (B, T, H, K)``; ``v (B, T, H, V)``; state ``(B, H, V, K)`` fp32. ``w`` is the log decay
(``<= 0``). Returns ``o (B, T, H, V)`` and the final state. See ``naive.py`` for the recurrence.
"""

from __future__ import annotations

from typing import Any

import torch

from layers.ops import dispatch
from layers.ops.rwkv7.chunked import rwkv7_chunked
from layers.ops.rwkv7.naive import rwkv7_naive, rwkv7_step

__all__ = ["BACKENDS", "rwkv7", "rwkv7_chunked", "rwkv7_naive", "rwkv7_step"]

BACKENDS: dict[str, Any] = {"naive": rwkv7_naive, "chunked": rwkv7_chunked}
BACKENDS.update(dispatch.triton_backend("layers.ops.rwkv7.triton", "rwkv7_triton"))  # where triton is installed


def probe(device: torch.device, dtype: torch.dtype) -> tuple[tuple, dict]:
    """A tiny input for the Triton self-check (two chunks, the second partial)."""
    g = torch.Generator().manual_seed(0)
    shape = (1, 20, 2, 16)
    kk = torch.nn.functional.normalize(torch.randn(*shape, generator=g), dim=-1)
    r, k, v = (torch.randn(*shape, generator=g) for _ in range(3))
    w = -0.6065 * torch.sigmoid(torch.randn(*shape, generator=g))
    b = kk * torch.rand(*shape, generator=g)
    state = torch.randn(1, 2, 16, 16, generator=g)
    cast = [t.to(device=device, dtype=dtype) for t in (r, w, k, v, -kk, b)]
    return (*cast, state.to(device)), {"chunk_size": 16}


dispatch.register("rwkv7", BACKENDS, probe)


def rwkv7(r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
          initial_state: torch.Tensor | None = None, *, chunk_size: int = 64, decay_bound: float | None = None,
          backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The backend chosen by :mod:`layers.ops.dispatch` (forced > env > ``backend`` > auto). ``decay_bound``: a
    guarantee ``w >= -decay_bound`` that lets the chunked path size its chunks without reading ``w``."""
    return dispatch.run("rwkv7", BACKENDS, r, w, k, v, a, b, initial_state, chunk_size=chunk_size,
                        decay_bound=decay_bound, backend=backend)
