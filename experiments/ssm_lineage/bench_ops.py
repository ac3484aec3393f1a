"""The SSM-lineage ops' fast paths against their oracles, forward + backward, timed in interleaved rounds.

    python experiments/ssm_lineage/bench_ops.py [--rounds 5] [--threads 2]

- Mamba-1's selective scan: ``chunked`` (the blocked scan with every gradient by hand) against ``naive`` (token loop
  with plain indexing) at batch 8, length 1024, d_model 128 (d_inner 256), N 16: the issue's shape and target
  (>= 15x). ``seq`` (the plain sequential scan over unbound slices with a reverse-loop backward, the best loop of
  ``ssm_lineage.md`` §9.2) is timed beside them: the target asks the fast path to be within 2x of the best
  sequential form.
- S4D: ``chunked`` (FFT convolution with the Vandermonde kernel) against ``naive`` (the recurrence) at length 4096
  (batch 1, 128 channels, 32 stored modes = N 64): target >= 50x.

Each round times every path once (the order alternates), the medians are reported, with ``uptime`` before and after.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time

import torch

from hybridnas.runtime import tune_malloc
from layers.ops.s4_kernel import s4d_conv, s4d_init
from layers.ops.selective_scan import selective_scan, selective_scan_seq


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def scan_inputs(b=8, t=1024, d=256, n=16):
    g = torch.Generator().manual_seed(0)
    u = torch.randn(b, t, d, generator=g, requires_grad=True)
    delta = torch.nn.functional.softplus(torch.randn(b, t, d, generator=g) - 3).requires_grad_()
    A = (-torch.arange(1, n + 1, dtype=torch.float32)).repeat(d, 1).requires_grad_()
    B = torch.randn(b, t, n, generator=g, requires_grad=True)
    C = torch.randn(b, t, n, generator=g, requires_grad=True)
    return u, delta, A, B, C


def s4_inputs(b=1, t=4096, h=128, m=32):
    g = torch.Generator().manual_seed(0)
    u = torch.randn(b, t, h, generator=g, requires_grad=True)
    re, im = s4d_init("lin", 2 * m)
    a_re = re.repeat(h, 1).requires_grad_()
    a_im = im.repeat(h, 1).requires_grad_()
    c_re = torch.randn(h, m, generator=g, requires_grad=True)
    c_im = torch.randn(h, m, generator=g, requires_grad=True)
    dt = torch.full((h,), 0.01, requires_grad=True)
    return u, dt, a_re, a_im, c_re, c_im


def fwd_bwd(fn, inputs) -> float:
    for x in inputs:
        x.grad = None
    t0 = time.perf_counter()
    y, _ = fn(*inputs)
    y.float().pow(2).mean().backward()
    return time.perf_counter() - t0


def compare(name: str, make, call, rounds: int, extra: dict | None = None) -> None:
    """``call(*inputs, backend=...)`` for ``naive`` and ``chunked``, and each ``extra`` path (name -> function of the
    inputs), timed once per round in alternating order."""
    inputs = make()
    paths = {"naive": lambda *a: call(*a, backend="naive"), "chunked": lambda *a: call(*a, backend="chunked")}
    paths.update(extra or {})
    times: dict[str, list[float]] = {k: [] for k in paths}
    for key in paths:
        if key != "naive":
            fwd_bwd(paths[key], inputs)  # warm-up
    for r in range(rounds):
        order = list(paths) if r % 2 == 0 else list(paths)[::-1]
        for key in order:
            times[key].append(fwd_bwd(paths[key], inputs))
    med = {k: statistics.median(v) for k, v in times.items()}
    extras = "".join(f", {k} {med[k] * 1e3:.1f} ms (chunked {med[k] / med['chunked']:.2f}x faster)"
                     for k in extra or {})
    print(f"{name}: naive {med['naive'] * 1e3:.1f} ms, chunked {med['chunked'] * 1e3:.1f} ms, "
          f"speed-up {med['naive'] / med['chunked']:.1f}x{extras} (medians of {rounds} interleaved rounds, fwd+bwd)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--system-malloc", action="store_true",
                    help="leave glibc malloc as it is (hybridnas commands tune it)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not args.system_malloc:
        tune_malloc()  # as every hybridnas command does first (hybridnas/runtime.py)
    print(f"# torch {torch.__version__}, {args.threads} threads; uptime before: {uptime()}")
    compare("selective_scan B8 T1024 D256 (d_model 128) N16", scan_inputs,
            lambda u, d, A, B, C, backend: selective_scan(u, d, A, B, C, backend=backend), args.rounds,
            extra={"seq": selective_scan_seq})
    compare("s4d B1 T4096 H128 N64 (32 modes)", s4_inputs,
            lambda u, dt, ar, ai, cr, ci, backend: s4d_conv(u, dt, torch.complex(ar, ai), torch.complex(cr, ci),
                                                            backend=backend), args.rounds)
    compare("s4d B1 T4096 H128 N64, no final state (the layer's training forward)", s4_inputs,
            lambda u, dt, ar, ai, cr, ci, backend: s4d_conv(u, dt, torch.complex(ar, ai), torch.complex(cr, ci),
                                                            want_state=False, backend=backend), args.rounds)
    print(f"# uptime after: {uptime()}")


if __name__ == "__main__":
    main()
