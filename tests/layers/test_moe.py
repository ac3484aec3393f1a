"""MoE: sorted dispatch against a dense reference, aux/z losses by hand, renormalisation, router gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from layers.ffn import swiglu
from layers.moe import MoE


def _moe(d=16, **kw) -> MoE:
    torch.manual_seed(0)
    layer = MoE(d, MoE.Config(**kw))
    with torch.no_grad():  # a sharper router than the 0.02 init, so routing is far from uniform
        layer.router.weight.normal_(0.0, 0.5)
    return layer


def dense_reference(layer: MoE, x: torch.Tensor) -> torch.Tensor:
    """Every expert on every token, weighted by a dense (N, E) gate that is zero off the top-k."""
    xf = x.reshape(-1, layer.d_model)
    probs = torch.softmax(xf.float() @ layer.router.weight.float().T, dim=-1)
    w, idx = probs.topk(layer.top_k, dim=-1)
    if layer.config.renormalize:
        w = w / w.sum(-1, keepdim=True)
    gate = torch.zeros_like(probs).scatter(1, idx, w)
    out = torch.zeros_like(xf)
    for e in range(layer.n_experts):
        out = out + gate[:, e:e + 1] * swiglu(xf, layer.w1[e], layer.w3[e], layer.w2[e])
    return out.reshape(x.shape)


@pytest.mark.parametrize("n_experts, top_k, renormalize", [(4, 2, True), (8, 2, False), (5, 1, True), (3, 3, True)])
def test_sorted_dispatch_matches_dense(n_experts, top_k, renormalize):
    layer = _moe(n_experts=n_experts, top_k=top_k, renormalize=renormalize, aux_loss_coef=0.0)
    x = torch.randn(3, 7, 16, requires_grad=True)
    results = []
    for fn in (layer, lambda x: dense_reference(layer, x)):
        layer.zero_grad()
        x.grad = None
        y = fn(x)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        results.append((y.detach(), x.grad.clone(), *(p.grad.clone() for p in layer.parameters())))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_unused_expert_gets_zero_gradient_and_counts_add_up():
    layer = _moe(n_experts=4, top_k=1)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0, 0] = 100.0  # every token below has x[0] > 0, so all go to expert 0
    x = torch.randn(1, 20, 16)
    x[..., 0] = x[..., 0].abs() + 0.1
    layer(x).sum().backward()
    assert layer.last_tokens_per_expert.tolist() == [20, 0, 0, 0]
    assert layer.w1.grad[1:].abs().sum() == 0 and layer.w1.grad[0].abs().sum() > 0


def test_bf16_forward():
    layer = _moe(n_experts=4, top_k=2).to(torch.bfloat16)
    x = torch.randn(2, 5, 16, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    assert layer.aux_loss().dtype == torch.float32  # router statistics stay fp32


@pytest.mark.parametrize("n_experts, top_k", [(4, 1), (8, 2), (6, 3)])
def test_aux_loss_is_k_for_uniform_router(n_experts, top_k):
    layer = _moe(n_experts=n_experts, top_k=top_k, aux_loss_coef=1.0)
    with torch.no_grad():
        layer.router.weight.zero_()  # all probabilities 1/E, so P̄ is uniform whatever top-k picks
    layer(torch.randn(2, 9, 16))
    torch.testing.assert_close(layer.aux_loss(), torch.tensor(float(top_k)))


def _hand_case(**kw) -> tuple[MoE, torch.Tensor]:
    """d=2, E=2: tokens e0, e1, e0 and router ln(3)*I give probabilities (3/4, 1/4), (1/4, 3/4), (3/4, 1/4)."""
    layer = MoE(2, MoE.Config(n_experts=2, **kw))
    with torch.no_grad():
        layer.router.weight.copy_(math.log(3.0) * torch.eye(2))
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]])
    return layer, x


def test_aux_loss_hand_computed():
    layer, x = _hand_case(top_k=1, aux_loss_coef=0.5)
    layer(x)
    # f = (2/3, 1/3); P̄ = (7/12, 5/12); L = E * (2/3 * 7/12 + 1/3 * 5/12) = 2 * 19/36 = 19/18
    torch.testing.assert_close(layer.aux_loss(), torch.tensor(0.5 * 19 / 18))
    layer, x = _hand_case(top_k=2, aux_loss_coef=1.0)
    layer(x)
    torch.testing.assert_close(layer.aux_loss(), torch.tensor(2.0))  # every expert chosen once per token: k


def test_z_loss_value_and_sum():
    layer, x = _hand_case(top_k=1, aux_loss_coef=0.0, z_loss_coef=0.1)
    layer(x)
    # logits are (ln3, 0) or (0, ln3): logsumexp = ln 4 for every token
    torch.testing.assert_close(layer.aux_loss(), torch.tensor(0.1 * math.log(4.0) ** 2))
    layer, x = _hand_case(top_k=1, aux_loss_coef=0.5, z_loss_coef=0.1)
    layer(x)
    torch.testing.assert_close(layer.aux_loss(), torch.tensor(0.5 * 19 / 18 + 0.1 * math.log(4.0) ** 2))


def test_aux_loss_none_when_disabled():
    layer = _moe(aux_loss_coef=0.0, z_loss_coef=0.0)
    layer(torch.randn(1, 4, 16))
    assert layer.aux_loss() is None


def test_renormalize_scales_output_by_topk_mass():
    x = torch.randn(2, 6, 16)
    norm = _moe(n_experts=6, top_k=2, renormalize=True)
    raw = _moe(n_experts=6, top_k=2, renormalize=False)
    raw.load_state_dict(norm.state_dict())
    y_norm, y_raw = norm(x), raw(x)
    assert not torch.allclose(y_norm, y_raw, atol=1e-4)
    # Mixtral divides by the kept probability mass s; HF Jamba does not: y_raw = s * y_norm per token.
    probs = torch.softmax(x @ norm.router.weight.T, dim=-1)
    s = probs.topk(2, dim=-1).values.sum(-1, keepdim=True)
    torch.testing.assert_close(y_raw, s * y_norm, atol=1e-5, rtol=1e-5)
    # with top_k == n_experts the kept mass is 1 and the two agree
    full_n, full_r = _moe(n_experts=3, top_k=3), _moe(n_experts=3, top_k=3, renormalize=False)
    full_r.load_state_dict(full_n.state_dict())
    torch.testing.assert_close(full_n(x), full_r(x), atol=1e-6, rtol=1e-6)


def test_router_gets_gradient_through_aux_loss():
    layer = _moe(n_experts=4, top_k=2, aux_loss_coef=1.0, z_loss_coef=0.01)
    layer(torch.randn(2, 8, 16))
    layer.aux_loss().backward()
    g = layer.router.weight.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
    assert layer.w1.grad is None  # the aux loss touches only the router


def test_aux_loss_gradient_matches_autograd_of_formula():
    layer = _moe(n_experts=4, top_k=2, aux_loss_coef=1.0)
    x = torch.randn(2, 8, 16)
    layer(x)
    layer.aux_loss().backward()
    w = layer.router.weight.detach().clone().requires_grad_(True)
    probs = torch.softmax(x.reshape(-1, 16) @ w.T, dim=-1)
    f = F.one_hot(probs.topk(2, dim=-1).indices, 4).float().mean(0)
    (4 * (f * probs.mean(0)).sum()).backward()
    torch.testing.assert_close(layer.router.weight.grad, w.grad)


def test_jitter_only_in_training():
    layer = _moe(n_experts=4, top_k=1, jitter=0.5)
    x = torch.randn(4, 16, 16)
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x))
    layer.train()
    torch.manual_seed(1)
    a = layer(x)
    torch.manual_seed(2)
    b = layer(x)
    assert not torch.allclose(a, b)


def test_empty_input():
    layer = _moe()
    y = layer(torch.randn(2, 0, 16))
    assert y.shape == (2, 0, 16) and layer.aux_loss() is None


def test_param_count_formula():
    layer = MoE(24, MoE.Config(n_experts=3, expand=1.5))
    h = 40  # round_up(int(1.5 * 24) = 36, 8)
    assert layer.hidden == h
    assert MoE.param_count(24, layer.config) == 3 * 24 + 3 * 3 * 24 * h == sum(p.numel() for p in layer.parameters())
