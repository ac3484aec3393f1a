"""HybridLM: embedding -> pre-norm residual blocks from the pattern -> RMSNorm -> tied LM head.

Each pattern symbol is one block ``x = x + layer(norm(x))`` (Megatron-LM / Nemotron-H / MAD convention).

Parameter count (exact, see :meth:`HybridLM.param_count`):
    vocab*d (embedding) + sum(layer formulas) + (n_layers + 1)*d (norms) + [vocab*d if the head is untied]

Initialization: the model initializes only what it owns (embedding, untied head, norms) and then asks every
layer to run its own ``reset_parameters``; it never walks all modules re-initializing ``nn.Linear`` weights,
which is how MAD and Zoology lost Mamba's dt-bias and A init.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hybridnas import patterns, registry
from hybridnas.schema import ModelConfig
from layers.norm import RMSNorm


class Block(nn.Module):
    """Pre-norm residual block around one registered layer."""

    def __init__(self, d_model: int, layer: nn.Module, eps: float):
        super().__init__()
        self.norm = RMSNorm(d_model, eps)
        self.layer = layer

    def forward(self, x: torch.Tensor, ctx: dict) -> torch.Tensor:
        return x + self.layer(self.norm(x), ctx)

    def prefill(self, x: torch.Tensor, ctx: dict) -> tuple[torch.Tensor, Any]:
        y, state = self.layer.prefill(self.norm(x), ctx)
        return x + y, state

    def step(self, x: torch.Tensor, state: Any, ctx: dict) -> tuple[torch.Tensor, Any]:
        y, state = self.layer.step(self.norm(x), state, ctx)
        return x + y, state


def _layer_params(cfg: ModelConfig) -> dict[str, dict[str, Any]]:
    merged: dict[str, dict[str, Any]] = {}
    for sym, params in (cfg.layers or {}).items():
        merged.setdefault(registry.primary(sym), {}).update(params or {})
    return merged


class HybridLM(nn.Module):
    """A language model whose blocks are given by ``cfg.pattern``. Inputs ``(B, T)`` int64; logits ``(B, T, V)``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.symbols = patterns.layer_symbols(cfg.pattern)
        params = _layer_params(cfg)
        n = len(self.symbols)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(
            Block(cfg.d_model, registry.get(sym).build(cfg.d_model, params.get(sym), layer_idx=i, n_layers=n),
                  cfg.norm_eps)
            for i, sym in enumerate(self.symbols))
        self.norm_f = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.init_weights()

    def init_weights(self) -> None:
        nn.init.normal_(self.embed.weight, std=self.cfg.init_std)
        if self.lm_head is not None:
            nn.init.normal_(self.lm_head.weight, std=self.cfg.init_std)
        self.norm_f.reset_parameters()
        for block in self.blocks:
            block.norm.reset_parameters()
            block.layer.reset_parameters()

    # ------------------------------------------------------------------ sizes

    @staticmethod
    def param_count(cfg: ModelConfig) -> int:
        """Exact parameter count from the layers' formulas, without building the model."""
        params = _layer_params(cfg)
        n = 0
        for sym in patterns.layer_symbols(cfg.pattern):
            n += registry.get(sym).param_count(cfg.d_model, params.get(sym))
        n += cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2)
        n += (len(patterns.layer_symbols(cfg.pattern)) + 1) * cfg.d_model
        return n

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def state_size(self, batch: int, seq_len: int, dtype: torch.dtype = torch.float32) -> int:
        """Decoding state bytes after ``seq_len`` tokens (KV caches grow; SSM states do not)."""
        return sum(b.layer.state_size(batch, seq_len, dtype) for b in self.blocks)

    # ------------------------------------------------------------------ training path

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm_f(x)
        weight = self.embed.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(x, weight)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        ctx: dict = {}
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x, ctx)
        return self._head(x)

    def aux_loss(self) -> torch.Tensor | None:
        """Sum of the layers' auxiliary losses from the last forward (MoE load balancing), or None."""
        total = None
        for block in self.blocks:
            a = block.layer.aux_loss()
            if a is not None:
                total = a if total is None else total + a
        return total

    # ------------------------------------------------------------------ decoding

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, list[Any]]:
        """Run the prompt; return logits ``(B, T, V)`` and the per-layer decoding state."""
        ctx: dict = {}
        x = self.embed(input_ids)
        states = []
        for block in self.blocks:
            x, s = block.prefill(x, ctx)
            states.append(s)
        return self._head(x), states

    @torch.no_grad()
    def step(self, token_ids: torch.Tensor, states: list[Any]) -> tuple[torch.Tensor, list[Any]]:
        """One token per sequence (``(B,)`` or ``(B, 1)``); returns logits ``(B, V)`` and the new state."""
        if token_ids.dim() == 1:
            token_ids = token_ids[:, None]
        ctx: dict = {}
        x = self.embed(token_ids)
        new_states = []
        for block, s in zip(self.blocks, states, strict=True):
            x, s = block.step(x, s, ctx)
            new_states.append(s)
        return self._head(x)[:, -1], new_states

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                 top_k: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Prefill the prompt, then decode ``max_new_tokens`` through ``step``; greedy when temperature is 0."""
        was_training = self.training
        self.eval()
        logits, states = self.prefill(input_ids)
        next_logits = logits[:, -1]
        out = [input_ids]
        for _ in range(max_new_tokens):
            if temperature <= 0:
                tok = next_logits.argmax(-1)
            else:
                scaled = next_logits / temperature
                if top_k is not None:
                    kth = torch.topk(scaled, min(top_k, scaled.size(-1))).values[:, -1:]
                    scaled = scaled.masked_fill(scaled < kth, float("-inf"))
                tok = torch.multinomial(F.softmax(scaled.float(), -1), 1, generator=generator)[:, 0]
            out.append(tok[:, None])
            next_logits, states = self.step(tok, states)
        self.train(was_training)
        return torch.cat(out, dim=1)
