"""hybridnas.registry scoping: the symbols a YAML file declares stay in force while it is in use and never leak
into the next space or architecture loaded in the same process."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch
from optuna.trial import FixedTrial

from hybridnas import registry
from hybridnas.config import load_arch, load_space
from hybridnas.model import HybridLM
from hybridnas.search import sample_arch
from hybridnas.yamlio import ConfigError

MODULE = "hybridnas_test_scoped_layer"

SOURCE = '''
from dataclasses import dataclass

from torch import nn

from layers.base import TokenwiseLayer


class Doubler(TokenwiseLayer):
    """y = 2 W x, position by position. Parameters: d*d."""

    kind = "mixer"

    @dataclass
    class Config:
        std: float = 0.02

    def __init__(self, d_model, config=None, *, layer_idx=0, n_layers=1):
        super().__init__(d_model, config, layer_idx=layer_idx, n_layers=n_layers)
        self.proj = nn.Linear(d_model, d_model, bias=False)
        self.reset_parameters()

    @classmethod
    def param_count(cls, d_model, config):
        return d_model * d_model

    def reset_parameters(self):
        nn.init.normal_(self.proj.weight, std=self.config.std)

    def forward(self, x, ctx=None):
        return 2 * self.proj(x)
'''

TASK = "task: {name: mqar, vocab_size: 64, seq_len: 32, num_kv_pairs: 4}\n"


def space(pattern: str, symbols: str = "") -> str:
    return textwrap.dedent(symbols) + TASK + f"model: {{d_model: 32, pattern: [{pattern}]}}\ntrain: {{steps: 5}}\n"


@pytest.fixture
def layer_path(tmp_path, monkeypatch):
    """An importable user layer; every symbol the test leaves registered is dropped afterwards."""
    (tmp_path / f"{MODULE}.py").write_text(SOURCE, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    before = set(registry.symbols())
    yield f"{MODULE}:Doubler"
    registry.new_scope()
    for sym in set(registry.symbols()) - before:
        registry.unregister(sym)
    sys.modules.pop(MODULE, None)


def test_a_space_symbol_does_not_leak_into_the_next_space(layer_path):
    first = load_space(text=space("AZ", f"symbols: {{Z: '{layer_path}'}}\n"), file="one.yaml")
    assert registry.get("Z").name == "Doubler"
    # a trial builds its model after the load, while the space is in use
    arch = sample_arch(first, FixedTrial({"pattern": "AZ"}))
    assert type(HybridLM(arch.model).blocks[1].layer).__name__ == "Doubler"

    load_space(text=space("AF"), file="two.yaml")
    with pytest.raises(registry.RegistryError, match="unknown layer symbol 'Z'"):
        registry.get("Z")
    assert "Z" not in registry.symbol_map()
    with pytest.raises(ConfigError) as info:  # a second space using Z without declaring it is rejected
        load_space(text=space("AZ"), file="three.yaml")
    assert info.value.path == ("model", "pattern", 0)
    assert "unknown layer symbol 'Z'" in info.value.message


def test_an_architecture_symbol_does_not_leak_either(layer_path):
    text = f"symbols: {{Y: '{layer_path}'}}\n" + TASK + "model: {d_model: 32, pattern: YA}\n"
    arch = load_arch(text=text, file="arch.yaml", trust_custom_code=True)
    assert registry.primary("Y") == "Y"
    load_arch(text=TASK + "model: {d_model: 32, pattern: AF}\n", file="other.yaml")
    assert "Y" not in registry.symbols()
    # loading the architecture again (as an export does) brings its symbol back
    again = load_arch(data=arch.to_dict(), file="again.yaml", trust_custom_code=[layer_path])
    assert again.symbols == {"Y": layer_path} and registry.get("Y").name == "Doubler"


def test_reloading_the_same_space_keeps_its_symbol_and_a_new_one_may_reuse_it(layer_path):
    text = space("ZA", f"symbols: {{Z: {{path: '{layer_path}', aliases: [z]}}}}\n")
    load_space(text=text, file="one.yaml")
    load_space(text=text, file="one.yaml")
    assert registry.primary("z") == "Z" and registry.scoped_symbols() == {"Z": layer_path}
    # another file may bind the same character to another class: the first file's binding is gone by then
    load_space(text=space("ZA", "symbols: {Z: 'layers.ffn:SwiGLU'}\n"), file="two.yaml")
    assert registry.get("Z").name == "SwiGLU" and "z" not in registry.symbol_map()


def test_python_registrations_are_not_scoped(layer_path):
    from hybridnas_test_scoped_layer import Doubler

    registry.register("P", Doubler)
    load_space(text=space("AP"), file="uses_p.yaml")  # P is usable without a symbols entry
    load_space(text=space("AF"), file="other.yaml")
    assert registry.get("P").cls is Doubler
    model = HybridLM(sample_arch(load_space(text=space("PA"), file="p.yaml"), FixedTrial({"pattern": "PA"})).model)
    assert model(torch.randint(0, 64, (1, 4))).shape == (1, 4, 64)
