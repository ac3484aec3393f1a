"""Mamba-1 selective scan in Triton, forward and backward, token by token.

Same signature and result as :func:`layers.ops.selective_scan.naive.selective_scan_naive` (shapes in
:mod:`layers.ops.selective_scan`). Every channel ``d`` has its own row of the state ``h (D, N)``::

    a_t = exp(Δ_t[d]·A[d, n]),   h_t = a_t ⊙ h_{t-1} + (Δ_t[d]·u_t[d])·B_t[n],   y_t[d] = Σ_n h_t[d, n]·C_t[n]

so one program owns (batch, a block of ``BD`` channels) and walks the tokens with its ``(BD, N)`` tile of the state
in registers (fp32), as the recurrent RWKV-7 kernel (:mod:`layers.ops.rwkv7.triton`) does. The forward stores the
state every ``chunk_size`` tokens; the backward walks the chunks in reverse, recomputes a chunk's states from its
checkpoint into a per-program scratch buffer, then walks the chunk's tokens in reverse with the state gradient
``G`` in registers::

    G_t = gy_t[d]·C_t[n] + a_{t+1} ⊙ G_{t+1}     (G_T also holds the final state's gradient)
    X_t = G_t ⊙ a_t ⊙ h_{t-1}                    (the gradient of Δ_t[d]·A[d, n]),   S_t[d] = Σ_n G_t B_t
    dA = Σ_{b,t} Δ_t X_t        dΔ_t = Σ_n A X_t + u_t S_t      du_t = Δ_t S_t
    dB_t = Σ_d (Δ_t u_t) G_t    dC_t = Σ_d gy_t h_t             dh_0 = a_1 ⊙ G_1

(the gradients of ``chunked._BlockedScan``). ``du`` and ``dΔ`` belong to one program each; ``dB`` and ``dC`` sum
over channels, so each channel block writes a partial that PyTorch adds up, and ``dA`` is accumulated in registers
and written once per (batch, block). Tokens past ``T`` load as zeros (``Δ = 0``: identity steps), channels past
``D`` and states past ``N`` as zeros (``A = 0``, ``B = 0``: they stay zero).

Sequential in T and parallel over batch and channels only, like ``mamba_ssm``'s ``selective_scan_cuda`` minus its
in-chunk parallel scan. Block sizes and warps are untuned (no GPU where it was written). No inline asm, no
libdevice: it runs under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _tile(D, N, BD: tl.constexpr, BN: tl.constexpr):
    """This program's batch ``b`` and channel block ``db``; channels ``d`` and states ``n`` with their masks; the
    (BD, BN) state tile's offsets and mask (also A's: both are row-major ``(D, N)``)."""
    b = tl.program_id(0).to(tl.int64)
    db = tl.program_id(1)
    d = db * BD + tl.arange(0, BD)
    n = tl.arange(0, BN)
    dm = d < D
    nm = n < N
    s_off = d[:, None] * N + n[None, :]
    s_mask = dm[:, None] & nm[None, :]
    return b, db, d, n, dm, nm, s_off, s_mask


@triton.jit
def _load_token(u_ptr, dt_ptr, B_ptr, b, t, T, D, N, d, n, dm, nm):
    """Token ``t``'s masks and offsets, its ``u, Δ`` (channels ``d``) and ``B_t`` (N,) in fp32."""
    md = dm & (d * 0 + t < T)  # vector masks: t may be a plain int (interpreter)
    mn = nm & (n * 0 + t < T)
    x_off = (b * T + t) * D + d
    n_off = (b * T + t) * N + n
    u = tl.load(u_ptr + x_off, mask=md, other=0.0).to(tl.float32)
    dt = tl.load(dt_ptr + x_off, mask=md, other=0.0).to(tl.float32)
    Bt = tl.load(B_ptr + n_off, mask=mn, other=0.0).to(tl.float32)
    return md, mn, x_off, n_off, u, dt, Bt


