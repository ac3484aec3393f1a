"""RWKV-7 layer ``R``: backends agree, value residual through ctx, decoding, decay bound, state size."""

from __future__ import annotations

import math

import pytest
import torch

from hybridnas.config import ModelConfig
from hybridnas.model import HybridLM
from layers.ops import dispatch
from layers.rwkv import CTX_V_FIRST, RWKV7

TOL = 1e-4
SMALL = {"head_size": 16, "decay_rank": 8, "a_rank": 8, "v_rank": 8, "gate_rank": 8, "chunk_size": 8}


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def layer(idx: int = 0, n_layers: int = 2, d: int = 32, **kw) -> RWKV7:
    torch.manual_seed(idx)
    return RWKV7(d, RWKV7.Config(**{**SMALL, **kw}), layer_idx=idx, n_layers=n_layers)


def x_(t: int, d: int = 32, b: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, t, d, generator=torch.Generator().manual_seed(seed))


def _two_layers(l0: RWKV7, l1: RWKV7, x: torch.Tensor) -> torch.Tensor:
    ctx: dict = {}
    return l1(l0(x, ctx) + x, ctx)


@pytest.mark.parametrize("t", [1, 13, 37])
def test_naive_and_chunked_layers_agree_with_grads(t):
    l0, l1 = layer(0), layer(1)
    params = list(l0.parameters()) + list(l1.parameters())
    results = []
    for backend in ("naive", "chunked"):
        x = x_(t).requires_grad_(True)
        for p in params:
            p.grad = None
        with dispatch.force(backend):
            y = _two_layers(l0, l1, x)
        y.square().sum().backward()
        results.append([y.detach(), x.grad] + [p.grad.clone() for p in params if p.grad is not None])
    (y_n, *g_n), (y_c, *g_c) = results
    assert len(g_n) == len(g_c)
    assert rel_err(y_c, y_n) <= TOL
    for i, (a, b) in enumerate(zip(g_c, g_n)):
        assert rel_err(a, b) <= TOL, f"grad {i}: {rel_err(a, b):.2e}"


def test_value_residual_flows_through_ctx():
    l0, l1 = layer(0), layer(1)
    x = x_(9)
    ctx: dict = {}
    y0 = l0(x, ctx)
    assert CTX_V_FIRST in ctx and ctx[CTX_V_FIRST].shape == (2, 9, 32)
    v_first = ctx[CTX_V_FIRST]
    y1 = l1(x + y0, ctx)
    assert ctx[CTX_V_FIRST] is v_first  # later layers read it, never overwrite it
    # the second layer's output depends on the first layer's value, through ctx only
    assert rel_err(l1(x + y0, {CTX_V_FIRST: v_first + 1.0}), y1) > 1e-3
    assert torch.equal(l1(x + y0, {CTX_V_FIRST: v_first}), y1)


def test_value_residual_params_get_gradients_in_later_layers_only():
    l0, l1 = layer(0), layer(1)
    _two_layers(l0, l1, x_(11)).square().mean().backward()
    for name, p in l1.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    for name, p in l0.named_parameters():
        if name in RWKV7.ctx_only_params:
            assert p.grad is None, name  # the first R layer has no value to mix toward
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("n_prefill", [1, 6, 17])
def test_two_layer_decode_equals_forward(n_prefill):
    l0, l1 = layer(0).eval(), layer(1).eval()
    x = x_(17)
    with torch.no_grad():
        ref = _two_layers(l0, l1, x)
        ctx: dict = {}
        y0, s0 = l0.prefill(x[:, :n_prefill], ctx)
        y1, s1 = l1.prefill(y0 + x[:, :n_prefill], ctx)
        outs = [y1]
        for t in range(n_prefill, 17):
            ctx = {}  # the model's step makes a fresh ctx per call
            h, s0 = l0.step(x[:, t:t + 1], s0, ctx)
            y, s1 = l1.step(h + x[:, t:t + 1], s1, ctx)
            outs.append(y)
    assert rel_err(torch.cat(outs, dim=1), ref) <= TOL


def test_multi_token_step_equals_forward():
    lay = layer(0).eval()
    x = x_(20)
    with torch.no_grad():
        ref = lay(x, {})
        y0, s = lay.prefill(x[:, :7], {})
        y1, s = lay.step(x[:, 7:15], s, {})
        y2, s = lay.step(x[:, 15:], s, {})
    assert rel_err(torch.cat((y0, y1, y2), dim=1), ref) <= TOL


def test_model_with_r_after_attention_decodes_like_forward():
    cfg = ModelConfig(vocab_size=32, d_model=32, pattern="ARR", layers={"A": {"n_heads": 2}, "R": SMALL})
    torch.manual_seed(0)
    model = HybridLM(cfg).eval()
    assert HybridLM.param_count(cfg) == model.num_params()
    ids = torch.randint(0, 32, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(ids)
        logits, states = model.prefill(ids[:, :5])
        outs = [logits]
        for t in range(5, 12):
            step_logits, states = model.step(ids[:, t], states)
            outs.append(step_logits[:, None])
    assert rel_err(torch.cat(outs, dim=1), ref) <= TOL


def test_decay_is_bounded():
    lay = layer(0)
    with torch.no_grad():
        lay.w0.fill_(50.0)  # saturate the sigmoid: the fastest possible decay
        w = -math.exp(-0.5) * torch.sigmoid(lay.w0 + torch.tanh(x_(3) @ lay.w1) @ lay.w2)
    assert (w.exp() >= math.exp(-math.exp(-0.5)) - 1e-7).all() and (w.exp() <= 1).all()


def test_state_size_fixed_and_exact_at_4096():
    lay = RWKV7(128)  # defaults: head_size 64 -> 2 heads
    expect = 128 * 4 + 2 * 64 * 64 * 4
    assert lay.state_size(1, 4096) == lay.state_size(1, 1) == expect
    assert lay.state_size(1, 4096, torch.bfloat16) == 128 * 2 + 2 * 64 * 64 * 4  # the S state stays fp32
    assert RWKV7.param_count(128, lay.config) == sum(p.numel() for p in lay.parameters())
