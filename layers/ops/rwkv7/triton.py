"""RWKV-7 generalized delta rule in Triton, forward and backward: the *recurrent* form (token by token).

Same signature and result as :func:`layers.ops.rwkv7.chunked.rwkv7_chunked` (shapes in :mod:`layers.ops.rwkv7`).
Each row ``i`` (value index) of the state ``S (V, K)`` evolves on its own::

    x_t = S_{t-1}[i] · a_t,   S_t[i] = S_{t-1}[i] ⊙ exp(w_t) + x_t b_t + v_t[i] k_t,   o_t[i] = S_t[i] · r_t

so one program owns (batch·head, a block of value rows) and walks the tokens with its rows of the state in
registers (fp32). The forward stores the state every ``chunk_size`` tokens; the backward walks the chunks in
reverse, recomputes a chunk's states from its checkpoint into a per-program scratch buffer, then walks the
chunk's tokens in reverse with ``dS`` in registers. Gradients of r, w, k, a, b sum over value rows, so each
row block writes a partial that PyTorch adds up. Rows past ``T`` load as zeros (``w = 0``: identity steps).

This is not the chunked WY form (matmul-rich, see ``reference/rwkv7_chunked.md``): it is sequential in T and
parallel over batch, heads and value rows, like flash-linear-attention's ``fused_recurrent`` kernels: exact and
cheap in memory, but slower than a chunked kernel on long sequences. No inline asm, no libdevice:
it runs under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _tile(K, V, BK: tl.constexpr, BV: tl.constexpr):
    """This program's (batch, head) ``bh`` and state-row block ``vb``; key columns ``kk`` and state rows ``i`` with
    their masks; the (BV, BK) state tile's offsets and mask."""
    bh = tl.program_id(0).to(tl.int64)
    vb = tl.program_id(1)
    kk = tl.arange(0, BK)
    i = vb * BV + tl.arange(0, BV)
    km = kk < K
    im = i < V
    s_off = i[:, None] * K + kk[None, :]
    s_mask = im[:, None] & km[None, :]
    return bh, vb, kk, i, km, im, s_off, s_mask


@triton.jit
def _load_token(w_ptr, k_ptr, a_ptr, b_ptr, v_ptr, bh, t, T, K, V, kk, i, km, im):
    """Token ``t``'s masks, key-row offsets and its ``w, k, a, b`` (K,) and ``v`` (rows ``i``) in fp32."""
    mk = km & (kk * 0 + t < T)  # vector masks: t may be a plain int (interpreter)
    mi = im & (i * 0 + t < T)
    kv = (bh * T + t) * K + kk
    w = tl.load(w_ptr + kv, mask=mk, other=0.0).to(tl.float32)
    k = tl.load(k_ptr + kv, mask=mk, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + kv, mask=mk, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + kv, mask=mk, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + (bh * T + t) * V + i, mask=mi, other=0.0).to(tl.float32)
    return mk, mi, kv, w, k, a, b, v


@triton.jit
def _step(S, w, k, a, b, v):
    """``S_t = S_{t-1} ⊙ exp(w) + (S_{t-1} a) bᵀ + v kᵀ`` for the rows this program owns."""
    x = tl.sum(S * a[None, :], 1)
    return S * tl.exp(w)[None, :] + x[:, None] * b[None, :] + v[:, None] * k[None, :]


@triton.jit
def _rwkv7_fwd_kernel(r_ptr, w_ptr, k_ptr, v_ptr, a_ptr, b_ptr, h0_ptr, o_ptr, ht_ptr, ck_ptr,
                      T, K, V, NCK,
                      CK: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, STORE: tl.constexpr):
    bh, vb, kk, i, km, im, s_off, s_mask = _tile(K, V, BK, BV)
    S = tl.load(h0_ptr + bh * V * K + s_off, mask=s_mask, other=0.0).to(tl.float32)  # (BV, BK)
    for c in range(NCK):
        if STORE:
            tl.store(ck_ptr + (bh * NCK + c) * V * K + s_off, S, mask=s_mask)
        for j in range(CK):
            t = c * CK + j
            mk, mi, kv, w, k, a, b, v = _load_token(w_ptr, k_ptr, a_ptr, b_ptr, v_ptr, bh, t, T, K, V, kk, i, km, im)
            r = tl.load(r_ptr + kv, mask=mk, other=0.0).to(tl.float32)
            S = _step(S, w, k, a, b, v)
            o = tl.sum(S * r[None, :], 1)
            tl.store(o_ptr + (bh * T + t) * V + i, o, mask=mi)
    tl.store(ht_ptr + bh * V * K + s_off, S, mask=s_mask)


