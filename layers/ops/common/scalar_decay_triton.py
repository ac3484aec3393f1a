"""Triton chunked scalar-decay scan, forward and backward: the GPU twin of
:func:`layers.ops.common.scalar_decay_chunked.ssd_scan` (same signature, same result), shared by Mamba-2 and
Mamba-3.

Per batch and head, with ``acs`` the cumulative log-decay inside a chunk (rank R folded into the chunk: row
``j`` of a chunk is time ``j // R``, rank ``j % R``; only the rank-0 row of a time step carries its ``a``, so a
row cumsum gives every row its time's ``acs``)::

    W[i, j] = exp(acs_i - acs_j) * scale_j   if time_j < time_i
              scale_j - shift_j             if time_j == time_i  (the whole R x R block)
    Y_c     = (Q Kᵀ ⊙ W) V + exp(acs) ⊙ (Q S_cᵀ)
    S_{c+1} = exp(acs_L) S_c + (V ⊙ exp(acs_L - acs) scale)ᵀ K

One program per (batch·head, block of P) walks the chunks in order with the state ``S`` (P-block x N) in
registers; ``y`` and the final state are exact per P-block because the state's P rows never mix. The forward
keeps each chunk's entering state for the backward, which walks the chunks in reverse with ``dS`` in registers
and recomputes the chunk's masks; dq, dk and the scalar gradients sum over P, so each P-block writes a partial
that PyTorch adds up. Block sizes start wide and narrow on ``OutOfResources`` (see :func:`_configs`).
Any length: rows past ``T`` load as zeros (``a = scale = 0``: decay 1, no contribution), so the final state
is exact. Everything accumulates in fp32; inputs of any float dtype are loaded and cast. ``tl.dot`` on fp32
uses the GPU default precision (TF32 on Ampere and later; set ``TRITON_F32_DEFAULT=ieee`` for IEEE fp32).
No inline asm, no libdevice: the kernels run under ``TRITON_INTERPRET=1`` on CPU (fp32), which is how CI
tests them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources


@triton.jit
def _tile(N, P, R: tl.constexpr, BT: tl.constexpr, BN: tl.constexpr, BP: tl.constexpr):
    """This program's (batch, head) ``bh`` and P-block ``pb``; chunk rows ``j`` = (token ``tj``, rank) pairs with
    ``first`` marking rank 0; state columns ``n`` and rows ``p`` with their masks; the strictly-earlier and
    same-token row pairs ``lower``, ``same``; and the state tile's offsets and mask."""
    bh = tl.program_id(0).to(tl.int64)
    pb = tl.program_id(1)
    j = tl.arange(0, BT)
    n = tl.arange(0, BN)
    p = pb * BP + tl.arange(0, BP)
    nm = n < N
    pm = p < P
    tj = j // R
    first = (j % R) == 0
    lower = tj[:, None] > tj[None, :]
    same = tj[:, None] == tj[None, :]
    s_off = bh * P * N + p[:, None] * N + n[None, :]
    s_mask = pm[:, None] & nm[None, :]
    return bh, pb, j, n, p, nm, pm, tj, first, lower, same, s_off, s_mask


