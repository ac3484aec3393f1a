"""Causal multi-head attention, symbol ``A`` (alias ``*``): GQA, RoPE or NoPE, optional sliding window."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from layers.base import Layer, LayerConfigError, require_at_least, require_positive

# SDPA grew ``enable_gqa`` in torch 2.5; before that the kv heads are repeated explicitly.
_HAS_ENABLE_GQA = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``cos, sin`` of shape ``(T, head_dim // 2)`` for integer ``positions (T,)``."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32)
                                / head_dim))
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """Rotary embedding (rotate-half layout, as Llama/HF) of ``x (..., T, head_dim)`` at ``positions (T,)``.

    Pairs ``(x[i], x[i + head_dim/2])`` rotate by ``pos * theta**(-2i/head_dim)``; computed in fp32 and cast
    back. Scores ``q·k`` then depend only on the position difference.
    """
    half = x.shape[-1] // 2
    cos, sin = rope_cos_sin(positions, x.shape[-1], theta)
    xf = x.float()
    x1, x2 = xf[..., :half], xf[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def attention_mask(q_start: int, n_q: int, k_start: int, n_k: int, window: int | None,
                   device: torch.device | None = None) -> torch.Tensor | None:
    """Boolean ``(n_q, n_k)`` mask (True = attend) for queries at absolute positions ``q_start + i`` over keys at
    ``k_start + j``: causal, and within ``window`` most recent keys (itself included). ``None`` if all True."""
    qpos = torch.arange(q_start, q_start + n_q, device=device)[:, None]
    kpos = torch.arange(k_start, k_start + n_k, device=device)[None, :]
    mask = kpos <= qpos
    if window is not None:
        mask = mask & (qpos - kpos < window)
    return None if bool(mask.all()) else mask


class Attention(Layer):
    """Causal softmax attention with grouped-query heads, RoPE (or NoPE) and an optional sliding window.

    Shapes: ``x (B, T, d)`` -> ``(B, T, d)``; ``H = n_heads``, ``G = n_kv_heads`` (default ``H``; GQA when
    fewer), ``hd = head_dim`` (default ``d // H``). Query head ``i`` reads kv head ``i // (H // G)``.
    Projections: fused ``qkv: d -> (H + 2G) * hd`` and ``out: H * hd -> d`` (no bias).
    Parameters: ``d * (H + 2G) * hd + H * hd * d`` (+ ``(H + 2G) * hd`` with ``qkv_bias``).
    Init: qkv normal(0, 0.02), out normal(0, out_init_std()) (depth-scaled), biases zero.

    Decoding state (``prefill``/``step``): ``{"k", "v": (B, G, S, hd)`` (k after RoPE), ``"pos": int}`` where
    ``S = min(tokens seen, window)``: the cache is trimmed to the window, so its size is bounded by it.
    :meth:`stack_states` makes one ragged state of sequences of different lengths (continuous batching).
    """

    state_grows: ClassVar[bool] = True

    @dataclass
    class Config:
        n_heads: int = 4
        n_kv_heads: int | None = None
        head_dim: int | None = None
        rope: bool = True
        rope_theta: float = 10000.0
        window: int | None = None
        qkv_bias: bool = False

    def __init__(self, d_model: int, config: Config | None = None, *, layer_idx: int = 0, n_layers: int = 1):
        super().__init__(d_model, config, layer_idx=layer_idx, n_layers=n_layers)
        cfg = self.config
        self.n_heads, self.n_kv_heads, self.head_dim = self._dims(d_model, cfg)
        self.qkv = nn.Linear(d_model, (self.n_heads + 2 * self.n_kv_heads) * self.head_dim, bias=cfg.qkv_bias)
        self.out = nn.Linear(self.n_heads * self.head_dim, d_model, bias=False)
        self.reset_parameters()

    @staticmethod
    def _dims(d_model: int, cfg: Config) -> tuple[int, int, int]:
        n_kv = cfg.n_kv_heads if cfg.n_kv_heads is not None else cfg.n_heads
        hd = cfg.head_dim if cfg.head_dim is not None else d_model // cfg.n_heads
        return cfg.n_heads, n_kv, hd

    @classmethod
    def check_config(cls, d_model: int, config: Config) -> None:
        super().check_config(d_model, config)
        require_at_least(config, 1, "n_heads")
        if config.head_dim is None and d_model % config.n_heads:
            raise LayerConfigError("n_heads", f"d_model={d_model} is not divisible by n_heads={config.n_heads} "
                                              "(or set head_dim)")
        if config.head_dim is not None:
            require_at_least(config, 1, "head_dim")
        if config.n_kv_heads is not None:
            require_at_least(config, 1, "n_kv_heads")
            if config.n_heads % config.n_kv_heads:
                raise LayerConfigError("n_kv_heads", f"n_heads={config.n_heads} is not divisible by "
                                                     f"n_kv_heads={config.n_kv_heads}")
        _, _, hd = cls._dims(d_model, config)
        if config.rope and hd % 2:
            raise LayerConfigError("head_dim", f"head_dim={hd} must be even for RoPE (or set rope=False)")
        if config.rope:
            require_positive(config, "rope_theta")
        if config.window is not None and config.window < 1:
            raise LayerConfigError("window", f"window must be >= 1 or None, got {config.window}")

    @classmethod
    def param_count(cls, d_model: int, config: Config) -> int:
        h, g, hd = cls._dims(d_model, config)
        n_qkv = (h + 2 * g) * hd
        return d_model * n_qkv + (n_qkv if config.qkv_bias else 0) + h * hd * d_model

    def reset_parameters(self) -> None:
        nn.init.normal_(self.qkv.weight, mean=0.0, std=0.02)
        if self.qkv.bias is not None:
            nn.init.zeros_(self.qkv.bias)
        nn.init.normal_(self.out.weight, mean=0.0, std=self.out_init_std())

    # -- internals -------------------------------------------------------------------------------------------

    def _heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x (B, T, d)`` -> ``q (B, H, T, hd)``, ``k, v (B, G, T, hd)``, before RoPE."""
        b, t, _ = x.shape
        h, g, hd = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.qkv(x).split((h * hd, g * hd, g * hd), dim=-1)
        return (q.view(b, t, h, hd).transpose(1, 2), k.view(b, t, g, hd).transpose(1, 2),
                v.view(b, t, g, hd).transpose(1, 2))

    def _rope(self, q: torch.Tensor, k: torch.Tensor, pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE on ``q, k (.., T, hd)`` at positions ``pos ..`` (unchanged without ``rope``)."""
        if not self.config.rope:
            return q, k
        positions = torch.arange(pos, pos + q.shape[-2], device=q.device)
        return apply_rope(q, positions, self.config.rope_theta), apply_rope(k, positions, self.config.rope_theta)

    def _project(self, x: torch.Tensor, pos: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x (B, T, d)`` -> ``q (B, H, T, hd)``, ``k, v (B, G, T, hd)``; RoPE at positions ``pos ..``."""
        q, k, v = self._heads(x)
        q, k = self._rope(q, k, pos)
        return q, k, v

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_start: int, k_start: int) -> torch.Tensor:
        """Queries ``(B, H, T, hd)`` at ``q_start ..`` over keys ``(B, G, S, hd)`` at ``k_start ..`` ->
        ``(B, T, H * hd)``."""
        b, _, t, _ = q.shape
        s = k.shape[2]
        kwargs: dict[str, Any] = {}
        if self.n_kv_heads != self.n_heads:
            if _HAS_ENABLE_GQA:
                kwargs["enable_gqa"] = True
            else:
                rep = self.n_heads // self.n_kv_heads
                k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        window = self.config.window
        if t == s and q_start == k_start and (window is None or window >= t):
            y = F.scaled_dot_product_attention(q, k, v, is_causal=t > 1, **kwargs)
        else:
            mask = attention_mask(q_start, t, k_start, s, window, device=q.device)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **kwargs)
        return y.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim)

    def _trim(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.config.window
        if w is not None and k.shape[2] > w:
            k, v = k[:, :, -w:].contiguous(), v[:, :, -w:].contiguous()
        return k, v

    # -- contract --------------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, ctx: dict | None = None) -> torch.Tensor:
        return self.prefill(x, ctx)[0]

    def prefill(self, x: torch.Tensor, ctx: dict | None = None) -> tuple[torch.Tensor, dict]:
        b, t, _ = x.shape
        q, k, v = self._project(x, 0)
        if t == 0:
            y = x.new_zeros(b, 0, self.d_model)
        else:
            y = self.out(self._attend(q, k, v, 0, 0))
        k, v = self._trim(k, v)
        return y, {"k": k, "v": v, "pos": t}

    def step(self, x: torch.Tensor, state: dict, ctx: dict | None = None) -> tuple[torch.Tensor, dict]:
        """Decode ``x (B, T, d)`` (usually ``T = 1``) after the tokens summarised by ``state`` (or a ragged state
        of :meth:`stack_states`: sequences of different lengths in one batch)."""
        if isinstance(state["pos"], list):
            return self._step_ragged(x, state)
        pos = state["pos"]
        q, k_new, v_new = self._project(x, pos)
        k = torch.cat((state["k"], k_new), dim=2)
        v = torch.cat((state["v"], v_new), dim=2)
        t = x.shape[1]
        y = self.out(self._attend(q, k, v, pos, pos + t - k.shape[2]))
        k, v = self._trim(k, v)
        return y, {"k": k, "v": v, "pos": pos + t}

    # -- batches of sequences of different lengths (continuous batching in hybridnas serve) ----------------------

    @staticmethod
    def stack_states(states: list[dict]) -> dict:
        """One ragged state for a batch of one-sequence states of any lengths: ``{"k", "v": [(1, G, S_i, hd)],
        "pos": [int]}``, row ``i`` of the batch is ``states[i]``. :meth:`step` on it runs the projections for the
        whole batch and attends each row to its own cache at its own RoPE positions (no padding, no mask), so each
        row's output is the one-sequence step's."""
        return {"k": [s["k"] for s in states], "v": [s["v"] for s in states], "pos": [s["pos"] for s in states]}

    @staticmethod
    def split_state(state: dict, n: int) -> list[dict]:
        """The ``n`` one-sequence states of a ragged state (the inverse of :meth:`stack_states`)."""
        return [{"k": state["k"][i], "v": state["v"][i], "pos": state["pos"][i]} for i in range(n)]

    def _step_ragged(self, x: torch.Tensor, state: dict) -> tuple[torch.Tensor, dict]:
        t = x.shape[1]
        q, k, v = self._heads(x)
        ys, ks, vs, poss = [], [], [], []
        for i, pos in enumerate(state["pos"]):
            qi, ki = self._rope(q[i:i + 1], k[i:i + 1], pos)
            vi = v[i:i + 1]
            kc = torch.cat((state["k"][i], ki), dim=2)
            vc = torch.cat((state["v"][i], vi), dim=2)
            ys.append(self._attend(qi, kc, vc, pos, pos + t - kc.shape[2]))
            kc, vc = self._trim(kc, vc)
            ks.append(kc)
            vs.append(vc)
            poss.append(pos + t)
        return self.out(torch.cat(ys, dim=0)), {"k": ks, "v": vs, "pos": poss}

    def state_size(self, batch: int, seq_len: int, dtype: torch.dtype = torch.float32) -> int:
        """Bytes of the KV cache: ``2 * batch * G * min(seq_len, window) * hd * element_size``."""
        s = seq_len if self.config.window is None else min(seq_len, self.config.window)
        elt = torch.empty((), dtype=dtype).element_size()
        return 2 * batch * self.n_kv_heads * s * self.head_dim * elt
