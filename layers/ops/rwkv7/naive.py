"""RWKV-7 generalized delta rule, token by token in fp32: the oracle for every other path.

Per batch and head, with ``S (V, K)`` the state (value rows, key columns)::

    x_t = S_{t-1} a_t                                  (reads the OLD state)
    S_t = S_{t-1} diag(d_t) + x_t b_t^T + v_t k_t^T     (d_t = exp(w_t), w = log decay < 0)
    o_t = S_t r_t                                       (read AFTER the update: token t sees itself)

Shapes: ``r, w, k, a, b (B, T, H, K)``, ``v (B, T, H, V)``, ``initial_state (B, H, V, K)`` or ``None`` (zeros).
Returns ``o (B, T, H, V)`` in the input dtype and the final state ``(B, H, V, K)`` in fp32.
"""

from __future__ import annotations

import torch


def rwkv7_step(r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor,
               b: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One token: ``r, w, k, a, b (B, H, K)``, ``v (B, H, V)``, ``state (B, H, V, K)`` fp32 -> ``o (B, H, V)`` fp32
    and the new state."""
    r, w, k, v, a, b = (t.float() for t in (r, w, k, v, a, b))
    x = torch.einsum("bhvk,bhk->bhv", state, a)
    state = state * w.exp()[:, :, None, :] + x[..., :, None] * b[..., None, :] + v[..., :, None] * k[..., None, :]
    o = torch.einsum("bhvk,bhk->bhv", state, r)
    return o, state


def rwkv7_naive(r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor,
                b: torch.Tensor, initial_state: torch.Tensor | None = None, *,
                chunk_size: int = 64, decay_bound: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole sequence token by token; ``chunk_size`` and ``decay_bound`` are accepted (one signature across
    backends) and ignored."""
    bsz, t_len, h, kd = r.shape
    vd = v.shape[-1]
    state = (torch.zeros(bsz, h, vd, kd, dtype=torch.float32, device=r.device) if initial_state is None
             else initial_state.float())
    outs = []
    for t in range(t_len):
        o, state = rwkv7_step(r[:, t], w[:, t], k[:, t], v[:, t], a[:, t], b[:, t], state)
        outs.append(o)
    o = torch.stack(outs, dim=1) if outs else v.new_zeros(bsz, 0, h, vd, dtype=torch.float32)
    return o.to(v.dtype), state
