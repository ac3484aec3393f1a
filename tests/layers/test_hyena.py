"""Hyena layer ``H``: FFT and direct convolution agree (outputs, grads), decoding for both filters, state sizes."""

from __future__ import annotations

import pytest
import torch

from layers.hyena import Hyena
from layers.ops import dispatch

TOL = 1e-4
FILTERS = [
    pytest.param({"filter": "implicit", "filter_order": 16, "l_max": 64}, id="implicit"),
    pytest.param({"filter": "modal", "modal_state": 4, "l_max": 64}, id="modal"),
    pytest.param({"filter": "implicit", "order": 3, "filter_order": 8, "emb_dim": 5, "l_max": 32},
                 id="implicit-order3"),
    pytest.param({"filter": "modal", "order": 3, "short_filter": 4}, id="modal-order3-fir4"),
]


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def layer(params: dict, d: int = 16) -> Hyena:
    torch.manual_seed(0)
    return Hyena(d, Hyena.Config(**params), layer_idx=0, n_layers=2)


def x_(t: int, d: int = 16, b: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, t, d, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("params", FILTERS)
@pytest.mark.parametrize("t", [1, 29])
def test_fft_and_direct_layers_agree_with_grads(params, t):
    lay = layer(params)
    results = []
    for backend in ("naive", "chunked"):
        x = x_(t).requires_grad_(True)
        lay.zero_grad(set_to_none=True)
        with dispatch.force(backend):
            y = lay(x, {})
        y.square().sum().backward()
        results.append([y.detach(), x.grad] + [p.grad.clone() for p in lay.parameters()])
    for i, (a, b) in enumerate(zip(*results)):
        assert rel_err(a, b) <= TOL, f"tensor {i}: {rel_err(a, b):.2e}"


@pytest.mark.parametrize("params", FILTERS)
@pytest.mark.parametrize("n_prefill", [1, 8, 23])
def test_step_after_prefill_equals_forward(params, n_prefill):
    lay = layer(params).eval()
    x = x_(23)
    with torch.no_grad():
        ref = lay(x, {})
        y, state = lay.prefill(x[:, :n_prefill], {})
        outs = [y]
        for t in range(n_prefill, 23):
            y, state = lay.step(x[:, t:t + 1], state, {})
            outs.append(y)
    assert rel_err(torch.cat(outs, dim=1), ref) <= TOL


@pytest.mark.parametrize("params", FILTERS[:2])
def test_multi_token_step_equals_forward(params):
    lay = layer(params).eval()
    x = x_(21)
    with torch.no_grad():
        ref = lay(x, {})
        y0, s = lay.prefill(x[:, :6], {})
        y1, s = lay.step(x[:, 6:13], s, {})
        y2, s = lay.step(x[:, 13:], s, {})
    assert rel_err(torch.cat((y0, y1, y2), dim=1), ref) <= TOL


@pytest.mark.parametrize("params", FILTERS[:2])
def test_filter_does_not_depend_on_sequence_length(params):
    lay = layer(params)
    with torch.no_grad():
        assert torch.allclose(lay.filter(10), lay.filter(40)[..., :10], atol=1e-6)


def test_modal_poles_inside_unit_circle():
    lay = layer({"filter": "modal", "modal_state": 8})
    with torch.no_grad():
        lay.filter.nu.normal_(0.0, 5.0)
        p_re, p_im = lay.filter.pole()
    assert (p_re.square() + p_im.square() <= 1).all()  # |p| = exp(-exp(nu)): 1 only where exp(nu) underflows


def test_state_sizes_at_4096():
    implicit, modal = Hyena(128), Hyena(128, Hyena.Config(filter="modal"))
    fir = 3 * 128 * 2 * 4  # (N+1) d channels, w-1 = 2 taps, fp32
    assert implicit.state_grows and not modal.state_grows
    assert implicit.state_size(1, 4096) == fir + 128 * 4096 * 4
    assert modal.state_size(1, 4096) == modal.state_size(1, 1) == fir + 128 * 2 * 2 * 4
    for lay in (implicit, modal):
        assert Hyena.param_count(128, lay.config) == sum(p.numel() for p in lay.parameters())
