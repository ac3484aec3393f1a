"""Contract tests generated from the registry: every registered layer gets them for free.

The behavioural core (builds, forward shape, step after prefill equals forward, exact parameter count, state
size) is ``registry.check_layer``, the same function ``hybridnas validate`` runs on a user's custom symbols;
the tests below it go further (state bytes against the real state, gradients, init, config checks).

A new layer needs nothing here unless its defaults are too big for a CPU test or it has extra interesting
configurations: add it to ``CASES`` (test sizes and parameter sets) and ``INVALID`` (rejected configs).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from hybridnas import registry
from layers import contract
from layers.base import Layer, LayerConfigError

D_MODEL = 32
BATCH = 2
SEQ = 12

#: symbol -> list of (d_model, params) cases; symbols not listed run once with (D_MODEL, {}).
CASES: dict[str, list[tuple[int, dict[str, Any]]]] = {
    "A": [
        (D_MODEL, {}),
        (D_MODEL, {"n_heads": 4, "n_kv_heads": 2, "window": 5, "qkv_bias": True}),
        (D_MODEL, {"n_heads": 2, "n_kv_heads": 1, "head_dim": 12, "rope": False, "window": 1}),
    ],
    "E": [
        (D_MODEL, {"n_experts": 4, "top_k": 2, "z_loss_coef": 1e-3}),
        (D_MODEL, {"n_experts": 3, "top_k": 1, "renormalize": False, "jitter": 0.1}),
    ],
    "F": [(D_MODEL, {}), (24, {"expand": 2.5, "multiple_of": 16, "bias": True})],
    "H": [
        (D_MODEL, {"filter": "implicit", "filter_order": 8, "l_max": 64}),
        (D_MODEL, {"filter": "modal", "modal_state": 3}),
        (24, {"filter": "implicit", "order": 3, "filter_order": 8, "emb_dim": 5, "short_filter": 4, "l_max": 16}),
        (24, {"filter": "modal", "order": 3, "short_filter": 1}),
    ],
    "R": [
        (D_MODEL, {"head_size": 16, "decay_rank": 8, "a_rank": 8, "v_rank": 4, "gate_rank": 8, "chunk_size": 4}),
        (D_MODEL, {"head_size": 8, "decay_rank": 4, "a_rank": 4, "v_rank": 4, "gate_rank": 4, "chunk_size": 5}),
    ],
    "M": [
        (D_MODEL, {"d_state": 8, "headdim": 16, "chunk_size": 4}),
        (D_MODEL, {"d_state": 8, "headdim": 16, "mimo_rank": 2, "rope_fraction": 1.0, "chunk_size": 4}),
        (D_MODEL, {"variant": "mamba2", "d_state": 8, "headdim": 16, "chunk_size": 4}),
        (D_MODEL, {"variant": "mamba1", "d_state": 8}),
        (24, {"variant": "mamba1", "d_state": 4, "d_conv": 1, "dt_rank": 3, "expand": 1.5}),
    ],
    "S": [
        (D_MODEL, {"d_state": 8}),
        (D_MODEL, {"d_state": 8, "init": "inv"}),
        (24, {"d_state": 6, "init": "legs", "dt_min": 0.01, "dt_max": 0.05}),
    ],
}

#: symbol -> list of (d_model, params, field named by the LayerConfigError).
INVALID: dict[str, list[tuple[int, dict[str, Any], str]]] = {
    "A": [
        (30, {"n_heads": 4}, "n_heads"),
        (32, {"n_heads": 0}, "n_heads"),
        (32, {"n_heads": 4, "n_kv_heads": 3}, "n_kv_heads"),
        (32, {"n_heads": 4, "head_dim": 7}, "head_dim"),
        (28, {"n_heads": 4}, "head_dim"),  # head_dim 7 is odd, RoPE needs pairs
        (32, {"window": 0}, "window"),
    ],
    "E": [
        (32, {"n_experts": 4, "top_k": 5}, "top_k"),
        (32, {"top_k": 0}, "top_k"),
        (32, {"n_experts": 0, "top_k": 0}, "n_experts"),
        (32, {"aux_loss_coef": -1.0}, "aux_loss_coef"),
        (32, {"jitter": 1.5}, "jitter"),
        (32, {"expand": 0.0}, "expand"),
    ],
    "F": [(32, {"expand": -1.0}, "expand"), (32, {"multiple_of": 0}, "multiple_of")],
    "H": [
        (32, {"order": 1}, "order"),
        (32, {"filter": "fft"}, "filter"),
        (32, {"filter_order": 0}, "filter_order"),
        (32, {"emb_dim": 4}, "emb_dim"),
        (32, {"l_max": 0}, "l_max"),
        (32, {"filter": "modal", "modal_state": 0}, "modal_state"),
        (32, {"short_filter": 0}, "short_filter"),
    ],
    "R": [
        (96, {"head_size": 64}, "head_size"),
        (32, {"head_size": 0}, "head_size"),
        (32, {"head_size": 16, "decay_rank": 0}, "decay_rank"),
        (32, {"head_size": 16, "gate_rank": -1}, "gate_rank"),
        (32, {"head_size": 16, "norm_eps": 0.0}, "norm_eps"),
        (32, {"head_size": 16, "chunk_size": 0}, "chunk_size"),
    ],
    "M": [
        (32, {"headdim": 24}, "headdim"),
        (32, {"rope_fraction": 0.25}, "rope_fraction"),
        (32, {"variant": "mamba2", "mimo_rank": 2}, "mimo_rank"),
        (32, {"variant": "mamba4"}, "variant"),
        (32, {"d_state": 1, "headdim": 16}, "d_state"),
        (32, {"mimo_rank": 0, "headdim": 16}, "mimo_rank"),
        (32, {"variant": "mamba1", "dt_rank": 0}, "dt_rank"),
        (32, {"variant": "mamba1", "mimo_rank": 2}, "mimo_rank"),
        (32, {"variant": "mamba1", "d_conv": 0}, "d_conv"),
        (32, {"variant": "mamba1", "d_state": 0}, "d_state"),
    ],
    "S": [
        (32, {"d_state": 7}, "d_state"),
        (32, {"d_state": 0}, "d_state"),
        (32, {"init": "real"}, "init"),
        (32, {"dt_min": 0.2, "dt_max": 0.1}, "dt_min"),
        (32, {"backend": "cuda"}, "backend"),
    ],
}


def _cases() -> list:
    out = []
    for spec in registry.specs():
        for i, (d, params) in enumerate(CASES.get(spec.symbol, [(D_MODEL, {})])):
            out.append(pytest.param(spec, d, params, id=f"{spec.symbol}-{spec.name}-{i}"))
    return out


CASE_PARAMS = _cases()


def _build(spec, d: int, params: dict, n_layers: int = 2) -> Layer:
    torch.manual_seed(0)
    return spec.build(d, params, layer_idx=1, n_layers=n_layers)


def _x(d: int, seq: int = SEQ, batch: int = BATCH, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, seq, d, generator=g)


def _tensors(state: Any) -> list[torch.Tensor]:
    """Every tensor inside a state (tensor, dict, list/tuple, nested); other leaves (ints) are ignored."""
    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, dict):
        return [t for v in state.values() for t in _tensors(v)]
    if isinstance(state, list | tuple):
        return [t for v in state for t in _tensors(v)]
    return []


def test_registry_has_builtins():
    assert {"A", "E", "F"} <= set(registry.symbols())
    assert registry.primary("*") == "A" and registry.primary("-") == "F"


def test_contract_checks_are_the_documented_ones():
    """The checks every layer gets through ``check_layer``: prefill of 1, 5 and all tokens, fp32 tolerance 1e-5."""
    assert contract.PREFILL_LENGTHS == (1, 5) and contract.TOLERANCE == 1e-5
    assert set(contract.REQUIRED) == {"param_count", "reset_parameters", "forward", "prefill", "step", "state_size"}


@pytest.mark.parametrize("spec, d, params", CASE_PARAMS)
def test_contract(spec, d, params):
    """Forward keeps shape and dtype and is finite, aux_loss is None or a finite scalar, kind is mixer or ffn,
    step after prefill equals forward, param_count is exact, state_size is bytes: ``registry.check_layer``."""
    assert registry.check_layer(spec, d, params, batch=BATCH, seq_len=SEQ) == []
    assert spec.param_count(d, params) == sum(p.numel() for p in _build(spec, d, params).parameters())


@pytest.mark.parametrize("spec, d, params", CASE_PARAMS)
def test_state_size_matches_prefill_state(spec, d, params):
    layer = _build(spec, d, params).eval()
    with torch.no_grad():
        for length in (1, 3, SEQ):
            _, state = layer.prefill(_x(d, seq=length), {})
            actual = sum(t.nbytes for t in _tensors(state))
            assert layer.state_size(BATCH, length, torch.float32) == actual, f"length {length}"
            # and it stays right after decoding more tokens
            _, state = layer.step(_x(d, seq=1, seed=5), state, {})
            actual = sum(t.nbytes for t in _tensors(state))
            assert layer.state_size(BATCH, length + 1, torch.float32) == actual, f"length {length} + 1 step"
    if not spec.cls.state_grows:
        assert layer.state_size(BATCH, 10) == layer.state_size(BATCH, 10_000)
    assert layer.state_size(2 * BATCH, SEQ) == 2 * layer.state_size(BATCH, SEQ)


@pytest.mark.parametrize("spec, d, params", CASE_PARAMS)
def test_gradients_finite(spec, d, params):
    layer = _build(spec, d, params).train()
    x = _x(d).requires_grad_(True)
    y = layer(x, {})
    aux = layer.aux_loss()
    loss = y.square().mean() + (aux if aux is not None else 0.0)
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    # A layer may name parameters it uses only with what an earlier layer of the same call put in ``ctx``
    # (RWKV-7's value-residual LoRA; a lone layer with an empty ctx is the model's first R layer and leaves it
    # unused). tests/layers/test_rwkv.py checks those gradients with two layers sharing a ctx.
    ctx_only = set(getattr(layer, "ctx_only_params", ()))
    for name, p in layer.named_parameters():
        if p.requires_grad and name not in ctx_only:
            assert p.grad is not None, f"{name} got no gradient"
            assert torch.isfinite(p.grad).all(), f"{name} has non-finite gradient"
            assert p.grad.abs().sum() > 0, f"{name} gradient is identically zero"


@pytest.mark.parametrize("spec, d, params", CASE_PARAMS)
def test_reset_parameters_deterministic(spec, d, params):
    a, b = _build(spec, d, params), _build(spec, d, params)
    with torch.no_grad():
        for p in a.parameters():
            p.add_(1.0)
    torch.manual_seed(0)
    a.reset_parameters()
    torch.manual_seed(0)
    b.reset_parameters()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name


@pytest.mark.parametrize("spec", registry.specs(), ids=lambda s: s.symbol)
def test_config_fields_have_defaults(spec):
    cfg = spec.make_config()
    assert set(spec.cls.config_fields()) == set(vars(cfg))


@pytest.mark.parametrize("spec", registry.specs(), ids=lambda s: s.symbol)
def test_rejects_nonpositive_d_model(spec):
    with pytest.raises(LayerConfigError) as e:
        spec.cls.check_config(0, spec.make_config())
    assert e.value.field == "d_model"


def _invalid_cases() -> list:
    return [pytest.param(sym, d, params, field, id=f"{sym}-{field}-{i}")
            for sym, cases in INVALID.items() for i, (d, params, field) in enumerate(cases)]


@pytest.mark.parametrize("symbol, d, params, field", _invalid_cases())
def test_check_config_rejects(symbol, d, params, field):
    spec = registry.get(symbol)
    with pytest.raises(LayerConfigError) as e:
        spec.cls.check_config(d, spec.make_config(params))
    assert e.value.field == field
    with pytest.raises(LayerConfigError):  # the constructor checks too
        spec.build(d, params)
