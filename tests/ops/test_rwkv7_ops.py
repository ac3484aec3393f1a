"""RWKV-7 op: chunked (WY) form against the fp32 token loop, outputs, final state and every gradient."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from layers.ops import dispatch
from layers.ops.rwkv7 import rwkv7, rwkv7_chunked, rwkv7_naive, rwkv7_step

TOL = 1e-4


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Max absolute error relative to the reference's max magnitude (fp32)."""
    return ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def make_inputs(b: int, t: int, h: int, k: int, v: int, *, gate: str = "rwkv7", seed: int = 0) -> list[torch.Tensor]:
    """``r, w, k, v, a, b, h0`` as the RWKV-7 layer makes them: ``a = -kh``, ``b = kh * a'``."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    if gate == "rwkv7":  # the layer's bound: log decay in (-exp(-1/2), 0)
        w = -math.exp(-0.5) * torch.sigmoid(2 * rnd(b, t, h, k))
    else:  # strong generic gates, log decay down to ~-8: exercises the chunk-halving guard
        w = F.logsigmoid(rnd(b, t, h, k)) * 2
    kh = F.normalize(rnd(b, t, h, k), dim=-1)
    a_rate = torch.rand(b, t, h, k, generator=g)
    return [rnd(b, t, h, k), w, rnd(b, t, h, k), rnd(b, t, h, v), -kh, kh * a_rate, rnd(b, h, v, k)]


def _run(fn, inputs):
    xs = [x.clone().requires_grad_(True) for x in inputs]
    o, s = fn(*xs)
    g = torch.Generator().manual_seed(7)
    (o * torch.randn(o.shape, generator=g)).sum().add((s * torch.randn(s.shape, generator=g)).sum()).backward()
    return o.detach(), s.detach(), [x.grad for x in xs]


CASES = [
    pytest.param(2, 1, 2, 8, 8, 16, "rwkv7", id="T1"),
    pytest.param(2, 15, 2, 16, 12, 4, "rwkv7", id="T15-C4-KneV"),
    pytest.param(1, 63, 3, 16, 16, 16, "rwkv7", id="T63-C16"),
    pytest.param(2, 100, 2, 32, 32, 32, "rwkv7", id="T100-C32"),
    pytest.param(1, 131, 1, 64, 64, 64, "rwkv7", id="T131-C64-hs64"),
    pytest.param(2, 77, 2, 8, 8, 64, "strong", id="T77-strong-gates"),
]


@pytest.mark.parametrize("b, t, h, k, v, chunk, gate", CASES)
def test_chunked_matches_naive_outputs_and_grads(b, t, h, k, v, chunk, gate):
    inputs = make_inputs(b, t, h, k, v, gate=gate)
    o_ref, s_ref, g_ref = _run(rwkv7_naive, inputs)
    o, s, grads = _run(lambda *x: rwkv7_chunked(*x, chunk_size=chunk), inputs)
    assert o.shape == (b, t, h, v) and s.shape == (b, h, v, k) and s.dtype == torch.float32
    assert rel_err(o, o_ref) <= TOL
    assert rel_err(s, s_ref) <= TOL
    for name, gg, gr in zip("r w k v a b h0".split(), grads, g_ref):
        assert torch.isfinite(gg).all(), name
        assert rel_err(gg, gr) <= TOL, f"d{name}: {rel_err(gg, gr):.2e}"


@pytest.mark.parametrize("fn", [rwkv7_naive, lambda *x: rwkv7_chunked(*x, chunk_size=8)], ids=["naive", "chunked"])
@pytest.mark.parametrize("split", [1, 8, 21])
def test_state_across_split_equals_whole(fn, split):
    r, w, k, v, a, b, h0 = make_inputs(2, 29, 2, 16, 16, seed=3)
    o, s = fn(r, w, k, v, a, b, h0)
    o1, s1 = fn(r[:, :split], w[:, :split], k[:, :split], v[:, :split], a[:, :split], b[:, :split], h0)
    o2, s2 = fn(r[:, split:], w[:, split:], k[:, split:], v[:, split:], a[:, split:], b[:, split:], s1)
    assert rel_err(torch.cat((o1, o2), dim=1), o) <= TOL
    assert rel_err(s2, s) <= TOL


def test_steps_after_prefill_equal_whole():
    r, w, k, v, a, b, _ = make_inputs(2, 23, 2, 16, 8, seed=4)
    o, s = rwkv7_chunked(r, w, k, v, a, b, chunk_size=8)
    o_pre, state = rwkv7_chunked(r[:, :10], w[:, :10], k[:, :10], v[:, :10], a[:, :10], b[:, :10], chunk_size=8)
    outs = [o_pre]
    for t in range(10, 23):
        o_t, state = rwkv7_step(r[:, t], w[:, t], k[:, t], v[:, t], a[:, t], b[:, t], state)
        outs.append(o_t[:, None])
    assert rel_err(torch.cat(outs, dim=1), o) <= TOL
    assert rel_err(state, s) <= TOL


def test_zero_initial_state_is_default_and_empty_sequence():
    r, w, k, v, a, b, h0 = make_inputs(1, 9, 1, 8, 8)
    o0, s0 = rwkv7_chunked(r, w, k, v, a, b, torch.zeros_like(h0))
    o1, s1 = rwkv7_chunked(r, w, k, v, a, b)
    assert torch.equal(o0, o1) and torch.equal(s0, s1)
    o, s = rwkv7_chunked(r[:, :0], w[:, :0], k[:, :0], v[:, :0], a[:, :0], b[:, :0], h0)
    assert o.shape == (1, 0, 1, 8) and torch.equal(s, h0)


def test_dispatch_routes_to_forced_backend():
    inputs = make_inputs(1, 12, 1, 8, 8)
    with dispatch.force("naive"):
        o_naive, _ = rwkv7(*inputs)
    with dispatch.force("chunked"):
        o_chunk, _ = rwkv7(*inputs, chunk_size=5)
    assert torch.equal(o_naive, rwkv7_naive(*inputs)[0])
    assert torch.equal(o_chunk, rwkv7_chunked(*inputs, chunk_size=5)[0])
    with dispatch.force("triton"), pytest.raises(dispatch.BackendError):
        rwkv7(*inputs)


@pytest.mark.parametrize("gate, chunk", [("rwkv7", 64), ("strong", 64)])
def test_decay_bound_sizes_chunks_without_reading_w(gate, chunk):
    """With ``decay_bound`` (the caller's guarantee ``w >= -decay_bound``) the chunk size is fixed from the bound
    on the host: same numbers as the token loop (strong gates: chunks halved by the bound alone), and the chunked
    path compiles as one graph (reading ``w``'s span on the host was a graph break)."""
    inputs = make_inputs(2, 77, 2, 8, 8, gate=gate)
    bound = math.exp(-0.5) if gate == "rwkv7" else float(-inputs[1].min()) + 0.5
    o_ref, s_ref, g_ref = _run(rwkv7_naive, inputs)
    o, s, grads = _run(lambda *x: rwkv7_chunked(*x, chunk_size=chunk, decay_bound=bound), inputs)
    assert rel_err(o, o_ref) <= TOL and rel_err(s, s_ref) <= TOL
    for name, gg, gr in zip("r w k v a b h0".split(), grads, g_ref):
        assert rel_err(gg, gr) <= TOL, f"d{name}: {rel_err(gg, gr):.2e}"
    torch._dynamo.reset()
    report = torch._dynamo.explain(lambda *x: rwkv7_chunked(*x, chunk_size=chunk, decay_bound=bound))(*inputs)
    assert report.graph_break_count == 0, [str(r.reason).splitlines()[0] for r in report.break_reasons]
    # the entry point passes the bound to every backend (naive and triton accept and ignore it)
    assert rel_err(rwkv7(*inputs, chunk_size=chunk, decay_bound=bound, backend="naive")[0], o_ref) <= TOL
