"""Worst fp32 relative errors (max |got - ref| / max |ref|) of the fast paths against the token-loop oracles.

Ops: RWKV-7 chunked vs naive (output, final state, gradients of r, w, k, v, a, b, h0) and Hyena FFT vs direct
convolution (output, gradients of u, h, skip) over odd lengths. Layers (d_model 128, defaults): naive vs chunked
backends (output and all gradients), and prefill + step vs forward, for R and both H filters.
Run from the repository root: python experiments/hyena_rwkv_cpu/errors.py
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from hybridnas import registry
from layers.ops import dispatch
from layers.ops.hyena import long_conv_fft, long_conv_naive
from layers.ops.rwkv7 import rwkv7_chunked, rwkv7_naive


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def grads(fn, inputs, seed=7):
    xs = [x.clone().requires_grad_(True) for x in inputs]
    out = fn(*xs)
    outs = out if isinstance(out, tuple) else (out,)
    g = torch.Generator().manual_seed(seed)
    sum((o * torch.randn(o.shape, generator=g)).sum() for o in outs).backward()
    return [o.detach() for o in outs] + [x.grad for x in xs]


def rwkv7_inputs(t, b=2, h=2, k=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    kh = F.normalize(rnd(b, t, h, k), dim=-1)
    return [rnd(b, t, h, k), -math.exp(-0.5) * torch.sigmoid(2 * rnd(b, t, h, k)), rnd(b, t, h, k), rnd(b, t, h, k),
            -kh, kh * torch.rand(b, t, h, k, generator=g), rnd(b, h, k, k)]


def main() -> None:
    torch.manual_seed(0)
    worst = 0.0
    for t in (1, 63, 65, 131, 257):
        inputs = rwkv7_inputs(t)
        ref = grads(rwkv7_naive, inputs)
        got = grads(lambda *x: rwkv7_chunked(*x, chunk_size=64), inputs)
        errs = [rel(a, b) for a, b in zip(got, ref)]
        worst = max(worst, *errs)
        print(f"rwkv7 op  T={t:4d}: o {errs[0]:.1e}  state {errs[1]:.1e}  worst grad {max(errs[2:]):.1e}")
    print(f"rwkv7 op worst: {worst:.1e}")
    worst = 0.0
    for length in (1, 101, 1023):
        g = torch.Generator().manual_seed(length)
        inputs = [torch.randn(2, 16, length, generator=g),
                  torch.randn(16, length, generator=g) * torch.exp(-0.01 * torch.arange(length)),
                  torch.randn(16, generator=g)]
        errs = [rel(a, b) for a, b in zip(grads(long_conv_fft, inputs), grads(long_conv_naive, inputs))]
        worst = max(worst, *errs)
        print(f"hyena op  L={length:4d}: y {errs[0]:.1e}  worst grad {max(errs[1:]):.1e}")
    print(f"hyena op worst: {worst:.1e}")

    x = torch.randn(2, 257, 128, generator=torch.Generator().manual_seed(3))
    for sym, params in (("R", {}), ("H", {"filter": "implicit", "l_max": 256}), ("H", {"filter": "modal"})):
        torch.manual_seed(0)
        lay = registry.get(sym).build(128, params)
        res = {}
        for backend in ("naive", "chunked"):
            lay.zero_grad(set_to_none=True)
            xi = x.clone().requires_grad_(True)
            with dispatch.force(backend):
                y = lay(xi, {})
            y.square().sum().backward()
            res[backend] = [y.detach(), xi.grad] + [p.grad.clone() for p in lay.parameters() if p.grad is not None]
        fb = max(rel(a, b) for a, b in zip(res["chunked"], res["naive"]))
        with torch.no_grad():
            ref = lay(x, {})
            y0, s = lay.prefill(x[:, :100], {})
            ys = [y0]
            for t in range(100, x.shape[1]):
                yt, s = lay.step(x[:, t:t + 1], s, {})
                ys.append(yt)
        dec = rel(torch.cat(ys, dim=1), ref)
        print(f"layer {sym} {params or 'defaults'} T=257: chunked vs naive (out + all grads) {fb:.1e}; "
              f"prefill 100 + 157 steps vs forward {dec:.1e}")


if __name__ == "__main__":
    main()
