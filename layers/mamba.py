"""Mamba mixers, symbol ``M``: Mamba-3 (default; SISO, or MIMO with ``mimo_rank > 1``), Mamba-2 and Mamba-1.

Mamba-3 (Lahoti et al., ICLR 2026; block of ``state-spaces/mamba`` ``Mamba3``): no short conv, no in_proj bias::

    z, x, B, C, dd_dt, dd_A, trap, ang = in_proj(u)      sizes di, di, R·N, R·N, H, H, H, S
    Δ = softplus(dd_dt + dt_bias),  A = -max(f(dd_A), A_floor),  a = A·Δ,  λ = σ(trap)
        f(u) = 1 + u (u >= 0), 1 / (1 - u) (u < 0)       (the heavy-tail activation)
    k = RMSNorm(B) + B_bias[h],  q = RMSNorm(C) + C_bias[h]   (per head, per rank)
    dθ = Δ·π·tanh(ang)  -> cumulative angles rotate q and k (SISO: interleaved pairs; MIMO: rotate-half)
    y_{t,r} = H_t q_{t,r} + D·v_{t,r}        (exponential-trapezoidal recurrence, ``layers.ops.mamba3``)
    SISO: out = out_proj(y ⊙ silu(z));  MIMO: out = out_proj(Σ_r y_r ⊙ silu(z ⊙ W_z[r]) ⊙ W_o[r]),
    with v_{t,r} = x_t ⊙ W_x[r]; the state stays P×N.

Mamba-2 (``mamba_ssm`` ``Mamba2``, ngroups 1)::

    z, xBC, dd_dt = in_proj(u);  x, B, C = silu(causal depthwise conv(xBC))   (``layers.ops.causal_conv1d``)
    y = SSD(x, Δ, A = -exp(A_log), B, C) + D·x;   out = out_proj(RMSNorm(y ⊙ silu(z)) · w)

Mamba-1 (``mamba_ssm`` ``Mamba``, "S6"; ``variant: mamba1``)::

    x, z = in_proj(u);  x = silu(causal depthwise conv(x))
    dt_low, B, C = x_proj(x);  Δ = softplus(dt_proj(dt_low))          (dt_proj has the bias)
    y = selective_scan(x, Δ, A = -exp(A_log), B, C) + D·x;   out = out_proj(y ⊙ silu(z))
    A is per channel and per state (di, N), S4D-Real init A = -(1..N); the scan is ``layers.ops.selective_scan``.

Sizes: ``di = int(expand·d)``, ``H = di / headdim``, ``P = headdim``, ``N = d_state``, ``R = mimo_rank``,
``S = num_rope_angles = (int(N·rope_fraction) rounded down to even) / 2``, ``conv_dim = di + 2N``, ``K = d_conv``,
Mamba-1 ``r = dt_rank`` (None: ``ceil(d / 16)``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from layers.base import Layer, LayerConfigError, require_at_least, require_positive
from layers.ops import dispatch
from layers.ops.causal_conv1d import causal_conv1d
from layers.ops.mamba2 import ssd
from layers.ops.mamba3 import mamba3, pairs_adjacent
from layers.ops.selective_scan import selective_scan

VARIANTS = ("mamba3", "mamba2", "mamba1")


def heavy_tail(u: torch.Tensor) -> torch.Tensor:
    """``1 + u`` for ``u >= 0`` and ``1 / (1 - u)`` for ``u < 0``: positive, smooth, linear tail."""
    return torch.where(u >= 0, 1 + u.clamp(min=0), 1 / (1 - u.clamp(max=0)))


def rms(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    xf = x.float()
    return xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps) * weight


def num_rope_angles(d_state: int, rope_fraction: float) -> int:
    split = int(d_state * rope_fraction)
    return (split - split % 2) // 2


class Mamba(Layer):
    """Mamba-3 / Mamba-2 / Mamba-1 mixer (see the module docstring for the equations).

    Shapes: ``x (B, T, d)`` -> ``(B, T, d)``.
    Parameters, Mamba-3: ``d·(2di + 2RN + 3H + S) + 2H (dt_bias, D) + 2HRN (B_bias, C_bias) + 2N (B/C norm
    weights) + [3HRP (W_x, W_z, W_o) if R > 1] + di·d``.
    Parameters, Mamba-2: ``d·(2di + 2N + H) + conv_dim·(K + 1) + 3H (dt_bias, A_log, D) + di (norm) + di·d``.
    Parameters, Mamba-1: ``2d·di + di·(K + 1) (conv) + di·(r + 2N) (x_proj) + r·di + di (dt_proj) + di·N (A_log)
    + di (D) + di·d``; ``headdim`` is not used.
    Init: in_proj normal(0, 0.02); out_proj normal(0, out_init_std()); dt_bias = softplus⁻¹(dt), dt log-uniform in
    ``[dt_min, dt_max]`` floored at ``dt_init_floor``; D = 1; Mamba-3 B/C biases = 1, W_x = W_o = 1/R, W_z = 1;
    Mamba-2 A = U(a_init_min, a_init_max), conv as PyTorch's default (uniform ±1/sqrt(K)); Mamba-1 A_log[d, n] =
    log(n + 1) (S4D-Real), dt_proj.bias = softplus⁻¹(dt) as above, dt_proj.weight U(±r^-1/2), x_proj U(±di^-1/2)
    (PyTorch's Linear default), conv as Mamba-2's.

    Decoding state: Mamba-3 ``{"angle" (B, H, S) fp32, "ssm" (B, H, P, N) fp32, "k" (B, R, H, N), "v" (B, H, P)}``;
    Mamba-2 ``{"conv" (B, conv_dim, K - 1), "ssm" (B, H, P, N) fp32}``; Mamba-1 ``{"conv" (B, di, K - 1),
    "ssm" (B, di, N) fp32}``. Fixed size.

    MIMO computes in a basis where the rotate-half pairs ``(i, i + N/2)`` are adjacent (``adjacent_pairs``): B, C
    and their norm weights and biases are reordered while small (before the per-head bias spreads them over heads)
    and the op runs its interleaved rotary, which is the same rotation. Outputs and gradients are those of the
    rotate-half form (tested); parameters keep the reference layout; the decode state's N axis is in the adjacent
    order, which only this layer reads.
    ``chunk_size`` (tokens per chunk of the chunked path) defaults to ``64 // R`` (min 8), as the reference.
    """

    state_grows: ClassVar[bool] = False
    adjacent_pairs: ClassVar[bool] = True

    @dataclass
    class Config:
        variant: str = "mamba3"
        d_state: int = 128
        headdim: int = 64
        expand: float = 2
        mimo_rank: int = 1
        rope_fraction: float = 0.5
        chunk_size: int | None = None
        d_conv: int = 4
        dt_min: float = 0.001
        dt_max: float = 0.1
        dt_init_floor: float = 1e-4
        a_floor: float = 1e-4
        a_init_min: float = 1.0
        a_init_max: float = 16.0
        dt_rank: int | None = None  # Mamba-1 only (ignored by the others, as headdim is by Mamba-1)
        backend: str | None = None

    def __init__(self, d_model: int, config: Config | None = None, *, layer_idx: int = 0, n_layers: int = 1):
        super().__init__(d_model, config, layer_idx=layer_idx, n_layers=n_layers)
        cfg = self.config
        self.d_inner, self.nheads, self.n_angles = self._dims(d_model, cfg)
        self.headdim, self.d_state = cfg.headdim, cfg.d_state
        self.rank = cfg.mimo_rank if cfg.variant == "mamba3" else 1
        self.chunk = cfg.chunk_size or max(64 // self.rank, 8)
        h, n, r, p, di = self.nheads, self.d_state, self.rank, self.headdim, self.d_inner
        if cfg.variant == "mamba1":
            self._init_mamba1(d_model)
            return
        self.dt_bias = nn.Parameter(torch.empty(h))
        self.D = nn.Parameter(torch.empty(h))
        if cfg.variant == "mamba3":
            self.splits = [di, di, r * n, r * n, h, h, h, self.n_angles]
            self.B_bias = nn.Parameter(torch.empty(h, r, n))
            self.C_bias = nn.Parameter(torch.empty(h, r, n))
            self.B_norm = nn.Parameter(torch.empty(n))
            self.C_norm = nn.Parameter(torch.empty(n))
            if r > 1:
                self.mimo_x = nn.Parameter(torch.empty(h, r, p))
                self.mimo_z = nn.Parameter(torch.empty(h, r, p))
                self.mimo_o = nn.Parameter(torch.empty(h, r, p))
        else:
            self.conv_dim = di + 2 * n
            self.splits = [di, self.conv_dim, h]
            self.conv = nn.Conv1d(self.conv_dim, self.conv_dim, cfg.d_conv, groups=self.conv_dim, bias=True)
            self.A_log = nn.Parameter(torch.empty(h))
            self.norm_weight = nn.Parameter(torch.empty(di))
        self.in_proj = nn.Linear(d_model, sum(self.splits), bias=False)
        self.out_proj = nn.Linear(di, d_model, bias=False)
        self.reset_parameters()

    def _init_mamba1(self, d_model: int) -> None:
        di, n, k = self.d_inner, self.d_state, self.config.d_conv
        self.dt_rank = self._dt_rank(d_model, self.config)
        self.splits = [di, di]  # x, z
        self.in_proj = nn.Linear(d_model, 2 * di, bias=False)
        self.conv = nn.Conv1d(di, di, k, groups=di, bias=True)
        self.x_proj = nn.Linear(di, self.dt_rank + 2 * n, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, di, bias=True)
        self.A_log = nn.Parameter(torch.empty(di, n))
        self.D = nn.Parameter(torch.empty(di))
        self.out_proj = nn.Linear(di, d_model, bias=False)
        self.reset_parameters()

    @staticmethod
    def _dt_rank(d_model: int, cfg: Config) -> int:
        return cfg.dt_rank if cfg.dt_rank is not None else math.ceil(d_model / 16)

    @staticmethod
    def _dims(d_model: int, cfg: Config) -> tuple[int, int, int]:
        d_inner = int(cfg.expand * d_model)
        nheads = d_inner // cfg.headdim if cfg.headdim > 0 else 0
        return d_inner, nheads, num_rope_angles(cfg.d_state, cfg.rope_fraction)

    @classmethod
    def check_config(cls, d_model: int, config: Config) -> None:
        super().check_config(d_model, config)
        c = config
        if c.variant not in VARIANTS:
            raise LayerConfigError("variant", f"variant must be one of {', '.join(VARIANTS)}, got {c.variant!r}")
        require_at_least(c, 1, "d_state", "headdim")
        require_positive(c, "expand")
        d_inner = int(c.expand * d_model)
        if c.variant == "mamba1":
            cls._check_mamba1(d_model, c, d_inner)
            return
        if d_inner < c.headdim or d_inner % c.headdim:
            raise LayerConfigError("headdim", f"d_inner = int(expand * d_model) = {d_inner} is not a positive "
                                              f"multiple of headdim={c.headdim}")
        require_at_least(c, 1, "mimo_rank")
        if c.chunk_size is not None and c.chunk_size < 1:
            raise LayerConfigError("chunk_size", f"chunk_size must be >= 1 or None, got {c.chunk_size}")
        cls._check_dt_and_backend(c)
        if c.variant == "mamba2":
            cls._check_siso_conv(c)
            if not 0 < c.a_init_min <= c.a_init_max:
                raise LayerConfigError("a_init_min", f"need 0 < a_init_min <= a_init_max, got "
                                                     f"{c.a_init_min}, {c.a_init_max}")
            return
        if c.rope_fraction not in (0.5, 1.0):
            raise LayerConfigError("rope_fraction", f"rope_fraction must be 0.5 or 1.0, got {c.rope_fraction}")
        if num_rope_angles(c.d_state, c.rope_fraction) < 1:
            raise LayerConfigError("d_state", f"d_state={c.d_state} leaves no rotary angle at rope_fraction "
                                              f"{c.rope_fraction} (need int(d_state * rope_fraction) >= 2)")
        if c.mimo_rank > 1 and c.d_state % 2:
            raise LayerConfigError("d_state", f"MIMO pairs (i, i + N/2): d_state={c.d_state} must be even")
        require_at_least(c, 0, "a_floor")

    @staticmethod
    def _check_dt_and_backend(c: Config) -> None:
        """What every variant checks alike: the Δ init range and floor, the backend."""
        if not 0 < c.dt_min <= c.dt_max:
            raise LayerConfigError("dt_min", f"need 0 < dt_min <= dt_max, got {c.dt_min}, {c.dt_max}")
        require_at_least(c, 0, "dt_init_floor")
        if c.backend not in (None, "auto", *dispatch.BACKENDS):
            raise LayerConfigError("backend", f"backend must be auto, {', '.join(dispatch.BACKENDS)} or None, "
                                              f"got {c.backend!r}")

    @staticmethod
    def _check_siso_conv(c: Config) -> None:
        """Mamba-1 and Mamba-2: single input, single output, and a causal conv."""
        if c.mimo_rank != 1:
            raise LayerConfigError("mimo_rank", "mimo_rank > 1 (MIMO) exists only for variant 'mamba3'")
        require_at_least(c, 1, "d_conv")

    @classmethod
    def _check_mamba1(cls, d_model: int, c: Config, d_inner: int) -> None:
        """Mamba-1 has no heads: ``headdim`` is ignored, ``d_inner`` only needs to be positive."""
        if d_inner < 1:
            raise LayerConfigError("expand", f"d_inner = int(expand * d_model) = {d_inner} must be >= 1")
        cls._check_siso_conv(c)
        if c.dt_rank is not None and c.dt_rank < 1:
            raise LayerConfigError("dt_rank", f"dt_rank must be >= 1 or None (ceil(d_model / 16)), got {c.dt_rank}")
        cls._check_dt_and_backend(c)

    @classmethod
    def param_count(cls, d_model: int, config: Config) -> int:
        di, h, s = cls._dims(d_model, config)
        n, p, d = config.d_state, config.headdim, d_model
        if config.variant == "mamba1":
            r, k = cls._dt_rank(d_model, config), config.d_conv
            return 2 * d * di + di * (k + 1) + di * (r + 2 * n) + r * di + di + di * n + di + di * d
        if config.variant == "mamba2":
            conv_dim = di + 2 * n
            return d * (2 * di + 2 * n + h) + conv_dim * (config.d_conv + 1) + 3 * h + di + di * d
        r = config.mimo_rank
        mimo = 3 * h * r * p if r > 1 else 0
        return d * (2 * di + 2 * r * n + 3 * h + s) + 2 * h + 2 * h * r * n + 2 * n + mimo + di * d

    def _init_dt_bias(self, bias: torch.Tensor) -> None:
        """``bias`` = softplus⁻¹(dt), dt log-uniform in [dt_min, dt_max] floored at dt_init_floor."""
        cfg = self.config
        lo, hi = math.log(cfg.dt_min), math.log(cfg.dt_max)
        dt = torch.exp(torch.rand(bias.shape) * (hi - lo) + lo).clamp(min=cfg.dt_init_floor)
        bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus

    def reset_parameters(self) -> None:
        cfg = self.config
        nn.init.normal_(self.in_proj.weight, mean=0.0, std=0.02)
        nn.init.normal_(self.out_proj.weight, mean=0.0, std=self.out_init_std())
        with torch.no_grad():
            if cfg.variant == "mamba1":
                di, n = self.d_inner, self.d_state
                bound = 1.0 / math.sqrt(cfg.d_conv)
                nn.init.uniform_(self.conv.weight, -bound, bound)
                nn.init.uniform_(self.conv.bias, -bound, bound)
                nn.init.uniform_(self.x_proj.weight, -di ** -0.5, di ** -0.5)
                nn.init.uniform_(self.dt_proj.weight, -self.dt_rank ** -0.5, self.dt_rank ** -0.5)
                self._init_dt_bias(self.dt_proj.bias)
                self.A_log.copy_(torch.arange(1, n + 1, dtype=torch.float32).log().repeat(di, 1))
                self.D.fill_(1.0)
                return
            self._init_dt_bias(self.dt_bias)
            self.D.fill_(1.0)
            if cfg.variant == "mamba3":
                for w in (self.B_bias, self.C_bias, self.B_norm, self.C_norm):
                    w.fill_(1.0)
                if self.rank > 1:
                    self.mimo_x.fill_(1.0 / self.rank)
                    self.mimo_z.fill_(1.0)
                    self.mimo_o.fill_(1.0 / self.rank)
            else:
                self.A_log.copy_(torch.empty(self.nheads).uniform_(cfg.a_init_min, cfg.a_init_max).log())
                bound = 1.0 / math.sqrt(cfg.d_conv)
                nn.init.uniform_(self.conv.weight, -bound, bound)
                nn.init.uniform_(self.conv.bias, -bound, bound)
                self.norm_weight.fill_(1.0)

    # -- Mamba-3 ---------------------------------------------------------------------------------------------

    def _mamba3(self, u: torch.Tensor, state: dict | None) -> tuple[torch.Tensor, dict]:
        b, t, _ = u.shape
        h, p, n, r = self.nheads, self.headdim, self.d_state, self.rank
        z, x, B, C, dd_dt, dd_A, trap, ang = self.in_proj(u).split(self.splits, dim=-1)
        x = x.reshape(b, t, h, p)
        B, C = B.reshape(b, t, r, 1, n), C.reshape(b, t, r, 1, n)
        b_norm, c_norm, b_bias, c_bias = self.B_norm, self.C_norm, self.B_bias, self.C_bias
        pairing = "interleaved"
        if r > 1:
            if self.adjacent_pairs:  # see the class docstring: rotate-half pairs made adjacent before the head
                # expansion, so the op rotates with one complex multiply and reorders nothing rank-and-head sized
                B, C, b_norm, c_norm, b_bias, c_bias = map(pairs_adjacent, (B, C, b_norm, c_norm, b_bias, c_bias))
            else:
                pairing = "half"
        # RMSNorm over N (shared across heads), then the per-head bias: (B, T, R, H, N)
        k = rms(B, b_norm) + b_bias.transpose(0, 1)
        q = rms(C, c_norm) + c_bias.transpose(0, 1)
        dt = F.softplus(dd_dt.float() + self.dt_bias)
        a = -heavy_tail(dd_A.float()).clamp(min=self.config.a_floor) * dt
        lam = torch.sigmoid(trap.float())
        dtheta = dt[..., None] * (math.pi * torch.tanh(ang.float()))[:, :, None, :]  # (B, T, H, S)
        w_x = self.mimo_x.transpose(0, 1) if r > 1 else None  # (R, H, P)
        y, new_state = mamba3(x, q, k, a, dt, lam, dtheta, state, w_x, pairing=pairing,
                              chunk_size=self.chunk, backend=self.config.backend)
        d_skip = self.D[:, None] * w_x if w_x is not None else self.D[:, None]  # D·v = x ⊙ (D·W_x), folded
        y = y.float() + x[:, :, None].float() * d_skip  # (B, T, R, H, P)
        z = z.reshape(b, t, 1, h, p).float()
        if r > 1:
            y = (y * F.silu(z * self.mimo_z.transpose(0, 1)) * self.mimo_o.transpose(0, 1)).sum(dim=2)
        else:
            y = y[:, :, 0] * F.silu(z[:, :, 0])
        return self.out_proj(y.reshape(b, t, self.d_inner).to(u.dtype)), new_state

    # -- Mamba-2 ---------------------------------------------------------------------------------------------

    def _mamba2(self, u: torch.Tensor, state: dict | None) -> tuple[torch.Tensor, dict]:
        b, t, _ = u.shape
        h, p, n = self.nheads, self.headdim, self.d_state
        z, xbc, dd_dt = self.in_proj(u).split(self.splits, dim=-1)
        xbc, conv_state = causal_conv1d(xbc, self.conv.weight[:, 0], self.conv.bias,
                                        state["conv"] if state is not None else None, activation="silu",
                                        backend=self.config.backend)
        x, B, C = xbc.split((self.d_inner, n, n), dim=-1)
        x = x.reshape(b, t, h, p)
        dt = F.softplus(dd_dt.float() + self.dt_bias)
        y, ssm_state = ssd(x, dt, -torch.exp(self.A_log.float()), B[:, :, None], C[:, :, None],
                           state["ssm"] if state is not None else None, chunk_size=self.chunk,
                           backend=self.config.backend)
        y = (y.float() + self.D[:, None] * x.float()).reshape(b, t, self.d_inner)
        y = rms(y * F.silu(z.float()), self.norm_weight)
        new_state = {"conv": conv_state, "ssm": ssm_state}
        return self.out_proj(y.to(u.dtype)), new_state

    # -- Mamba-1 ---------------------------------------------------------------------------------------------

    def _mamba1(self, u: torch.Tensor, state: dict | None) -> tuple[torch.Tensor, dict]:
        b, t, _ = u.shape
        n = self.d_state
        x, z = self.in_proj(u).split(self.splits, dim=-1)
        x, conv_state = causal_conv1d(x, self.conv.weight[:, 0], self.conv.bias,
                                      state["conv"] if state is not None else None, activation="silu",
                                      backend=self.config.backend)
        dt_low, B, C = self.x_proj(x).split((self.dt_rank, n, n), dim=-1)
        delta = F.softplus(self.dt_proj(dt_low).float())
        y, ssm_state = selective_scan(x, delta, -torch.exp(self.A_log.float()), B, C,
                                      state["ssm"] if state is not None else None, backend=self.config.backend)
        y = (y.float() + self.D * x.float()) * F.silu(z.float())
        new_state = {"conv": conv_state, "ssm": ssm_state}
        return self.out_proj(y.to(u.dtype)), new_state

    # -- contract --------------------------------------------------------------------------------------------

    def _run(self, x: torch.Tensor, state: dict | None) -> tuple[torch.Tensor, dict]:
        run = {"mamba3": self._mamba3, "mamba2": self._mamba2, "mamba1": self._mamba1}[self.config.variant]
        return run(x, state)

    def forward(self, x: torch.Tensor, ctx: dict | None = None) -> torch.Tensor:
        return self._run(x, None)[0]

    def prefill(self, x: torch.Tensor, ctx: dict | None = None) -> tuple[torch.Tensor, dict]:
        return self._run(x, None)

    def step(self, x: torch.Tensor, state: dict, ctx: dict | None = None) -> tuple[torch.Tensor, dict]:
        """Decode ``x (B, T, d)`` (usually ``T = 1``) after the tokens summarised by ``state``."""
        return self._run(x, state)

    def state_size(self, batch: int, seq_len: int, dtype: torch.dtype = torch.float32) -> int:
        """Bytes of the decode state (independent of ``seq_len``). Mamba-3: ``batch·H·(4S + 4PN + (RN + P)·elt)``;
        Mamba-2: ``batch·(conv_dim·(K-1)·elt + 4HPN)``; Mamba-1: ``batch·di·((K-1)·elt + 4N)``."""
        elt = torch.empty((), dtype=dtype).element_size()
        h, p, n = self.nheads, self.headdim, self.d_state
        if self.config.variant == "mamba1":
            return batch * self.d_inner * ((self.config.d_conv - 1) * elt + 4 * n)
        if self.config.variant == "mamba2":
            return batch * (self.conv_dim * (self.config.d_conv - 1) * elt + 4 * h * p * n)
        return batch * h * (4 * self.n_angles + 4 * p * n + (self.rank * n + p) * elt)