@triton.jit
def _ss_fwd_kernel(u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, h0_ptr, y_ptr, ht_ptr, ck_ptr,
                   T, D, N, NCK,
                   CK: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr, STORE: tl.constexpr):
    b, db, d, n, dm, nm, s_off, s_mask = _tile(D, N, BD, BN)
    A = tl.load(A_ptr + s_off, mask=s_mask, other=0.0)  # (BD, BN) fp32
    h = tl.load(h0_ptr + b * D * N + s_off, mask=s_mask, other=0.0)
    for c in range(NCK):
        if STORE:
            tl.store(ck_ptr + (b * NCK + c) * D * N + s_off, h, mask=s_mask)
        for j in range(CK):
            t = c * CK + j
            md, mn, x_off, n_off, u, dt, Bt = _load_token(u_ptr, dt_ptr, B_ptr, b, t, T, D, N, d, n, dm, nm)
            Ct = tl.load(C_ptr + n_off, mask=mn, other=0.0).to(tl.float32)
            h = tl.exp(dt[:, None] * A) * h + (dt * u)[:, None] * Bt[None, :]
            tl.store(y_ptr + x_off, tl.sum(h * Ct[None, :], 1), mask=md)
    tl.store(ht_ptr + b * D * N + s_off, h, mask=s_mask)


@triton.jit
def _ss_bwd_kernel(u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, ck_ptr, gy_ptr, ght_ptr, sc_ptr,
                   du_ptr, ddt_ptr, dA_ptr, dB_ptr, dC_ptr, dh0_ptr,
                   BS, T, D, N, NCK,
                   CK: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr):
    b, db, d, n, dm, nm, s_off, s_mask = _tile(D, N, BD, BN)
    ndb = tl.num_programs(1)
    loc = tl.arange(0, BD)[:, None] * BN + n[None, :]  # scratch slot layout (BD, BN), always in bounds
    scratch = sc_ptr + (b * ndb + db) * (CK + 1) * BD * BN
    part = db.to(tl.int64) * BS * T * N  # this channel block's slice of the dB, dC partials
    A = tl.load(A_ptr + s_off, mask=s_mask, other=0.0)
    G = tl.load(ght_ptr + b * D * N + s_off, mask=s_mask, other=0.0).to(tl.float32)
    dA = tl.zeros((BD, BN), dtype=tl.float32)
    for ci in range(NCK):
        c = NCK - 1 - ci
        # recompute the chunk's states: slot j holds the state before token c*CK + j
        h = tl.load(ck_ptr + (b * NCK + c) * D * N + s_off, mask=s_mask, other=0.0)
        tl.store(scratch + loc, h)
        for j in range(CK):
            t = c * CK + j
            _, _, _, _, u, dt, Bt = _load_token(u_ptr, dt_ptr, B_ptr, b, t, T, D, N, d, n, dm, nm)
            h = tl.exp(dt[:, None] * A) * h + (dt * u)[:, None] * Bt[None, :]
            tl.store(scratch + (j + 1) * BD * BN + loc, h)
        tl.debug_barrier()  # the scratch is written and read back by different threads of this program
        for jj in range(CK):
            j = CK - 1 - jj
            t = c * CK + j
            md, mn, x_off, n_off, u, dt, Bt = _load_token(u_ptr, dt_ptr, B_ptr, b, t, T, D, N, d, n, dm, nm)
            Ct = tl.load(C_ptr + n_off, mask=mn, other=0.0).to(tl.float32)
            gy = tl.load(gy_ptr + x_off, mask=md, other=0.0).to(tl.float32)
            h_prev = tl.load(scratch + j * BD * BN + loc)
            h_t = tl.load(scratch + (j + 1) * BD * BN + loc)
            a = tl.exp(dt[:, None] * A)
            G += gy[:, None] * Ct[None, :]  # y_t = h_t C_t; G now holds G_t
            pn = part + n_off
            tl.store(dC_ptr + pn, tl.sum(gy[:, None] * h_t, 0), mask=mn)
            tl.store(dB_ptr + pn, tl.sum((dt * u)[:, None] * G, 0), mask=mn)
            X = G * a * h_prev
            dA += dt[:, None] * X
            S = tl.sum(G * Bt[None, :], 1)
            tl.store(du_ptr + x_off, dt * S, mask=md)
            tl.store(ddt_ptr + x_off, tl.sum(A * X, 1) + u * S, mask=md)
            G = a * G  # the gradient reaching h_{t-1}
        tl.debug_barrier()  # the next chunk overwrites the scratch
    tl.store(dh0_ptr + b * D * N + s_off, G, mask=s_mask)
    tl.store(dA_ptr + b * D * N + s_off, dA, mask=s_mask)


