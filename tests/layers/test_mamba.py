"""The ``M`` mixer beyond the generated registry tests: backends agree through the whole layer (output and
every parameter gradient), decoding across chunk boundaries, initialization, parameter counts, A's activation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hybridnas import registry
from layers.mamba import Mamba, heavy_tail, num_rope_angles
from layers.ops import dispatch

D = 32
SMALL = {"d_state": 8, "headdim": 16, "chunk_size": 8}
VARIANTS = {
    "siso-rope0.5": {**SMALL},
    "siso-rope1.0": {**SMALL, "rope_fraction": 1.0},
    "mimo2-rope0.5": {**SMALL, "mimo_rank": 2, "chunk_size": 4},
    "mimo4-rope1.0": {**SMALL, "mimo_rank": 4, "rope_fraction": 1.0, "chunk_size": 4},
    "mamba2": {**SMALL, "variant": "mamba2"},
    "mamba2-conv1": {**SMALL, "variant": "mamba2", "d_conv": 1},
    "mamba1": {"variant": "mamba1", "d_state": 8},
    "mamba1-conv1-rank3": {"variant": "mamba1", "d_state": 4, "d_conv": 1, "dt_rank": 3},
}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def build(params: dict, d: int = D) -> Mamba:
    torch.manual_seed(0)
    layer = registry.get("M").build(d, params, layer_idx=0, n_layers=2)
    with torch.no_grad():  # move off the symmetric init so every path matters
        for p in layer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return layer


def x_of(t_len: int, seed: int = 1, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, t_len, D, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("params", VARIANTS.values(), ids=VARIANTS.keys())
def test_chunked_equals_naive_through_layer(params):
    layer = build(params)
    x = x_of(21).requires_grad_(True)
    out = {}
    for backend in ("naive", "chunked"):
        layer.zero_grad()
        x.grad = None
        with dispatch.force(backend):
            y = layer(x)
        y.square().sum().backward()
        out[backend] = (y.detach(), x.grad.clone(), {n: p.grad.clone() for n, p in layer.named_parameters()})
    (y0, gx0, gp0), (y1, gx1, gp1) = out["naive"], out["chunked"]
    assert rel(y1, y0) <= 1e-4 and rel(gx1, gx0) <= 1e-4
    for name in gp0:
        assert rel(gp1[name], gp0[name]) <= 1e-4, name


@pytest.mark.parametrize("params", VARIANTS.values(), ids=VARIANTS.keys())
@pytest.mark.parametrize("backend", ["naive", "chunked"])
def test_prefill_then_steps_equals_forward(params, backend):
    layer = build(params).eval()
    x = x_of(19, seed=3)
    with torch.no_grad(), dispatch.force(backend):
        ref = layer(x)
        y, state = layer.prefill(x[:, :9])  # 9 = one full chunk + 1 for chunk_size 8
        ys = [y]
        y, state = layer.step(x[:, 9:13], state)  # several tokens at once
        ys.append(y)
        for t in range(13, 19):
            y, state = layer.step(x[:, t:t + 1], state)
            ys.append(y)
    assert rel(torch.cat(ys, dim=1), ref) <= 1e-5


def test_decode_state_shapes_match_reference_cache():
    layer = build({**SMALL, "mimo_rank": 2})
    _, st = layer.prefill(x_of(5))
    h, p, n, s = layer.nheads, 16, 8, num_rope_angles(8, 0.5)
    assert st["angle"].shape == (2, h, s) and st["angle"].dtype == torch.float32
    assert st["ssm"].shape == (2, h, p, n) and st["ssm"].dtype == torch.float32
    assert st["k"].shape == (2, 2, h, n) and st["v"].shape == (2, h, p)
    assert ((0 <= st["angle"]) & (st["angle"] < 2 * math.pi)).all()
    bf16 = layer.state_size(2, 5, torch.bfloat16)
    assert bf16 == 2 * h * (4 * s + 4 * p * n + 2 * (2 * n + p))


@pytest.mark.parametrize("params", [
    {}, {"mimo_rank": 4}, {"rope_fraction": 1.0, "d_state": 30, "headdim": 32}, {"expand": 1.5, "headdim": 16},
    {"variant": "mamba2"}, {"variant": "mamba2", "d_conv": 2, "d_state": 16, "headdim": 8},
    {"variant": "mamba1", "d_state": 16}, {"variant": "mamba1", "d_state": 5, "expand": 1.5, "dt_rank": 7},
], ids=["default", "mimo4", "rope1-odd", "expand1.5", "mamba2", "mamba2-small", "mamba1", "mamba1-odd"])
def test_param_count_formula(params):
    d = 64
    layer = registry.get("M").build(d, params)
    assert Mamba.param_count(d, layer.config) == sum(p.numel() for p in layer.parameters())


def test_defaults_follow_reference():
    cfg = Mamba.Config()
    assert (cfg.variant, cfg.d_state, cfg.headdim, cfg.expand, cfg.rope_fraction) == ("mamba3", 128, 64, 2, 0.5)
    assert (cfg.dt_min, cfg.dt_max, cfg.a_floor, cfg.mimo_rank) == (0.001, 0.1, 1e-4, 1)
    assert num_rope_angles(128, 0.5) == 32 and num_rope_angles(128, 1.0) == 64 and num_rope_angles(30, 0.5) == 7
    assert Mamba(64).chunk == 64 and Mamba(64, Mamba.Config(mimo_rank=4)).chunk == 16


def test_initialization():
    torch.manual_seed(0)
    layer = Mamba(64, Mamba.Config(d_state=16, headdim=8, mimo_rank=4), n_layers=4)
    dt = F.softplus(layer.dt_bias)
    assert (dt >= 1e-3 * 0.999).all() and (dt <= 0.1 * 1.001).all()
    assert torch.equal(layer.D, torch.ones_like(layer.D))
    assert torch.equal(layer.B_bias, torch.ones_like(layer.B_bias))
    assert torch.equal(layer.C_bias, torch.ones_like(layer.C_bias))
    assert torch.allclose(layer.mimo_x, torch.full_like(layer.mimo_x, 0.25))
    assert torch.allclose(layer.mimo_o, torch.full_like(layer.mimo_o, 0.25))
    assert torch.equal(layer.mimo_z, torch.ones_like(layer.mimo_z))
    assert abs(layer.out_proj.weight.std().item() - layer.out_init_std()) < 0.2 * layer.out_init_std()
    m2 = Mamba(64, Mamba.Config(variant="mamba2", d_state=16, headdim=8))
    a = torch.exp(m2.A_log)
    assert (a >= 1).all() and (a <= 16).all()


def test_heavy_tail_and_a_floor():
    u = torch.linspace(-50, 50, 1001, requires_grad=True)
    f = heavy_tail(u)
    assert (f > 0).all() and torch.isclose(heavy_tail(torch.tensor(0.0)), torch.tensor(1.0))
    f.sum().backward()
    assert torch.isfinite(u.grad).all() and torch.isclose(u.grad[500], torch.tensor(1.0))
    assert torch.allclose(heavy_tail(torch.tensor([-1.0, 2.0])), torch.tensor([0.5, 3.0]))
    # A = -max(f, a_floor) <= -a_floor: the floor only binds far in the negative tail
    layer = build({**SMALL, "a_floor": 0.9})
    with torch.no_grad():
        layer.in_proj.weight.zero_()
        layer.in_proj.weight[sum(layer.splits[:5]):sum(layer.splits[:6])] = 1.0  # dd_A rows
    y = layer(-10 * torch.ones(1, 3, D))
    assert torch.isfinite(y).all()


def test_rope_fraction_changes_angles_and_pairing():
    siso = build({**SMALL})
    full = build({**SMALL, "rope_fraction": 1.0})
    assert siso.n_angles == 2 and full.n_angles == 4
    assert siso.splits[-1] == 2 and full.splits[-1] == 4


@pytest.mark.parametrize("params", [VARIANTS["mimo2-rope0.5"], VARIANTS["mimo4-rope1.0"]], ids=["mimo2", "mimo4"])
def test_mimo_adjacent_pair_basis_is_the_rotate_half_layer(monkeypatch, params):
    """MIMO runs with the rotate-half pairs made adjacent (interleaved rotary on reordered B, C, norms, biases);
    output, decode state carry and every gradient equal the layer computed with rotate-half pairing directly."""
    layer = build(params)
    x = x_of(19).requires_grad_(True)
    got = {}
    for adjacent in (True, False):
        monkeypatch.setattr(Mamba, "adjacent_pairs", adjacent)
        layer.zero_grad()
        x.grad = None
        y = layer(x)
        y_pre, st = layer.prefill(x[:, :11])
        y_step, _ = layer.step(x[:, 11:], st)
        (y.square().sum() + y_step.square().sum()).backward()
        got[adjacent] = (y.detach(), y_step.detach(), x.grad.clone(),
                         {n: p.grad.clone() for n, p in layer.named_parameters()})
    (y1, s1, gx1, gp1), (y0, s0, gx0, gp0) = got[True], got[False]
    assert rel(y1, y0) <= 1e-5 and rel(s1, s0) <= 1e-5 and rel(gx1, gx0) <= 1e-5
    assert rel(s1, y0[:, 11:]) <= 1e-4  # step after prefill continues the sequence
    for name in gp0:
        assert rel(gp1[name], gp0[name]) <= 1e-5, name


def test_mamba1_parameter_count_by_hand_at_reference_width():
    """ssm_lineage.md §8.1: d = 768, E = 1536, N = 16, r = 48 gives about 3.77M parameters per layer."""
    d, e, n, r, k = 768, 1536, 16, 48, 4
    by_hand = 2 * d * e + e * k + e + e * (r + 2 * n) + r * e + e + e * n + e + e * d
    assert Mamba.param_count(d, Mamba.Config(variant="mamba1", d_state=16)) == by_hand
    assert round(by_hand / 1e6, 2) == 3.77


def test_mamba1_initialization_follows_reference():
    torch.manual_seed(0)
    layer = Mamba(64, Mamba.Config(variant="mamba1", d_state=16), n_layers=2)
    assert layer.dt_rank == 4 and layer.x_proj.weight.shape == (4 + 32, 128)
    assert layer.dt_proj.weight.shape == (128, 4) and layer.conv.weight.shape == (128, 1, 4)
    # S4D-Real: A = -(1..N) in every channel, stored as A_log
    assert torch.allclose(-torch.exp(layer.A_log), -torch.arange(1, 17.0).expand(128, 16))
    assert torch.equal(layer.D, torch.ones(128))
    dt = F.softplus(layer.dt_proj.bias)
    assert (dt >= 1e-3 * 0.999).all() and (dt <= 0.1 * 1.001).all()
    log_dt = dt.log()  # log-uniform: the logs spread over the whole range, not bunched at one end
    assert log_dt.min() < math.log(3e-3) and log_dt.max() > math.log(3e-2)
    bound = 4 ** -0.5
    assert layer.dt_proj.weight.abs().max() <= bound and layer.dt_proj.weight.abs().max() > 0.9 * bound


def test_mamba1_decode_state_and_bytes():
    layer = build({"variant": "mamba1", "d_state": 8})
    _, st = layer.prefill(x_of(2))  # shorter than the conv: the conv state is zero-padded on the left
    assert st["conv"].shape == (2, 64, 3) and torch.equal(st["conv"][:, :, 0], torch.zeros(2, 64))
    assert st["ssm"].shape == (2, 64, 8) and st["ssm"].dtype == torch.float32
    assert layer.state_size(2, 2, torch.bfloat16) == 2 * 64 * (3 * 2 + 4 * 8)


def test_mamba1_layer_equals_direct_reference_computation():
    """The layer against the Mamba-1 equations written out with the naive scan: catches a swapped x/z or B/C split,
    a missing dt bias or gate."""
    from layers.ops.selective_scan import selective_scan_naive

    layer = build({"variant": "mamba1", "d_state": 8})
    x = x_of(9)
    with torch.no_grad():
        xz = layer.in_proj(x)
        xi, z = xz[..., :64], xz[..., 64:]
        xc = F.silu(F.conv1d(F.pad(xi.transpose(1, 2), (3, 0)), layer.conv.weight, layer.conv.bias, groups=64))
        xc = xc.transpose(1, 2)
        proj = layer.x_proj(xc)
        dt = F.softplus(proj[..., :2] @ layer.dt_proj.weight.T + layer.dt_proj.bias)
        y, _ = selective_scan_naive(xc, dt, -torch.exp(layer.A_log), proj[..., 2:10], proj[..., 10:])
        want = layer.out_proj((y + layer.D * xc) * F.silu(z))
        assert rel(layer(x), want) <= 1e-5
