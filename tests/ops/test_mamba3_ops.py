"""Mamba-3 op: chunked vs the naive oracle (output, final state, every gradient), state carry, reductions."""

from __future__ import annotations

import math

import pytest
import torch

from layers.ops import dispatch
from layers.ops.common import scalar_decay_chunked as scan_core
from layers.ops.mamba2.naive import ssd_naive
from layers.ops.mamba3 import mamba3, mamba3_chunked, mamba3_naive, rotate
from layers.ops.mamba3.chunked import rotate_pairs

TOL = 1e-4
B, H, P, N = 2, 2, 4, 8


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def inputs(t_len: int, r: int, s: int, seed: int = 0, decay: float = 2.0, with_state: bool = True) -> dict:
    """Random op inputs in realistic ranges (Δ log-uniform-ish, A·Δ <= 0, λ in (0, 1)), as leaf tensors."""
    g = torch.Generator().manual_seed(seed)
    dt = torch.nn.functional.softplus(torch.randn(B, t_len, H, generator=g) - 1.5)
    out = {
        "x": torch.randn(B, t_len, H, P, generator=g),
        "q": torch.randn(B, t_len, r, H, N, generator=g),
        "k": torch.randn(B, t_len, r, H, N, generator=g),
        "a": -decay * torch.rand(B, t_len, H, generator=g) * dt,
        "dt": dt,
        "lam": torch.rand(B, t_len, H, generator=g),
        "dtheta": 0.5 * torch.randn(B, t_len, H, s, generator=g),
        "w_x": torch.randn(r, H, P, generator=g),
    }
    if with_state:
        out["state"] = {"angle": 2 * math.pi * torch.rand(B, H, s, generator=g),
                        "ssm": torch.randn(B, H, P, N, generator=g),
                        "k": torch.randn(B, r, H, N, generator=g), "v": torch.randn(B, H, P, generator=g)}
    for v in [*out.values(), *out.get("state", {}).values()]:
        if isinstance(v, torch.Tensor):
            v.requires_grad_(True)
    return out


def call(fn, inp: dict, pairing: str, chunk: int = 8, **over):
    i = {**inp, **over}
    return fn(i["x"], i["q"], i["k"], i["a"], i["dt"], i["lam"], i["dtheta"], i.get("state"), i.get("w_x"),
              pairing=pairing, chunk_size=chunk)


def leaves(inp: dict) -> dict[str, torch.Tensor]:
    out = {k: v for k, v in inp.items() if isinstance(v, torch.Tensor)}
    out.update({f"state.{k}": v for k, v in inp.get("state", {}).items()})
    return out


def loss_of(y: torch.Tensor, state: dict, seed: int = 7) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    loss = (y * torch.randn(y.shape, generator=g)).sum()
    for name in ("ssm", "k", "v"):
        loss = loss + (state[name] * torch.randn(state[name].shape, generator=g)).sum()
    return loss + state["angle"].sin().sum()


def n_angles(frac: float) -> int:
    return int(N * frac) // 2


CASES = [pytest.param(t, r, frac, chunk, id=f"T{t}-R{r}-rope{frac}-C{chunk}")
         for t in (1, 7, 33, 65) for r in (1, 2, 4) for frac in (0.5, 1.0) for chunk in ((8,) if t < 33 else (16,))]


def assert_chunked_matches_naive(inp: dict, pairing: str, chunk: int) -> None:
    """Output, final state (values, dtypes, shapes) and every input gradient, chunked against the oracle."""
    ref_y, ref_s = call(mamba3_naive, inp, pairing)
    ref_grads = torch.autograd.grad(loss_of(ref_y, ref_s), list(leaves(inp).values()))
    y, s = call(mamba3_chunked, inp, pairing, chunk=chunk)
    grads = torch.autograd.grad(loss_of(y, s), list(leaves(inp).values()))
    assert torch.isfinite(y).all() and rel(y, ref_y) <= TOL
    for name in ref_s:
        assert rel(s[name], ref_s[name]) <= TOL, name
        assert s[name].dtype == ref_s[name].dtype and s[name].shape == ref_s[name].shape, name
    for name, g, rg in zip(leaves(inp), grads, ref_grads):
        assert rel(g, rg) <= TOL, f"grad {name}: {rel(g, rg):.2e}"