@triton.jit
def _load_chunk(q_ptr, k_ptr, v_ptr, a_ptr, sc_ptr, sh_ptr, bh, c, T, N, P, j, n, p, nm, pm, tj, first,
                C: tl.constexpr, R: tl.constexpr):
    """Chunk ``c`` of one (batch, head): rows ``j`` = (token, rank) pairs. Returns the row mask, offsets and masks,
    ``Q, K (BT, BN)``, ``V (BT, BP)``, the per-token scale ``s`` and shift ``d``, and the in-chunk cumulative
    log-decay ``acs`` with its total ``tot`` (the decay counted once per token, on its rank-0 row)."""
    t = c * C + tj
    rm = (j < C * R) & (t < T)
    row = bh * T * R + c * C * R + j
    qk_mask = rm[:, None] & nm[None, :]
    v_mask = rm[:, None] & pm[None, :]
    Q = tl.load(q_ptr + row[:, None] * N + n[None, :], mask=qk_mask, other=0.0).to(tl.float32)
    K = tl.load(k_ptr + row[:, None] * N + n[None, :], mask=qk_mask, other=0.0).to(tl.float32)
    V = tl.load(v_ptr + row[:, None] * P + p[None, :], mask=v_mask, other=0.0).to(tl.float32)
    av = tl.load(a_ptr + bh * T + t, mask=rm & first, other=0.0).to(tl.float32)
    s = tl.load(sc_ptr + bh * T + t, mask=rm, other=0.0).to(tl.float32)
    d = tl.load(sh_ptr + bh * T + t, mask=rm, other=0.0).to(tl.float32)
    return rm, row, qk_mask, v_mask, Q, K, V, s, d, tl.cumsum(av, 0), tl.sum(av, 0)


@triton.jit
def _ssd_fwd_kernel(q_ptr, k_ptr, v_ptr, a_ptr, sc_ptr, sh_ptr, h0_ptr, y_ptr, ht_ptr, st_ptr,
                    T, N, P, NC,
                    C: tl.constexpr, R: tl.constexpr, BT: tl.constexpr, BN: tl.constexpr, BP: tl.constexpr,
                    STORE: tl.constexpr):
    bh, pb, j, n, p, nm, pm, tj, first, lower, same, s_off, s_mask = _tile(N, P, R, BT, BN, BP)
    S = tl.load(h0_ptr + s_off, mask=s_mask, other=0.0).to(tl.float32)  # (BP, BN)
    for c in range(NC):
        rm, row, qk_mask, v_mask, Q, K, V, s, d, acs, tot = _load_chunk(
            q_ptr, k_ptr, v_ptr, a_ptr, sc_ptr, sh_ptr, bh, c, T, N, P, j, n, p, nm, pm, tj, first, C, R)
        # mask before exp: above the diagonal acs_i - acs_j > 0 could overflow
        diff = tl.where(lower, acs[:, None] - acs[None, :], 0.0)
        W = tl.where(lower, tl.exp(diff) * s[None, :], tl.where(same, (s - d)[None, :], 0.0))
        M = tl.dot(Q, tl.trans(K)) * W
        Y = tl.dot(M, V) + tl.exp(acs)[:, None] * tl.dot(Q, tl.trans(S))
        tl.store(y_ptr + row[:, None] * P + p[None, :], Y, mask=v_mask)
        if STORE:
            tl.store(st_ptr + (bh * NC + c) * P * N + p[:, None] * N + n[None, :], S, mask=s_mask)
        e = tl.exp(tot - acs) * s
        S = tl.exp(tot) * S + tl.dot(tl.trans(V * e[:, None]), K)
    tl.store(ht_ptr + s_off, S, mask=s_mask)


