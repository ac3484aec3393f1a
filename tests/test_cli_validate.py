"""`hybridnas validate FILE...`: exit 0 on good files; exit 2 with `error: file:line: field.path: message`."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from hybridnas import registry
from hybridnas.cli import main

GOOD_SPACE = """\
name: cli_demo
task: {name: mqar, vocab_size: 64, seq_len: 32, num_kv_pairs: 4}
model:
  d_model: [32, 64]
  pattern: ["AA", "A-A-", "(AE)x2"]
  layers:
    A: {n_heads: [2, 4]}
    E: {n_experts: [2, 4]}
train:
  lr: {low: 1e-3, high: 1e-2, log: true}
  steps: 20
search:
  n_trials: 3
"""

# line 7: 48 is not divisible by 5 heads
BAD_SPACE = """\
task: {name: mqar, vocab_size: 64, seq_len: 32, num_kv_pairs: 4}
model:
  d_model: 48
  pattern: AA
  layers:
    A:
      n_heads: [4, 5]
"""

GOOD_ARCH = """\
task: {name: mqar, vocab_size: 64, seq_len: 32, num_kv_pairs: 4}
model: {d_model: 32, pattern: AF, layers: {A: {n_heads: 2}}}
train: {steps: 3}
"""

SEARCH_SPACES = Path(__file__).resolve().parents[1] / "search_spaces"


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def assert_clean_error(err: str, path: str, line: int, field: str) -> None:
    assert err.startswith(f"error: {path}:{line}: {field}: "), err
    assert "Traceback" not in err


def test_validate_good_space(tmp_path, capsys):
    path = write(tmp_path, "good.yaml", GOOD_SPACE)
    assert main(["validate", path]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert f"{path}: OK" in out
    assert "study 'cli_demo'" in out and "3 pattern(s)" in out and "3 trials" in out
    for searched in ("d_model", "pattern", "A.n_heads", "E.n_experts"):
        assert searched in out
    # the learning rate is a ladder inside each trial (the default lr_mode), not a searched parameter
    assert "learning rate: halving over 0.001, 0.00316228, 0.01 inside each trial" in out


def test_validate_bad_space_exits_2_with_file_line_and_path(tmp_path, capsys):
    path = write(tmp_path, "bad.yaml", BAD_SPACE)
    assert main(["validate", path]) == 2
    out, err = capsys.readouterr()
    assert_clean_error(err, path, 7, "model.layers.A.n_heads")
    assert "d_model=48 is not divisible by n_heads=5" in err
    assert "OK" not in out


def test_validate_stops_at_the_first_bad_file(tmp_path, capsys):
    good = write(tmp_path, "good.yaml", GOOD_SPACE)
    bad = write(tmp_path, "bad.yaml", BAD_SPACE)
    assert main(["validate", good, bad]) == 2
    out, err = capsys.readouterr()
    assert f"{good}: OK" in out
    assert_clean_error(err, bad, 7, "model.layers.A.n_heads")


@pytest.mark.parametrize(("text", "line", "field", "message"), [
    pytest.param("model:\n  d_modle: 32\n", 2, "model.d_modle", "did you mean 'd_model'", id="unknown-key"),
    pytest.param("train:\n  steps: {low: 1, high: .inf}\n", 2, "train.steps.high", "finite", id="infinite-range"),
    pytest.param("search:\n  sampler: tpee\n", 2, "search.sampler", "did you mean 'tpe'", id="bad-sampler"),
    pytest.param("task:\n  name: mqar\n  seq_len: 33\n", 3, "task.seq_len", "must be even", id="bad-task-field"),
])
def test_validate_reports_field_errors(tmp_path, capsys, text, line, field, message):
    path = write(tmp_path, "bad.yaml", text)
    assert main(["validate", path]) == 2
    _, err = capsys.readouterr()
    assert_clean_error(err, path, line, field)
    assert message in err


@pytest.mark.parametrize(("text", "line", "message"), [
    pytest.param("model: [1, 2\n", 2, "invalid YAML", id="yaml-syntax"),
    pytest.param("", 1, "the file is empty", id="empty"),
    pytest.param("- a\n", 1, "expected a mapping", id="top-level-list"),
])
def test_validate_reports_file_level_errors(tmp_path, capsys, text, line, message):
    path = write(tmp_path, "bad.yaml", text)
    assert main(["validate", path]) == 2
    _, err = capsys.readouterr()
    assert err.startswith(f"error: {path}:{line}: "), err
    assert message in err
    assert "Traceback" not in err


def test_validate_missing_file(tmp_path, capsys):
    path = str(tmp_path / "missing.yaml")
    assert main(["validate", path]) == 2
    _, err = capsys.readouterr()
    assert err.startswith(f"error: {path}: ") and "file not found" in err
    assert "Traceback" not in err


def test_validate_arch_files(tmp_path, capsys):
    good = write(tmp_path, "arch.yaml", GOOD_ARCH)
    assert main(["validate", "--arch", good]) == 0
    out, _ = capsys.readouterr()
    assert f"{good}: OK (architecture 'AF', d_model 32)" in out

    # a search space is not a concrete architecture: the list is rejected at its line
    space = write(tmp_path, "space.yaml", GOOD_SPACE.split("search:")[0])
    assert main(["validate", "--arch", space]) == 2
    _, err = capsys.readouterr()
    assert_clean_error(err, space, 4, "model.d_model")


def _shipped_spaces() -> list:
    files = sorted(SEARCH_SPACES.glob("*.yaml")) + sorted(SEARCH_SPACES.glob("*.yml")) if SEARCH_SPACES.is_dir() \
        else []
    files = [f for f in files if not f.name.startswith("distill_")]  # need a trained teacher: tests/test_distill.py
    if not files:
        return [pytest.param(None, marks=pytest.mark.skip(reason="search_spaces/ has no YAML files yet"),
                             id="none")]
    return [pytest.param(f, id=f.name) for f in files]


@pytest.mark.parametrize("path", _shipped_spaces())
def test_shipped_search_spaces_validate(path, capsys):
    assert main(["validate", str(path)]) == 0, capsys.readouterr().err
    out, err = capsys.readouterr()
    assert err == ""
    assert f"{path}: OK" in out


@pytest.mark.parametrize("old, new, line, field", [
    ("S: {d_state: [16, 64]", "S: {d_state: [16, 7]", 31, "model.layers.S.d_state"),
    ("M: {variant: [mamba1, mamba2, mamba3]", "M: {variant: [mamba1, mamba4]", 30, "model.layers.M.variant"),
    ("M: {variant: [mamba1, mamba2, mamba3]", "M: {variant: mamba1, dt_rank: 0", 30, "model.layers.M.dt_rank"),
], ids=["S-odd-d_state", "M-unknown-variant", "mamba1-dt_rank"])
def test_ssm_family_space_rejects_bad_s_and_mamba1_settings(tmp_path, capsys, old, new, line, field):
    text = (SEARCH_SPACES / "ssm_family.yaml").read_text(encoding="utf-8")
    assert old in text
    path = write(tmp_path, "ssm.yaml", text.replace(old, new))
    assert main(["validate", path]) == 2
    assert_clean_error(capsys.readouterr().err, path, line, field)


# ---------------------------------------------------------------------------------------------- custom symbols

USER_LAYERS = '''
from dataclasses import dataclass

import torch
from torch import nn

from layers.base import Layer, TokenwiseLayer


@dataclass
class Config:
    bias: bool = False


class Good(TokenwiseLayer):
    kind = "mixer"
    Config = Config

    def __init__(self, d_model, config=None, *, layer_idx=0, n_layers=1):
        super().__init__(d_model, config, layer_idx=layer_idx, n_layers=n_layers)
        self.proj = nn.Linear(d_model, d_model, bias=self.config.bias)
        self.reset_parameters()

    @classmethod
    def param_count(cls, d_model, config):
        return d_model * d_model + (d_model if config.bias else 0)

    def reset_parameters(self):
        nn.init.normal_(self.proj.weight, std=0.02)

    def forward(self, x, ctx=None):
        return self.proj(x)


class MiscountsBias(Good):
    @classmethod
    def param_count(cls, d_model, config):
        return d_model * d_model


class NoStep(Layer):
    Config = Config

    @classmethod
    def param_count(cls, d_model, config):
        return 0

    def reset_parameters(self):
        pass

    def forward(self, x, ctx=None):
        return x

    def prefill(self, x, ctx=None):
        return x, None

    def state_size(self, batch, seq_len, dtype=torch.float32):
        return 0
'''


@pytest.fixture
def user_layers(tmp_path, monkeypatch):
    """The module ``hybridnas_test_validate_layers`` on sys.path; symbols left registered are dropped afterwards."""
    module = "hybridnas_test_validate_layers"
    (tmp_path / f"{module}.py").write_text(USER_LAYERS, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    before = set(registry.symbols())
    yield module
    registry.new_scope()
    for sym in set(registry.symbols()) - before:
        registry.unregister(sym)
    sys.modules.pop(module, None)


def custom_space(path: str, bias: str = "[false, true]") -> str:
    # line 3 holds the symbols.Z entry
    return f"""\
