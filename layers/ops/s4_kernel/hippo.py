"""HiPPO-LegS and the S4D initialisations derived from it (``ssm_lineage.md`` §1-2).

- :func:`hippo_legs`: the closed form ``A_nk = -sqrt(2n+1)·sqrt(2k+1)`` (n > k), ``-(n+1)`` (n = k), 0 (n < k),
  ``B_n = sqrt(2n+1)``. Lower-triangular, so its eigenvalues are ``-1 … -N``: S4D-Real, Mamba-1's A init.
- :func:`legs_normal_part`: with ``P_n = sqrt(n + 1/2)``, ``A + P Pᵀ = -I/2 + S`` with S skew-symmetric (the NPLR
  form); the normal part's eigenvalues are ``-1/2 ± i·w``. S4D-LegS keeps one of each pair: ``-1/2 + i·w``, w > 0.
- :func:`s4d_init`: ``lin`` (``-1/2 + iπn``), ``inv`` (``-1/2 + i·(N/π)(N/(2n+1) - 1)``) and ``legs``, for the
  ``M = N/2`` stored modes.
"""

from __future__ import annotations

import math

import torch

INITS = ("lin", "inv", "legs")


def hippo_legs(N: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A (N, N), B (N,))`` of HiPPO-LegS in float64."""
    q = torch.arange(N, dtype=torch.float64)
    r = torch.sqrt(2 * q + 1)
    A = -(r[:, None] * r[None, :]).tril(-1) - torch.diag(q + 1)
    return A, r.clone()


def legs_normal_part(N: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(S, w)``: ``S = A + P Pᵀ + I/2`` (skew-symmetric) and the positive frequencies ``w`` (ascending, N/2 of
    them for even N) of its eigenvalues ``±i·w``."""
    A, _ = hippo_legs(N)
    P = torch.sqrt(torch.arange(N, dtype=torch.float64) + 0.5)
    S = A + P[:, None] * P[None, :] + 0.5 * torch.eye(N, dtype=torch.float64)
    w = torch.linalg.eigvalsh(-1j * S.to(torch.complex128))  # -iS is Hermitian: its eigenvalues are real
    return S, w[w > 0]


def s4d_init(kind: str, N: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(real, imag)`` of the ``N/2`` stored modes of ``A = real + i·imag`` (float32; real = -1/2)."""
    m = N // 2
    n = torch.arange(m, dtype=torch.float64)
    if kind == "lin":
        imag = math.pi * n
    elif kind == "inv":
        imag = (N / math.pi) * (N / (2 * n + 1) - 1)
    elif kind == "legs":
        imag = legs_normal_part(N)[1][:m]
    else:
        raise ValueError(f"init must be one of {', '.join(INITS)}, got {kind!r}")
    return torch.full((m,), -0.5), imag.float()
