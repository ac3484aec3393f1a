"""RWKV-7 generalized delta rule in chunked (WY) form: pure PyTorch, any length, initial and final state.

Same signature and result as :func:`layers.ops.rwkv7.naive.rwkv7_naive` (the recurrence is written there).
The algorithm is the diagonal-plus-low-rank chunked form (``/work/shared/reference/rwkv7_chunked.md`` §2):

1. Pad ``T`` to a multiple of the chunk ``C`` with identity tokens (``r = k = v = a = b = 0``, ``w = 0``), so
   the final state is exact; split into ``n = T/C`` chunks. Per chunk: ``g`` = inclusive cumsum of the log
   decay ``w``, ``e = g - w`` (exclusive), ``g_C`` the chunk total.
2. Four ``C x C`` matrices, all chunks at once (batched matmuls). They are *factorized* around the chunk's
   middle row ``m``: ``A_qk = tril((r e^{g-m}) (k e^{m-g})^T)`` and likewise ``A_qb`` (with ``b``), and strictly
   lower ``A_ak, A_ab`` from ``a e^{e-m}``. Every kept entry carries a decay ``<= 1``; a single factor is at
   most ``e^{span/2}`` with ``span = |g_C|``. Masking is a select, never a multiply (the upper triangle may
   hold large values).
3. The in-chunk reads of the old state ``X (C x V)``, rows ``x_i = S_{i-1} a_i``, solve the unit lower
   triangular system ``(I - A_ab) X = (a e^{e}) S_0^T + A_ak V``. One batched triangular solve gives
   ``W = (I - A_ab)^{-1} (a e^e)`` and ``U = (I - A_ab)^{-1} A_ak V``, so ``X = W S_0^T + U``.
4. A sequential scan over chunks, matmuls only: ``X = W S^T + U``;
   ``O = (r e^g) S^T + A_qk V + A_qb X``; ``S <- S diag(e^{g_C}) + V^T (k e^{g_C-g}) + X^T (b e^{g_C-g})``.

Everything runs in fp32; gradients come from autograd. Requires ``w <= 0`` (decays in (0, 1]); when a chunk's
total log decay exceeds ``_MAX_SPAN`` (fp32 factor overflow) the chunk size is halved until it fits, so any
gate is handled exactly. Finding that out reads ``w`` on the host (a device sync, and a graph break under
``torch.compile``); a caller that guarantees ``w >= -decay_bound`` (the RWKV-7 layer: ``exp(-1/2)``) passes
``decay_bound`` and the chunk size is fixed from it alone (``C · decay_bound <= _MAX_SPAN``: C <= 64 at
RWKV-7's bound), so the function compiles as one graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_MAX_SPAN = 60.0  # e^{60} ~ 1e26: factor products stay finite in fp32 (max ~ e^{88})


def _chunks(x: torch.Tensor, n: int, c: int) -> torch.Tensor:
    """``(B, T, H, D)`` -> fp32 ``(B, H, n, C, D)``, zero-padded at the end."""
    bsz, t, h, d = x.shape
    x = x.float().transpose(1, 2)
    if n * c != t:
        x = F.pad(x, (0, 0, 0, n * c - t))
    return x.reshape(bsz, h, n, c, d)


def rwkv7_chunked(r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor,
                  b: torch.Tensor, initial_state: torch.Tensor | None = None,
                  chunk_size: int = 64, decay_bound: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    bsz, t_len, h, kd = r.shape
    vd = v.shape[-1]
    c = max(1, min(chunk_size, t_len))
    if decay_bound is not None:  # a chunk spans at most c·decay_bound: halve on the host, never reading w
        while c > 1 and c * decay_bound > _MAX_SPAN:
            c //= 2
    n = -(-t_len // c) if t_len else 0
    state = (torch.zeros(bsz, h, vd, kd, dtype=torch.float32, device=r.device) if initial_state is None
             else initial_state.float())
    if n == 0:
        return v.new_zeros(bsz, 0, h, vd), state
    r_, w_, k_, v_, a_, b_ = (_chunks(x, n, c) for x in (r, w, k, v, a, b))

    g = w_.cumsum(dim=-2)  # inclusive log decay (B, H, n, C, K)
    g_end = g[..., -1:, :]
    if decay_bound is None and c > 1 and float(-g_end.detach().min()) > _MAX_SPAN:
        return rwkv7_chunked(r, w, k, v, a, b, initial_state, chunk_size=c // 2)
    e = g - w_  # exclusive
    m = g[..., c // 2:c // 2 + 1, :]  # reference row: factors stay within e^{+-span/2}
    r_hat, a_hat = r_ * (g - m).exp(), a_ * (e - m).exp()
    k_hat, b_hat = k_ * (m - g).exp(), b_ * (m - g).exp()
    ones = torch.ones(c, c, dtype=torch.bool, device=r.device)
    incl, strict = ones.tril(), ones.tril(-1)
    zero = r_.new_zeros(())
    a_qk = torch.where(incl, r_hat @ k_hat.transpose(-1, -2), zero)
    a_qb = torch.where(incl, r_hat @ b_hat.transpose(-1, -2), zero)
    a_ak = torch.where(strict, a_hat @ k_hat.transpose(-1, -2), zero)
    a_ab = torch.where(strict, a_hat @ b_hat.transpose(-1, -2), zero)

    # (I - A_ab) [W | U] = [a e^e | A_ak V]; unit diagonal, so the solve never divides.
    eye = torch.eye(c, dtype=torch.float32, device=r.device)
    rhs = torch.cat((a_ * e.exp(), a_ak @ v_), dim=-1)
    wu = torch.linalg.solve_triangular(eye - a_ab, rhs, upper=False, unitriangular=True)
    w_wy, u_wy = wu.split((kd, vd), dim=-1)

    r_gamma = r_ * g.exp()
    o_intra = a_qk @ v_  # (B, H, n, C, V)
    to_end = (g_end - g).exp()
    k_end, b_end = k_ * to_end, b_ * to_end
    decay_end = g_end.exp()  # (B, H, n, 1, K)

    outs = []
    # unbind once: indexing inside the loop would make autograd build a full-size zero gradient per chunk
    per_chunk = zip(*(z.unbind(2) for z in (w_wy, u_wy, r_gamma, o_intra, a_qb, decay_end, v_, k_end, b_end)))
    for w_i, u_i, rg_i, oi_i, qb_i, dec_i, v_i, ke_i, be_i in per_chunk:
        s_t = state.transpose(-1, -2)  # (B, H, K, V)
        x = w_i @ s_t + u_i  # (B, H, C, V): the old-state reads x_i = S_{i-1} a_i
        outs.append(rg_i @ s_t + oi_i + qb_i @ x)
        state = state * dec_i + v_i.transpose(-1, -2) @ ke_i + x.transpose(-1, -2) @ be_i
    o = torch.stack(outs, dim=2).reshape(bsz, h, n * c, vd)[:, :, :t_len]
    return o.transpose(1, 2).to(v.dtype), state
