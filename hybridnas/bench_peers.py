"""Outside GPU kernels as ``hybridnas bench`` peers: optional imports, never requirements.

Each peer is a small module at the shapes of the layer it stands in for (read from that layer's config, so
``--params`` apply): an input projection, the outside kernel, an output projection. Op-level peers time the
kernel plus two matmuls, not a full layer (no conv, gate or norm); compare them with each other and with our
``triton`` backend at the same shapes, not as layer-for-layer equivalents.

| peer | stands in for | outside code |
|---|---|---|
| ``fla-simple-gla`` | ``M`` (scalar-decay scan) | flash-linear-attention ``fla.ops.simple_gla.chunk_simple_gla`` |
| ``fla-rwkv7`` | ``R`` | flash-linear-attention ``fla.ops.rwkv7.chunk_rwkv7`` |
| ``mamba-ssm-ssd`` | ``M`` (Mamba-2 SSD) | mamba_ssm ``mamba_chunk_scan_combined`` |
| ``mamba-ssm-mamba3`` | ``M`` (Mamba-3, SISO kernels; MIMO needs TileLang) | mamba_ssm ``modules.mamba3.Mamba3`` |
| ``sdpa`` | ``A`` (the quadratic baseline) | PyTorch SDPA, flash backend only, causal |

All of them need CUDA (the flash backend also fp16 or bf16); elsewhere a peer's row says so instead of timing.
A missing package is reported as "not installed" by :mod:`hybridnas.bench` before anything is built.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class PeerUnavailable(RuntimeError):
    pass


def _config(symbol: str, params: dict[str, Any]) -> Any:
    from hybridnas import registry

    return registry.get(symbol).make_config(params)


class _OpPeer(nn.Module):
    """``x (B, T, d_model)`` -> in_proj -> split into ``sizes`` -> ``fn(*parts)`` -> out_proj -> ``(B, T, d_model)``."""

    def __init__(self, d_model: int, sizes: list[int], d_out: int, fn: Callable[..., torch.Tensor]):
        super().__init__()
        self.sizes, self.fn = sizes, fn
        self.in_proj = nn.Linear(d_model, sum(sizes), bias=False)
        self.out_proj = nn.Linear(d_out, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cuda":
            raise PeerUnavailable(f"needs CUDA (tensors are on {x.device})")
        parts = self.in_proj(x).split(self.sizes, dim=-1)
        y = self.fn(*parts)
        return self.out_proj(y.reshape(*x.shape[:2], -1))


def _mamba_dims(d_model: int, params: dict[str, Any]) -> tuple[int, int, int]:
    c = _config("M", params)
    d_inner = int(c.expand * d_model)
    return d_inner // c.headdim, c.headdim, c.d_state  # H, P, N


def fla_simple_gla(d_model: int, params: dict[str, Any]) -> nn.Module:
    from fla.ops.simple_gla import chunk_simple_gla

    h, p, n = _mamba_dims(d_model, params)

    def fn(q, k, v, g):
        bsz, t = q.shape[:2]
        g = -F.softplus(g.float())  # log-decay <= 0, as Δ·A
        o, _ = chunk_simple_gla(q.view(bsz, t, h, n), k.view(bsz, t, h, n), v.view(bsz, t, h, p), g, scale=1.0)
        return o

    return _OpPeer(d_model, [h * n, h * n, h * p, h], h * p, fn)


def mamba_ssm_ssd(d_model: int, params: dict[str, Any]) -> nn.Module:
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    h, p, n = _mamba_dims(d_model, params)
    chunk = _config("M", params).chunk_size or 64

    class Peer(_OpPeer):
        def __init__(self):
            super().__init__(d_model, [h * p, h, n, n], h * p, self._fn)
            self.A_log = nn.Parameter(torch.log(torch.linspace(1.0, 16.0, h)))

        def _fn(self, xs, dt, b, c):
            bsz, t = xs.shape[:2]
            return mamba_chunk_scan_combined(xs.view(bsz, t, h, p), F.softplus(dt), -torch.exp(self.A_log.float()),
                                             b.view(bsz, t, 1, n), c.view(bsz, t, 1, n), chunk)

    return Peer()


def mamba_ssm_mamba3(d_model: int, params: dict[str, Any]) -> nn.Module:
    from mamba_ssm.modules.mamba3 import Mamba3

    c = _config("M", params)
    if c.variant != "mamba3":
        raise PeerUnavailable("mamba-ssm-mamba3 implements only variant mamba3")
    r = c.mimo_rank
    kwargs: dict[str, Any] = {"d_state": c.d_state, "expand": c.expand, "headdim": c.headdim,
                              "rope_fraction": c.rope_fraction, "is_mimo": r > 1}
    if r > 1:
        kwargs["mimo_rank"] = r
    if c.chunk_size:
        kwargs["chunk_size"] = c.chunk_size
    inner = Mamba3(d_model, **kwargs)

    class Peer(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.device.type != "cuda":
                raise PeerUnavailable(f"needs CUDA (tensors are on {x.device})")
            return self.inner(x)

    return Peer()


def fla_rwkv7(d_model: int, params: dict[str, Any]) -> nn.Module:
    from fla.ops.rwkv7 import chunk_rwkv7

    hs = _config("R", params).head_size
    h = d_model // hs

    def fn(r, w, k, v, a):
        bsz, t = r.shape[:2]
        shape = (bsz, t, h, hs)
        w = -F.softplus(w.float()) - 0.5  # log-decay
        kk = F.normalize(k.view(shape).float(), dim=-1).to(k.dtype)
        iclr = torch.sigmoid(a).view(shape)
        o, _ = chunk_rwkv7(r.view(shape), w.view(shape), k.view(shape), v.view(shape), -kk, kk * iclr,
                           scale=1.0, output_final_state=False)
        return o

    return _OpPeer(d_model, [d_model] * 5, d_model, fn)


def sdpa_flash(d_model: int, params: dict[str, Any]) -> nn.Module:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    c = _config("A", params)
    h = c.n_heads
    hd = c.head_dim or d_model // h

    def fn(q, k, v):
        if q.dtype not in (torch.float16, torch.bfloat16):
            raise PeerUnavailable(f"the flash backend needs fp16 or bf16, not {q.dtype} (use --dtype bf16)")
        bsz, t = q.shape[:2]
        q, k, v = (z.view(bsz, t, h, hd).transpose(1, 2) for z in (q, k, v))
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1 / math.sqrt(hd))
        return o.transpose(1, 2)

    return _OpPeer(d_model, [h * hd] * 3, h * hd, fn)


#: peer name -> (symbol it stands in for, importable top-level module, factory(d_model, params) -> module)
PEERS: dict[str, tuple[str, str, Callable[[int, dict[str, Any]], nn.Module]]] = {
    "fla-simple-gla": ("M", "fla", fla_simple_gla),
    "fla-rwkv7": ("R", "fla", fla_rwkv7),
    "mamba-ssm-ssd": ("M", "mamba_ssm", mamba_ssm_ssd),
    "mamba-ssm-mamba3": ("M", "mamba_ssm", mamba_ssm_mamba3),
    "sdpa": ("A", "torch", sdpa_flash),
}