@pytest.mark.parametrize("t_len, r, frac, chunk", CASES)
def test_chunked_matches_naive_output_state_and_grads(t_len, r, frac, chunk):
    pairing = "interleaved" if r == 1 else "half"
    assert_chunked_matches_naive(inputs(t_len, r, n_angles(frac), seed=t_len * 10 + r), pairing, chunk)


@pytest.mark.parametrize("fn", [mamba3_naive, mamba3_chunked], ids=["naive", "chunked"])
@pytest.mark.parametrize("r", [1, 2])
def test_split_with_state_equals_whole(fn, r):
    pairing = "interleaved" if r == 1 else "half"
    inp = inputs(29, r, 2, seed=3)
    y, s = call(fn, inp, pairing, chunk=8)
    first = {k: (v[:, :11] if k not in ("w_x", "state") else v) for k, v in inp.items()}
    second = {k: (v[:, 11:] if k not in ("w_x", "state") else v) for k, v in inp.items()}
    y1, s1 = call(fn, first, pairing, chunk=8)
    y2, s2 = call(fn, {**second, "state": s1}, pairing, chunk=8)
    assert rel(torch.cat((y1, y2), dim=1), y) <= TOL
    for name in s:
        assert rel(s2[name], s[name]) <= TOL, name


def test_lambda_one_zero_angles_is_mamba2_without_conv():
    """λ = 1 is exponential Euler: with zero angles the recurrence is Mamba-2's SSD (a = Δ·A_h)."""
    inp = inputs(23, 1, 2, seed=5, with_state=False)
    A = -torch.tensor([0.7, 3.0])
    a = inp["dt"] * A
    y3, s3 = call(mamba3_chunked, inp, "interleaved", a=a, lam=torch.ones(B, 23, H),
                  dtheta=torch.zeros(B, 23, H, 2), w_x=None)
    y2, s2 = ssd_naive(inp["x"], inp["dt"], A, inp["k"][:, :, 0], inp["q"][:, :, 0])
    assert rel(y3[:, :, 0], y2) <= TOL
    assert rel(s3["ssm"], s2) <= TOL


def siso_reference(inp: dict, pairing: str) -> torch.Tensor:
    """The SISO equations of the reference (§1.3) written out per token with scalar gates, v = x ⊙ w."""
    st = inp["state"]
    theta, hs = st["angle"], st["ssm"]
    w = inp["w_x"][0]
    k_prev, v_prev = st["k"][:, 0], st["v"] * w
    ys = []
    for t in range(inp["x"].shape[1]):
        theta = torch.remainder(theta + inp["dtheta"][:, t], 2 * math.pi)
        qt, kt = rotate(inp["q"][:, t, 0], theta, pairing), rotate(inp["k"][:, t, 0], theta, pairing)
        vt = inp["x"][:, t] * w
        dt, lam = inp["dt"][:, t, :, None, None], inp["lam"][:, t, :, None, None]
        alpha = torch.exp(inp["a"][:, t])[:, :, None, None]
        hs = (alpha * hs + (1 - lam) * dt * alpha * v_prev[..., None] * k_prev[:, :, None, :]
              + lam * dt * vt[..., None] * kt[:, :, None, :])
        ys.append((hs @ qt[..., None])[..., 0])
        k_prev, v_prev = kt, vt
    return torch.stack(ys, dim=1)


@pytest.mark.parametrize("pairing", ["interleaved", "half"])
@pytest.mark.parametrize("fn", [mamba3_naive, mamba3_chunked], ids=["naive", "chunked"])
def test_mimo_rank_one_equals_siso(fn, pairing):
    inp = inputs(19, 1, 2, seed=11)
    with torch.no_grad():
        y, _ = call(fn, inp, pairing)
        assert rel(y[:, :, 0], siso_reference(inp, pairing)) <= TOL
        # with W_x = 1 the MIMO form is the plain SISO op (v = x)
        y_ones, _ = call(fn, inp, pairing, w_x=torch.ones(1, H, P))
        y_none, _ = call(fn, inp, pairing, w_x=None)
        assert rel(y_ones, y_none) <= 1e-6


