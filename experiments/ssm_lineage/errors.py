"""Worst errors of the SSM-lineage fast paths against their oracles, fp32, at the benchmark's shapes and smaller.

    python experiments/ssm_lineage/errors.py > experiments/ssm_lineage/errors.txt

For each case: the output, the final state and every input's gradient of ``sum(y * w)`` (w fixed random), as
``max|fast - oracle| / max|oracle|`` (relative to the tensor's scale), fast path against the fp32 oracle; the
float64 oracle is the reference both are compared with, so the line shows the oracle's own fp32 error beside it.
"""

from __future__ import annotations

import torch

from layers.ops.s4_kernel import s4d_conv, s4d_init
from layers.ops.selective_scan import selective_scan


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = torch.view_as_real(a) if a.is_complex() else a, torch.view_as_real(b) if b.is_complex() else b
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def run(fn, inputs, backend, dtype):
    xs = [x.detach().to(dtype).requires_grad_() for x in inputs]
    y, state = fn(*xs, backend=backend)
    w = torch.Generator().manual_seed(1)
    weight = torch.randn(y.shape, generator=w, dtype=torch.float64).to(y.dtype)
    (y * weight).sum().backward()
    return y.detach(), (state.detach() if state is not None else None), [x.grad for x in xs]


def report(name, fn, inputs, names):
    ref = run(fn, inputs, "naive", torch.float64)
    worst = {}
    for backend in ("chunked", "naive"):
        y, s, gs = run(fn, inputs, backend, torch.float32)
        errs = {"y": rel(y, ref[0])}
        if s is not None:
            errs["state"] = rel(s, ref[1])
        for n, g, gr in zip(names, gs, ref[2], strict=True):
            errs["d" + n] = rel(g, gr)
        worst[backend] = errs
    keys = list(worst["chunked"])
    print(f"{name}:")
    print("   " + "  ".join(f"{k:>9}" for k in keys))
    for backend in ("chunked", "naive"):
        print("   " + "  ".join(f"{worst[backend][k]:9.1e}" for k in keys) + f"   {backend} fp32 vs float64 oracle")


def scan_inputs(b, t, d, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(b, t, d, generator=g)
    delta = torch.nn.functional.softplus(torch.randn(b, t, d, generator=g) - 3)
    A = -torch.arange(1, n + 1, dtype=torch.float32).repeat(d, 1)
    return [u, delta, A, torch.randn(b, t, n, generator=g), torch.randn(b, t, n, generator=g)]


def s4_inputs(t, h, m, seed=0):
    g = torch.Generator().manual_seed(seed)
    re, im = s4d_init("lin", 2 * m)
    return [torch.randn(1, t, h, generator=g), torch.full((h,), 0.01), re.repeat(h, 1), im.repeat(h, 1),
            torch.randn(h, m, generator=g), torch.randn(h, m, generator=g)]


def s4(u, dt, ar, ai, cr, ci, backend):
    return s4d_conv(u, dt, torch.complex(ar, ai), torch.complex(cr, ci), backend=backend)


def main() -> None:
    torch.set_num_threads(2)
    print(f"# torch {torch.__version__}")
    for shape in ((2, 100, 32, 8), (8, 1024, 256, 16)):
        report(f"selective_scan B{shape[0]} T{shape[1]} D{shape[2]} N{shape[3]}",
               lambda *a, backend: selective_scan(*a, backend=backend), scan_inputs(*shape),
               ["u", "delta", "A", "B", "C"])
    for t in (300, 4096):
        report(f"s4d T{t} H128 N64", s4, s4_inputs(t, 128, 32), ["u", "dt", "A_re", "A_im", "C_re", "C_im"])


if __name__ == "__main__":
    main()
