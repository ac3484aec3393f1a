"""RWKV-7 ("Goose", x070) time mixing, symbol ``R``: the generalized delta rule with a value residual.

Per token, with ``xx = x_{t-1} - x_t`` (token shift) and ``x_c = x + xx * mu_c`` for ``c in r, w, k, v, a, g``::

    r = W_r x_r;  k = W_k x_k;  v = W_v x_v
    w = -exp(-1/2) * sigmoid(w0 + tanh(x_w W_w1) W_w2)      log decay; decay exp(w) in (0.5453, 1)
    v <- v + (v_first - v) * sigmoid(v0 + x_v W_v1 W_v2)   value residual (not in the model's first R layer)
    a = sigmoid(a0 + x_a W_a1 W_a2)                         in-context learning rate
    g = sigmoid(x_g W_g1) W_g2                              output gate
    kh = L2normalize_head(k * k_k);   k <- k * (1 + (a - 1) * k_a)
    S_t = S_{t-1} (diag(exp(w_t)) - kh (a * kh)^T) + v_t k_t^T     per head, S (hs x hs), read after the update
    o = GroupNorm_H(S_t r_t) + sum_head(r * k * r_k) * v    bonus term
    out = W_o (o * g)

The log-decay form ``-exp(-1/2) sigmoid(z)`` equals the official ``exp(-exp(-softplus(-z) - 1/2))``. The
recurrence runs in :mod:`layers.ops.rwkv7` (``naive`` token loop / ``chunked`` WY form, chosen by dispatch).

Value residual: the first ``R`` layer a model call reaches (``ctx`` has no ``"rwkv7_v_first"`` yet) stores its
``v`` there; every later ``R`` layer of the same call mixes toward it. This holds in ``forward``, ``prefill``
and ``step`` because the model creates one ``ctx`` per call and runs layers in order. A layer cannot know at
build time whether it will be first (pattern ``AR``), so every ``R`` layer owns ``v0, v1, v2`` (as in the
official code, where layer 0 carries them unused); the first one leaves them untouched (see
``ctx_only_params``).

Shapes: ``x (B, T, d)`` -> ``(B, T, d)``; ``H = d / head_size`` heads. LoRA ranks ``r_w, r_a, r_v, r_g``
default to fla's formulas ``max(32, round(f sqrt(d) / 32) * 32)`` with ``f = 2.5 (hs/64), 2.5 (hs/64), 1.7, 5``.
Parameters: ``4 d^2 + 14 d + 2 d (r_w + r_a + r_v + r_g)`` (W_r, W_k, W_v, W_o; six mu, w0, a0, v0, k_k, k_a,
r_k, GroupNorm weight and bias; the four LoRAs).
Decoding state: ``{"x": (B, d)`` last input (token shift), ``"S": (B, H, hs, hs)`` fp32``}`` - fixed size.
Init follows the official x070 code (mu ramps, decay speeds -7..-2 by channel, k_k 0.85, k_a 1, r_k -0.04,
orthogonal LoRA up-projections with gain 0.1), except that the LoRA down-projections are N(0, 0.02) rather
than zero (a zero matrix would leave its partner without gradient) and ``W_o`` is N(0, out_init_std()).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from layers.base import Layer, LayerConfigError, require_at_least, require_positive
from layers.ops.rwkv7 import rwkv7, rwkv7_step

CTX_V_FIRST = "rwkv7_v_first"
_LOG_DECAY_SCALE = math.exp(-0.5)  # log decay in (-0.6065, 0)
_MIX = ("r", "w", "k", "v", "a", "g")


def lora_rank(d_model: int, factor: float) -> int:
    """fla's default LoRA rank: ``max(32, round(factor * sqrt(d) / 32) * 32)``."""
    return max(32, int(round(factor * math.sqrt(d_model) / 32)) * 32)