def _blocks(d: int, n: int) -> tuple[int, int, int, int]:
    """Channel block, padded state size, channel blocks and warps (untuned: small channel blocks keep many
    programs in flight, since each one is sequential in T)."""
    bn = max(2, triton.next_power_of_2(n))
    bd = max(2, min(16, triton.next_power_of_2(d)))
    warps = max(1, min(4, bd * bn // 256))
    return bd, bn, triton.cdiv(d, bd), warps


class _SelectiveScan(torch.autograd.Function):
    """``u, Δ (B, T, D)`` and ``B, C (B, T, N)`` contiguous in any float dtype (read as fp32), ``A (D, N)`` and
    ``h0 (B, D, N)`` contiguous fp32."""

    @staticmethod
    def forward(ctx, u, dt, A, Bm, Cm, h0, chunk: int):
        bsz, t_len, dd = u.shape
        nn = A.shape[-1]
        nck = triton.cdiv(t_len, chunk)
        bd, bn, ndb, warps = _blocks(dd, nn)
        dev, f32 = u.device, torch.float32
        y = torch.empty(bsz, t_len, dd, device=dev, dtype=u.dtype)
        ht = torch.empty(bsz, dd, nn, device=dev, dtype=f32)
        store = any(ctx.needs_input_grad)
        ck = torch.empty(bsz, nck, dd, nn, device=dev, dtype=f32) if store else ht
        _ss_fwd_kernel[(bsz, ndb)](u, dt, A, Bm, Cm, h0, y, ht, ck, t_len, dd, nn, nck,
                                   CK=chunk, BD=bd, BN=bn, STORE=store, num_warps=warps)
        if store:
            ctx.save_for_backward(u, dt, A, Bm, Cm, ck)
        ctx.chunk = chunk
        return y, ht

    @staticmethod
    def backward(ctx, gy, ght):
        u, dt, A, Bm, Cm, ck = ctx.saved_tensors
        bsz, t_len, dd = u.shape
        nn = A.shape[-1]
        nck, chunk = ck.shape[1], ctx.chunk
        bd, bn, ndb, warps = _blocks(dd, nn)
        dev, f32 = u.device, torch.float32
        gy = torch.zeros(bsz, t_len, dd, device=dev, dtype=f32) if gy is None else gy.contiguous()
        ght = torch.zeros(bsz, dd, nn, device=dev, dtype=f32) if ght is None else ght.contiguous()
        scratch = torch.empty(bsz, ndb, chunk + 1, bd, bn, device=dev, dtype=f32)
        du = torch.empty(bsz, t_len, dd, device=dev, dtype=f32)
        ddt = torch.empty(bsz, t_len, dd, device=dev, dtype=f32)
        dA = torch.empty(bsz, dd, nn, device=dev, dtype=f32)
        dB = torch.empty(ndb, bsz, t_len, nn, device=dev, dtype=f32)
        dC = torch.empty(ndb, bsz, t_len, nn, device=dev, dtype=f32)
        dh0 = torch.empty(bsz, dd, nn, device=dev, dtype=f32)
        _ss_bwd_kernel[(bsz, ndb)](u, dt, A, Bm, Cm, ck, gy, ght, scratch, du, ddt, dA, dB, dC, dh0,
                                   bsz, t_len, dd, nn, nck, CK=chunk, BD=bd, BN=bn, num_warps=warps)
        return (du.to(u.dtype), ddt.to(dt.dtype), dA.sum(0), dB.sum(0).to(Bm.dtype), dC.sum(0).to(Cm.dtype), dh0,
                None)


def selective_scan_triton(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                          state: torch.Tensor | None = None, *,
                          chunk_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """``u, delta (B, T, D)``, ``A (D, N)``, ``B, C (B, T, N)``, ``state (B, D, N)`` or None -> ``y (B, T, D)`` in
    u's dtype, final state ``(B, D, N)`` fp32; differentiable in all six. ``chunk_size``: tokens between the
    checkpointed states the backward recomputes from."""
    bsz, t_len, d = u.shape
    n = A.shape[-1]
    h0 = (torch.zeros(bsz, d, n, dtype=torch.float32, device=u.device) if state is None
          else state.to(torch.float32))
    if t_len == 0:
        return u.new_zeros(bsz, 0, d), h0
    y, ht = _SelectiveScan.apply(u.contiguous(), delta.contiguous(), A.to(torch.float32).contiguous(),
                                 B.contiguous(), C.contiguous(), h0.contiguous(), max(1, min(chunk_size, t_len)))
    return y, ht
