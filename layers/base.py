"""The layer contract every registered mixer and FFN follows.

A layer is an ``nn.Module`` built from ``d_model`` and its own config dataclass (``cls.Config``). Every
field of ``Config`` is a per-symbol parameter a search space may set (``A.n_heads``, ``E.n_experts``).

Contract (checked by :mod:`layers.contract`: the methods when a class is registered, the behaviour by
``layers.registry.check_layer`` for every registry entry in the tests and for custom symbols in ``validate``):

- ``forward(x, ctx)``: ``x`` is ``(batch, seq, d_model)``; returns the same shape. The training path.
- ``prefill(x, ctx) -> (y, state)`` and ``step(x_t, state, ctx) -> (y_t, state)`` with ``x_t`` of shape
  ``(batch, 1, d_model)``: ``step`` after ``prefill`` equals ``forward`` on the whole sequence.
- ``state_size(batch, seq_len, dtype)``: bytes of decoding state after ``seq_len`` tokens.
- ``param_count(d_model, config)``: exact parameter count from the formula, without building the module.
- ``reset_parameters()``: the layer's own initialization. ``HybridLM`` calls it and never re-initializes a
  layer's weights itself (the model-level-init bug of MAD and Zoology).
- ``aux_loss()``: an auxiliary loss from the last ``forward`` (MoE load balancing), or ``None``.
- ``check_config(d_model, config)``: raises :class:`LayerConfigError` naming the field for an impossible
  combination (e.g. ``d_model`` not divisible by ``n_heads``), so a search space is rejected before training.

``ctx`` is a dict shared by all layers of one model call; layers may read or write keys in it (RWKV-7
passes its first layer's value along this way). Layers that ignore it accept it and do nothing.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any, ClassVar

import torch
from torch import nn


class LayerConfigError(ValueError):
    """An impossible layer configuration; ``field`` names the offending parameter (or ``d_model``)."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(message)


def require_at_least(config: Any, low: int, *names: str) -> None:
    """:class:`LayerConfigError` for the first of ``names`` whose value in ``config`` is below ``low``."""
    for name in names:
        value = getattr(config, name)
        if value < low:
            raise LayerConfigError(name, f"{name} must be >= {low}, got {value}")


def require_positive(config: Any, *names: str) -> None:
    """:class:`LayerConfigError` for the first of ``names`` whose value in ``config`` is not ``> 0`` (NaN included)."""
    for name in names:
        value = getattr(config, name)
        if not value > 0:
            raise LayerConfigError(name, f"{name} must be positive, got {value}")


class Layer(nn.Module):
    """Base class of every registered layer. Subclasses set ``Config`` (a dataclass) and ``kind``."""

    Config: ClassVar[type]
    kind: ClassVar[str] = "mixer"  # "mixer" or "ffn"
    #: True when the decoding state grows with the sequence (a KV cache); False for fixed-size states.
    state_grows: ClassVar[bool] = False

    def __init__(self, d_model: int, config: Any = None, *, layer_idx: int = 0, n_layers: int = 1):
        super().__init__()
        self.d_model = d_model
        self.config = config if config is not None else self.Config()
        self.layer_idx = layer_idx
        self.n_layers = n_layers
        self.check_config(d_model, self.config)

    @classmethod
    def check_config(cls, d_model: int, config: Any) -> None:
        """Raise :class:`LayerConfigError` for an impossible configuration."""
        if d_model < 1:
            raise LayerConfigError("d_model", f"d_model must be positive, got {d_model}")

    @classmethod
    def param_count(cls, d_model: int, config: Any) -> int:
        raise NotImplementedError

    @classmethod
    def config_fields(cls) -> list[str]:
        return [f.name for f in fields(cls.Config)]

    def reset_parameters(self) -> None:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, ctx: dict | None = None) -> torch.Tensor:
        raise NotImplementedError

    def prefill(self, x: torch.Tensor, ctx: dict | None = None) -> tuple[torch.Tensor, Any]:
        raise NotImplementedError

    def step(self, x: torch.Tensor, state: Any, ctx: dict | None = None) -> tuple[torch.Tensor, Any]:
        raise NotImplementedError

    def state_size(self, batch: int, seq_len: int, dtype: torch.dtype = torch.float32) -> int:
        raise NotImplementedError

    def aux_loss(self) -> torch.Tensor | None:
        return None

    def out_init_std(self, base_std: float = 0.02) -> float:
        """Std for a residual-branch output projection: scaled by depth as in GPT-2 / Megatron."""
        return base_std / (2 * max(self.n_layers, 1)) ** 0.5


class TokenwiseLayer(Layer):
    """A layer that mixes no information across positions (MLP, MoE): no decoding state."""

    kind: ClassVar[str] = "ffn"

    def prefill(self, x: torch.Tensor, ctx: dict | None = None) -> tuple[torch.Tensor, Any]:
        return self.forward(x, ctx), None

    def step(self, x: torch.Tensor, state: Any, ctx: dict | None = None) -> tuple[torch.Tensor, Any]:
        return self.forward(x, ctx), None

    def state_size(self, batch: int, seq_len: int, dtype: torch.dtype = torch.float32) -> int:
        return 0
