"""The chunked scalar-decay scan (Mamba-2 SSD "Listing 1", generalised): the PyTorch CPU path and fallback.

``ssd_scan`` is shared by Mamba-2 (:mod:`layers.ops.mamba2.chunked`) and Mamba-3 (trapezoid and MIMO,
:mod:`layers.ops.mamba3.chunked`); its Triton twin is :mod:`layers.ops.common.scalar_decay_triton`. Per batch
and head it computes, with ``acs`` the cumulative log-decay and ``L[t, s] = exp(acs_t - acs_s)`` (``s <= t``)::

    H_t = exp(a_t) H_{t-1} + scale_t * sum_r v_{t,r} k_{t,r}^T     (+ the diagonal correction below)
    y_{t,r'} = sum_{s<=t} (q_{t,r'}·k_{s,r}) * W[t, s] * v_{s,r}  +  exp(acs_t) q_{t,r'}·H_init
    W[t, s] = L[t, s] * scale_s  -  [s == t] * shift_t

``shift`` is the over-counted diagonal (Mamba-3's ``(1-λ_{t+1}) Δ_{t+1}``; ``None`` for Mamba-2). The rank axis
R (MIMO) is folded into the chunk: one chunk is a ``(R·C) x (R·C)`` masked matmul with the mask
``kron(ones(R, R), W)`` (rows ordered rank-major, so W's blocks stay contiguous). Four steps per chunk:
intra-chunk (masked QKᵀ V), chunk states, a sequential pass over chunks (state passing), state-to-output.
Any length: the tail is padded with ``a = scale = 0`` (decay 1, no contribution), so the final state is exact.

Autograd runs through a hand-derived backward (:class:`_ChunkScan`): ``scale`` folded into K, the diagonal kept
apart, ``L`` factored into row and column scalings where the decay allows (:data:`FACTOR_RANGE`), the blocks made
in slices and recomputed rather than saved (:data:`SLICE_BYTES`). Forward and backward are tested against the
token-by-token oracles.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def segsum(a: torch.Tensor, acs: torch.Tensor | None = None) -> torch.Tensor:
    """``a (..., C)`` -> ``(..., C, C)`` with ``out[i, j] = sum_{j < r <= i} a_r`` for ``j <= i``, ``-inf`` above.

    Computed as a difference of the chunk's cumulative sums (three passes over ``C x C``; the masked-cumsum
    form costs twice that on CPU). Within one chunk that is exact to a few fp32 ulps of ``|cumsum|``: the
    diagonal is exactly 0, and the strong-decay test bounds the error elsewhere.
    """
    c = a.shape[-1]
    acs = a.cumsum(dim=-1) if acs is None else acs
    out = acs[..., :, None] - acs[..., None, :]
    upper = torch.ones(c, c, dtype=torch.bool, device=a.device).triu(1)
    return out.masked_fill_(upper, float("-inf"))


class _Blocks:
    """Layout helpers for one call: ``(B, T, ...)`` tensors <-> chunk blocks ``(B, H, nc, ...)``, tail padded."""

    def __init__(self, bsz: int, t_len: int, h: int, c: int):
        self.bsz, self.t_len, self.h, self.c = bsz, t_len, h, c
        self.pad = (-t_len) % c
        self.nc = (t_len + self.pad) // c

    def blocks(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, R, H, D) -> (B, H, nc, R, C, D): rank-major rows
        xr, d = x.shape[2], x.shape[-1]
        x = F.pad(x, (0, 0, 0, 0, 0, 0, 0, self.pad)) if self.pad else x
        return x.reshape(self.bsz, self.nc, self.c, xr, self.h, d).permute(0, 4, 1, 3, 2, 5).contiguous()

    def unblocks(self, x: torch.Tensor) -> torch.Tensor:  # the inverse of ``blocks``
        bsz, h, nc, xr, c, d = x.shape
        return x.permute(0, 2, 4, 3, 1, 5).reshape(bsz, nc * c, xr, h, d)[:, :self.t_len]

    def scalars(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, H) -> (B, H, nc, C)
        x = F.pad(x, (0, 0, 0, self.pad)) if self.pad else x
        return x.view(self.bsz, self.nc, self.c, self.h).permute(0, 3, 1, 2)

    def unscalars(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, nc, C) -> (B, T, H)
        return x.permute(0, 2, 3, 1).reshape(self.bsz, self.nc * self.c, self.h)[:, :self.t_len]


#: Bytes of one slice of ``(R·C) x (R·C)`` blocks. The intra-chunk blocks are made slice by slice and never saved
#: (the backward recomputes them), so their transient memory stays near this whatever the batch and length. Speed
#: is flat from here to unsliced (8-64 MB at batch 8, length 1024, measured); 0.5 MB slices were 25% slower for MIMO.
SLICE_BYTES = 8 << 20


def _rows(x: torch.Tensor) -> torch.Tensor:  # (Z, R, C, D) -> (Z, R*C, D)
    z, r, c, d = x.shape
    return x.reshape(z, r * c, d)


def _slices(nz: int, rc: int) -> list[slice]:
    step = max(1, SLICE_BYTES // (4 * rc * rc))
    return [slice(i, min(i + step, nz)) for i in range(0, nz, step)]


def _rank_rows(w: torch.Tensor, r: int) -> torch.Tensor:
    """``w (Z, C, C)`` -> ``(Z, C, R*C)``: each row repeated over the column ranks (a copy for ``R > 1``), so
    that ``kron(ones(R, R), w)`` is a broadcast over the row rank only, with contiguous rows."""
    if r == 1:
        return w
    z, c, _ = w.shape
    return w[:, :, None, :].expand(z, c, r, c).reshape(z, c, r * c)


def _kron_mul(s: torch.Tensor, wr: torch.Tensor, r: int, *, inplace: bool = False) -> torch.Tensor:
    """``s (Z, RC, RC) ⊙ kron(ones(R, R), w)`` with ``wr = _rank_rows(w, r)``."""
    if r == 1:
        return s.mul_(wr) if inplace else s * wr
    z, c = wr.shape[:2]
    sv = s.view(z, r, c, r * c)
    return (sv.mul_(wr[:, None]) if inplace else sv * wr[:, None]).view(s.shape)


def _pair_dots(qz: torch.Tensor, kz: torch.Tensor) -> torch.Tensor:
    """``(Z, R, C, N)`` twice -> ``(Z, R, R, C)``: ``q_{r,t}·k_{r',t}`` for every rank pair (one pair at a time:
    R is small, and one ``(R, R, C, N)`` product is not)."""
    r = qz.shape[1]
    return torch.stack([torch.stack([(qz[:, i] * kz[:, j]).sum(dim=-1) for j in range(r)], dim=1)
                        for i in range(r)], dim=1)


def _diag_blocks(m: torch.Tensor, r: int, c: int) -> torch.Tensor:
    """The ``t == s`` entries of every ``(r, r')`` block of ``m (Z, RC, RC)``: a view ``(Z, R, R, C)``."""
    return m.view(m.shape[0], r, c, r, c).diagonal(dim1=2, dim2=4)


#: A chunk whose cumulative log-decay spans at most this much has ``L[t, s] = exp(acs_t - acs_s)`` factored as
#: ``exp(acs_t - ref) · exp(ref - acs_s)`` about the span's midpoint (factors within ``e^±20``): 2C exponentials per
#: chunk instead of C² (``exp`` over the masked block, ``-inf`` and underflow included, was the slowest pass).
#: Slices holding a chunk with a wider span use ``exp(segsum)``, exact for any decay; so does every slice under
#: ``torch.compile`` and off CPU (:func:`_use_factored`), where the choice is not made on the host. (Mamba's
#: |A·Δ| per token is ~0.1 at initialization, a span of ~6 over 64 tokens.)
FACTOR_RANGE = 40.0


def _use_factored(acs: torch.Tensor) -> bool:
    """Whether a slice (cumulative log-decays ``acs (zs, C)``) takes the factored form: only in eager on CPU, where
    reading the slice's largest span on the host costs nothing. Compiled (a host read would break the graph) and
    on other devices (a device sync per slice) every slice takes ``exp(segsum)``, exact for any span; inductor
    fuses its ``C²`` exponentials into the one pass that applies the decay, so it costs no extra pass there."""
    if torch.compiler.is_compiling() or acs.device.type != "cpu":
        return False
    span = acs[:, 0] - acs[:, -1]
    return bool(span.max() <= FACTOR_RANGE) if span.numel() else True


def _causal_mask(r: int, c: int, device: torch.device) -> torch.Tensor:
    """``kron(ones(R, R), tril(ones(C, C)))``, fp32 ``(RC, RC)``: 1 where ``s <= t``. A multiply, 15x faster
    than ``masked_fill_`` with a broadcast bool mask on CPU; the entries it zeroes are finite (factored slices
    only, whose factors stay within ``e^±FACTOR_RANGE/2``)."""
    return torch.ones(c, c, device=device).tril_().repeat(r, r)


class _Intra:
    """One slice's intra-chunk block ``M = (Q K̃ᵀ) ⊙ kron(ones(R, R), L) - diag(shift_t q_t·k_t)`` with
    ``K̃ = K ⊙ scale`` and ``L[t, s] = exp(acs_t - acs_s)`` (``s <= t``, else 0), and its backward.

    Factored slices (:data:`FACTOR_RANGE`) compute ``M`` as ``(Q ⊙ e⁺)(K̃ ⊙ e⁻)ᵀ`` masked to ``s <= t``, where
    ``e⁺_t = exp(acs_t - ref)``, ``e⁻_s = exp(ref - acs_s)``; ``ref`` is held fixed (``M`` does not depend on it,
    so its gradient is zero). Others multiply by ``L = exp(segsum)``.
    """

    def __init__(self, qz, kz, ab, sb, shb, mask):
        self.qz, self.kz, self.sb, self.shb, self.mask = qz, kz, sb, shb, mask
        self.r, self.c = qz.shape[1], qz.shape[2]
        acs = ab.cumsum(dim=-1)
        self.factored = _use_factored(acs)
        if self.factored:
            acs = acs - 0.5 * (acs[:, :1] + acs[:, -1:])
            self.e_plus, self.e_minus = acs.exp(), acs.neg().exp_()
            self.ek = self.e_minus * sb  # K̃'s column scale
            self.qf = qz * self.e_plus[:, None, :, None]
            self.kf = kz * self.ek[:, None, :, None]
        else:
            self.lr = _rank_rows(segsum(ab, acs).exp_(), self.r)
            self.kf = kz * sb[:, None, :, None]  # K̃

    def block(self) -> torch.Tensor:
        r, c = self.r, self.c
        if self.factored:
            m = torch.bmm(_rows(self.qf), _rows(self.kf).transpose(1, 2)).mul_(self.mask)
        else:
            m = _kron_mul(torch.bmm(_rows(self.qz), _rows(self.kf).transpose(1, 2)), self.lr, r, inplace=True)
        self.qk = None
        if self.shb is not None:
            self.qk = _pair_dots(self.qz, self.kz)
            _diag_blocks(m, r, c).sub_(self.qk * self.shb[:, None, None, :])
        return m

    def backward(self, m, dm, dq, dk, dacs, dsb, dshift) -> None:
        """Given ``M`` and ``dM`` (overwritten), add to ``dq, dk (zs, R, C, N)``, ``dacs, dsb (zs, C)`` and set
        ``dshift (zs, C)``."""
        r, c, qz, kz, sb = self.r, self.c, self.qz, self.kz, self.sb
        if self.shb is not None:
            dmd = _diag_blocks(dm, r, c)  # (zs, R, R', C)
            dshift.copy_(-(dmd * self.qk).sum(dim=(1, 2)))
            dqk = dmd * -self.shb[:, None, None, :]  # d(q_{r,t}·k_{r',t})
            for i in range(r):
                for j in range(r):
                    dq[:, i].addcmul_(dqk[:, i, j, :, None], kz[:, j])
                    dk[:, j].addcmul_(dqk[:, i, j, :, None], qz[:, i])
        if self.factored:
            dm.mul_(self.mask)
            dqf = torch.bmm(dm, _rows(self.kf)).view(qz.shape)
            dkf = torch.bmm(dm.transpose(1, 2), _rows(self.qf)).view(kz.shape)
            dq.addcmul_(dqf, self.e_plus[:, None, :, None])
            dk.addcmul_(dkf, self.ek[:, None, :, None])
            d_plus = (dqf * qz).sum(dim=(1, 3)) * self.e_plus  # d acs through e⁺ (and -d acs through e⁻)
            d_ek = (dkf * kz).sum(dim=(1, 3))
            dsb += d_ek * self.e_minus
            dacs += d_plus - d_ek * self.ek
            return
        dst = _kron_mul(dm, self.lr, r)  # d(Q K̃ᵀ)
        dq.view(dq.shape[0], r * c, -1).baddbmm_(dst, _rows(self.kf))
        dkt = torch.bmm(dst.transpose(1, 2), _rows(qz)).view(kz.shape)
        dk.addcmul_(dkt, sb[:, None, :, None])
        dsb += (dkt * kz).sum(dim=(1, 3))
        dl = dm.mul_(m)  # Σ over rank blocks of dM ⊙ M = dL ⊙ L: the segsum's gradient (the diagonal cancels)
        if r > 1:  # two reductions over contiguous blocks (one joint one over both rank axes is slow on CPU)
            dl = dl.view(-1, r, c, r, c).sum(dim=1).sum(dim=-2)
        dacs += dl.sum(dim=-1) - dl.sum(dim=-2)


def _w_blocks(w_v: torch.Tensor) -> torch.Tensor:
    """``w_v (R, H, P)`` broadcastable against blocked values ``(B, H, nc, R, C, P)``."""
    return w_v.permute(1, 0, 2)[None, :, None, :, None, :]


def _mix(vb: torch.Tensor, w_v: torch.Tensor | None) -> torch.Tensor:
    """Blocked values ``(B, H, nc, 1, C, P)`` times ``w_v (R, H, P)`` -> ``(B, H, nc, R, C, P)`` (as is without)."""
    return vb * _w_blocks(w_v) if w_v is not None else vb


class _ChunkScan(torch.autograd.Function):
    """The chunked scan with a hand-derived backward (see ``ssd_scan``), laid out as ``Z = B·H·nc`` chunks.

    Autograd through ~20 element-wise passes over whole ``C x C`` (rank-expanded ``RC x RC``) tensors was most
    of the layer's time on CPU. Here ``scale`` is folded into K and the diagonal correction is kept apart, so
    per chunk ``M = (Q K̃ᵀ) ⊙ kron(L) - diag(shift ⊙ q·k)`` (see :class:`_Intra` for its two forms). The decay's
    gradient comes from row and column scalings (factored form) or from the row sums minus column sums of
    ``dM ⊙ M`` (``exp(segsum)`` form; the diagonal cancels there), never from autograd through the ``C x C``
    passes. Blocks are made slice by slice (:data:`SLICE_BYTES`) and never saved: the
    backward recomputes them, as flash attention does, so the saved tensors are the blocked inputs and the
    state entering each chunk.
    """

    @staticmethod
    def forward(ctx, q, k, v, a, scale, shift, h0, w_v, c):
        bsz, t_len, r, h, n = q.shape
        p = v.shape[-1]
        lay = _Blocks(bsz, t_len, h, c)
        nz, bh = bsz * h * lay.nc, bsz * h
        qz, kz = lay.blocks(q).view(nz, r, c, n), lay.blocks(k).view(nz, r, c, n)
        vb0 = lay.blocks(v)
        vz = _mix(vb0, w_v).reshape(nz, r, c, p)
        ab, sb = lay.scalars(a).reshape(nz, c), lay.scalars(scale).reshape(nz, c)
        shb = lay.scalars(shift).reshape(nz, c) if shift is not None else None
        acs = ab.cumsum(dim=-1)

        # 1. intra-chunk, slice by slice: y = M V
        y = q.new_empty(nz, r * c, p)
        mask = _causal_mask(r, c, q.device)
        for sl in _slices(nz, r * c):
            m = _Intra(qz[sl], kz[sl], ab[sl], sb[sl], shb[sl] if shb is not None else None, mask).block()
            torch.bmm(m, _rows(vz[sl]), out=y[sl])

        # 2. each chunk's own state contribution, decayed to its end
        to_end = torch.exp(acs[:, -1:] - acs).mul_(sb)  # (Z, C)
        chunk_states = torch.bmm(_rows(vz * to_end[:, None, :, None]).transpose(1, 2), _rows(kz))  # (Z, P, N)

        # 3. state passing over chunks (sequential; nc is small)
        chunk_decay = torch.exp(acs[:, -1]).view(bh, lay.nc)
        chunk_states = chunk_states.view(bh, lay.nc, p, n)
        state = h0.reshape(bh, p, n)
        starts = []
        for i in range(lay.nc):
            starts.append(state)
            state = chunk_decay[:, i, None, None] * state + chunk_states[:, i]
        prev = torch.stack(starts, dim=1).view(nz, p, n)  # the state entering each chunk

        # 4. state -> output: y += (Q prevᵀ) ⊙ exp(acs)
        y_off = torch.bmm(_rows(qz), prev.transpose(1, 2)).view(nz, r, c, p).mul_(acs.exp()[:, None, :, None])
        y = y.view(nz, r, c, p).add_(y_off)
        ctx.save_for_backward(qz, kz, vb0, w_v, ab, sb, shb, prev)
        ctx.lay = lay
        return lay.unblocks(y.view(bsz, h, lay.nc, r, c, p)), state.view(bsz, h, p, n)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy, dfinal):
        qz, kz, vb0, w_v, ab, sb, shb, prev = ctx.saved_tensors
        lay = ctx.lay
        nz, r, c, n = qz.shape
        bsz, h, nc = lay.bsz, lay.h, lay.nc
        bh = bsz * h
        p = vb0.shape[-1]
        vz = _mix(vb0, w_v).reshape(nz, r, c, p)
        dyz = lay.blocks(dy).view(nz, r, c, p)
        acs = ab.cumsum(dim=-1)
        ex = acs.exp()

        # 4. y_off = (Q prevᵀ) ⊙ exp(acs): with G = dy ⊙ exp(acs), dQ = G prev, dprev = Gᵀ Q and
        #    d acs_t = Σ G ⊙ (Q prevᵀ) = Σ_n q ⊙ dQ (no need to rebuild Q prevᵀ)
        g = _rows(dyz * ex[:, None, :, None])
        dq = torch.bmm(g, prev)  # (Z, RC, N)
        dprev = torch.bmm(g.transpose(1, 2), _rows(qz)).view(bh, nc, p, n)
        dacs = (qz * dq.view(nz, r, c, n)).sum(dim=(1, 3))  # (Z, C)

        # 3. state passing, in reverse: s_{i+1} = d_i s_i + CS_i
        chunk_decay = ex[:, -1].view(bh, nc)
        prev_c = prev.view(bh, nc, p, n)
        ds = dfinal.reshape(bh, p, n)
        d_cs, d_decay = [], []
        for i in reversed(range(nc)):
            d_cs.append(ds)
            d_decay.append((ds * prev_c[:, i]).sum(dim=(-1, -2)))
            ds = dprev[:, i] + chunk_decay[:, i, None, None] * ds
        dh0 = ds.view(bsz, h, p, n)
        d_cs = torch.stack(d_cs[::-1], dim=1).view(nz, p, n)
        d_last = torch.stack(d_decay[::-1], dim=1).view(nz) * ex[:, -1]  # d acs_last

        # 2. CS = (V ⊙ e)ᵀ K with e_s = exp(acs_last - acs_s) scale_s
        decay_to_end = torch.exp(acs[:, -1:] - acs)
        to_end = decay_to_end * sb
        dve = torch.bmm(_rows(kz), d_cs.transpose(1, 2)).view(nz, r, c, p)
        dk = torch.bmm(_rows(vz * to_end[:, None, :, None]), d_cs)  # (Z, RC, N)
        dv = dve * to_end[:, None, :, None]
        d_to_end = (dve * vz).sum(dim=(1, 3))  # (Z, C)
        dsb = d_to_end * decay_to_end
        dlog = d_to_end * to_end
        dacs.sub_(dlog)
        d_last.add_(dlog.sum(dim=-1))

        # 1. intra-chunk, slice by slice, recomputing M: y = M V
        dshift = sb.new_zeros(nz, c) if shb is not None else None
        dv_r = dv.view(nz, r * c, p)
        dq = dq.view(nz, r, c, n)
        dk = dk.view(nz, r, c, n)
        mask = _causal_mask(r, c, qz.device)
        for sl in _slices(nz, r * c):
            intra = _Intra(qz[sl], kz[sl], ab[sl], sb[sl], shb[sl] if shb is not None else None, mask)
            m = intra.block()
            dys = _rows(dyz[sl])
            dm = torch.bmm(dys, _rows(vz[sl]).transpose(1, 2))  # (zs, RC, RC)
            dv_r[sl].baddbmm_(m.transpose(1, 2), dys)
            intra.backward(m, dm, dq[sl], dk[sl], dacs[sl], dsb[sl], dshift[sl] if dshift is not None else None)
        dacs[:, -1] += d_last

        # acs = cumsum(a): d a_j = Σ_{t >= j} d acs_t
        da = dacs.sum(dim=-1, keepdim=True) - dacs.cumsum(dim=-1) + dacs
        dvb = dv.view(bsz, h, nc, r, c, p)
        dw_v = None
        if w_v is not None:
            if ctx.needs_input_grad[7]:
                dw_v = (dvb * vb0).sum(dim=(0, 2, 4)).permute(1, 0, 2)  # (H, R, P) -> (R, H, P)
            dvb = (dvb * _w_blocks(w_v)).sum(dim=3, keepdim=True)

        def back(x: torch.Tensor) -> torch.Tensor:
            return lay.unblocks(x.view(bsz, h, nc, -1, c, x.shape[-1]))

        def back_scalars(x: torch.Tensor) -> torch.Tensor:
            return lay.unscalars(x.view(bsz, h, nc, c))

        return (back(dq), back(dk), lay.unblocks(dvb), back_scalars(da), back_scalars(dsb),
                back_scalars(dshift) if dshift is not None else None, dh0, dw_v, None)


def ssd_scan(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor, scale: torch.Tensor,
             shift: torch.Tensor | None, h0: torch.Tensor, chunk_size: int,
             w_v: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked scan. ``q, k (B, T, R, H, N)``, ``v (B, T, R, H, P)``, ``a, scale, shift (B, T, H)``,
    ``h0 (B, H, P, N)``; all fp32. Returns ``y (B, T, R, H, P)`` and the final state ``(B, H, P, N)``.
    With ``w_v (R, H, P)``, ``v`` is ``(B, T, 1, H, P)`` and the values are ``v ⊙ w_v`` (MIMO's up-projection,
    applied after blocking so the R-times larger tensor is made once, already in block layout).
    Differentiable in every tensor argument (a hand-derived backward, :class:`_ChunkScan`; not twice)."""
    c = max(1, min(chunk_size, q.shape[1]))
    return _ChunkScan.apply(q, k, v, a, scale, shift, h0, w_v, c)

