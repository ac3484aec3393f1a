"""Model folders: save -> load gives the same model, loading reads only safe formats, and a folder that names
custom layer code is not imported without ``trust_custom_code``."""

from __future__ import annotations

import json
import sys

import pytest
import torch

import hybridnas
from hybridnas import registry
from hybridnas.checkpoint import (
    ARCH_FILE,
    CONFIG_FILE,
    WEIGHTS_FILE,
    UntrustedCodeError,
    build_model,
    save_checkpoint,
)
from hybridnas.config import ArchConfig, ModelConfig, TaskSpec, TrainConfig
from hybridnas.model import HybridLM

TASK = TaskSpec("mqar", {"vocab_size": 64, "seq_len": 16, "num_kv_pairs": 2})
SYMBOL = "Q"
MODULE = "hybridnas_test_checkpoint_layer"
LAYER_SOURCE = '''
from layers.ffn import SwiGLU


class CustomFFN(SwiGLU):
    """A user layer living outside hybridnas (the built-in SwiGLU under another name)."""
'''


def trained_like(pattern: str, symbols: dict[str, str] | None = None) -> tuple[ArchConfig, HybridLM]:
    arch = ArchConfig(ModelConfig(vocab_size=64, d_model=32, pattern=pattern, layers={"A": {"n_heads": 2}}), TASK,
                      TrainConfig(steps=3), dict(symbols or {}), "ckpt")
    torch.manual_seed(0)
    model = HybridLM(arch.model)
    with torch.no_grad():  # weights that differ from a fresh initialization, so loading is what restores them
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return arch, model.eval()


def test_round_trip_gives_the_same_outputs(tmp_path):
    arch, model = trained_like("AF")
    out = save_checkpoint(tmp_path / "ckpt", arch, model)
    assert {p.name for p in out.iterdir()} == {ARCH_FILE, CONFIG_FILE, WEIGHTS_FILE}
    config = json.loads((out / CONFIG_FILE).read_text())
    assert config["hybrid_override_pattern"] == "AF" and config["num_parameters"] == model.num_params()
    x = torch.randint(0, 64, (2, 16))
    for loaded in (build_model(out), build_model(out / ARCH_FILE), hybridnas.build_model(out)):
        assert not loaded.training
        assert torch.equal(loaded(x), model(x))
    fresh = build_model(out, load_weights=False)
    assert fresh.num_params() == model.num_params() and not torch.equal(fresh(x), model(x))


def test_missing_weights_are_a_clear_error(tmp_path):
    arch, model = trained_like("AF")
    out = save_checkpoint(tmp_path / "ckpt", arch, model)
    (out / WEIGHTS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="load_weights=False"):
        build_model(out)


@pytest.fixture
def custom_layer(tmp_path, monkeypatch):
    """``SYMBOL`` registered from a module on sys.path, as a search space's ``symbols:`` entry does."""
    (tmp_path / f"{MODULE}.py").write_text(LAYER_SOURCE, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert SYMBOL not in registry.symbol_map()
    path = f"{MODULE}:CustomFFN"
    registry.register_path(SYMBOL, path)
    yield path
    registry.unregister(SYMBOL)
    sys.modules.pop(MODULE, None)


def test_custom_code_is_imported_only_when_trusted(tmp_path, custom_layer):
    arch, model = trained_like(f"A{SYMBOL}", {SYMBOL: custom_layer})
    out = save_checkpoint(tmp_path / "ckpt", arch, model)
    # a fresh process: neither the module nor the symbol is known
    registry.unregister(SYMBOL)
    sys.modules.pop(MODULE, None)

    with pytest.raises(UntrustedCodeError) as e:
        build_model(out)
    assert MODULE in str(e.value) and "trust_custom_code=True" in str(e.value)
    assert MODULE not in sys.modules and SYMBOL not in registry.symbol_map()

    loaded = build_model(out, trust_custom_code=True)
    assert MODULE in sys.modules
    x = torch.randint(0, 64, (2, 16))
    assert torch.equal(loaded(x), model(x))
