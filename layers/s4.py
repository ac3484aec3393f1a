"""Diagonal S4 (S4D) mixer, symbol ``S`` (Gu, Gupta, Goel, Ré 2022; block of ``state-spaces/s4`` ``s4d.py``).

One linear time-invariant SSM per channel (H = d_model channels, N = d_state, M = N/2 stored complex modes)::

    A_hm = -exp(log_A_real) + i·A_imag,   Δ_h = exp(log_dt),   C_hm complex,   B = 1 (folded into C)
    y = S4D(u) + D ⊙ u                     (``layers.ops.s4_kernel``: FFT convolution to train and prefill,
                                           the recurrence with an O(1) state to decode)
    out = GLU(W·GELU(y) + b)               (W: H -> 2H, as S4D's ``output_linear``)

Initialisation (``init``): ``lin`` A = -1/2 + iπn, ``inv`` A = -1/2 + i(N/π)(N/(2n+1) - 1), ``legs`` A = -1/2 +
i·w with ±i·w the eigenvalues of HiPPO-LegS's normal part (:mod:`layers.ops.s4_kernel.hippo`); log Δ uniform in
``[log dt_min, log dt_max]``; C complex normal (variance 1); D standard normal; W normal(0, out_init_std()), b 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from layers.base import Layer, LayerConfigError
from layers.ops import dispatch
from layers.ops.s4_kernel import INITS, s4d_conv, s4d_init


class S4D(Layer):
    """S4D mixer (see the module docstring). Shapes: ``x (B, T, d)`` -> ``(B, T, d)``.

    Parameters: ``H (log_dt) + 2HM (log_A_real, A_imag) + 2HM (C as a real view) + H (D) + 2H² + 2H (output
    linear)`` with ``H = d_model``, ``M = d_state / 2``.
    Decoding state: ``(B, H, M)`` complex64 (8 bytes a mode whatever the input dtype); fixed size.
    """

    state_grows: ClassVar[bool] = False

    @dataclass
    class Config:
        d_state: int = 64
        init: str = "lin"
        dt_min: float = 0.001
        dt_max: float = 0.1
        backend: str | None = None

    def __init__(self, d_model: int, config: Config | None = None, *, layer_idx: int = 0, n_layers: int = 1):
        super().__init__(d_model, config, layer_idx=layer_idx, n_layers=n_layers)
        h, m = d_model, self.config.d_state // 2
        self.log_dt = nn.Parameter(torch.empty(h))
        self.log_A_real = nn.Parameter(torch.empty(h, m))
        self.A_imag = nn.Parameter(torch.empty(h, m))
        self.C = nn.Parameter(torch.empty(h, m, 2))  # real view of a complex (H, M)
        self.D = nn.Parameter(torch.empty(h))
        self.out_linear = nn.Linear(h, 2 * h)
        self.reset_parameters()

    @classmethod
    def check_config(cls, d_model: int, config: Config) -> None:
        super().check_config(d_model, config)
        c = config
        if c.d_state < 2 or c.d_state % 2:
            raise LayerConfigError("d_state", f"d_state must be even and >= 2 (N/2 complex modes are stored), "
                                              f"got {c.d_state}")
        if c.init not in INITS:
            raise LayerConfigError("init", f"init must be one of {', '.join(INITS)}, got {c.init!r}")
        if not 0 < c.dt_min <= c.dt_max:
            raise LayerConfigError("dt_min", f"need 0 < dt_min <= dt_max, got {c.dt_min}, {c.dt_max}")
        if c.backend not in (None, "auto", *dispatch.BACKENDS):
            raise LayerConfigError("backend", f"backend must be auto, {', '.join(dispatch.BACKENDS)} or None, "
                                              f"got {c.backend!r}")

    @classmethod
    def param_count(cls, d_model: int, config: Config) -> int:
        h, m = d_model, config.d_state // 2
        return h + 4 * h * m + h + 2 * h * h + 2 * h

    def reset_parameters(self) -> None:
        cfg = self.config
        h, m = self.d_model, cfg.d_state // 2
        with torch.no_grad():
            lo, hi = math.log(cfg.dt_min), math.log(cfg.dt_max)
            self.log_dt.copy_(torch.rand(h) * (hi - lo) + lo)
            real, imag = s4d_init(cfg.init, cfg.d_state)
            self.log_A_real.copy_(torch.log(-real).expand(h, m))
            self.A_imag.copy_(imag.expand(h, m))
            self.C.copy_(torch.randn(h, m, 2) * math.sqrt(0.5))
            self.D.copy_(torch.randn(h))
        nn.init.normal_(self.out_linear.weight, mean=0.0, std=self.out_init_std())
        nn.init.zeros_(self.out_linear.bias)

    def ssm_params(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(dt (H,), A (H, M) complex, C (H, M) complex)`` from the stored parameters."""
        A = torch.complex(-torch.exp(self.log_A_real.float()), self.A_imag.float())
        return torch.exp(self.log_dt.float()), A, torch.view_as_complex(self.C.float().contiguous())

    def _run(self, x: torch.Tensor, state: torch.Tensor | None, want_state: bool):
        dt, A, C = self.ssm_params()
        y, new_state = s4d_conv(x, dt, A, C, state, want_state=want_state, backend=self.config.backend)
        y = F.gelu(y.float() + self.D * x.float())
        return F.glu(self.out_linear(y.to(x.dtype)), dim=-1), new_state

    def forward(self, x: torch.Tensor, ctx: dict | None = None) -> torch.Tensor:
        return self._run(x, None, want_state=False)[0]

    def prefill(self, x: torch.Tensor, ctx: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self._run(x, None, want_state=True)

    def step(self, x: torch.Tensor, state: torch.Tensor, ctx: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode ``x (B, T, d)`` (usually ``T = 1``) after the tokens summarised by ``state``."""
        return self._run(x, state, want_state=True)

    def state_size(self, batch: int, seq_len: int, dtype: torch.dtype = torch.float32) -> int:
        """Bytes of the decode state: ``batch·H·M·8`` (complex64), independent of ``seq_len`` and ``dtype``."""
        return batch * self.d_model * (self.config.d_state // 2) * 8
