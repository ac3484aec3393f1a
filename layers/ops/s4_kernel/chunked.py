"""Diagonal S4 (S4D) by FFT convolution (the fast CPU path; ``chunked`` in dispatch terms, as Hyena's FFT is).
Same signature and result as :func:`layers.ops.s4_kernel.naive.s4d_naive`.

1. The kernel by a Vandermonde product: ``K_l = 2·Re(Σ_m C_m dB_m exp(l·Δ A_m))``, ``l = 0 … T-1``.
2. ``y = irfft(rfft(u, 2T)·rfft(K, 2T))[:T]``: zero-padding both to ``2T`` makes the circular convolution the
   causal one (at ``n = T`` later outputs would wrap onto earlier ones).
3. A carried state ``x0`` adds ``2·Re(Σ_m C_m dA_m^{t+1} x0_m)`` to ``y_t``; the state after the chunk is
   ``dA^T x0 + dB·Σ_l dA^{T-1-l} u_l`` (a transposed Vandermonde product), so prefill hands decoding the exact
   recurrent state without replaying the prompt.

The Vandermonde phase ``l·Δ·Im A`` is large for S4D-Inv's fast modes (about 128 rad a step at Δ = 0.1, N = 64),
and the fp32 product ``(Δ·A)·l`` carries the rounding of ``Δ·A`` times l: against a float64 reference the plain
complex64 ``exp`` errs by 5-8e-5 (N = 64, Δ in 1e-3…0.1, up to 8192 lags). The ``(H, M, T)`` Vandermonde matrix
is never formed: with ``l = s·b + t`` (``b`` the power of two nearest above sqrt(T)), ``exp(l·ΔA) = P[t]·Q[s]``.
The factors are built in complex128 from one exponential per mode (its phase reduced mod 2π in float64), its
power-of-two powers by repeated squaring and the rest by doubling (:func:`_time_major_powers`); against a float64
reference ``P[t]·Q[s]`` errs by under 1.5e-7 at 8192 lags with S4D-Inv's fast modes. A single token (a decode
step) takes the recurrence. Cost ``O(H·M·T)`` multiply-adds in matrix products for the kernel and the final state,
``O(B·H·T log T)`` for the convolution.

Each piece carries its own backward, so autograd never runs through the FFTs, the phases or a complex matmul:

- :class:`_S4DKernel`: the factors lag-major (``(H, b, M)``, ``(H, T2, M)``, so ``view_as_real`` gives the real
  matmul operands without a copy) and ``K`` as one real matmul per channel of inner size 2M (only the real part is
  needed); its backward gets ``∂W`` and ``∂(ΔA)`` together from one real matmul of ``[g; l·g]`` with the factor.
- :class:`_S4DStateSum`: ``Σ_l u_l exp((T-1-l)·ΔA)`` against the factors reversed along their lags (not the input
  reversed), sharing the kernel's factors; backward by hand.
- :class:`_FFTCausalConv`: the gradients are causal correlations computed from the forward spectra (one ``rfft``
  of the output gradient and one ``irfft`` per input); it reads and writes the layers' ``(B, T, H)`` layout.

Measured (``experiments/ssm_lineage/bench_ops.py``, idle 2-core machine, B 1, T 4096, H 128, N 64, forward +
backward, medians of interleaved rounds): about 61x the recurrence without the final state and 51-55x with it,
where the previous version (a factors Function and a kernel Function that materialised and transposed the
factors' gradients, the output a transposed view, the state through autograd) gave 44-50x and 41x. What is left:
six FFTs of ``128 x 8192`` points (about 0.7-0.8 ms each here), four transposed copies between ``(B, T, H)`` and the
FFTs' ``(B, H, T)`` (0.6-0.8 ms each: torch returns FFTs over a middle dimension in a permuted layout, which only
moves the copy), the kernel's matmuls.
"""

from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

from layers.ops.s4_kernel.naive import discretize, s4d_naive