def test_rotate_pairings():
    x = torch.arange(1.0, 9.0)  # N = 8
    theta = torch.tensor([math.pi / 2, 0.0])  # S = 2
    inter = rotate(x, theta, "interleaved")  # pairs (0,1) by 90°, (2,3) by 0
    assert torch.allclose(inter, torch.tensor([-2.0, 1.0, 3, 4, 5, 6, 7, 8]), atol=1e-6)
    half = rotate(x, theta, "half")  # pairs (0,4) by 90°, (1,5) by 0
    assert torch.allclose(half, torch.tensor([-5.0, 2, 3, 4, 1, 6, 7, 8]), atol=1e-6)
    y = torch.randn(3, 8)
    for pairing in ("interleaved", "half"):
        assert torch.allclose(rotate(y, torch.randn(3, 4), pairing).norm(dim=-1), y.norm(dim=-1), atol=1e-5)
    with pytest.raises(ValueError):
        rotate(x, theta, "diagonal")
    odd = torch.randn(4, 7)[:, :5]  # odd N and a strided input: no complex view possible, still rotates
    got = rotate(odd, torch.full((4, 2), math.pi), "interleaved")
    assert torch.allclose(got, torch.cat((-odd[:, :4], odd[:, 4:]), dim=-1), atol=1e-6)


def test_strong_decay_long_chunk_stays_exact():
    """Large |A·Δ| over a 64-token chunk: the stable segsum keeps chunked equal to naive and finite."""
    inp = inputs(130, 2, 2, seed=2, decay=40.0)
    with torch.no_grad():
        y0, _ = call(mamba3_naive, inp, "half")
        y1, _ = call(mamba3_chunked, inp, "half", chunk=64)
    assert torch.isfinite(y1).all() and rel(y1, y0) <= TOL


@pytest.mark.parametrize("r", [1, 2])
@pytest.mark.parametrize("decay", [2.0, 40.0], ids=["decay2", "decay40"])
@pytest.mark.parametrize("form", ["auto", "segsum"])
def test_intra_forms_and_slicing_match_naive_with_grads(monkeypatch, form, decay, r):
    """The scan's two intra-chunk forms, ``exp(acs_t - ref)·exp(ref - acs_s)`` factored and ``exp(segsum)``,
    with every gradient, at one chunk per slice: under strong decay one call mixes factored and segsum slices."""
    if form == "segsum":
        monkeypatch.setattr(scan_core, "FACTOR_RANGE", -1.0)
    monkeypatch.setattr(scan_core, "SLICE_BYTES", 1)
    seen = []
    init = scan_core._Intra.__init__

    def spy(self, *args):
        init(self, *args)
        seen.append(self.factored)

    monkeypatch.setattr(scan_core._Intra, "__init__", spy)
    pairing = "interleaved" if r == 1 else "half"
    assert_chunked_matches_naive(inputs(70, r, 2, seed=r + int(decay), decay=decay), pairing, 16)
    assert len(seen) == 2 * B * H * 5  # forward and backward, one slice per chunk (5 chunks of 16 for 70)
    expected = {"segsum": {False}, "auto": {True, False} if decay > 10 else {True}}[form]
    assert set(seen) == expected


@pytest.mark.parametrize("r", [1, 2])
def test_compiles_as_one_graph_and_stays_exact_under_strong_decay(r):
    """Under ``torch.compile`` the scan decides nothing on the host (``fullgraph=True`` raises on a graph break;
    the span test ``bool(span.max() <= FACTOR_RANGE)`` was one) and takes the form exact for any span: strong
    decay over 64-token chunks still equals the oracle, with every gradient. ``aot_eager`` traces forward and
    backward as inductor would, without its C++ build (tests/layers/test_compile_layers.py runs inductor)."""
    torch._dynamo.reset()
    compiled = torch.compile(mamba3_chunked, backend="aot_eager", fullgraph=True)
    pairing = "interleaved" if r == 1 else "half"
    inp = inputs(70, r, 2, seed=5, decay=40.0)
    ref_y, ref_s = call(mamba3_naive, inp, pairing)
    ref_grads = torch.autograd.grad(loss_of(ref_y, ref_s), list(leaves(inp).values()))
    y, s = call(compiled, inp, pairing, chunk=64)
    grads = torch.autograd.grad(loss_of(y, s), list(leaves(inp).values()))
    assert torch.isfinite(y).all() and rel(y, ref_y) <= TOL
    for name, g, rg in zip(leaves(inp), grads, ref_grads):
        assert rel(g, rg) <= TOL, f"grad {name}: {rel(g, rg):.2e}"


