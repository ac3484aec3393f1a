"""Mamba-3 (SISO and MIMO) token by token in fp32: the oracle. Shapes as in :mod:`layers.ops.mamba3`.

Per head, state ``H ∈ R^{P×N}``; ``v_{t,r} = x_t ⊙ w_x[r]`` (``v_t = x_t`` for SISO)::

    θ_t = (θ_{t-1} + dθ_t) mod 2π
    q_{t,r} = Rot(θ_t) q_{t,r},   k_{t,r} = Rot(θ_t) k_{t,r}
    α_t = exp(a_t),  β_t = (1-λ_t) Δ_t α_t,  γ_t = λ_t Δ_t
    H_t = α_t H_{t-1} + β_t Σ_r v_{t-1,r} k_{t-1,r}ᵀ + γ_t Σ_r v_{t,r} k_{t,r}ᵀ
    y_{t,r} = H_t q_{t,r}
"""

from __future__ import annotations

import math

import torch

TWO_PI = 2 * math.pi


def rotate(x: torch.Tensor, theta: torch.Tensor, pairing: str) -> torch.Tensor:
    """Rotate ``x (..., N)`` by angles ``theta (..., S)`` (broadcast against ``x``'s leading dims).

    ``pairing="interleaved"`` (SISO): pairs ``(2i, 2i+1)`` for ``i < S``; ``"half"`` (MIMO): pairs ``(i, i+N/2)``
    for ``i < S``. Dimensions outside the pairs are left unchanged. A pair ``(u, w)`` maps to
    ``(u cos θ - w sin θ, u sin θ + w cos θ)``.
    """
    s = theta.shape[-1]
    n = x.shape[-1]
    if pairing not in ("interleaved", "half"):
        raise ValueError(f"unknown rotary pairing {pairing!r}; use 'interleaved' or 'half'")
    cos, sin = theta.cos(), theta.sin()

    def pad(t: torch.Tensor, value: float, width: int) -> torch.Tensor:
        return torch.cat((t, t.new_full((), value).expand(*t.shape[:-1], width)), dim=-1)

    # full-width form x·cos' + partner(x)·sin' (no slicing of x, so no zero-filled slice gradients): cos' is 1
    # and sin' is 0 outside the pairs; partner(x) swaps the two members of every pair
    if pairing == "half":
        if n % 2:
            raise ValueError(f"rotate-half pairing needs an even state dim, got {n}")
        half = n // 2
        cos_w, sin_w = pad(cos, 1.0, half - s), pad(sin, 0.0, half - s)
        cos_w, sin_w = torch.cat((cos_w, cos_w), dim=-1), torch.cat((-sin_w, sin_w), dim=-1)
        return x * cos_w + torch.roll(x, half, dims=-1) * sin_w
    if n % 2 == 0:
        cos_w = pad(torch.stack((cos, cos), dim=-1).flatten(-2), 1.0, n - 2 * s)
        sin_w = pad(torch.stack((-sin, sin), dim=-1).flatten(-2), 0.0, n - 2 * s)
        return x * cos_w + x.unflatten(-1, (n // 2, 2)).flip(-1).flatten(-2) * sin_w
    u, w = x[..., 0:2 * s:2], x[..., 1:2 * s:2]  # interleaved with an odd state dim: the last dim never pairs
    rot = torch.stack((u * cos - w * sin, u * sin + w * cos), dim=-1).flatten(-2)
    return torch.cat((rot, x[..., 2 * s:]), dim=-1)


def zero_state(x: torch.Tensor, r: int, n: int, s: int) -> dict[str, torch.Tensor]:
    """The decode state before any token: angle, ssm (fp32), k, v (x's dtype), all zero."""
    bsz, _, h, p = x.shape
    return {"angle": x.new_zeros(bsz, h, s, dtype=torch.float32),
            "ssm": x.new_zeros(bsz, h, p, n, dtype=torch.float32),
            "k": x.new_zeros(bsz, r, h, n), "v": x.new_zeros(bsz, h, p)}


def mamba3_naive(x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, a: torch.Tensor, dt: torch.Tensor,
                 lam: torch.Tensor, dtheta: torch.Tensor, state: dict | None = None, w_x: torch.Tensor | None = None,
                 *, pairing: str = "interleaved", chunk_size: int = 64) -> tuple[torch.Tensor, dict]:
    """The recurrence above, one token at a time. ``chunk_size`` is accepted and ignored."""
    bsz, t_len, r, h, n = q.shape
    f32 = torch.float32
    st = state if state is not None else zero_state(x, r, n, dtheta.shape[-1])
    wx = w_x.to(f32) if w_x is not None else x.new_ones(1, h, x.shape[-1], dtype=f32)
    theta = st["angle"].to(f32)
    hs = st["ssm"].to(f32)
    k_prev = st["k"].to(f32)
    x_prev = st["v"].to(f32)
    xf, qf, kf = x.to(f32), q.to(f32), k.to(f32)
    af, dtf, lf, dthf = a.to(f32), dt.to(f32), lam.to(f32), dtheta.to(f32)
    ys = []
    for t in range(t_len):
        theta = torch.remainder(theta + dthf[:, t], TWO_PI)
        q_t = rotate(qf[:, t], theta[:, None], pairing)  # (B, R, H, N)
        k_t = rotate(kf[:, t], theta[:, None], pairing)
        v_t = xf[:, t, None] * wx  # (B, R, H, P)
        v_prev = x_prev[:, None] * wx
        alpha = torch.exp(af[:, t])
        beta = (1 - lf[:, t]) * dtf[:, t] * alpha
        gamma = lf[:, t] * dtf[:, t]
        hs = (alpha[..., None, None] * hs
              + beta[..., None, None] * torch.einsum("brhp,brhn->bhpn", v_prev, k_prev)
              + gamma[..., None, None] * torch.einsum("brhp,brhn->bhpn", v_t, k_t))
        ys.append(torch.einsum("bhpn,brhn->brhp", hs, q_t))
        k_prev, x_prev = k_t, xf[:, t]
    y = torch.stack(ys, dim=1) if ys else xf.new_zeros(bsz, 0, r, h, x.shape[-1])
    return y.to(x.dtype), {"angle": theta, "ssm": hs, "k": k_prev.to(x.dtype), "v": x_prev.to(x.dtype)}