@triton.jit
def _ssd_bwd_kernel(q_ptr, k_ptr, v_ptr, a_ptr, sc_ptr, sh_ptr, st_ptr, dy_ptr, dht_ptr,
                    dq_ptr, dk_ptr, dv_ptr, da_ptr, dsc_ptr, dsh_ptr, dh0_ptr,
                    BH, T, N, P, NC,
                    C: tl.constexpr, R: tl.constexpr, BT: tl.constexpr, BN: tl.constexpr, BP: tl.constexpr):
    bh, pb, j, n, p, nm, pm, tj, first, lower, same, s_off, s_mask = _tile(N, P, R, BT, BN, BP)
    part = pb.to(tl.int64) * BH * T * R  # this P-block's slice of the partial buffers
    G = tl.load(dht_ptr + s_off, mask=s_mask, other=0.0).to(tl.float32)  # dL/dS after the chunk
    for i in range(NC):
        c = NC - 1 - i
        rm, row, qk_mask, v_mask, Q, K, V, s, d, acs, tot = _load_chunk(
            q_ptr, k_ptr, v_ptr, a_ptr, sc_ptr, sh_ptr, bh, c, T, N, P, j, n, p, nm, pm, tj, first, C, R)
        dY = tl.load(dy_ptr + row[:, None] * P + p[None, :], mask=v_mask, other=0.0).to(tl.float32)
        Sc = tl.load(st_ptr + (bh * NC + c) * P * N + p[:, None] * N + n[None, :], mask=s_mask, other=0.0)
        diff = tl.where(lower, acs[:, None] - acs[None, :], 0.0)
        E = tl.where(lower, tl.exp(diff), 0.0)
        W = tl.where(lower, E * s[None, :], tl.where(same, (s - d)[None, :], 0.0))
        scores = tl.dot(Q, tl.trans(K))
        dM = tl.dot(dY, tl.trans(V))  # dL/d(scores ⊙ W)
        dSc = dM * W  # dL/dscores
        eacs = tl.exp(acs)
        et = tl.exp(tot - acs)
        e = et * s
        VG = tl.dot(V, G)  # (BT, BN)
        dV = tl.dot(tl.trans(scores * W), dY) + e[:, None] * tl.dot(K, tl.trans(G))
        dQ = tl.dot(dSc, K) + eacs[:, None] * tl.dot(dY, Sc)
        dK = tl.dot(tl.trans(dSc), Q) + e[:, None] * VG
        # scalar gradients through W, the inter-chunk output and the state update
        dW = dM * scores
        X = tl.where(lower, dW * W, 0.0)
        y_inter = eacs[:, None] * tl.dot(Q, tl.trans(Sc))
        de = tl.sum(VG * K, 1)
        dacs = tl.sum(X, 1) - tl.sum(X, 0) + tl.sum(dY * y_inter, 1) - de * e
        dtot = tl.sum(tl.sum(G * Sc, 1), 0) * tl.exp(tot) + tl.sum(de * e, 0)
        dsc = tl.sum(tl.where(lower, dW * E, tl.where(same, dW, 0.0)), 0) + de * et
        dsh = -tl.sum(tl.where(same, dW, 0.0), 0)
        # acs_i = sum_{j <= i} a_j and tot = sum_j a_j: d a_j = sum_{i >= j} dacs_i + dtot
        da = tl.sum(dacs, 0) - tl.cumsum(dacs, 0) + dacs + dtot
        prow = part + row
        tl.store(dq_ptr + prow[:, None] * N + n[None, :], dQ, mask=qk_mask)
        tl.store(dk_ptr + prow[:, None] * N + n[None, :], dK, mask=qk_mask)
        tl.store(dv_ptr + row[:, None] * P + p[None, :], dV, mask=v_mask)
        tl.store(da_ptr + prow, da, mask=rm)
        tl.store(dsc_ptr + prow, dsc, mask=rm)
        tl.store(dsh_ptr + prow, dsh, mask=rm)
        G = tl.exp(tot) * G + tl.dot(tl.trans(dY * eacs[:, None]), Q)
    tl.store(dh0_ptr + s_off, G, mask=s_mask)


def _warps(bt: int, bn: int, bp: int) -> int:
    # big fp32 tiles (e.g. 64 x 128 for Q, K and the state) spill with 4 warps; untuned: speed unmeasured (no GPU)
    return 8 if max(bt, bp) * bn >= 64 * 128 else 4


def _blocks(c: int, r: int, n: int, p: int, bp_cap: int) -> tuple[int, int, int, int]:
    """Block sizes: rows of a chunk, N and a P-block, each a power of two >= 16 (``tl.dot`` on GPU)."""
    bt = max(16, triton.next_power_of_2(c * r))
    bn = max(16, triton.next_power_of_2(n))
    bp = max(16, min(bp_cap, triton.next_power_of_2(p)))
    return bt, bn, bp, triton.cdiv(p, bp)