task: {{name: mqar, vocab_size: 64, seq_len: 32, num_kv_pairs: 4}}
symbols:
  Z: {path}
model:
  d_model: [32, 64]
  pattern: [AZ, ZZ]
  layers:
    Z: {{bias: {bias}}}
"""


def test_validate_runs_the_contract_checks_on_custom_symbols(tmp_path, capsys, user_layers):
    good = write(tmp_path, "good.yaml", custom_space(f"{user_layers}:Good"))
    assert main(["validate", good]) == 0
    assert f"{good}: OK" in capsys.readouterr().out

    # validate checks the first option of each parameter: MiscountsBias forgets the bias that true adds
    wrong = write(tmp_path, "wrong.yaml", custom_space(f"{user_layers}:MiscountsBias", bias="[true, false]"))
    assert main(["validate", wrong]) == 2
    out, err = capsys.readouterr()
    assert_clean_error(err, wrong, 3, "symbols.Z")
    assert "Z (MiscountsBias) breaks the layer contract" in err
    assert "param_count(d_model=32) is 1024 but the module has 1056 parameters" in err
    assert "OK" not in out


def test_validate_reports_a_custom_class_missing_step_at_its_symbol(tmp_path, capsys, user_layers):
    path = write(tmp_path, "nostep.yaml", custom_space(f"{user_layers}:NoStep", bias="false"))
    assert main(["validate", path]) == 2
    _, err = capsys.readouterr()
    assert_clean_error(err, path, 3, "symbols.Z")
    assert "NoStep does not define step" in err
