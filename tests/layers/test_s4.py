"""The ``S`` (S4D) mixer beyond the generated registry tests: backends agree through the layer (output and every
parameter gradient), prefill + steps equal forward, parameter count by hand, initialisation, state bytes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hybridnas import registry
from layers.ops import dispatch
from layers.ops.s4_kernel import s4d_naive
from layers.s4 import S4D

D = 16
SMALL = {"d_state": 8}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def build(params: dict, d: int = D) -> S4D:
    torch.manual_seed(0)
    layer = registry.get("S").build(d, params, layer_idx=0, n_layers=2)
    with torch.no_grad():  # move off the symmetric init so every path matters
        for p in layer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return layer


def x_of(t_len: int, seed: int = 1, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, t_len, D, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("init", ["lin", "inv", "legs"])
def test_fft_equals_recurrence_through_layer(init):
    layer = build({**SMALL, "init": init})
    x = x_of(13).requires_grad_(True)
    out = {}
    for backend in ("naive", "chunked"):
        layer.zero_grad()
        x.grad = None
        with dispatch.force(backend):
            y = layer(x)
        y.square().sum().backward()
        out[backend] = (y.detach(), x.grad.clone(), {n: p.grad.clone() for n, p in layer.named_parameters()})
    (y0, gx0, gp0), (y1, gx1, gp1) = out["naive"], out["chunked"]
    assert rel(y1, y0) <= 1e-5 and rel(gx1, gx0) <= 1e-4
    for name in gp0:
        assert rel(gp1[name], gp0[name]) <= 1e-4, name


@pytest.mark.parametrize("backend", ["naive", "chunked"])
def test_prefill_then_steps_equals_forward(backend):
    layer = build({**SMALL, "init": "inv"}).eval()
    x = x_of(15, seed=3)
    with torch.no_grad(), dispatch.force(backend):
        ref = layer(x)
        y, state = layer.prefill(x[:, :6])
        ys = [y]
        y, state = layer.step(x[:, 6:9], state)  # several tokens at once
        ys.append(y)
        for t in range(9, 15):
            y, state = layer.step(x[:, t:t + 1], state)
            ys.append(y)
    assert rel(torch.cat(ys, dim=1), ref) <= 1e-5


def test_layer_equals_direct_computation():
    """GELU after the D skip, then GLU of the output linear: the block of S4D."""
    layer = build(SMALL)
    x = x_of(7)
    with torch.no_grad():
        dt = torch.exp(layer.log_dt)
        A = torch.complex(-torch.exp(layer.log_A_real), layer.A_imag)
        y, _ = s4d_naive(x, dt, A, torch.view_as_complex(layer.C.contiguous()))
        want = F.glu(layer.out_linear(F.gelu(y + layer.D * x)), dim=-1)
        assert rel(layer(x), want) <= 1e-5


@pytest.mark.parametrize("d, n", [(16, 8), (24, 64), (5, 2)])
def test_param_count_by_hand(d, n):
    m = n // 2
    by_hand = d + 2 * d * m + 2 * d * m + d + (2 * d * d + 2 * d)
    layer = S4D(d, S4D.Config(d_state=n))
    assert S4D.param_count(d, layer.config) == by_hand == sum(p.numel() for p in layer.parameters())


def test_initialization_and_defaults():
    cfg = S4D.Config()
    assert (cfg.d_state, cfg.init, cfg.dt_min, cfg.dt_max) == (64, "lin", 0.001, 0.1)
    torch.manual_seed(0)
    layer = S4D(64, S4D.Config(d_state=16, init="lin"))
    dt = torch.exp(layer.log_dt)
    assert (dt >= 1e-3 * 0.999).all() and (dt <= 0.1 * 1.001).all()
    assert dt.log().min() < math.log(3e-3) and dt.log().max() > math.log(3e-2)  # log-uniform, spread out
    assert torch.allclose(-torch.exp(layer.log_A_real), torch.full((64, 8), -0.5))
    assert torch.allclose(layer.A_imag, math.pi * torch.arange(8.0).expand(64, 8))
    inv = S4D(64, S4D.Config(d_state=16, init="inv"))
    assert torch.allclose(inv.A_imag[0], (16 / math.pi) * (16 / (2 * torch.arange(8.0) + 1) - 1))
    assert torch.equal(layer.out_linear.bias, torch.zeros(128))


def test_state_bytes_complex64_any_dtype():
    layer = build(SMALL)
    _, st = layer.prefill(x_of(4))
    assert st.shape == (2, D, 4) and st.dtype == torch.complex64
    assert layer.state_size(2, 4) == st.nbytes == 2 * D * 4 * 8
    assert layer.state_size(2, 4, torch.bfloat16) == layer.state_size(2, 10_000, torch.float32)


def test_long_sequence_fft_matches_recurrence():
    """Any length: 300 tokens (not a power of two) through the layer, FFT vs recurrence."""
    layer = build({**SMALL, "init": "inv"}).eval()
    x = x_of(300, batch=1)
    with torch.no_grad():
        with dispatch.force("naive"):
            y0 = layer(x)
        y1 = layer(x)
    assert rel(y1, y0) <= 1e-4
