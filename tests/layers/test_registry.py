"""layers.registry: the contract is checked at registration, built-ins load lazily, layers import no hybridnas."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from layers import contract, registry
from layers.base import Layer, TokenwiseLayer

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class _Config:
    bias: bool = False


def _param_count(cls, d_model, config):
    return d_model * d_model + (d_model if config.bias else 0)


def _init(self, d_model, config=None, *, layer_idx=0, n_layers=1):
    Layer.__init__(self, d_model, config, layer_idx=layer_idx, n_layers=n_layers)
    self.proj = nn.Linear(d_model, d_model, bias=self.config.bias)
    self.reset_parameters()


def _reset_parameters(self):
    nn.init.normal_(self.proj.weight, std=0.02)


def _forward(self, x, ctx=None):
    return self.proj(x)


def _prefill(self, x, ctx=None):
    return self.forward(x, ctx), None


def _step(self, x, state, ctx=None):
    return self.forward(x, ctx), None


def _state_size(self, batch, seq_len, dtype=torch.float32):
    return 0


#: A complete position-wise mixer, written out method by method so a test can leave any one out.
METHODS = {"param_count": classmethod(_param_count), "reset_parameters": _reset_parameters, "forward": _forward,
           "prefill": _prefill, "step": _step, "state_size": _state_size}


def _layer_class(name: str = "Custom", base: type = Layer, drop: tuple[str, ...] = (), **extra) -> type:
    ns = {"Config": _Config, "__init__": _init, **{k: v for k, v in METHODS.items() if k not in drop}, **extra}
    return type(name, (base,), ns)


@pytest.fixture
def symbol():
    """A free symbol, unregistered afterwards whatever the test left behind."""
    assert "Q" not in registry.symbol_map()
    yield "Q"
    registry.unregister("Q")


def test_complete_layer_registers_and_passes_the_behavioural_checks(symbol):
    spec = registry.register(symbol, _layer_class())
    assert registry.get(symbol) is spec
    assert registry.check_layer(symbol, d_model=16) == []
    assert registry.check_layer(spec, d_model=8, params={"bias": True}) == []


@pytest.mark.parametrize("method", contract.REQUIRED)
def test_missing_method_is_refused_naming_it(symbol, method):
    with pytest.raises(registry.RegistryError) as info:
        registry.register(symbol, _layer_class(drop=(method,)))
    assert method in str(info.value) and "does not define" in str(info.value)
    assert symbol not in registry.symbol_map()


@pytest.mark.parametrize("method", contract.REQUIRED)
def test_not_implemented_stub_of_a_parent_counts_as_missing(symbol, method):
    def stub(*args, **kwargs):
        """Subclasses provide this."""
        raise NotImplementedError(f"{method} is abstract here")

    parent = type("AbstractParent", (Layer,), {method: classmethod(stub) if method == "param_count" else stub})
    with pytest.raises(registry.RegistryError, match=f"does not define {method}"):
        registry.register(symbol, _layer_class(base=parent, drop=(method,)))


def test_tokenwise_layer_provides_prefill_step_and_state_size(symbol):
    cls = _layer_class(base=TokenwiseLayer, drop=("prefill", "step", "state_size"))
    assert contract.missing_methods(cls) == []
    registry.register(symbol, cls)
    assert registry.check_layer(symbol, d_model=8) == []


def test_a_mixin_parent_counts_as_defining_a_method(symbol):
    mixin = type("StepMixin", (), {"step": _step})
    registry.register(symbol, _layer_class(base=type("Base", (mixin, Layer), {}), drop=("step",)))


def test_several_missing_methods_are_named_together(symbol):
    cls = type("Bare", (Layer,), {"Config": _Config})
    with pytest.raises(registry.RegistryError) as info:
        registry.register(symbol, cls)
    assert "does not define param_count, reset_parameters, forward, prefill, step, state_size" in str(info.value)


def test_config_must_be_a_dataclass(symbol):
    with pytest.raises(registry.RegistryError, match="has no Config dataclass"):
        registry.register(symbol, _layer_class(Config=dict))
    with pytest.raises(registry.RegistryError, match="is not a subclass of layers.base.Layer"):
        registry.register(symbol, nn.Linear)


def test_check_layer_reports_a_wrong_param_count(symbol):
    wrong = _layer_class(param_count=classmethod(lambda cls, d, c: d * d + 1))
    registry.register(symbol, wrong)
    problems = registry.check_layer(symbol, d_model=8)
    assert problems == ["param_count(d_model=8) is 65 but the module has 64 parameters"]


def test_check_layer_reports_step_that_disagrees_with_forward(symbol):
    registry.register(symbol, _layer_class(step=lambda self, x, state, ctx=None: (2 * self.forward(x), None)))
    [problem] = registry.check_layer(symbol, d_model=8)
    assert problem.startswith("step after prefill of 1 token(s) differs from forward")


def test_check_layer_reports_errors_instead_of_raising(symbol):
    def bad_forward(self, x, ctx=None):
        raise RuntimeError("boom")

    registry.register(symbol, _layer_class(forward=bad_forward))
    assert registry.check_layer(symbol, d_model=8) == ["forward raised RuntimeError: boom"]
    assert registry.check_layer(symbol, params={"nope": 1})[0].startswith("config: layer Q (Custom) has no parameter")


def test_builtin_symbols_are_declared_without_importing_them():
    assert set(registry.BUILTINS) <= set(registry.symbols())
    smap = registry.symbol_map()
    assert smap["*"] == "A" and smap["-"] == "F"
    assert registry.primary("*") == "A"
    with pytest.raises(registry.RegistryError, match=r"already registered \(to \['Attention'\]\)"):
        registry.register("A", _layer_class())


def _probe(code: str) -> set[str]:
    """Run ``code`` in a fresh interpreter and return the ``layers``/``hybridnas`` modules it loaded."""
    script = code + ("\nimport json, sys\nprint(json.dumps(sorted(m for m in sys.modules "
                     "if m.split('.')[0] in ('layers', 'hybridnas'))))")
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_get_imports_only_the_module_of_that_symbol():
    mods = _probe("from layers import registry\nregistry.symbols(); registry.symbol_map(); registry.get('*')")
    assert "layers.attention" in mods
    assert not mods & {"layers.mamba", "layers.hyena", "layers.rwkv", "layers.moe", "layers.ffn"}
    assert not {m for m in mods if m.startswith("hybridnas")}


def test_importing_an_op_loads_no_layer_module():
    mods = _probe("import layers.ops.mamba3")
    assert mods - {"layers"} <= {m for m in mods if m.startswith("layers.ops")}, mods


def test_layer_modules_import_nothing_of_hybridnas():
    mods = _probe("from layers import registry\nregistry.specs()")
    assert {"layers.attention", "layers.mamba", "layers.rwkv"} <= mods
    assert not {m for m in mods if m.startswith("hybridnas")}, mods