def _configs(chunk: int, r: int, bp_caps: tuple[int, ...]) -> list[tuple[int, int]]:
    """(chunk, P-block cap) to try in order: the kernels stage their ``tl.dot`` operands in shared memory, which
    grows with the tiles (compiled for sm_90: the fp32 backward at chunk 64, N 128 needs ~239 KB with 32-wide
    P-blocks, over the H100's 227 KB; ~194 KB with 16), so on ``OutOfResources`` narrow P, then halve the chunk
    (the chunk size changes rounding only, never the result)."""
    out, c = [], chunk
    while True:
        out += [(c, cap) for cap in bp_caps]
        if c == 1 or c * r <= 16:
            return out
        c = max(1, c // 2)


FWD_BP_CAPS = (64, 32, 16)
BWD_BP_CAPS = (32, 16)


def _fwd(q, k, v, a, scale, shift, h0, t_len: int, r: int, chunk: int, store: bool, bp_caps=FWD_BP_CAPS):
    """Launch the forward at the first (chunk, P-block) that fits; returns y, final state, states, chunk."""
    bh, _, n = q.shape
    p = v.shape[-1]
    dev, f32 = q.device, torch.float32
    err: Exception | None = None
    for c, cap in _configs(chunk, r, bp_caps):
        bt, bn, bp, npb = _blocks(c, r, n, p, cap)
        nc = triton.cdiv(t_len, c)
        y = torch.empty(bh, t_len * r, p, device=dev, dtype=f32)
        ht = torch.empty(bh, p, n, device=dev, dtype=f32)
        states = torch.empty(bh, nc, p, n, device=dev, dtype=f32) if store else ht
        try:
            _ssd_fwd_kernel[(bh, npb)](q, k, v, a, scale, shift, h0, y, ht, states, t_len, n, p, nc,
                                       C=c, R=r, BT=bt, BN=bn, BP=bp, STORE=store, num_warps=_warps(bt, bn, bp))
        except OutOfResources as e:
            err = e
            continue
        return y, ht, states, c
    raise RuntimeError(f"ssd_triton forward: no block configuration fits this GPU (N={n}, P={p}, R={r}): {err}")


def _bwd(q, k, v, a, scale, shift, states, dy, dht, t_len: int, r: int, chunk: int):
    """Launch the backward at the first P-block that fits; returns the gradients (P-block partials summed) or
    None when nothing fits at this chunk size."""
    bh, _, n = q.shape
    p = v.shape[-1]
    dev, f32 = q.device, torch.float32
    nc = states.shape[1]
    for cap in BWD_BP_CAPS:
        bt, bn, bp, npb = _blocks(chunk, r, n, p, cap)
        dq = torch.zeros(npb, bh, t_len * r, n, device=dev, dtype=f32)
        dk = torch.zeros_like(dq)
        dv = torch.zeros(bh, t_len * r, p, device=dev, dtype=f32)
        da = torch.zeros(npb, bh, t_len * r, device=dev, dtype=f32)
        dsc = torch.zeros_like(da)
        dsh = torch.zeros_like(da)
        dh0 = torch.empty(bh, p, n, device=dev, dtype=f32)
        try:
            _ssd_bwd_kernel[(bh, npb)](q, k, v, a, scale, shift, states, dy, dht, dq, dk, dv, da, dsc, dsh, dh0,
                                       bh, t_len, n, p, nc, C=chunk, R=r, BT=bt, BN=bn, BP=bp,
                                       num_warps=_warps(bt, bn, bp))
        except OutOfResources:
            continue
        return dq.sum(0), dk.sum(0), dv, da.sum(0), dsc.sum(0), dsh.sum(0), dh0
    return None


class _SSDScan(torch.autograd.Function):
    """Folded layout: ``q, k (BH, T·R, N)``, ``v (BH, T·R, P)``, ``a, scale, shift (BH, T)``, ``h0 (BH, P, N)``,
    all contiguous. Returns ``y (BH, T·R, P)`` fp32 and the final state ``(BH, P, N)`` fp32."""

    @staticmethod
    def forward(ctx, q, k, v, a, scale, shift, h0, t_len: int, r: int, chunk: int):
        store = any(ctx.needs_input_grad)
        y, ht, states, used = _fwd(q, k, v, a, scale, shift, h0, t_len, r, chunk, store)
        if store:
            ctx.save_for_backward(q, k, v, a, scale, shift, h0, states)
        ctx.meta = (t_len, r, used)
        return y, ht

    @staticmethod
    def backward(ctx, dy, dht):
        q, k, v, a, scale, shift, h0, states = ctx.saved_tensors
        t_len, r, chunk = ctx.meta
        bh, _, n = q.shape
        p = v.shape[-1]
        dev, f32 = q.device, torch.float32
        dy = torch.zeros(bh, t_len * r, p, device=dev, dtype=f32) if dy is None else dy.contiguous()
        dht = torch.zeros(bh, p, n, device=dev, dtype=f32) if dht is None else dht.contiguous()
        grads = _bwd(q, k, v, a, scale, shift, states, dy, dht, t_len, r, chunk)
        for c, _ in _configs(chunk, r, (16,))[1:]:
            if grads is not None:
                break
            # the backward needs a smaller chunk than the forward used: recompute the chunk states at that size
            _, _, states, c = _fwd(q, k, v, a, scale, shift, h0, t_len, r, c, True, bp_caps=(16,))
            grads = _bwd(q, k, v, a, scale, shift, states, dy, dht, t_len, r, c)
        if grads is None:
            raise RuntimeError(f"ssd_triton backward: no block configuration fits this GPU (N={n}, P={p}, R={r})")
        dq, dk, dv, da, dsc, dsh, dh0 = grads
        # per-row scalars -> per time step: a lives on the rank-0 row; scale and shift on every rank row
        da = da.view(bh, t_len, r)[..., 0]
        dsc = dsc.view(bh, t_len, r).sum(-1)
        dsh = dsh.view(bh, t_len, r).sum(-1)
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), da.to(a.dtype), dsc.to(scale.dtype),
                dsh.to(shift.dtype), dh0.to(h0.dtype), None, None, None)


