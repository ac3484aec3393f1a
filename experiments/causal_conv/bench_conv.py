"""Eager Mamba-2 (and Mamba-1) layer forward+backward on CPU with the old conv path against ``causal_conv1d``'s
chunked path, interleaved: issue 15's shape (batch 8, length 1024, d_model 128, d_state 32, headdim 32, chunk 64),
the ``chunked`` backend for the scan in both. "old" swaps the layer's conv for the naive backend, which is exactly
what the layer ran before (cat of the state and the transposed input, ``F.conv1d(groups=C)``, SiLU, transpose).

    python experiments/causal_conv/bench_conv.py [--rounds 7] [--passes 5] [--threads 2] [--variant mamba2]
                                                 [--clock wall|cpu]

Each round times old and new back to back (median of ``--passes`` calls), the order alternating between rounds;
prints each round, the median over rounds of each and of the per-round ratio new / old, and the load average.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import layers.mamba as mamba_mod
from hybridnas import runtime
from layers.mamba import Mamba
from layers.ops.causal_conv1d import causal_conv1d, causal_conv1d_naive

CLOCK = time.perf_counter


def old_conv(x, weight, bias=None, state=None, *, activation="silu", backend=None):
    return causal_conv1d_naive(x, weight, bias, state, activation=activation)


def fwd_bwd(layer: Mamba, u: torch.Tensor, gy: torch.Tensor, passes: int) -> float:
    times = []
    for _ in range(passes):
        layer.zero_grad(set_to_none=True)
        t0 = CLOCK()
        layer(u).backward(gy)
        times.append(CLOCK() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--passes", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variant", default="mamba2", choices=("mamba2", "mamba1"))
    ap.add_argument("--clock", default="wall", choices=("wall", "cpu"),
                    help="cpu: the process's CPU time (all threads), steadier than wall time on a shared machine")
    args = ap.parse_args()
    global CLOCK
    CLOCK = time.perf_counter if args.clock == "wall" else time.process_time
    runtime.tune_malloc()  # as hybridnas commands do
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    layer = Mamba(128, Mamba.Config(variant=args.variant, d_state=32 if args.variant == "mamba2" else 16,
                                    headdim=32, chunk_size=64, backend="chunked"), n_layers=2)
    u = torch.randn(8, 1024, 128, requires_grad=True)
    gy = torch.randn(8, 1024, 128)
    paths = {"old": old_conv, "new": causal_conv1d}
    for fn in paths.values():  # warm-up
        mamba_mod.causal_conv1d = fn
        fwd_bwd(layer, u, gy, 2)
    res: dict[str, list[float]] = {"old": [], "new": []}
    print(f"{args.variant} B8 T1024 d128, {args.threads} threads, {args.clock} clock, load {os.getloadavg()[0]:.2f}")
    for r in range(args.rounds):
        order = ("old", "new") if r % 2 == 0 else ("new", "old")
        for name in order:
            mamba_mod.causal_conv1d = paths[name]
            res[name].append(fwd_bwd(layer, u, gy, args.passes))
        print(f"round {r}: old {res['old'][-1]:.1f} ms  new {res['new'][-1]:.1f} ms  "
              f"ratio {res['new'][-1] / res['old'][-1]:.3f}  load {os.getloadavg()[0]:.2f}")
    mamba_mod.causal_conv1d = causal_conv1d
    ratios = [n / o for n, o in zip(res["new"], res["old"])]
    print(f"median: old {statistics.median(res['old']):.1f} ms  new {statistics.median(res['new']):.1f} ms  "
          f"new/old {statistics.median(ratios):.3f} (best round old {min(res['old']):.1f}, new {min(res['new']):.1f})")


if __name__ == "__main__":
    main()
