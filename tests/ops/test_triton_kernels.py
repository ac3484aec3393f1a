"""Triton kernels vs the naive oracles (output, final state, every gradient), fp32, relative error <= 1e-4.

Runs on CPU under ``TRITON_INTERPRET=1`` (set by the ``interp`` fixture before the kernel module is decorated;
the fixture checks the kernels really are interpreted). Shapes stay tiny: the interpreter runs each program
serially on numpy. Marked ``triton``; they run in CI all the same (deselect with ``-m "not triton"``).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import sys

import pytest
import torch

pytestmark = [pytest.mark.triton,
              pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")]

TOL = 1e-4
B, H, P, N, CHUNK = 2, 2, 16, 16, 16
LENGTHS = (1, 17, 33)  # one token, a partial second chunk, a partial third chunk


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


@pytest.fixture(scope="module")
def interp():
    """Interpreter mode for this module: set the variable, (re)decorate the kernels, restore afterwards."""
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        from triton.runtime.interpreter import InterpretedFunction

        name = "layers.ops.common.scalar_decay_triton"
        mod = importlib.reload(sys.modules[name]) if name in sys.modules else importlib.import_module(name)
        assert isinstance(mod._ssd_fwd_kernel, InterpretedFunction)
        assert isinstance(mod._ssd_bwd_kernel, InterpretedFunction)
        yield mod
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old


def check(ref: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> None:
    errs = {name: rel(got[name], ref[name]) for name in ref}
    bad = {name: e for name, e in errs.items() if not e <= TOL}
    assert not bad, f"relative errors above {TOL}: {bad}"


def grads(loss: torch.Tensor, leaves: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    gs = torch.autograd.grad(loss, list(leaves.values()))
    return {f"d{name}": g for name, g in zip(leaves, gs)}


def check_layer_forced_triton(symbol: str, params: dict, d_model: int, t_len: int) -> None:
    """A registered layer end to end with its op forced to triton vs naive: the output and every parameter
    gradient within :data:`TOL`."""
    from hybridnas import registry
    from layers.ops import dispatch

    torch.manual_seed(0)
    layer = registry.get(symbol).build(d_model, params)
    x = torch.randn(1, t_len, d_model)
    out = {}
    for backend in ("naive", "triton"):
        layer.zero_grad(set_to_none=True)
        with dispatch.force(backend):
            y = layer(x)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        out[backend] = {"y": y.detach(), **{f"d{n}": p.grad.clone() for n, p in layer.named_parameters()
                                            if p.grad is not None}}
    assert out["naive"].keys() == out["triton"].keys()
    check(out["naive"], out["triton"])


# ---------------------------------------------------------------------------------------------- the shared scan

@pytest.mark.parametrize("t_len, r, p", [(17, 1, 16), (33, 2, 20), (21, 2, 80)], ids=["T17-R1", "T33-R2-P20",
                                                                                     "T21-R2-P80"])
def test_scan_matches_chunked_scan(interp, t_len, r, p):
    """The kernel against ``ssd_scan`` (itself tested against the oracles), with a diagonal shift, odd N and
    a P split over two program blocks."""
    from layers.ops.common.scalar_decay_chunked import ssd_scan

    g = torch.Generator().manual_seed(t_len + r)
    n = 12
    dt = torch.nn.functional.softplus(torch.randn(B, t_len, H, generator=g) - 1)
    leaves = {"q": torch.randn(B, t_len, r, H, n, generator=g), "k": torch.randn(B, t_len, r, H, n, generator=g),
              "v": torch.randn(B, t_len, r, H, p, generator=g), "a": -2 * torch.rand(B, t_len, H, generator=g) * dt,
              "scale": dt * torch.rand(B, t_len, H, generator=g), "shift": 0.3 * torch.rand(B, t_len, H, generator=g),
              "h0": torch.randn(B, H, p, n, generator=g)}
    for x in leaves.values():
        x.requires_grad_(True)
    gy, gs = torch.randn(B, t_len, r, H, p, generator=g), torch.randn(B, H, p, n, generator=g)
    out = {}
    for name, fn in (("ref", ssd_scan), ("tri", interp.ssd_scan_triton)):
        y, s = fn(*leaves.values(), 8)
        out[name] = {"y": y, "state": s, **grads((y * gy).sum() + (s * gs).sum(), leaves)}
    check(out["ref"], out["tri"])


class _Limited:
    """A kernel whose launch raises ``OutOfResources`` unless ``fits(constexprs)``: a GPU with less shared memory."""

    def __init__(self, kernel, fits):
        self.kernel, self.fits, self.seen = kernel, fits, []

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kw):
            self.seen.append((kw["C"], kw["BP"]))
            if not self.fits(kw):
                from triton.runtime.errors import OutOfResources

                raise OutOfResources(300_000, 232_448, "shared memory")
            return launch(*args, **kw)

        return run


def test_scan_falls_back_to_smaller_blocks(interp, monkeypatch):
    """Out of shared memory: the forward narrows its P-block; the backward narrows P, then recomputes the chunk
    states at half the chunk size. The result is unchanged."""
    from layers.ops.common.scalar_decay_chunked import ssd_scan

    fwd = _Limited(interp._ssd_fwd_kernel, lambda kw: kw["BP"] <= 32)
    bwd = _Limited(interp._ssd_bwd_kernel, lambda kw: kw["C"] <= 8 and kw["BP"] <= 16)
    g = torch.Generator().manual_seed(5)
    t_len, r, p, n = 19, 2, 40, 16
    leaves = {"q": torch.randn(1, t_len, r, H, n, generator=g), "k": torch.randn(1, t_len, r, H, n, generator=g),
              "v": torch.randn(1, t_len, r, H, p, generator=g), "a": -torch.rand(1, t_len, H, generator=g),
              "scale": torch.rand(1, t_len, H, generator=g), "shift": torch.rand(1, t_len, H, generator=g),
              "h0": torch.randn(1, H, p, n, generator=g)}
    for x in leaves.values():
        x.requires_grad_(True)
    out = {}
    for name, fn in (("ref", ssd_scan), ("tri", interp.ssd_scan_triton)):
        if name == "tri":
            monkeypatch.setattr(interp, "_ssd_fwd_kernel", fwd)
            monkeypatch.setattr(interp, "_ssd_bwd_kernel", bwd)
        y, s = fn(*leaves.values(), 16)
        out[name] = {"y": y, "state": s, **grads(y.sum() + (s * s).sum(), leaves)}
    check(out["ref"], out["tri"])
    assert fwd.seen == [(16, 64), (16, 32), (8, 16)] and bwd.seen == [(16, 32), (16, 16), (8, 32), (8, 16)]


# ---------------------------------------------------------------------------------------------------- Mamba-2

def mamba2_inputs(t_len: int, groups: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {"x": torch.randn(B, t_len, H, P, generator=g),
           "dt": torch.nn.functional.softplus(torch.randn(B, t_len, H, generator=g) - 1.5),
           "A": -torch.empty(H).uniform_(1.0, 16.0, generator=g) / 4,
           "B": torch.randn(B, t_len, groups, N, generator=g), "C": torch.randn(B, t_len, groups, N, generator=g),
           "state": torch.randn(B, H, P, N, generator=g)}
    return {k: v.requires_grad_(True) for k, v in out.items()}


def mamba2_run(fn, inp: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    y, s = fn(*inp.values(), chunk_size=CHUNK)
    g = torch.Generator().manual_seed(7)
    loss = (y * torch.randn(y.shape, generator=g)).sum() + (s * torch.randn(s.shape, generator=g)).sum()
    return {"y": y, "final_state": s, **grads(loss, inp)}


@pytest.mark.parametrize("t_len, groups", [(t, 1 if t != 17 else H) for t in LENGTHS],
                         ids=[f"T{t}" for t in LENGTHS])
def test_mamba2_triton_matches_naive(interp, t_len, groups):
    from layers.ops.mamba2.naive import ssd_naive
    from layers.ops.mamba2.triton import ssd_triton

    inp = mamba2_inputs(t_len, groups, seed=t_len)
    check(mamba2_run(ssd_naive, inp), mamba2_run(ssd_triton, inp))


# ---------------------------------------------------------------------------------------------------- Mamba-3

def mamba3_inputs(t_len: int, r: int, s: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    dt = torch.nn.functional.softplus(torch.randn(B, t_len, H, generator=g) - 1.5)
    out = {"x": torch.randn(B, t_len, H, P, generator=g), "q": torch.randn(B, t_len, r, H, N, generator=g),
           "k": torch.randn(B, t_len, r, H, N, generator=g), "a": -2 * torch.rand(B, t_len, H, generator=g) * dt,
           "dt": dt, "lam": torch.rand(B, t_len, H, generator=g),
           "dtheta": 0.5 * torch.randn(B, t_len, H, s, generator=g),
           "state": {"angle": 2 * math.pi * torch.rand(B, H, s, generator=g),
                     "ssm": torch.randn(B, H, P, N, generator=g),
                     "k": torch.randn(B, r, H, N, generator=g), "v": torch.randn(B, H, P, generator=g)},
           "w_x": torch.randn(r, H, P, generator=g)}
    for v in [*out.values(), *out["state"].values()]:
        if isinstance(v, torch.Tensor):
            v.requires_grad_(True)
    return out


def mamba3_run(fn, inp: dict, pairing: str) -> dict[str, torch.Tensor]:
    names = ("x", "q", "k", "a", "dt", "lam", "dtheta")
    y, st = fn(*(inp[k] for k in names), inp["state"], inp["w_x"], pairing=pairing, chunk_size=CHUNK)
    leaves = {k: inp[k] for k in (*names, "w_x")} | {f"state.{k}": v for k, v in inp["state"].items()}
    g = torch.Generator().manual_seed(7)
    loss = (y * torch.randn(y.shape, generator=g)).sum() + st["angle"].sin().sum()
    for name in ("ssm", "k", "v"):
        loss = loss + (st[name] * torch.randn(st[name].shape, generator=g)).sum()
    return {"y": y, **{f"final.{k}": v for k, v in st.items()}, **grads(loss, leaves)}


@pytest.mark.parametrize("pairing", ["interleaved", "half"])
@pytest.mark.parametrize("r", [1, 2], ids=["SISO", "MIMO2"])
@pytest.mark.parametrize("t_len", LENGTHS, ids=[f"T{t}" for t in LENGTHS])
def test_mamba3_triton_matches_naive(interp, t_len, r, pairing):
    from layers.ops.mamba3.naive import mamba3_naive
    from layers.ops.mamba3.triton import mamba3_triton

    inp = mamba3_inputs(t_len, r, s=N // 4, seed=10 * t_len + r)
    check(mamba3_run(mamba3_naive, inp, pairing), mamba3_run(mamba3_triton, inp, pairing))


def test_mamba3_triton_state_carry(interp):
    """Two calls carrying the state equal one call over the whole sequence (the decode-cache path)."""
    from layers.ops.mamba3.triton import mamba3_triton

    inp = mamba3_inputs(20, 2, s=N // 4, seed=3)
    args = [inp[k].detach() for k in ("x", "q", "k", "a", "dt", "lam", "dtheta")]
    state = {k: v.detach() for k, v in inp["state"].items()}
    with torch.no_grad():
        y, s = mamba3_triton(*args, state, inp["w_x"].detach(), pairing="half", chunk_size=CHUNK)
        y1, s1 = mamba3_triton(*(x[:, :13] for x in args), state, inp["w_x"].detach(), pairing="half",
                               chunk_size=CHUNK)
        y2, s2 = mamba3_triton(*(x[:, 13:] for x in args), s1, inp["w_x"].detach(), pairing="half",
                               chunk_size=CHUNK)
    assert rel(torch.cat([y1, y2], dim=1), y) <= TOL and rel(s2["ssm"], s["ssm"]) <= TOL


# --------------------------------------------------------------------------------------------------- dispatch

def test_dispatch_runs_triton_when_forced(interp, monkeypatch):
    """``force("triton")`` and ``HYBRIDNAS_BACKEND=triton`` reach the kernels (interpreter mode counts as usable)."""
    from layers.ops import dispatch
    from layers.ops.mamba2 import BACKENDS as M2
    from layers.ops.mamba2 import ssd
    from layers.ops.mamba3 import BACKENDS as M3

    assert "triton" in M2 and "triton" in M3
    inp = {k: v.detach() for k, v in mamba2_inputs(5, 1, seed=1).items()}
    with torch.no_grad():
        with dispatch.force("naive"):
            ref, _ = ssd(*inp.values(), chunk_size=CHUNK)
        with dispatch.force("triton"):
            y, _ = ssd(*inp.values(), chunk_size=CHUNK)
        assert rel(y, ref) <= TOL
        monkeypatch.setenv(dispatch.ENV, "triton")
        y, _ = ssd(*inp.values(), chunk_size=CHUNK)
        assert rel(y, ref) <= TOL
        monkeypatch.delenv("TRITON_INTERPRET")
        with pytest.raises(dispatch.BackendError, match="needs a CUDA device"):
            ssd(*inp.values(), chunk_size=CHUNK)


M_TINY = {"d_state": 16, "headdim": 16, "chunk_size": 8}


@pytest.mark.parametrize("symbol, params", [("M", {"variant": "mamba2", **M_TINY}),
                                            ("M", {"variant": "mamba3", "mimo_rank": 2, **M_TINY}),
                                            ("R", {"head_size": 16, "chunk_size": 8})],
                         ids=["M-mamba2", "M-mamba3-R2", "R"])
def test_layer_forced_triton_matches_naive(interp, symbol, params):
    """A layer end to end (output and every parameter gradient) with its op forced to triton vs naive."""

    check_layer_forced_triton(symbol, params, d_model=32, t_len=11)


# ---------------------------------------------------------------------------------------------------- RWKV-7

@pytest.mark.parametrize("t_len, kd, vd", [(1, 16, 16), (17, 16, 16), (33, 16, 16), (9, 12, 40)],
                         ids=["T1", "T17", "T33", "T9-K12-V40"])
def test_rwkv7_triton_matches_naive(interp, t_len, kd, vd):
    """The recurrent RWKV-7 kernel: output, final state and every gradient; V=40 spans two row blocks."""
    from layers.ops.rwkv7.naive import rwkv7_naive
    from layers.ops.rwkv7.triton import rwkv7_triton

    g = torch.Generator().manual_seed(t_len + kd)
    shape = (1, t_len, H, kd)
    kk = torch.nn.functional.normalize(torch.randn(*shape, generator=g), dim=-1)
    leaves = {"r": torch.randn(*shape, generator=g), "w": -0.6065 * torch.sigmoid(torch.randn(*shape, generator=g)),
              "k": torch.randn(*shape, generator=g), "v": torch.randn(1, t_len, H, vd, generator=g),
              "a": -kk, "b": kk * torch.rand(*shape, generator=g), "state": torch.randn(1, H, vd, kd, generator=g)}
    for x in leaves.values():
        x.requires_grad_(True)
    gen = torch.Generator().manual_seed(7)
    go, gs = torch.randn(1, t_len, H, vd, generator=gen), torch.randn(1, H, vd, kd, generator=gen)
    out = {}
    for name, fn in (("ref", rwkv7_naive), ("tri", lambda *x: rwkv7_triton(*x, chunk_size=CHUNK))):
        o, s = fn(*leaves.values())
        out[name] = {"o": o, "final_state": s, **grads((o * go).sum() + (s * gs).sum(), leaves)}
    check(out["ref"], out["tri"])


def test_rwkv7_dispatch_forced_triton(interp):
    from layers.ops import dispatch
    from layers.ops.rwkv7 import rwkv7

    g = torch.Generator().manual_seed(0)
    args = [torch.randn(1, 5, H, 16, generator=g) for _ in range(6)]
    args[1] = -torch.rand(1, 5, H, 16, generator=g)
    with dispatch.force("naive"):
        ref, _ = rwkv7(*args)
    with dispatch.force("triton"):
        got, _ = rwkv7(*args)
    assert rel(got, ref) <= TOL


# ------------------------------------------------------------------------------------- Mamba-1 selective scan

@pytest.fixture(scope="module")
def ss_interp(interp):
    """The selective-scan kernel module, (re)decorated while ``interp`` holds ``TRITON_INTERPRET=1``."""
    from triton.runtime.interpreter import InterpretedFunction

    name = "layers.ops.selective_scan.triton"
    mod = importlib.reload(sys.modules[name]) if name in sys.modules else importlib.import_module(name)
    assert isinstance(mod._ss_fwd_kernel, InterpretedFunction)
    assert isinstance(mod._ss_bwd_kernel, InterpretedFunction)
    return mod


SS_D = 20  # two channel blocks of 16, the second partial


def ss_inputs(t_len: int, n: int, with_state: bool, seed: int, dtype=torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {"u": torch.randn(B, t_len, SS_D, generator=g),
           "delta": torch.nn.functional.softplus(torch.randn(B, t_len, SS_D, generator=g) - 1.0),
           "A": -torch.rand(SS_D, n, generator=g) * torch.arange(1, n + 1) / 2,
           "B": torch.randn(B, t_len, n, generator=g), "C": torch.randn(B, t_len, n, generator=g)}
    if with_state:
        out["state"] = torch.randn(B, SS_D, n, generator=g)
    return {k: v.to(dtype).requires_grad_(True) for k, v in out.items()}


def ss_run(fn, inp: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    y, s = fn(*inp.values(), chunk_size=CHUNK)
    g = torch.Generator().manual_seed(7)
    loss = (y * torch.randn(y.shape, generator=g, dtype=y.dtype)).sum() + (s * torch.randn(s.shape, generator=g)).sum()
    return {"y": y, "final_state": s, **grads(loss, inp)}


@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "state"])
@pytest.mark.parametrize("t_len, n", [(1, 8), (17, 16), (33, 8)], ids=["T1-N8", "T17-N16", "T33-N8"])
def test_selective_scan_triton_matches_naive(ss_interp, t_len, n, with_state):
    """Output, final state and the gradients of u, delta, A, B, C (and state) against the fp32 token loop; D=20
    spans a full and a partial channel block, T=17 and 33 end in a partial chunk."""
    from layers.ops.selective_scan.naive import selective_scan_naive

    inp = ss_inputs(t_len, n, with_state, seed=t_len + n + with_state)
    ref, got = ss_run(selective_scan_naive, inp), ss_run(ss_interp.selective_scan_triton, inp)
    assert got["y"].dtype == torch.float32 and got["final_state"].dtype == torch.float32
    assert set(got) == {"y", "final_state", "du", "ddelta", "dA", "dB", "dC", *(["dstate"] if with_state else [])}
    check(ref, got)


def test_selective_scan_triton_dtypes_and_state_carry(ss_interp):
    """float64 inputs: y comes back in u's dtype, the state in fp32, gradients in their inputs' dtypes (as the
    oracle); two calls carrying the state equal one call over the whole sequence."""
    from layers.ops.selective_scan.naive import selective_scan_naive

    inp = ss_inputs(9, 8, True, seed=11, dtype=torch.float64)
    ref, got = ss_run(selective_scan_naive, inp), ss_run(ss_interp.selective_scan_triton, inp)
    assert got["y"].dtype == torch.float64 and got["final_state"].dtype == torch.float32
    assert all(got[f"d{k}"].dtype == torch.float64 for k in inp)
    check(ref, got)
    args = [v.detach().float() for k, v in inp.items() if k != "state"]
    with torch.no_grad():
        y, s = ss_interp.selective_scan_triton(*args, inp["state"].detach().float(), chunk_size=4)
        cut = lambda x, sl: x[:, sl] if x.dim() == 3 and x.shape[0] == B else x  # noqa: E731
        y1, s1 = ss_interp.selective_scan_triton(*(cut(x, slice(0, 5)) for x in args), inp["state"].detach().float(),
                                                 chunk_size=4)
        y2, s2 = ss_interp.selective_scan_triton(*(cut(x, slice(5, None)) for x in args), s1, chunk_size=4)
    assert rel(torch.cat([y1, y2], dim=1), y) <= TOL and rel(s2, s) <= TOL


@pytest.mark.parametrize("shape", [(2, 0, 5, 3), (0, 4, 5, 3), (2, 4, 0, 3)], ids=["T0", "B0", "D0"])
def test_selective_scan_triton_empty_inputs(ss_interp, shape):
    """No tokens, no batch or no channels: the oracle's shapes and dtypes, the state passed through."""
    from layers.ops.selective_scan.naive import selective_scan_naive

    b, t, d, n = shape
    args = (torch.randn(b, t, d), torch.rand(b, t, d), -torch.rand(d, n), torch.randn(b, t, n), torch.randn(b, t, n),
            torch.randn(b, d, n))
    (y0, s0), (y1, s1) = selective_scan_naive(*args), ss_interp.selective_scan_triton(*args)
    assert (y1.shape, y1.dtype, s1.shape, s1.dtype) == (y0.shape, y0.dtype, s0.shape, s0.dtype)
    assert torch.equal(s1, args[-1])


def test_selective_scan_dispatch_and_mamba1_layer_forced_triton(ss_interp):
    """The op entry reaches the kernel when forced, and a Mamba-1 layer (output and every parameter gradient)
    matches its naive run."""
    from layers.ops import dispatch
    from layers.ops.selective_scan import BACKENDS, selective_scan

    assert "triton" in BACKENDS
    inp = {k: v.detach() for k, v in ss_inputs(6, 8, True, seed=2).items()}
    with torch.no_grad():
        with dispatch.force("naive"):
            ref, _ = selective_scan(*inp.values())
        with dispatch.force("triton"):
            got, _ = selective_scan(*inp.values())
    assert rel(got, ref) <= TOL
    check_layer_forced_triton("M", {"variant": "mamba1", "d_state": 8}, d_model=16, t_len=7)
