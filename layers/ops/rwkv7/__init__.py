"""RWKV-7 generalized delta rule (diagonal-plus-low-rank state update), three entry points:

- :func:`rwkv7` - dispatches to ``naive`` (token loop, fp32 oracle) or ``chunked`` (WY chunked form).
- :func:`rwkv7_step` - one decoding token from a state.

Shapes: ``r, w, k, a, b (B, T, H, K)``; ``v (B, T, H, V)``; state ``(B, H, V, K)`` fp32. ``w`` is the log decay
(``<= 0``). Returns ``o (B, T, H, V)`` and the final state. See ``naive.py`` for the recurrence.
"""

from __future__ import annotations

import torch

from layers.ops import dispatch
from layers.ops.rwkv7.chunked import rwkv7_chunked
from layers.ops.rwkv7.naive import rwkv7_naive, rwkv7_step

__all__ = ["rwkv7", "rwkv7_chunked", "rwkv7_naive", "rwkv7_step"]
_TRITON = dispatch.triton_backend("layers.ops.rwkv7.triton", "rwkv7_triton")  # {} where triton is missing


def rwkv7(r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
          initial_state: torch.Tensor | None = None, *, chunk_size: int = 64,
          backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole sequence through the backend chosen by :mod:`layers.ops.dispatch` (forced > env > config)."""
    impls = {
        "naive": lambda *args: rwkv7_naive(*args),
        "chunked": lambda *args: rwkv7_chunked(*args, chunk_size=chunk_size),
        **({"triton": lambda *args: _TRITON["triton"](*args, chunk_size=chunk_size)} if _TRITON else {}),
    }
    return dispatch.run("rwkv7", impls, r, w, k, v, a, b, initial_state, config_backend=backend)
