"""Dense SwiGLU MLP, symbol ``F`` (alias ``-``), and the SwiGLU math shared with the MoE experts."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from layers.base import TokenwiseLayer, require_at_least, require_positive


def round_up(n: int, multiple: int) -> int:
    """Smallest multiple of ``multiple`` that is ``>= n``."""
    return -(-n // multiple) * multiple


def ffn_hidden(d_model: int, expand: float, multiple_of: int) -> int:
    """Hidden width of a SwiGLU MLP: ``round_up(int(expand * d_model), multiple_of)`` (at least ``multiple_of``)."""
    return round_up(max(int(expand * d_model), 1), multiple_of)


def swiglu_act(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``: the SwiGLU gating nonlinearity."""
    return F.silu(gate) * up


def swiglu(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """``(silu(x @ w1) * (x @ w3)) @ w2`` with weights stored input-major.

    Shapes: ``x (..., d)``, ``w1, w3 (d, h)``, ``w2 (h, d_out)`` -> ``(..., d_out)``. This is the layout of one
    slice of the stacked MoE expert weights; the dense layer uses ``nn.Linear`` and :func:`swiglu_act`.
    """
    return swiglu_act(x @ w1, x @ w3) @ w2


class SwiGLU(TokenwiseLayer):
    """Dense SwiGLU MLP: ``y = W2(silu(W1 x) * W3 x)``.

    Shapes: ``x (B, T, d)`` -> ``(B, T, d)``; hidden ``h = ffn_hidden(d, expand, multiple_of)``
    ``= round_up(int(expand * d), multiple_of)``.
    Parameters: ``3 * d * h`` (+ ``2 * h + d`` with ``bias``).
    Init: W1, W3 normal(0, 0.02); W2 normal(0, out_init_std()) (depth-scaled); biases zero.
    """

    @dataclass
    class Config:
        expand: float = 4.0
        multiple_of: int = 8
        bias: bool = False

    def __init__(self, d_model: int, config: Config | None = None, *, layer_idx: int = 0, n_layers: int = 1):
        super().__init__(d_model, config, layer_idx=layer_idx, n_layers=n_layers)
        cfg = self.config
        self.hidden = ffn_hidden(d_model, cfg.expand, cfg.multiple_of)
        self.w1 = nn.Linear(d_model, self.hidden, bias=cfg.bias)
        self.w3 = nn.Linear(d_model, self.hidden, bias=cfg.bias)
        self.w2 = nn.Linear(self.hidden, d_model, bias=cfg.bias)
        self.reset_parameters()

    @classmethod
    def check_config(cls, d_model: int, config: Config) -> None:
        super().check_config(d_model, config)
        require_positive(config, "expand")
        require_at_least(config, 1, "multiple_of")

    @classmethod
    def param_count(cls, d_model: int, config: Config) -> int:
        h = ffn_hidden(d_model, config.expand, config.multiple_of)
        return 3 * d_model * h + ((2 * h + d_model) if config.bias else 0)

    def reset_parameters(self) -> None:
        for lin, std in ((self.w1, 0.02), (self.w3, 0.02), (self.w2, self.out_init_std())):
            nn.init.normal_(lin.weight, mean=0.0, std=std)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor, ctx: dict | None = None) -> torch.Tensor:
        return self.w2(swiglu_act(self.w1(x), self.w3(x)))