def vandermonde(dt: torch.Tensor, A: torch.Tensor, length: int) -> torch.Tensor:
    """``exp(l·Δ_h·A_hm)`` for ``l < length``: ``(H, M, length)`` complex64 (complex128 for float64 ``dt``), each
    entry from its own exponential with the phase reduced mod 2π in float64. The dense reference the factored
    kernel and state are tested against (the op itself never forms it)."""
    steps = torch.arange(length, dtype=torch.float64, device=dt.device)
    real = torch.float64 if dt.dtype == torch.float64 else torch.float32
    log_mag = (dt.to(real)[:, None] * A.real.to(real))[..., None] * steps.to(real)
    phase64 = (dt.to(torch.float64)[:, None] * A.imag.to(torch.float64))[..., None] * steps
    # reduced to [-π, π] as x - 2π·round(x / 2π): 4x faster than torch.remainder's fmod, the same angle to 1e-11
    phase = (phase64 * (0.5 / math.pi)).round_().mul_(-2 * math.pi).add_(phase64).to(real)
    mag = torch.exp(log_mag)
    # stacked as (re, im) pairs: torch.complex measured 6x slower here
    return torch.view_as_complex(torch.stack((mag * torch.cos(phase), mag * torch.sin(phase)), dim=-1))


def lag_block(length: int) -> int:
    """The factorisation's block: the power of two nearest above sqrt(length), so both factors are ~sqrt(T) long."""
    return 1 << max(0, math.ceil(math.log2(max(length, 1)) / 2))


