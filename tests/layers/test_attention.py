"""Attention against a naive reference: GQA, sliding window (forward and decoding), NoPE, RoPE."""

from __future__ import annotations

import math

import pytest
import torch

from layers.attention import Attention, apply_rope
from layers.base import LayerConfigError


def _layer(d=32, **kw) -> Attention:
    torch.manual_seed(0)
    layer = Attention(d, Attention.Config(**kw))
    with torch.no_grad():  # larger weights than the 0.02 init so attention patterns are far from uniform
        layer.qkv.weight.normal_(0.0, 0.3)
        layer.out.weight.normal_(0.0, 0.3)
    return layer


def naive_attention(layer: Attention, x: torch.Tensor) -> torch.Tensor:
    """Explicit masked softmax with kv heads repeated for GQA, fp32, positions 0..T-1."""
    b, t, _ = x.shape
    h, g, hd = layer.n_heads, layer.n_kv_heads, layer.head_dim
    qkv = x @ layer.qkv.weight.T
    if layer.qkv.bias is not None:
        qkv = qkv + layer.qkv.bias
    q, k, v = qkv.split((h * hd, g * hd, g * hd), dim=-1)
    q = q.view(b, t, h, hd).transpose(1, 2)
    k = k.view(b, t, g, hd).transpose(1, 2)
    v = v.view(b, t, g, hd).transpose(1, 2)
    if layer.config.rope:
        pos = torch.arange(t)
        q, k = apply_rope(q, pos, layer.config.rope_theta), apply_rope(k, pos, layer.config.rope_theta)
    rep = h // g
    k = torch.stack([k[:, i // rep] for i in range(h)], dim=1)  # query head i reads kv head i // rep
    v = torch.stack([v[:, i // rep] for i in range(h)], dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    qi, kj = torch.arange(t)[:, None], torch.arange(t)[None, :]
    allowed = kj <= qi
    if layer.config.window is not None:
        allowed &= qi - kj < layer.config.window
    scores = scores.masked_fill(~allowed, float("-inf"))
    y = torch.softmax(scores, dim=-1) @ v
    return y.transpose(1, 2).reshape(b, t, h * hd) @ layer.out.weight.T


@pytest.mark.parametrize("n_heads, n_kv_heads", [(4, None), (4, 2), (4, 1), (8, 2)])
def test_gqa_matches_naive(n_heads, n_kv_heads):
    layer = _layer(n_heads=n_heads, n_kv_heads=n_kv_heads, qkv_bias=True)
    with torch.no_grad():
        layer.qkv.bias.normal_()
    x = torch.randn(2, 10, 32)
    torch.testing.assert_close(layer(x), naive_attention(layer, x), atol=1e-5, rtol=1e-5)


def test_gqa_gradients_match_naive():
    layer = _layer(n_heads=4, n_kv_heads=2)
    x = torch.randn(2, 9, 32, requires_grad=True)
    grads = []
    for fn in (layer, lambda x: naive_attention(layer, x)):
        layer.zero_grad()
        x.grad = None
        fn(x).square().sum().backward()
        grads.append((x.grad.clone(), layer.qkv.weight.grad.clone(), layer.out.weight.grad.clone()))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("window", [1, 3, 6, 50])
@pytest.mark.parametrize("n_kv_heads", [None, 2])
def test_sliding_window_forward_and_decode(window, n_kv_heads):
    layer = _layer(n_heads=4, n_kv_heads=n_kv_heads, window=window).eval()
    x = torch.randn(2, 14, 32)
    ref = naive_attention(layer, x)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), ref, atol=1e-5, rtol=1e-5)
        for n_prefill in (0, 5):
            y0, state = layer.prefill(x[:, :n_prefill])
            ys = [y0]
            for t in range(n_prefill, x.shape[1]):
                y, state = layer.step(x[:, t:t + 1], state)
                ys.append(y)
                assert state["k"].shape[2] == min(t + 1, window)  # cache bounded by the window
                assert state["pos"] == t + 1
            torch.testing.assert_close(torch.cat(ys, dim=1), ref, atol=1e-5, rtol=1e-5)


def test_multi_token_step_with_window():
    """A chunk of several tokens decoded from a state (chunked prefill) equals the forward pass."""
    layer = _layer(n_heads=4, n_kv_heads=2, window=4).eval()
    x = torch.randn(1, 13, 32)
    with torch.no_grad():
        ref = layer(x)
        y0, state = layer.prefill(x[:, :5])
        y1, state = layer.step(x[:, 5:9], state)
        y2, state = layer.step(x[:, 9:], state)
    torch.testing.assert_close(torch.cat([y0, y1, y2], dim=1), ref, atol=1e-5, rtol=1e-5)


def test_window_state_size_bounded():
    layer = _layer(window=8)
    assert layer.state_size(1, 4) < layer.state_size(1, 8) == layer.state_size(1, 10_000)
    unbounded = _layer()
    assert unbounded.state_size(1, 100) == 100 * unbounded.state_size(1, 1)
    # 2 (k and v) * batch * kv heads * len * head_dim * bytes
    gqa = _layer(n_heads=8, n_kv_heads=2)
    assert gqa.state_size(3, 5, torch.bfloat16) == 2 * 3 * 2 * 5 * 4 * 2


def test_state_size_bf16_matches_cache():
    layer = _layer(n_heads=4, n_kv_heads=2, window=6).to(torch.bfloat16)
    with torch.no_grad():
        _, state = layer.prefill(torch.randn(2, 9, 32, dtype=torch.bfloat16))
    assert state["k"].dtype == torch.bfloat16
    assert state["k"].nbytes + state["v"].nbytes == layer.state_size(2, 9, torch.bfloat16)


def test_nope_matches_naive_and_is_permutation_invariant():
    layer = _layer(n_heads=2, head_dim=7, rope=False)  # odd head_dim is fine without RoPE
    x = torch.randn(2, 8, 32)
    y = layer(x)
    torch.testing.assert_close(y, naive_attention(layer, x), atol=1e-5, rtol=1e-5)
    # Without positions, the last token's output ignores the order of the tokens before it.
    perm = torch.cat([torch.randperm(7), torch.tensor([7])])
    torch.testing.assert_close(layer(x[:, perm])[:, -1], y[:, -1], atol=1e-5, rtol=1e-5)
    roped = _layer(n_heads=2, head_dim=8)
    assert not torch.allclose(roped(x[:, perm])[:, -1], roped(x)[:, -1], atol=1e-4)


def test_rope_scores_depend_on_relative_position_only():
    torch.manual_seed(0)
    q, k = torch.randn(3, 16), torch.randn(3, 16)
    pq, pk = torch.tensor([5, 9, 2]), torch.tensor([1, 9, 7])

    def scores(shift):
        rq = torch.stack([apply_rope(q[i:i + 1], pq[i:i + 1] + shift)[0] for i in range(3)])
        rk = torch.stack([apply_rope(k[i:i + 1], pk[i:i + 1] + shift)[0] for i in range(3)])
        return (rq * rk).sum(-1)

    base = scores(0)
    for shift in (1, 17, 1000):
        torch.testing.assert_close(scores(shift), base, atol=1e-4, rtol=1e-4)
    # rotation preserves norms and is the identity at position 0
    torch.testing.assert_close(apply_rope(q, torch.zeros(3, dtype=torch.long)), q)
    torch.testing.assert_close(apply_rope(q, pq).norm(dim=-1), q.norm(dim=-1))


def test_rope_layer_decode_after_long_prefix():
    """Step decoding at a large absolute position uses the right rotation (matches forward)."""
    layer = _layer(n_heads=4, rope_theta=500000.0).eval()
    x = torch.randn(1, 40, 32)
    with torch.no_grad():
        ref = layer(x)
        _, state = layer.prefill(x[:, :39])
        y, _ = layer.step(x[:, 39:], state)
    torch.testing.assert_close(y, ref[:, 39:], atol=1e-5, rtol=1e-5)


def test_empty_prefill():
    layer = _layer().eval()
    y, state = layer.prefill(torch.randn(2, 0, 32))
    assert y.shape == (2, 0, 32) and state["pos"] == 0 and state["k"].shape[2] == 0


def test_check_config_messages():
    with pytest.raises(LayerConfigError, match="not divisible by n_heads"):
        Attention(30, Attention.Config(n_heads=4))
    Attention(30, Attention.Config(n_heads=4, head_dim=8))  # explicit head_dim lifts the divisibility rule
    with pytest.raises(LayerConfigError) as e:
        Attention(32, Attention.Config(rope_theta=0.0))
    assert e.value.field == "rope_theta"


def test_init_scales():
    layer = Attention(256, Attention.Config(n_heads=4), n_layers=8)
    assert abs(layer.qkv.weight.std().item() - 0.02) < 2e-3
    assert abs(layer.out.weight.std().item() - 0.02 / 4) < 1e-3
