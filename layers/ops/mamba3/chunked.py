"""Mamba-3 (SISO and MIMO) by chunks: the trapezoid as SSD. Shapes as in :mod:`layers.ops.mamba3`.

Unrolling the recurrence, token ``s`` enters the state with ``γ_s`` at ``s`` and with ``β_{s+1}`` one step
later, so for ``t > s`` its weight is ``exp(Σ_{s<r<=t} a_r) · scale_s`` with
``scale_s = γ_s + (1-λ_{s+1}) Δ_{s+1}`` (``Δ`` past the end taken as 0), and at ``t = s`` it is
``γ_s = scale_s - shift_s`` with ``shift_s = (1-λ_{s+1}) Δ_{s+1}``. That is SSD with K scaled by ``scale`` minus
a diagonal correction (:func:`layers.ops.common.scalar_decay_chunked.ssd_scan`, rank folded into the chunk for
MIMO). The cached previous token enters through the initial state ``H_0 + (1-λ_0) Δ_0 Σ_r v_{-1,r} k_{-1,r}ᵀ``.
Angles ``θ = (θ_0 + cumsum dθ) mod 2π``, accumulated in fp64 so long sequences keep fp32 precision.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from layers.ops.common.scalar_decay_chunked import ssd_scan
from layers.ops.mamba3.naive import TWO_PI, rotate, zero_state


def mamba3_chunked(x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, a: torch.Tensor, dt: torch.Tensor,
                   lam: torch.Tensor, dtheta: torch.Tensor, state: dict | None = None,
                   w_x: torch.Tensor | None = None, *, pairing: str = "interleaved",
                   chunk_size: int = 64) -> tuple[torch.Tensor, dict]:
    """Same signature and result as :func:`layers.ops.mamba3.naive.mamba3_naive`."""
    return mamba3_with_scan(ssd_scan, x, q, k, a, dt, lam, dtheta, state, w_x, pairing=pairing,
                            chunk_size=chunk_size)


def mamba3_with_scan(scan, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, a: torch.Tensor, dt: torch.Tensor,
                     lam: torch.Tensor, dtheta: torch.Tensor, state: dict | None = None,
                     w_x: torch.Tensor | None = None, *, pairing: str = "interleaved",
                     chunk_size: int = 64) -> tuple[torch.Tensor, dict]:
    """The elementwise preparation around a scalar-decay scan with :func:`ssd_scan`'s signature (``w_v`` too);
    the PyTorch and Triton backends differ only in ``scan``."""
    bsz, t_len, r, h, n = q.shape
    f32 = torch.float32
    st = state if state is not None else zero_state(x, r, n, dtheta.shape[-1])
    if t_len == 0:
        return x.new_zeros(bsz, 0, r, h, x.shape[-1]), st
    xf, af, dtf, lf = x.to(f32), a.to(f32), dt.to(f32), lam.to(f32)

    theta = st["angle"].to(torch.float64)[:, None] + dtheta.to(torch.float64).cumsum(dim=1)
    theta = torch.remainder(theta, TWO_PI).to(f32)  # (B, T, H, S)
    # the scan runs in the state basis where rotary pairs are adjacent (see ``_PairOrder``); q·k and H q do not
    # depend on the order of N, so only the small decode state crosses between the two orders
    order = _PairOrder(pairing, n)
    rot = order.rotation(theta)
    qr = order.rotate(order.to_pairs(q.to(f32)), theta, rot)  # (B, T, R, H, N), pair order
    kr = order.rotate(order.to_pairs(k.to(f32)), theta, rot)
    wx = w_x.to(f32) if w_x is not None else None

    nxt = (1 - lf) * dtf  # (1-λ_t) Δ_t, used by the token before t
    shift = F.pad(nxt[:, 1:], (0, 0, 0, 1))
    scale = lf * dtf + shift

    v_prev = st["v"].to(f32)[:, None] * (wx if wx is not None else 1.0)
    h0 = st["ssm"].to(f32) + nxt[:, 0, :, None, None] * torch.einsum("brhp,brhn->bhpn", v_prev, st["k"].to(f32))
    y, last = scan(qr, kr, xf[:, :, None], af, scale, shift, order.to_pairs(h0), chunk_size, w_v=wx)
    # clones: a view would keep the whole (B, T, ...) tensors alive in the decode cache
    new_state = {"angle": theta[:, -1].clone(), "ssm": order.from_pairs(last),
                 "k": order.from_pairs(kr[:, -1]).to(x.dtype, copy=True), "v": x[:, -1].clone()}
    return y.to(x.dtype), new_state


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs ``(x1, x2) = x[..., 2i], x[..., 2i+1]`` by angles with ``cos, sin (..., N/2)``
    (broadcast against ``x``'s leading dims) on real numbers: ``(x1 cos - x2 sin, x1 sin + x2 cos)``. The complex
    multiply's numbers exactly; inductor fuses this form (it has no code generation for complex tensors), while
    in eager it is ~5x slower than one complex multiply (7 passes instead of 1)."""
    xp = x.unflatten(-1, (x.shape[-1] // 2, 2))
    x1, x2 = xp[..., 0], xp[..., 1]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


def pairs_adjacent(x: torch.Tensor) -> torch.Tensor:
    """Reorder the last axis (even N) so rotate-half pairs ``(i, i + N/2)`` become ``(2i, 2i + 1)``."""
    return x.unflatten(-1, (2, x.shape[-1] // 2)).transpose(-1, -2).flatten(-2)


def pairs_split(x: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`pairs_adjacent`."""
    return x.unflatten(-1, (x.shape[-1] // 2, 2)).transpose(-1, -2).flatten(-2)


class _PairOrder:
    """Rotary pairs made adjacent, so a rotation is one complex multiply in eager (a third of the passes of
    :func:`layers.ops.mamba3.naive.rotate`, forward and backward) and real-pair arithmetic that inductor fuses
    under ``torch.compile`` (:func:`rotate_pairs`).

    ``"interleaved"`` pairs ``(2i, 2i+1)`` are adjacent already; ``"half"`` pairs ``(i, i+N/2)`` are reordered to
    ``(i, i+N/2)`` -> ``(2i, 2i+1)`` (``to_pairs``; ``from_pairs`` undoes it). An odd state dim (interleaved only;
    its last dim never pairs) keeps ``rotate``.
    """

    def __init__(self, pairing: str, n: int):
        if pairing not in ("interleaved", "half"):
            raise ValueError(f"unknown rotary pairing {pairing!r}; use 'interleaved' or 'half'")
        if pairing == "half" and n % 2:
            raise ValueError(f"rotate-half pairing needs an even state dim, got {n}")
        self.pairing, self.n, self.swap = pairing, n, pairing == "half"

    def to_pairs(self, x: torch.Tensor) -> torch.Tensor:
        return pairs_adjacent(x) if self.swap else x

    def from_pairs(self, x: torch.Tensor) -> torch.Tensor:
        return pairs_split(x) if self.swap else x

    def rotation(self, theta: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None:
        """``exp(iθ)`` for every pair, ``(B, T, 1, H, N/2)`` complex (1 past the S angles); ``None`` for odd N.
        Under ``torch.compile`` its real and imaginary parts ``(cos, sin)`` instead: inductor has no code
        generation for complex tensors, and on real pairs (:func:`rotate_pairs`) it fuses the rotation."""
        if self.n % 2:
            return None
        extra = self.n // 2 - theta.shape[-1]
        cos, sin = theta.cos(), theta.sin()
        if extra:
            cos, sin = F.pad(cos, (0, extra), value=1.0), F.pad(sin, (0, extra))
        if torch.compiler.is_compiling():
            return cos[:, :, None], sin[:, :, None]
        return torch.complex(cos, sin)[:, :, None]

    def rotate(self, x: torch.Tensor, theta: torch.Tensor,
               rot: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """``x (B, T, R, H, N)`` in pair order by ``theta (B, T, H, S)``, ``rot = rotation(theta)``."""
        if rot is None:
            return rotate(x, theta[:, :, None], self.pairing)
        if isinstance(rot, tuple):
            return rotate_pairs(x, *rot)
        xc = torch.view_as_complex(x.contiguous().unflatten(-1, (self.n // 2, 2)))
        return torch.view_as_real(xc * rot).flatten(-2)
