"""Mixture-of-experts SwiGLU FFN (Mixtral / Jamba style), symbol ``E``.

Routing: ``p = softmax(W_g x)`` in fp32 over all experts, keep the top-k; Mixtral renormalises the kept
weights to sum to one (``renormalize=True``), HF Jamba does not (``renormalize=False``).

Dispatch sorts the ``N * k`` (token, expert) assignments by expert so each expert runs its SwiGLU once on a
contiguous slice holding only its tokens; the weighted results are scatter-added back to their tokens. The
work is therefore ``k`` expert-MLPs per token, not ``n_experts``.

Load balancing (Switch-style, as HF ``load_balancing_loss_func``, computed per layer over this call's tokens)::

    f[j, e] = mean_T 1[j-th choice of token == e]        (k, E)
    P̄[e]    = mean_T p[:, e]                             (E,)
    L_aux   = E * sum_{j,e} f[j, e] * P̄[e]               (= k at perfect balance)
    L_z     = mean_T logsumexp(logits) ** 2               (router z-loss)
    aux     = aux_loss_coef * L_aux + z_loss_coef * L_z
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from layers.base import LayerConfigError, TokenwiseLayer, require_at_least, require_positive
from layers.ffn import ffn_hidden, swiglu


def route(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Router probabilities and top-k choice. ``logits (N, E)`` fp32 -> ``probs (N, E)``, ``weights (N, k)``,
    ``experts (N, k)`` (int64), choices ordered by decreasing probability."""
    probs = torch.softmax(logits, dim=-1)
    weights, experts = probs.topk(top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return probs, weights, experts


def load_balancing_loss(probs: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """Switch-style ``E * sum_{j,e} f[j,e] * mean_T(p)[e]``; ``probs (N, E)``, ``experts (N, k)`` -> scalar."""
    n_experts = probs.shape[-1]
    f = F.one_hot(experts, n_experts).to(probs.dtype).mean(dim=0)  # (k, E), no gradient (a count)
    p_mean = probs.mean(dim=0)  # (E,)
    return n_experts * (f * p_mean.unsqueeze(0)).sum()


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Router z-loss ``mean_T logsumexp(logits)^2`` (ST-MoE), ``logits (N, E)`` -> scalar."""
    return torch.logsumexp(logits, dim=-1).square().mean()


class MoE(TokenwiseLayer):
    """Top-k routed mixture of SwiGLU experts.

    Shapes: ``x (B, T, d)`` -> ``(B, T, d)``. Router ``W_g: d -> E`` (no bias), experts stored stacked:
    ``w1, w3 (E, d, h)`` and ``w2 (E, h, d)`` with ``h = round_up(int(expand * d), multiple_of)``.
    Parameters: ``E * d + 3 * E * d * h``.
    Init: router and w1, w3 normal(0, 0.02); w2 normal(0, out_init_std()) (depth-scaled).

    ``aux_loss()`` returns ``aux_loss_coef * L_aux + z_loss_coef * L_z`` from the last forward (a tensor in
    the autograd graph), or ``None`` when both coefficients are zero. ``jitter`` multiplies the router input
    by ``U(1 - jitter, 1 + jitter)`` in training mode only (the experts see the clean input).
    """

    @dataclass
    class Config:
        n_experts: int = 8
        top_k: int = 2
        expand: float = 2.0
        multiple_of: int = 8
        aux_loss_coef: float = 0.01
        z_loss_coef: float = 0.0
        renormalize: bool = True
        jitter: float = 0.0

    def __init__(self, d_model: int, config: Config | None = None, *, layer_idx: int = 0, n_layers: int = 1):
        super().__init__(d_model, config, layer_idx=layer_idx, n_layers=n_layers)
        cfg = self.config
        self.n_experts = cfg.n_experts
        self.top_k = cfg.top_k
        self.hidden = ffn_hidden(d_model, cfg.expand, cfg.multiple_of)
        self.router = nn.Linear(d_model, cfg.n_experts, bias=False)
        self.w1 = nn.Parameter(torch.empty(cfg.n_experts, d_model, self.hidden))
        self.w3 = nn.Parameter(torch.empty(cfg.n_experts, d_model, self.hidden))
        self.w2 = nn.Parameter(torch.empty(cfg.n_experts, self.hidden, d_model))
        self._aux: torch.Tensor | None = None
        #: tokens routed to each expert (all k choices) in the last forward, for logging; ``(E,)`` int64.
        self.last_tokens_per_expert: torch.Tensor | None = None
        self.reset_parameters()

    @classmethod
    def check_config(cls, d_model: int, config: Config) -> None:
        super().check_config(d_model, config)
        require_at_least(config, 1, "n_experts")
        if not 1 <= config.top_k <= config.n_experts:
            raise LayerConfigError("top_k", f"top_k must be in [1, n_experts={config.n_experts}], got {config.top_k}")
        require_positive(config, "expand")
        require_at_least(config, 1, "multiple_of")
        require_at_least(config, 0, "aux_loss_coef", "z_loss_coef")
        if not 0 <= config.jitter < 1:
            raise LayerConfigError("jitter", f"jitter must be in [0, 1), got {config.jitter}")

    @classmethod
    def param_count(cls, d_model: int, config: Config) -> int:
        h = ffn_hidden(d_model, config.expand, config.multiple_of)
        return config.n_experts * d_model + 3 * config.n_experts * d_model * h

    def reset_parameters(self) -> None:
        nn.init.normal_(self.router.weight, mean=0.0, std=0.02)
        nn.init.normal_(self.w1, mean=0.0, std=0.02)
        nn.init.normal_(self.w3, mean=0.0, std=0.02)
        nn.init.normal_(self.w2, mean=0.0, std=self.out_init_std())

    def router_logits(self, xf: torch.Tensor) -> torch.Tensor:
        """``xf (N, d)`` -> fp32 logits ``(N, E)``; jitter applied in training mode only."""
        xr = xf.float()
        if self.training and self.config.jitter > 0:
            j = self.config.jitter
            xr = xr * torch.empty_like(xr).uniform_(1.0 - j, 1.0 + j)
        return F.linear(xr, self.router.weight.float())

    def forward(self, x: torch.Tensor, ctx: dict | None = None) -> torch.Tensor:
        shape = x.shape
        xf = x.reshape(-1, self.d_model)
        n_tok = xf.shape[0]
        if n_tok == 0:
            self._aux = None
            return x.new_zeros(shape)
        logits = self.router_logits(xf)
        probs, weights, experts = route(logits, self.top_k, self.config.renormalize)
        self._set_aux(logits, probs, experts)

        # Sort the N*k assignments by expert; each expert's tokens are then one contiguous slice.
        flat_e = experts.reshape(-1)
        order = torch.argsort(flat_e, stable=True)
        token_idx = order // self.top_k
        counts = torch.bincount(flat_e, minlength=self.n_experts)
        self.last_tokens_per_expert = counts.detach()
        x_sorted = xf.index_select(0, token_idx)
        w_sorted = weights.reshape(-1).index_select(0, order).to(x.dtype)
        outs = []
        # The slice sizes must be known on the host (one sync per layer); empty experts are skipped.
        start = 0
        for e, n in enumerate(counts.tolist()):
            if n > 0:
                outs.append(swiglu(x_sorted[start:start + n], self.w1[e], self.w3[e], self.w2[e]))
            start += n
        y_sorted = torch.cat(outs, dim=0) * w_sorted.unsqueeze(-1)
        out = torch.zeros_like(xf).index_add_(0, token_idx, y_sorted)
        return out.reshape(shape)

    def _set_aux(self, logits: torch.Tensor, probs: torch.Tensor, experts: torch.Tensor) -> None:
        cfg = self.config
        aux = None
        if cfg.aux_loss_coef > 0:
            aux = cfg.aux_loss_coef * load_balancing_loss(probs, experts)
        if cfg.z_loss_coef > 0:
            zl = cfg.z_loss_coef * z_loss(logits)
            aux = zl if aux is None else aux + zl
        self._aux = aux

    def aux_loss(self) -> torch.Tensor | None:
        return self._aux

