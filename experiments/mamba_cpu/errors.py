"""Worst relative errors, chunked vs naive, over the cases of tests/ops/test_mamba3_ops.py and test_mamba2_ops.py
(output, final state, every input gradient; fp32; relative error = ||a - b|| / ||b||).
Run from the repository root: python experiments/mamba_cpu/errors.py"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "ops"))
import test_mamba2_ops as m2  # noqa: E402
import test_mamba3_ops as m3  # noqa: E402

from layers.ops.mamba2.chunked import ssd_chunked  # noqa: E402
from layers.ops.mamba2.naive import ssd_naive  # noqa: E402
from layers.ops.mamba3 import mamba3_chunked, mamba3_naive  # noqa: E402


def mamba3_worst() -> dict[str, tuple[float, str]]:
    worst = {"output": (0.0, ""), "state": (0.0, ""), "grads": (0.0, "")}
    for case in m3.CASES:
        t_len, r, frac, chunk = case.values
        pairing = "interleaved" if r == 1 else "half"
        inp = m3.inputs(t_len, r, m3.n_angles(frac), seed=t_len * 10 + r)
        y0, s0 = m3.call(mamba3_naive, inp, pairing)
        g0 = torch.autograd.grad(m3.loss_of(y0, s0), list(m3.leaves(inp).values()))
        y1, s1 = m3.call(mamba3_chunked, inp, pairing, chunk=chunk)
        g1 = torch.autograd.grad(m3.loss_of(y1, s1), list(m3.leaves(inp).values()))
        errs = {"output": m3.rel(y1, y0), "state": max(m3.rel(s1[k], s0[k]) for k in s0),
                "grads": max(m3.rel(a, b) for a, b in zip(g1, g0))}
        for k, e in errs.items():
            if e > worst[k][0]:
                worst[k] = (e, case.id)
    return worst


def mamba2_worst() -> dict[str, tuple[float, str]]:
    worst = {"output": (0.0, ""), "state": (0.0, ""), "grads": (0.0, "")}
    for t_len, chunk in [(1, 8), (7, 8), (33, 8), (65, 16)]:
        for groups in (1, m2.H):
            inp = m2.inputs(t_len, groups, seed=t_len + groups)
            y0, s0 = ssd_naive(*inp)
            g0 = torch.autograd.grad(m2.loss_of(y0, s0), inp)
            y1, s1 = ssd_chunked(*inp, chunk_size=chunk)
            g1 = torch.autograd.grad(m2.loss_of(y1, s1), inp)
            cid = f"T{t_len}-C{chunk}-G{groups}"
            for k, e in {"output": m2.rel(y1, y0), "state": m2.rel(s1, s0),
                         "grads": max(m2.rel(a, b) for a, b in zip(g1, g0))}.items():
                if e > worst[k][0]:
                    worst[k] = (e, cid)
    return worst


if __name__ == "__main__":
    for name, fn in (("mamba3 (SISO+MIMO)", mamba3_worst), ("mamba2 SSD", mamba2_worst)):
        print(f"{name}: " + ", ".join(f"{k} {e:.2e} ({cid})" for k, (e, cid) in fn().items()))
