"""Hyena long convolution by FFT of size ``2L`` (the CPU/fallback path; "chunked" in dispatch terms).

Zero-padding both signals to ``2L`` makes the circular convolution equal the linear (causal) one on the first
``L`` outputs. Same signature and result as :func:`layers.ops.hyena.naive.long_conv_naive`; fp32 inside.
Cost ``O(B C L log L)``.
"""

from __future__ import annotations

import torch


def long_conv_fft(u: torch.Tensor, h: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    length = u.shape[-1]
    n = 2 * length
    uf = u.float()
    spec = torch.fft.rfft(uf, n=n) * torch.fft.rfft(h[..., :length].float(), n=n)
    y = torch.fft.irfft(spec, n=n)[..., :length]
    return (y + skip.float()[:, None] * uf).to(u.dtype)