def ssd_scan_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor, scale: torch.Tensor,
                    shift: torch.Tensor | None, h0: torch.Tensor, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Same signature and result as :func:`layers.ops.common.scalar_decay_chunked.ssd_scan`: ``q, k (B, T, R, H, N)``,
    ``v (B, T, R, H, P)``, ``a, scale, shift (B, T, H)`` (``shift`` may be None), ``h0 (B, H, P, N)`` ->
    ``y (B, T, R, H, P)`` fp32 and the final state ``(B, H, P, N)`` fp32. Differentiable in every tensor."""
    bsz, t_len, r, h, n = q.shape
    p = v.shape[-1]
    if t_len == 0:
        return v.new_zeros(bsz, 0, r, h, p, dtype=torch.float32), h0.to(torch.float32)
    chunk = max(1, chunk_size)  # fixed (not min(chunk, T)): one compiled kernel for every length

    def fold(x: torch.Tensor) -> torch.Tensor:  # (B, T, R, H, D) -> (B·H, T·R, D)
        return x.permute(0, 3, 1, 2, 4).reshape(bsz * h, t_len * r, x.shape[-1]).contiguous()

    def seq(x: torch.Tensor) -> torch.Tensor:  # (B, T, H) -> (B·H, T)
        return x.permute(0, 2, 1).reshape(bsz * h, t_len).contiguous()

    if shift is None:
        shift = torch.zeros_like(scale)
    y, ht = _SSDScan.apply(fold(q), fold(k), fold(v), seq(a), seq(scale), seq(shift),
                           h0.reshape(bsz * h, p, n).contiguous(), t_len, r, chunk)
    return y.view(bsz, h, t_len, r, p).permute(0, 2, 3, 1, 4), ht.view(bsz, h, p, n)