def _time_major_powers(dt: torch.Tensor, A: torch.Tensor, block: int, blocks: int,
                       conj: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``P[h, t, m] = exp(t·z)`` for ``t < block`` and ``Q[h, s, m] = exp(s·block·z)`` for ``s < blocks``,
    ``z = Δ_h·A_hm`` (conjugated when ``conj``), lag-major: ``(H, block, M)`` and ``(H, blocks, M)``, cast to ``dt``'s
    complex type. In this layout ``view_as_real`` gives the real matmul operands ``(H, L, 2M)`` (``Re, Im``
    interleaved) without a copy.

    All in complex128: one exponential ``exp(z)`` (its phase reduced mod 2π in float64), the power-of-two powers
    ``exp(2^i·z)`` by repeated squaring (relative error about ``2^i`` float64 roundings: 2e-13 at ``2^11``), then
    doubling along the lags (entries ``[n, 2n)`` are entries ``[0, n)`` times ``exp(n·z)``), so an entry is a product
    of at most ``log2`` of its lag such factors. Taking every power-of-two base from its own float64 exponential
    instead cost 5x the time here (float64 ``exp``, ``cos``, ``sin``)."""
    if block < 1 or block & (block - 1):
        raise ValueError(f"the lag block must be a power of two, got {block}")
    n_p, n_q = max(block - 1, 0).bit_length(), max(blocks - 1, 0).bit_length()
    n_all = max(n_p, block.bit_length() - 1 + n_q)  # exp(2^i·z) up to the largest of P's and Q's bases
    h, m = A.shape
    dt64 = dt.to(torch.float64)[:, None]
    phase = dt64 * A.imag.to(torch.float64)
    phase = phase - 2 * math.pi * torch.round(phase * (0.5 / math.pi))
    pows = torch.empty(h, max(n_all, 1), m, dtype=torch.complex128, device=A.device)
    pows[:, 0] = torch.polar(torch.exp(dt64 * A.real.to(torch.float64)), -phase if conj else phase)
    for i in range(1, n_all):
        pows[:, i] = pows[:, i - 1] * pows[:, i - 1]
    out = []
    for count, first in ((block, 0), (blocks, block.bit_length() - 1)):  # block is a power of two: Q from 2^log2(b)
        v = torch.empty(h, count, m, dtype=torch.complex128, device=A.device)
        v[:, 0] = 1
        n, i = 1, first
        while n < count:
            k = min(n, count - n)
            v[:, n:n + k] = v[:, :k] * pows[:, i, None]
            n, i = 2 * n, i + 1
        out.append(v if dt.dtype == torch.float64 else v.to(torch.complex64))
    return out[0], out[1]


class _S4DKernel(torch.autograd.Function):
    """``K_l = 2 Re Σ_m W_m exp(l·z_m)``, ``z = Δ·A``, ``l = s·b + t < T``, in one Function: the factors
    ``exp(t·z)`` and ``exp(s·b·z)`` (:func:`_time_major_powers`, lag-major) and one real matmul per channel,
    ``K[s, t] = [Re X, Im X] @ [Re P, -Im P]ᵀ`` with ``X = W·Q`` (inner size 2M). The backward contracts the kernel's
    gradient with the factors in their own layouts: with ``E_l = exp(l·z)``,

        ∂W = 2 Σ_l g_l conj(E_l),   ∂z = 2 conj(W) Σ_l l·g_l conj(E_l)

    (PyTorch's convention for complex gradients), and ``Σ_l v_l conj(E_l) = Σ_s conj(Q_s) Σ_t v[s, t] conj(P_t)``:
    one real matmul of ``[g; l·g]`` (stacked, ``(2·T2 x b)``) with the interleaved ``conj(P)``, then a product with
    ``conj(Q)`` summed over ``s``; ``∂A = Δ·∂z``, ``∂Δ = Re Σ_m ∂z·conj(A)``. The earlier split into a factors
    Function and a kernel Function materialised the factors' gradients and transposed them between the two: 2x the
    time of this one for the kernel's forward + backward at H 128, N 64, T 4096."""

    @staticmethod
    def forward(ctx, dt, A, W, length, Pc, Qc):
        block, blocks = Pc.shape[1], Qc.shape[1]  # conj(P) (H, b, M), conj(Q) (H, T2, M): _time_major_powers
        h, m = W.shape[-2:]
        Wg = W.reshape(-1, h, m)  # (G, H, M): a W per row of leading dimensions (one kernel each)
        X = Wg.conj()[:, :, None, :] * Qc  # conj(X) (G, H, T2, M)
        left = torch.view_as_real(X).view(-1, h, blocks, 2 * m)  # Re X, -Im X
        left[..., 1::2].neg_()  # Re X, Im X: Re(X P) = Re X Re P - Im X Im P
        right = torch.view_as_real(Pc).view(h, block, 2 * m).transpose(1, 2)  # Re P, -Im P
        K = torch.bmm(left[0], right)[None] if Wg.shape[0] == 1 else torch.matmul(left, right)
        K = K.view(-1, h, blocks * block)[..., :length].mul_(2)
        ctx.length = length
        ctx.save_for_backward(dt, A, W, Pc, Qc)
        return K.reshape(*W.shape[:-1], length)

    @staticmethod
    @once_differentiable
    def backward(ctx, g_k):
        dt, A, W, Pc, Qc = ctx.saved_tensors
        with torch.autocast(Pc.device.type, enabled=False):  # a backward run inside autocast stays fp32
            return _S4DKernel._backward(ctx, g_k.to(Pc.real.dtype), dt, A, W, Pc, Qc)

    @staticmethod
    def _backward(ctx, g_k, dt, A, W, Pc, Qc):
        h, b, m = Pc.shape
        t2 = Qc.shape[1]
        g_k = g_k.reshape(-1, h, ctx.length)
        n_w = g_k.shape[0]
        pad = t2 * b - ctx.length
        g = torch.empty(n_w, h, 2, t2 * b, dtype=g_k.dtype, device=g_k.device)  # [g; l·g], each (T2 x b)
        if pad:
            g[..., ctx.length:] = 0
        g[:, :, 0, :ctx.length] = g_k
        g[:, :, 1, :ctx.length] = g_k * torch.arange(ctx.length, dtype=g_k.dtype, device=g_k.device)  # (no out=
        # into a strided slice: torch.compile breaks the graph there)
        right = torch.view_as_real(Pc).view(h, b, 2 * m)
        if n_w == 1:
            Y = torch.bmm(g.view(h, 2 * t2, b), right)  # Σ_t v[s, t] conj(P_t)
        else:
            Y = torch.matmul(g.view(n_w, h, 2 * t2, b), right)
        Y = torch.view_as_complex(Y.view(n_w, h, 2, t2, m, 2))
        need_z = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        g_w = 2 * (Qc * Y[:, :, 0]).sum(2) if ctx.needs_input_grad[2] else None
        g_dt = g_a = None
        if need_z:
            g_z = 2 * (W.reshape(-1, h, m).conj() * (Qc * Y[:, :, 1]).sum(2)).sum(0)
            g_dt = (g_z * A.conj()).real.sum(-1).to(dt.dtype) if ctx.needs_input_grad[0] else None
            g_a = (g_z * dt.to(g_z.real.dtype)[:, None]).to(A.dtype) if ctx.needs_input_grad[1] else None
        if g_w is not None:
            g_w = g_w.reshape(W.shape).to(W.dtype)
        return g_dt, g_a, g_w, None, None, None


def s4d_kernel(dt: torch.Tensor, A: torch.Tensor, W: torch.Tensor, length: int,
               block: int | None = None) -> torch.Tensor:
    """The S4D convolution kernel ``K_l = 2 Re Σ_m W_m exp(l·Δ_h·A_hm)`` for ``l < length``, ``W = C·dB`` ``(H, M)``
    (or ``(..., H, M)``: one kernel per leading index): real ``(..., H, length)`` (float32; float64 for float64
    ``dt``), differentiable in ``dt``, ``A`` and ``W`` with the backward by hand. ``block``: the lag factorisation's
    block, a power of two (default :func:`lag_block`)."""
    Pc, Qc = lag_factors(dt, A, length, block, conj=True)
    return _S4DKernel.apply(dt, A, W, length, Pc, Qc)


def lag_factors(dt: torch.Tensor, A: torch.Tensor, length: int, block: int | None = None, *,
                conj: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(P, Q)`` with ``exp(l·ΔA) = P[:, l % b] · Q[:, l // b]`` (conjugated when ``conj``): ``P (H, b, M)`` the lags
    below the block ``b`` (a power of two, default :func:`lag_block`), ``Q (H, ceil(T/b), M)`` the block starts. No
    gradient: the Functions that contract with them differentiate through them by hand."""
    block = block or lag_block(length)
    with torch.no_grad():
        return _time_major_powers(dt, A, block, -(-length // block), conj=conj)


class _S4DStateSum(torch.autograd.Function):
    """``R[b, h, m] = Σ_l u[b, h, l]·exp((T-1-l)·z_hm)``, ``z = Δ·A``: the state after ``T`` tokens (times ``dB``)
    for real channel-major ``u (B, H, T)``, by the lag-major factors of :func:`_time_major_powers`. The input is
    zero-padded in front to ``T2·b`` (``l' = l + pad = s·b + t``); the power is then ``(T2-1-s)·b + (b-1-t)``, so
    it contracts with the factors reversed along their lags (small) rather than with a reversed input: one real
    matmul per channel (inner size ``b``, the input real) and a product with reversed ``Q`` summed over blocks.
    Backward by hand, with ``E_j = exp(j·z)``, ``j = T-1-l``:

        ∂u_l = Re Σ_m ∂R_m·conj(E_j)       (one real matmul, as the kernel's forward)
        ∂z   = Σ_b ∂R·conj(Σ_l j·u_l·E_j)   (``j = (T2-1-s)·b + (b-1-t)``: the block part from the forward's product,
                                            the in-block part from one more matmul with ``(b-1-t)·P``)

    where autograd through the factors' Function and two einsums ran complex products over every lag."""

    @staticmethod
    def forward(ctx, dt, A, u, Pc, Qc):
        bsz, h, t_len = u.shape  # channel-major: the matmuls below need H as a batch dimension
        block, blocks, m = Pc.shape[1], Qc.shape[1], Pc.shape[2]
        # with the conjugated factors (shared with the kernel) the sums are conjugated: conj(R) = Σ u'·Pcf·Qcf
        Pcf, Qcf = Pc.flip(1), Qc.flip(1)  # conj exp((b-1-t)·z), conj exp((T2-1-s)·b·z)
        pad = blocks * block - t_len
        if pad:
            front = u.new_zeros(bsz, h, blocks * block)
            front[..., pad:] = u
        else:
            front = u.contiguous()
        front = front.view(bsz, h, blocks, block)
        Yc = torch.matmul(front, torch.view_as_real(Pcf).view(h, block, 2 * m))
        Yc = torch.view_as_complex(Yc.view(bsz, h, blocks, m, 2))  # Σ_t u'[s, t]·conj(Pf[t])
        R = (Yc * Qcf).sum(2).conj()  # (B, H, M)
        ctx.pad = pad
        ctx.save_for_backward(dt, A, front, Pcf, Qcf, Yc)
        return R

    @staticmethod
    @once_differentiable
    def backward(ctx, g_r):
        dt, A, front, Pcf, Qcf, Yc = ctx.saved_tensors
        with torch.autocast(Pcf.device.type, enabled=False):  # a backward run inside autocast stays fp32
            return _S4DStateSum._backward(ctx, g_r.to(Pcf.dtype), dt, A, front, Pcf, Qcf, Yc)

    @staticmethod
    def _backward(ctx, g, dt, A, front, Pcf, Qcf, Yc):
        h, block, m = Pcf.shape
        bsz, blocks = g.shape[0], Qcf.shape[1]
        g_dt = g_a = g_u = None
        if ctx.needs_input_grad[2]:
            # ∂u'[s, t] = Re Σ_m conj(g)·Qf[s]·Pf[t] = Re Σ_m (g·Qcf[s])·Pcf[t] = Re X @ Re Pcf - Im X @ Im Pcf
            X = g[:, :, None, :] * Qcf  # (B, H, T2, M)
            left = torch.view_as_real(X).view(bsz, h, blocks, 2 * m)
            left[..., 1::2].neg_()
            gu = torch.matmul(left, torch.view_as_real(Pcf).view(h, block, 2 * m).transpose(1, 2))
            g_u = gu.view(bsz, h, blocks * block)[..., ctx.pad:]  # (B, H, T)
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            lags = torch.arange(block - 1, -1, -1, dtype=front.dtype, device=front.device)  # b-1-t
            Yct = torch.matmul(front, torch.view_as_real(Pcf * lags[:, None]).view(h, block, 2 * m))
            Yct = torch.view_as_complex(Yct.view(bsz, h, blocks, m, 2))  # Σ_t u'[s, t]·(b-1-t)·conj(Pf[t])
            s_lags = torch.arange(blocks - 1, -1, -1, dtype=front.dtype, device=front.device) * block
            Sc = (Qcf * (Yc * s_lags[:, None] + Yct)).sum(2)  # (B, H, M): conj Σ_l j·u_l·E_j
            g_z = (g * Sc).sum(0)
            g_dt = (g_z * A.conj()).real.sum(-1).to(dt.dtype) if ctx.needs_input_grad[0] else None
            g_a = (g_z * dt.to(g_z.real.dtype)[:, None]).to(A.dtype) if ctx.needs_input_grad[1] else None
        return g_dt, g_a, g_u, None, None


def s4d_state_sum(dt: torch.Tensor, A: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``Σ_l u[b, l, h]·exp((T-1-l)·Δ_h·A_hm)`` for real ``u (B, T, H)``: ``(B, H, M)`` complex; the S4D state after the
    input is this times ``dB``. Differentiable in ``dt``, ``A`` and ``u`` (backward by hand)."""
    Pc, Qc = lag_factors(dt, A, u.shape[1], conj=True)
    return _S4DStateSum.apply(dt, A, u.transpose(1, 2).contiguous(), Pc, Qc)


class _FFTCausalConv(torch.autograd.Function):
    """``y = irfft(rfft(u, 2T)·rfft(K, 2T))[:T]`` with a backward that reuses the forward spectra: the gradients are
    the causal correlations ``∂u = irfft(conj(K̂)·Ĝ)[:T]`` and ``∂K = irfft(Σ_b conj(Û_b)·Ĝ_b)[:T]`` with
    ``Ĝ = rfft(gy, 2T)`` (gy zero-padded, so lags past T-1 read zeros), three real FFTs where autograd through
    rfft/irfft ran two full complex FFTs and the zero-filled slice and pad backwards.

    ``time_major``: ``u``, ``y`` and their gradients are ``(B, T, H)``; the FFTs read the transposed view directly
    (pocketfft's strided read costs less than a transposed copy) and ``y`` is written once, contiguous, in the
    caller's layout. Returning the ``(B, H, T)`` result as a transposed view instead made every element-wise op
    after it (the layer's ``D·u`` and GELU, a loss) run on a strided tensor: 5x slower for a squared-error loss at
    T 4096, H 128."""

    @staticmethod
    def forward(ctx, u, K, time_major):
        t_len = u.shape[1] if time_major else u.shape[-1]
        n = 2 * t_len
        u_f = torch.fft.rfft(u.transpose(1, 2) if time_major else u, n=n)
        k_f = torch.fft.rfft(K, n=n)
        y = torch.fft.irfft(u_f.mul_(k_f) if not ctx.needs_input_grad[1] else u_f * k_f, n=n)[..., :t_len]
        ctx.time_major = time_major
        # u_f is only needed for K's gradient (it was multiplied in place above when that is not asked for)
        ctx.save_for_backward(u_f if ctx.needs_input_grad[1] else None, k_f)
        return y.transpose(1, 2).contiguous() if time_major else y.contiguous()

    @staticmethod
    @once_differentiable
    def backward(ctx, gy):
        u_f, k_f = ctx.saved_tensors
        with torch.autocast(k_f.device.type, enabled=False):  # a backward run inside autocast stays fp32
            return _FFTCausalConv._backward(ctx, gy, u_f, k_f)

    @staticmethod
    def _backward(ctx, gy, u_f, k_f):
        if ctx.time_major:
            gy = gy.transpose(1, 2)
        t_len = gy.shape[-1]
        n = 2 * t_len
        g_f = torch.fft.rfft(gy, n=n)
        g_u = g_k = None
        if ctx.needs_input_grad[0]:
            g_u = torch.fft.irfft(g_f * k_f.conj(), n=n)[..., :t_len]
            if ctx.time_major:
                g_u = g_u.transpose(1, 2).contiguous()
        if ctx.needs_input_grad[1]:
            prod = g_f.mul_(u_f.conj())
            if prod.dim() == 3:  # summed over the batch (a view of the only one: no copy at batch 1)
                prod = prod[0] if prod.shape[0] == 1 else prod.sum(0)
            g_k = torch.fft.irfft(prod, n=n)[..., :t_len]
        return g_u, g_k, None


def fft_causal_conv(u: torch.Tensor, K: torch.Tensor, *, time_major: bool = False) -> torch.Tensor:
    """Causal convolution ``y[b, h, t] = Σ_{s<=t} K[h, t-s]·u[b, h, s]`` of real ``u (B, H, T)`` with real
    ``K (H, T)`` by FFTs zero-padded to ``2T`` (no wrap-around), with a hand-written backward. ``time_major``:
    ``u`` and the contiguous result are ``(B, T, H)`` (the layers' layout) instead."""
    return _FFTCausalConv.apply(u, K, time_major)


def s4d_fft(u: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, C: torch.Tensor,
            state: torch.Tensor | None = None, *, want_state: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    # fp32 throughout (float64 for the phases): under autocast the matmuls would otherwise run in bf16
    with torch.autocast(u.device.type, enabled=False):
        return _s4d_fft(u, dt, A, C, state, want_state)


def _s4d_fft(u, dt, A, C, state, want_state):
    bsz, t_len, h = u.shape
    if t_len == 1:  # one decode step: the recurrence is the same sum without the kernel and the FFT
        return s4d_naive(u, dt, A, C, state, want_state=want_state)
    dA, dB = discretize(dt, A)
    Cc = C.to(torch.complex64)
    u32 = u.to(torch.float32)  # (B, T, H): the FFTs read it transposed, y comes back in this layout
    if t_len == 0:
        x0 = state.to(torch.complex64) if state is not None else torch.zeros(bsz, h, A.shape[-1],
                                                                               dtype=torch.complex64, device=u.device)
        return u.new_zeros(bsz, 0, h), (x0 if want_state else None)
    # K_l = 2 Re Σ_m W_m exp(l·ΔA_m): one (T2 x 2M) @ (2M x b) real product per channel
    Pc, Qc = lag_factors(dt, A, t_len, conj=True)  # both Functions below differentiate through them by hand
    W = Cc * dB
    if state is not None:  # a carried state: 2 Re Σ_m C_m dA_m^{t+1} x0_m is a kernel with W = C·dA·x0 per row,
        x0 = state.to(torch.complex64)  # made in the same call as the convolution's kernel
        W = torch.cat((W[None], Cc * dA * x0))
    K = _S4DKernel.apply(dt, A, W, t_len, Pc, Qc)  # (H, T), or (1 + B, H, T) with a carried state
    # with the final state asked for, the input is transposed once, for both the state's matmuls and the FFT (which
    # reads a transposed view more slowly than a contiguous one)
    u_ht = u32.transpose(1, 2).contiguous() if want_state else None
    u_in = u_ht.transpose(1, 2) if want_state else u32
    y = fft_causal_conv(u_in, K if state is None else K[0], time_major=True)  # (B, T, H), contiguous
    if state is not None:
        y = y + K[1:].transpose(1, 2)
    new_state = None
    if want_state:
        new_state = dB * _S4DStateSum.apply(dt, A, u_ht, Pc, Qc)
        if state is not None:  # dA^T·x0, the power in float64 (its phase reaches T·Δ·Im A)
            z = dt.to(torch.float64)[:, None] * A.to(torch.complex128)
            new_state = new_state + torch.exp(t_len * z).to(torch.complex64) * x0
    return y.to(u.dtype), new_state