class RWKV7(Layer):
    """RWKV-7 time mixing (see the module docstring for equations, parameter count and state)."""

    #: parameters used only when an earlier ``R`` layer of the same call put ``v_first`` in ``ctx``.
    ctx_only_params: ClassVar[tuple[str, ...]] = ("v0", "v1", "v2")

    @dataclass
    class Config:
        head_size: int = 64
        decay_rank: int | None = None
        a_rank: int | None = None
        v_rank: int | None = None
        gate_rank: int | None = None
        norm_eps: float = 64e-5  # official GroupNorm eps: 1e-5 * head_size_divisor (8) ** 2
        chunk_size: int = 64
        backend: str | None = None

    def __init__(self, d_model: int, config: Config | None = None, *, layer_idx: int = 0, n_layers: int = 1):
        super().__init__(d_model, config, layer_idx=layer_idx, n_layers=n_layers)
        cfg = self.config
        d = d_model
        self.head_size = cfg.head_size
        self.n_heads = d // cfg.head_size
        rw, ra, rv, rg = self.ranks(d, cfg)
        self.mu = nn.Parameter(torch.empty(len(_MIX), d))
        self.w0, self.w1, self.w2 = nn.Parameter(torch.empty(d)), nn.Parameter(torch.empty(d, rw)), \
            nn.Parameter(torch.empty(rw, d))
        self.a0, self.a1, self.a2 = nn.Parameter(torch.empty(d)), nn.Parameter(torch.empty(d, ra)), \
            nn.Parameter(torch.empty(ra, d))
        self.v0, self.v1, self.v2 = nn.Parameter(torch.empty(d)), nn.Parameter(torch.empty(d, rv)), \
            nn.Parameter(torch.empty(rv, d))
        self.g1, self.g2 = nn.Parameter(torch.empty(d, rg)), nn.Parameter(torch.empty(rg, d))
        self.k_k, self.k_a = nn.Parameter(torch.empty(d)), nn.Parameter(torch.empty(d))
        self.r_k = nn.Parameter(torch.empty(self.n_heads, self.head_size))
        self.receptance = nn.Linear(d, d, bias=False)
        self.key = nn.Linear(d, d, bias=False)
        self.value = nn.Linear(d, d, bias=False)
        self.output = nn.Linear(d, d, bias=False)
        self.ln_x = nn.GroupNorm(self.n_heads, d, eps=cfg.norm_eps)
        self.reset_parameters()

    @staticmethod
    def ranks(d_model: int, cfg: Config) -> tuple[int, int, int, int]:
        hs_factor = cfg.head_size / 64
        pick = [(cfg.decay_rank, 2.5 * hs_factor), (cfg.a_rank, 2.5 * hs_factor), (cfg.v_rank, 1.7),
                (cfg.gate_rank, 5.0)]
        rw, ra, rv, rg = (r if r is not None else lora_rank(d_model, f) for r, f in pick)
        return rw, ra, rv, rg

    @classmethod
    def check_config(cls, d_model: int, config: Config) -> None:
        super().check_config(d_model, config)
        require_at_least(config, 1, "head_size")
        if d_model % config.head_size:
            raise LayerConfigError("head_size", f"d_model={d_model} is not divisible by head_size="
                                                f"{config.head_size}")
        for name in ("decay_rank", "a_rank", "v_rank", "gate_rank"):
            r = getattr(config, name)
            if r is not None and r < 1:
                raise LayerConfigError(name, f"{name} must be >= 1 or None (fla's default), got {r}")
        require_positive(config, "norm_eps")
        require_at_least(config, 1, "chunk_size")

    @classmethod
    def param_count(cls, d_model: int, config: Config) -> int:
        d = d_model
        return 4 * d * d + 14 * d + 2 * d * sum(cls.ranks(d, config))

    def reset_parameters(self) -> None:
        d, n = self.d_model, max(self.n_layers, 1)
        ratio_0_to_1 = self.layer_idx / max(n - 1, 1)
        ratio_1_to_0 = 1.0 - self.layer_idx / n
        with torch.no_grad():
            ddd = torch.arange(d, dtype=torch.float32) / d
            powers = (0.2, 0.9, 0.7, 0.7, 0.9, 0.2)  # r, w, k, v, a, g
            self.mu.copy_(torch.stack([1.0 - ddd.pow(p * ratio_1_to_0) for p in powers]))
            speed = -7.0 + 5.0 * (torch.arange(d, dtype=torch.float32) / max(d - 1, 1)) \
                .pow(0.85 + ratio_0_to_1 ** 0.5)
            self.w0.copy_(speed + 0.5)
            self.a0.zero_()
            self.v0.fill_(1.0)
            self.k_k.fill_(0.85)
            self.k_a.fill_(1.0)
            self.r_k.fill_(-0.04)
        for down, up in ((self.w1, self.w2), (self.a1, self.a2), (self.v1, self.v2), (self.g1, self.g2)):
            nn.init.normal_(down, mean=0.0, std=0.02)
            nn.init.orthogonal_(up, gain=0.1)
        bound = d ** -0.5
        nn.init.uniform_(self.receptance.weight, -0.5 * bound, 0.5 * bound)
        nn.init.uniform_(self.key.weight, -0.05 * bound, 0.05 * bound)
        nn.init.uniform_(self.value.weight, -0.5 * bound, 0.5 * bound)
        nn.init.normal_(self.output.weight, mean=0.0, std=self.out_init_std())
        with torch.no_grad():
            self.ln_x.weight.fill_(((1 + self.layer_idx) / n) ** 0.7)
            self.ln_x.bias.zero_()

    # -- internals -------------------------------------------------------------------------------------------

    def _mix(self, x: torch.Tensor, last_x: torch.Tensor | None, state: torch.Tensor | None,
             ctx: dict, decode: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """``x (B, T, d)`` after the token ``last_x (B, d)`` (None: zeros) from state ``S`` -> ``y``, new ``S``."""
        b, t, d = x.shape
        h, hs = self.n_heads, self.head_size
        prev = x.new_zeros(b, 1, d) if last_x is None else last_x[:, None]
        xx = torch.cat((prev, x[:, :-1]), dim=1) - x
        xr, xw, xk, xv, xa, xg = (x + xx * self.mu[i] for i in range(len(_MIX)))
        r, k, v = self.receptance(xr), self.key(xk), self.value(xv)
        w = -_LOG_DECAY_SCALE * torch.sigmoid((self.w0 + torch.tanh(xw @ self.w1) @ self.w2).float())  # fp32
        if CTX_V_FIRST in ctx:
            v = v + (ctx[CTX_V_FIRST] - v) * torch.sigmoid(self.v0 + (xv @ self.v1) @ self.v2)
        else:
            ctx[CTX_V_FIRST] = v
        a = torch.sigmoid(self.a0 + (xa @ self.a1) @ self.a2)
        g = torch.sigmoid(xg @ self.g1) @ self.g2
        kk = F.normalize((k * self.k_k).view(b, t, h, hs), dim=-1, eps=1e-12)
        k = k * (1.0 + (a - 1.0) * self.k_a)
        r4, w4, k4, v4, a4 = (z.view(b, t, h, hs) for z in (r, w, k, v, a))
        if decode and t == 1:
            o, state = rwkv7_step(r4[:, 0], w4[:, 0], k4[:, 0], v4[:, 0], -kk[:, 0], (kk * a4)[:, 0],
                                  self._state0(x) if state is None else state)
            o = o[:, None].to(x.dtype)
        else:
            o, state = rwkv7(r4, w4, k4, v4, -kk, kk * a4, state, chunk_size=self.config.chunk_size,
                             decay_bound=_LOG_DECAY_SCALE,
                             backend=self.config.backend)
        o = self.ln_x(o.reshape(b * t, d).float()).view(b, t, d).to(x.dtype)
        bonus = ((r4 * k4 * self.r_k).sum(dim=-1, keepdim=True) * v4).reshape(b, t, d)
        return self.output((o + bonus) * g), state

    def _state0(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(x.shape[0], self.n_heads, self.head_size, self.head_size, dtype=torch.float32,
                           device=x.device)

    # -- contract --------------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, ctx: dict | None = None) -> torch.Tensor:
        return self._mix(x, None, None, {} if ctx is None else ctx, decode=False)[0]

    def prefill(self, x: torch.Tensor, ctx: dict | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
        if x.shape[1] == 0:
            return x.new_zeros(x.shape), {"x": x.new_zeros(x.shape[0], self.d_model), "S": self._state0(x)}
        y, s = self._mix(x, None, None, {} if ctx is None else ctx, decode=False)
        return y, {"x": x[:, -1], "S": s}

    def step(self, x: torch.Tensor, state: dict[str, Any], ctx: dict | None = None) -> tuple[torch.Tensor, dict]:
        """Decode ``x (B, T, d)`` (usually ``T = 1``: one recurrence step) after ``state``."""
        y, s = self._mix(x, state["x"], state["S"], {} if ctx is None else ctx, decode=True)
        return y, {"x": x[:, -1], "S": s}

    def state_size(self, batch: int, seq_len: int, dtype: torch.dtype = torch.float32) -> int:
        """Bytes: ``batch * d * elt(dtype)`` (token shift) + ``batch * H * hs^2 * 4`` (fp32 state); no ``seq_len``."""
        elt = torch.empty((), dtype=dtype).element_size()
        return batch * self.d_model * elt + batch * self.n_heads * self.head_size ** 2 * 4
