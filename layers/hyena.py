"""Hyena operator, symbol ``H``: gated long convolutions (safari Hyena; StripedHyena's modal filter).

Order ``N`` (default 2), ``x (B, T, d)``::

    z = in_proj(x)                          d -> (N + 1) d, with bias
    z = short causal depthwise conv(z)      width ``short_filter`` (3), with bias
    x_0, ..., x_{N-1}, v = split(z)
    for i = N-1 .. 1:  v = h_i * (x_i . v) + D_i . (x_i . v)     long causal conv (FFT of size 2T) + skip
    y = out_proj(x_0 . v)                   d -> d, with bias

For ``N = 2``: ``y = out_proj(x_0 . (h * (x_1 . v) + D . x_1 . v))``. The long convolution runs in
:mod:`layers.ops.hyena` (``chunked`` = FFT, ``naive`` = direct convolution), chosen by dispatch.

Long filters ``h_i`` (one per channel, ``N - 1`` of them), by ``filter``:

- ``implicit`` (safari ``HyenaFilter``): ``h(t) = FFN(PE(t)) . exp(-|delta_c| t / l_max)``.
  ``PE(t) = [t/l_max, cos(f_k w_t), -sin(f_k w_t)]`` with ``w_t = 2 pi t / l_max``, ``K = (emb_dim - 1)/2``
  bands ``f_k = linspace(1e-4, K - 1, K)``; FFN ``Linear(emb_dim, F) -> Sin -> [Linear(F, F) -> Sin] x 2 ->
  Linear(F, (N-1) d, no bias)`` with ``Sin(x) = sin(omega . x)`` (one learnable ``omega (F,)`` shared, as in
  safari); ``|delta_c| = linspace(ln(1e-2)/1.5, ln(1e-2)/0.3, d)`` is a fixed buffer. Positions are absolute and
  normalised by ``l_max`` (not by ``T``), so the filter does not depend on the sequence length and decoding
  matches the full forward at any length (the PE is periodic past ``l_max``).
- ``modal`` (StripedHyena): ``h_c(t) = Re sum_n R_{c,n} p_{c,n}^t`` over ``n < modal_state`` complex modes,
  poles ``p = exp(-exp(nu)) e^{i theta}`` (``|p| < 1`` by construction) and residues ``R = R_re + i R_im``.

Parameters (``C3 = (N + 1) d``, ``w = short_filter``, ``F = filter_order``, ``E = emb_dim``, ``n = modal_state``):
``d C3 + C3`` (in_proj) ``+ C3 w + C3`` (short conv) ``+ (N - 1) d`` (skips ``D``) ``+ d^2 + d`` (out_proj), plus
implicit: ``E F + F + 2 (F^2 + F) + F (N - 1) d + F``; modal: ``4 (N - 1) d n`` (nu, theta, R_re, R_im).

Decoding state: ``"fir"`` the last ``w - 1`` short-conv inputs ``(B, C3, w - 1)``, and per long conv
- implicit: the cached conv inputs ``"u" (B, N - 1, d, T)``: grows with ``T`` (each step re-evaluates the
  filter at ``0..T`` and takes one dot product: ``O(T)`` per token);
- modal: the modal state ``"s" (B, N - 1, d, n, 2)`` fp32 (real, imaginary) with
  ``s_t = p s_{t-1} + u_t`` and output ``Re sum_n R_n s_{t,n} + D u_t``: fixed size. Prefill computes the
  final ``s`` directly from the inputs (``sum_j p^{T-1-j} u_j``).

``state_grows`` is True on the class (the implicit filter's cache grows); a modal instance sets it False and
its ``state_size`` does not depend on ``seq_len``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from layers.base import Layer, LayerConfigError, require_at_least
from layers.ops.hyena import long_conv

FILTERS = ("implicit", "modal")


class ImplicitFilter(nn.Module):
    """``h (N-1, d, L)`` from positions ``0..L-1`` (see the module docstring)."""

    def __init__(self, d_model: int, n_filters: int, width: int, emb_dim: int, l_max: int):
        super().__init__()
        self.d_model, self.n_filters, self.emb_dim, self.l_max = d_model, n_filters, emb_dim, l_max
        self.omega = nn.Parameter(torch.empty(width))
        self.layers = nn.ModuleList([nn.Linear(emb_dim, width), nn.Linear(width, width), nn.Linear(width, width)])
        self.head = nn.Linear(width, n_filters * d_model, bias=False)
        target, fast, slow = 1e-2, 0.3, 1.5
        deltas = torch.linspace(math.log(target) / slow, math.log(target) / fast, d_model).abs()
        self.register_buffer("deltas", deltas, persistent=False)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.omega)
        for lin in (*self.layers, self.head):
            lin.reset_parameters()  # torch's default (Kaiming-uniform), as safari

    def forward(self, length: int) -> torch.Tensor:
        t = torch.arange(length, dtype=torch.float32, device=self.omega.device)
        bands = (self.emb_dim - 1) // 2
        f = torch.linspace(1e-4, bands - 1, bands, device=t.device)
        angle = f[None, :] * (2 * math.pi * t / self.l_max)[:, None]
        z = torch.cat(((t / self.l_max)[:, None], angle.cos(), -angle.sin()), dim=-1)  # (L, E)
        for lin in self.layers:
            z = torch.sin(self.omega * lin(z))
        h = self.head(z).view(length, self.n_filters, self.d_model).permute(1, 2, 0)  # (N-1, d, L)
        return h * torch.exp(-(t / self.l_max)[None, :] * self.deltas[:, None])


class ModalFilter(nn.Module):
    """``h_c(t) = Re sum_n R_{c,n} p_{c,n}^t`` with ``p = exp(-exp(nu) + i theta)``; params ``(N-1, d, n)``."""

    def __init__(self, d_model: int, n_filters: int, modes: int, l_max: int):
        super().__init__()
        self.l_max = l_max
        shape = (n_filters, d_model, modes)
        self.nu, self.theta = nn.Parameter(torch.empty(shape)), nn.Parameter(torch.empty(shape))
        self.res_re, self.res_im = nn.Parameter(torch.empty(shape)), nn.Parameter(torch.empty(shape))

    def reset_parameters(self) -> None:
        with torch.no_grad():
            # decay rates log-uniform in [1/l_max, 0.5]; small rotations; unit-energy residues per channel
            lo, hi = math.log(1.0 / self.l_max), math.log(0.5)
            self.nu.uniform_(lo, hi)  # nu = log(rate)
            self.theta.uniform_(0.0, math.pi / 8)
            scale = (self.nu.exp() * 2.0 / self.nu.shape[-1]).sqrt()
            self.res_re.normal_().mul_(scale)
            self.res_im.normal_().mul_(scale)

    def powers(self, tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``Re, Im p^tau`` for integer lags ``tau (L,)``: each ``(N-1, d, n, L)``."""
        mag = torch.exp(-self.nu.exp()[..., None] * tau)
        ang = self.theta[..., None] * tau
        return mag * ang.cos(), mag * ang.sin()

    def forward(self, length: int) -> torch.Tensor:
        tau = torch.arange(length, dtype=torch.float32, device=self.nu.device)
        p_re, p_im = self.powers(tau)
        return (self.res_re[..., None] * p_re - self.res_im[..., None] * p_im).sum(dim=2)  # (N-1, d, L)

    def pole(self) -> tuple[torch.Tensor, torch.Tensor]:
        mag = torch.exp(-self.nu.exp())
        return mag * self.theta.cos(), mag * self.theta.sin()