def test_real_pair_rotation_equals_the_complex_multiply():
    """``rotate_pairs`` (real pairs: ``x1 cos - x2 sin, x1 sin + x2 cos``) gives the complex multiply's values and
    gradient (to rounding: the complex kernel may fuse its multiply-adds); it is the op's form under compile."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 2, 3, 8, generator=g, requires_grad=True)
    theta = torch.rand(2, 5, 1, 3, 4, generator=g) * 6
    gy = torch.randn(x.shape, generator=g)
    cos, sin = theta.cos(), theta.sin()
    ref = torch.view_as_real(torch.view_as_complex(x.unflatten(-1, (4, 2))) * torch.complex(cos, sin)).flatten(-2)
    got = rotate_pairs(x, cos, sin)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(torch.autograd.grad(got, x, gy)[0], torch.autograd.grad(ref, x, gy)[0], atol=1e-6,
                               rtol=1e-6)


@pytest.mark.parametrize("r", [1, 2])
def test_compiled_rotary_has_no_complex_op(r):
    """Inductor generates no code for complex tensors (they run as separate eager kernels): the graph dynamo hands
    to the backend rotates on real pairs."""
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(mamba3_chunked, backend=capture, fullgraph=True)
    y, _ = call(compiled, inputs(20, r, 2, seed=1), "interleaved" if r == 1 else "half")
    targets = [str(n.target) for gm in graphs for n in gm.graph.nodes]
    assert graphs and not [t for t in targets if "complex" in t], targets
    ref, _ = call(mamba3_naive, inputs(20, r, 2, seed=1), "interleaved" if r == 1 else "half")
    assert rel(y, ref) <= TOL


def test_odd_state_dim_rotates_with_the_unpaired_dim_kept():
    """An odd N (interleaved only) keeps the real-valued rotation; chunked still equals the oracle."""
    inp = inputs(21, 1, 2, seed=9)
    odd = {k: v for k, v in inp.items()}
    odd["q"], odd["k"] = inp["q"][..., :7].detach(), inp["k"][..., :7].detach()
    odd["state"] = {**inp["state"], "ssm": inp["state"]["ssm"][..., :7].detach(),
                    "k": inp["state"]["k"][..., :7].detach()}
    with torch.no_grad():
        y0, s0 = call(mamba3_naive, odd, "interleaved")
        y1, s1 = call(mamba3_chunked, odd, "interleaved")
    assert rel(y1, y0) <= TOL
    for name in s0:
        assert rel(s1[name], s0[name]) <= TOL, name


def test_dispatch_forces_backend(monkeypatch):
    inp = inputs(9, 1, 2, seed=4)
    args = [inp[k] for k in ("x", "q", "k", "a", "dt", "lam", "dtheta")]
    with torch.no_grad(), dispatch.force("naive"):
        y_naive, _ = mamba3(*args, inp["state"], inp["w_x"], chunk_size=4)
    with torch.no_grad(), dispatch.force("chunked"):
        y_chunk, _ = mamba3(*args, inp["state"], inp["w_x"], chunk_size=4)
    assert rel(y_chunk, y_naive) <= TOL
    with pytest.raises(dispatch.BackendError), dispatch.force("triton"):
        mamba3(*args)


def test_empty_sequence_keeps_state():
    inp = inputs(0, 2, 2, seed=1)
    for fn in (mamba3_naive, mamba3_chunked):
        y, s = call(fn, inp, "half")
        assert y.shape == (B, 0, 2, H, P)
        assert torch.equal(s["ssm"], inp["state"]["ssm"])