@triton.jit
def _rwkv7_bwd_kernel(r_ptr, w_ptr, k_ptr, v_ptr, a_ptr, b_ptr, ck_ptr, do_ptr, dht_ptr, sc_ptr,
                      dr_ptr, dw_ptr, dk_ptr, dv_ptr, da_ptr, db_ptr, dh0_ptr,
                      BH, T, K, V, NCK,
                      CK: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    bh, vb, kk, i, km, im, s_off, s_mask = _tile(K, V, BK, BV)
    nvb = tl.num_programs(1)
    loc = tl.arange(0, BV)[:, None] * BK + kk[None, :]  # scratch slot layout (BV, BK), always in bounds
    scratch = sc_ptr + (bh * nvb + vb) * (CK + 1) * BV * BK
    part = vb.to(tl.int64) * BH * T * K  # this row block's slice of the partial buffers
    G = tl.load(dht_ptr + bh * V * K + s_off, mask=s_mask, other=0.0).to(tl.float32)
    for ci in range(NCK):
        c = NCK - 1 - ci
        # recompute the chunk's states: slot j holds the state before token c*CK + j
        S = tl.load(ck_ptr + (bh * NCK + c) * V * K + s_off, mask=s_mask, other=0.0)
        tl.store(scratch + loc, S)
        for j in range(CK):
            t = c * CK + j
            _, _, _, w, k, a, b, v = _load_token(w_ptr, k_ptr, a_ptr, b_ptr, v_ptr, bh, t, T, K, V, kk, i, km, im)
            S = _step(S, w, k, a, b, v)
            tl.store(scratch + (j + 1) * BV * BK + loc, S)
        tl.debug_barrier()  # the scratch is written and read back by different threads of this program
        for jj in range(CK):
            j = CK - 1 - jj
            t = c * CK + j
            mk, mi, kv, w, k, a, b, v = _load_token(w_ptr, k_ptr, a_ptr, b_ptr, v_ptr, bh, t, T, K, V, kk, i, km, im)
            r = tl.load(r_ptr + kv, mask=mk, other=0.0).to(tl.float32)
            do = tl.load(do_ptr + (bh * T + t) * V + i, mask=mi, other=0.0).to(tl.float32)
            S_prev = tl.load(scratch + j * BV * BK + loc)
            S_t = tl.load(scratch + (j + 1) * BV * BK + loc)
            G += do[:, None] * r[None, :]  # o_t = S_t r_t
            d = tl.exp(w)
            x = tl.sum(S_prev * a[None, :], 1)
            dx = tl.sum(G * b[None, :], 1)
            pk = part + kv
            tl.store(dr_ptr + pk, tl.sum(S_t * do[:, None], 0), mask=mk)
            tl.store(dk_ptr + pk, tl.sum(G * v[:, None], 0), mask=mk)
            tl.store(db_ptr + pk, tl.sum(G * x[:, None], 0), mask=mk)
            tl.store(dw_ptr + pk, tl.sum(S_prev * G, 0) * d, mask=mk)
            tl.store(da_ptr + pk, tl.sum(S_prev * dx[:, None], 0), mask=mk)
            tl.store(dv_ptr + (bh * T + t) * V + i, tl.sum(G * k[None, :], 1), mask=mi)
            G = G * d[None, :] + dx[:, None] * a[None, :]
        tl.debug_barrier()  # the next chunk overwrites the scratch
    tl.store(dh0_ptr + bh * V * K + s_off, G, mask=s_mask)


def _blocks(k: int, v: int) -> tuple[int, int, int]:
    bk = max(16, triton.next_power_of_2(k))
    bv = max(16, min(32, triton.next_power_of_2(v)))
    return bk, bv, triton.cdiv(v, bv)


class _RWKV7(torch.autograd.Function):
    """Folded layout: ``r, w, k, a, b (BH, T, K)``, ``v (BH, T, V)``, ``h0 (BH, V, K)`` contiguous."""

    @staticmethod
    def forward(ctx, r, w, k, v, a, b, h0, chunk: int):
        bh, t_len, kd = r.shape
        vd = v.shape[-1]
        nck = triton.cdiv(t_len, chunk)
        bk, bv, nvb = _blocks(kd, vd)
        dev, f32 = r.device, torch.float32
        o = torch.empty(bh, t_len, vd, device=dev, dtype=f32)
        ht = torch.empty(bh, vd, kd, device=dev, dtype=f32)
        store = any(ctx.needs_input_grad)
        ck = torch.empty(bh, nck, vd, kd, device=dev, dtype=f32) if store else ht
        _rwkv7_fwd_kernel[(bh, nvb)](r, w, k, v, a, b, h0, o, ht, ck, t_len, kd, vd, nck,
                                     CK=chunk, BK=bk, BV=bv, STORE=store)
        if store:
            ctx.save_for_backward(r, w, k, v, a, b, ck)
        ctx.meta = (chunk, h0.dtype)
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        r, w, k, v, a, b, ck = ctx.saved_tensors
        chunk, h0_dtype = ctx.meta
        bh, t_len, kd = r.shape
        vd = v.shape[-1]
        nck = ck.shape[1]
        bk, bv, nvb = _blocks(kd, vd)
        dev, f32 = r.device, torch.float32
        do = torch.zeros(bh, t_len, vd, device=dev, dtype=f32) if do is None else do.contiguous()
        dht = torch.zeros(bh, vd, kd, device=dev, dtype=f32) if dht is None else dht.contiguous()
        scratch = torch.empty(bh, nvb, chunk + 1, bv, bk, device=dev, dtype=f32)
        parts = [torch.zeros(nvb, bh, t_len, kd, device=dev, dtype=f32) for _ in range(5)]  # dr dw dk da db
        dv = torch.zeros(bh, t_len, vd, device=dev, dtype=f32)
        dh0 = torch.empty(bh, vd, kd, device=dev, dtype=f32)
        dr, dw, dk, da, db = parts
        _rwkv7_bwd_kernel[(bh, nvb)](r, w, k, v, a, b, ck, do, dht, scratch, dr, dw, dk, dv, da, db, dh0,
                                     bh, t_len, kd, vd, nck, CK=chunk, BK=bk, BV=bv)
        dr, dw, dk, da, db = (g.sum(0).to(x.dtype) for g, x in zip(parts, (r, w, k, a, b)))
        return dr, dw, dk, dv.to(v.dtype), da, db, dh0.to(h0_dtype), None


def rwkv7_triton(r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor,
                 b: torch.Tensor, initial_state: torch.Tensor | None = None, *,
                 chunk_size: int = 64, decay_bound: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``r, w, k, a, b (B, T, H, K)``, ``v (B, T, H, V)``, ``initial_state (B, H, V, K)`` or None ->
    ``o (B, T, H, V)`` in v's dtype, final state ``(B, H, V, K)`` fp32. ``chunk_size``: tokens between the
    checkpointed states of the backward. ``decay_bound`` is accepted (one signature) and ignored: the kernel
    steps token by token and never factors a decay."""
    bsz, t_len, h, kd = r.shape
    vd = v.shape[-1]
    h0 = (torch.zeros(bsz, h, vd, kd, dtype=torch.float32, device=r.device) if initial_state is None
          else initial_state.float())
    if t_len == 0:
        return v.new_zeros(bsz, 0, h, vd), h0

    def fold(x: torch.Tensor) -> torch.Tensor:  # (B, T, H, D) -> (B·H, T, D)
        return x.transpose(1, 2).reshape(bsz * h, t_len, x.shape[-1]).contiguous()

    o, ht = _RWKV7.apply(fold(r), fold(w), fold(k), fold(v), fold(a), fold(b),
                         h0.reshape(bsz * h, vd, kd).contiguous(), max(1, min(chunk_size, t_len)))
    return o.view(bsz, h, t_len, vd).transpose(1, 2).to(v.dtype), ht.view(bsz, h, vd, kd)