class Hyena(Layer):
    """Hyena operator of order ``N`` (see the module docstring for equations, parameter count and state)."""

    state_grows: ClassVar[bool] = True  # implicit filter: cached inputs; modal instances set False

    @dataclass
    class Config:
        order: int = 2
        filter: str = "implicit"
        filter_order: int = 64
        emb_dim: int = 3
        l_max: int = 2048
        modal_state: int = 2
        short_filter: int = 3
        backend: str | None = None

    def __init__(self, d_model: int, config: Config | None = None, *, layer_idx: int = 0, n_layers: int = 1):
        super().__init__(d_model, config, layer_idx=layer_idx, n_layers=n_layers)
        cfg = self.config
        d, n = d_model, cfg.order
        self.channels = (n + 1) * d
        self.state_grows = cfg.filter == "implicit"
        self.in_proj = nn.Linear(d, self.channels)
        self.short_weight = nn.Parameter(torch.empty(self.channels, cfg.short_filter))
        self.short_bias = nn.Parameter(torch.empty(self.channels))
        self.skip = nn.Parameter(torch.empty(n - 1, d))
        if cfg.filter == "implicit":
            self.filter = ImplicitFilter(d, n - 1, cfg.filter_order, cfg.emb_dim, cfg.l_max)
        else:
            self.filter = ModalFilter(d, n - 1, cfg.modal_state, cfg.l_max)
        self.out_proj = nn.Linear(d, d)
        self.reset_parameters()

    @classmethod
    def check_config(cls, d_model: int, config: Config) -> None:
        super().check_config(d_model, config)
        require_at_least(config, 2, "order")
        if config.filter not in FILTERS:
            raise LayerConfigError("filter", f"filter must be one of {FILTERS}, got {config.filter!r}")
        require_at_least(config, 1, "filter_order")
        if config.emb_dim < 3 or config.emb_dim % 2 == 0:
            raise LayerConfigError("emb_dim", f"emb_dim must be odd and >= 3, got {config.emb_dim}")
        require_at_least(config, 1, "l_max", "modal_state", "short_filter")

    @classmethod
    def param_count(cls, d_model: int, config: Config) -> int:
        d, n, c3 = d_model, config.order, (config.order + 1) * d_model
        count = d * c3 + c3 + c3 * config.short_filter + c3 + (n - 1) * d + d * d + d
        if config.filter == "implicit":
            f, e = config.filter_order, config.emb_dim
            return count + e * f + f + 2 * (f * f + f) + f * (n - 1) * d + f
        return count + 4 * (n - 1) * d * config.modal_state

    def reset_parameters(self) -> None:
        nn.init.normal_(self.in_proj.weight, mean=0.0, std=self.d_model ** -0.5)
        nn.init.zeros_(self.in_proj.bias)
        bound = self.config.short_filter ** -0.5  # Conv1d's default fan-in bound for a depthwise filter
        nn.init.uniform_(self.short_weight, -bound, bound)
        nn.init.zeros_(self.short_bias)
        nn.init.normal_(self.skip)  # safari: randn
        self.filter.reset_parameters()
        nn.init.normal_(self.out_proj.weight, mean=0.0, std=self.out_init_std())
        nn.init.zeros_(self.out_proj.bias)

    # -- internals -------------------------------------------------------------------------------------------

    def _mix(self, x: torch.Tensor, fir: torch.Tensor | None, conv) -> tuple[torch.Tensor, torch.Tensor, list]:
        """Shared by every path. ``conv(j, u (B, d, T)) -> (B, d, T)`` is the ``j``-th long conv with its skip.
        Returns ``y (B, T, d)``, the new FIR state and the long convs' inputs."""
        b, t, d = x.shape
        w = self.config.short_filter
        z = self.in_proj(x).transpose(1, 2)  # (B, C3, T)
        if fir is None:
            fir = z.new_zeros(b, self.channels, w - 1)
        zp = torch.cat((fir, z), dim=-1)
        zc = F.conv1d(zp, self.short_weight[:, None, :], self.short_bias, groups=self.channels)
        xs = zc.split(d, dim=1)  # x_0 .. x_{N-1}, v: each (B, d, T)
        v, inputs = xs[-1], []
        for j, i in enumerate(range(self.config.order - 1, 0, -1)):
            u = xs[i] * v
            inputs.append(u)
            v = conv(j, u)
        y = self.out_proj((xs[0] * v).transpose(1, 2))
        return y, zp[..., zp.shape[-1] - (w - 1):], inputs

    def _full(self, x: torch.Tensor, fir: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, list]:
        h = self.filter(x.shape[1])
        return self._mix(x, fir, lambda j, u: long_conv(u, h[j], self.skip[j], backend=self.config.backend))

    # -- contract --------------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, ctx: dict | None = None) -> torch.Tensor:
        return self._full(x)[0]

    def prefill(self, x: torch.Tensor, ctx: dict | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
        y, fir, inputs = self._full(x)
        b, t, d = x.shape
        if self.config.filter == "implicit":
            u = torch.stack(inputs, dim=1) if t else x.new_zeros(b, self.config.order - 1, d, 0)
            return y, {"fir": fir, "u": u}
        tau = torch.arange(t - 1, -1, -1, dtype=torch.float32, device=x.device)  # lag of input j: T-1-j
        p_re, p_im = self.filter.powers(tau)  # (N-1, d, n, T)
        s = [torch.stack((torch.einsum("bdt,dnt->bdn", u.float(), p_re[j]),
                          torch.einsum("bdt,dnt->bdn", u.float(), p_im[j])), dim=-1) for j, u in enumerate(inputs)]
        return y, {"fir": fir, "s": torch.stack(s, dim=1)}

    def step(self, x: torch.Tensor, state: dict[str, Any], ctx: dict | None = None) -> tuple[torch.Tensor, dict]:
        """Decode ``x (B, T, d)`` (usually ``T = 1``) after ``state``."""
        if self.config.filter == "implicit":
            hist = state["u"]
            h = self.filter(hist.shape[-1] + x.shape[1])
            new = []

            def conv(j: int, u: torch.Tensor) -> torch.Tensor:
                full = torch.cat((hist[:, j], u), dim=-1)
                new.append(full)
                if u.shape[-1] == 1:  # one token: a single dot product with the reversed filter
                    return (full * h[j].flip(-1)).sum(-1, keepdim=True) + self.skip[j][:, None] * u
                return long_conv(full, h[j], self.skip[j], backend=self.config.backend)[..., -u.shape[-1]:]

            y, fir, _ = self._mix(x, state["fir"], conv)
            return y, {"fir": fir, "u": torch.stack(new, dim=1)}

        p_re, p_im = self.filter.pole()  # (N-1, d, n)
        s_new = []

        def modal(j: int, u: torch.Tensor) -> torch.Tensor:
            s_re, s_im = state["s"][:, j].unbind(-1)  # (B, d, n)
            outs = []
            for t in range(u.shape[-1]):
                ut = u[..., t].float()[..., None]
                s_re, s_im = p_re[j] * s_re - p_im[j] * s_im + ut, p_re[j] * s_im + p_im[j] * s_re
                outs.append((self.filter.res_re[j] * s_re - self.filter.res_im[j] * s_im).sum(-1))
            s_new.append(torch.stack((s_re, s_im), dim=-1))
            return torch.stack(outs, dim=-1).to(u.dtype) + self.skip[j][:, None] * u

        y, fir, _ = self._mix(x, state["fir"], modal)
        return y, {"fir": fir, "s": torch.stack(s_new, dim=1)}

    def state_size(self, batch: int, seq_len: int, dtype: torch.dtype = torch.float32) -> int:
        """Bytes: FIR ``B C3 (w-1) elt`` + implicit ``B (N-1) d seq_len elt`` or modal ``B (N-1) d n 2 * 4``."""
        elt = torch.empty((), dtype=dtype).element_size()
        cfg = self.config
        fir = batch * self.channels * (cfg.short_filter - 1) * elt
        if cfg.filter == "implicit":
            return fir + batch * (cfg.order - 1) * self.d_model * seq_len * elt
        return fir + batch * (cfg.order - 1) * self.d_model * cfg.modal_state * 2 * 4
