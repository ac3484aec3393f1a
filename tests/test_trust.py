"""Loading never runs code named inside a file unless the caller opts in, and written files honour the umask.

An architecture file (an export's ``architecture.yaml``, ``hybridnas train ARCH.yaml``) or a trial recorded in a
study may name a custom layer by import path (``symbols: {Z: module:Class}``); importing that module runs its code.
Every loading path is tried with a module that writes a marker file when imported: without the opt-in the load is
refused with an error saying how to opt in, and the marker does not exist.
"""

from __future__ import annotations

import os
import stat
import sys
import textwrap
import uuid

import optuna
import pytest

import hybridnas
from hybridnas import registry
from hybridnas.checkpoint import UntrustedCodeError, save_checkpoint
from hybridnas.cli import main
from hybridnas.config import load_arch

LAYER_SOURCE = '''
from pathlib import Path

Path({marker!r}).write_text("imported")

from layers.ffn import SwiGLU


class MarkerFFN(SwiGLU):
    """A user layer whose module leaves a marker file behind when it is imported."""
'''

ARCH = """\
name: trusty
symbols: {{Z: "{path}"}}
task: {{name: mqar, vocab_size: 32, seq_len: 16, num_kv_pairs: 2, num_train: 64, num_test: 16}}
model:
  d_model: 16
  pattern: "AZ"
  layers: {{A: {{n_heads: 2}}}}
train: {{steps: 2, batch_size: 8, eval_every: 2, warmup_steps: 1}}
"""


class Marker:
    def __init__(self, tmp_path, monkeypatch):
        self.module = f"hybridnas_test_marker_{uuid.uuid4().hex[:10]}"
        self.file = tmp_path / f"{self.module}.imported"
        (tmp_path / f"{self.module}.py").write_text(LAYER_SOURCE.format(marker=str(self.file)), encoding="utf-8")
        monkeypatch.syspath_prepend(str(tmp_path))
        self.path = f"{self.module}:MarkerFFN"

    def arch_text(self) -> str:
        return ARCH.format(path=self.path)

    def imported(self) -> bool:
        return self.file.exists() or self.module in sys.modules


@pytest.fixture
def marker(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = set(registry.symbol_map())
    m = Marker(tmp_path, monkeypatch)
    yield m
    for sym in set(registry.symbol_map()) - before:
        registry.unregister(registry.primary(sym))
    registry.new_scope()
    sys.modules.pop(m.module, None)


def refused(err: str, marker: Marker) -> bool:
    """A one-line error that names the module and says how to opt in; nothing imported."""
    return ("--trust-custom-code" in err and marker.module in err and "Traceback" not in err
            and not marker.imported())


def test_load_arch_refuses_a_file_naming_code(marker, tmp_path):
    path = tmp_path / "arch.yaml"
    path.write_text(marker.arch_text())
    with pytest.raises(UntrustedCodeError) as e:
        load_arch(str(path))
    assert f"{path}:2: symbols.Z:" in str(e.value) and "trust_custom_code=True" in str(e.value)
    assert not marker.imported()
    arch = load_arch(str(path), trust_custom_code=True)
    assert marker.file.exists() and arch.symbols == {"Z": marker.path}


def test_load_arch_refuses_recorded_data_naming_code(marker):
    import yaml

    data = yaml.safe_load(marker.arch_text())
    with pytest.raises(UntrustedCodeError, match="study s trial 3: symbols.Z: .*trust_custom_code=True"):
        load_arch(data=data, file="study s trial 3")
    assert not marker.imported()
    # a caller that already trusts some import paths (the search whose space named them) names them
    with pytest.raises(UntrustedCodeError):
        load_arch(data=data, file="x", trust_custom_code=["other.module:Layer"])
    assert not marker.imported()
    assert load_arch(data=data, file="x", trust_custom_code=[marker.path]).symbols == {"Z": marker.path}


def test_build_model_refuses_a_folder_naming_code(marker, tmp_path):
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "architecture.yaml").write_text(marker.arch_text())
    for target in (folder, folder / "architecture.yaml"):
        with pytest.raises(UntrustedCodeError) as e:
            hybridnas.build_model(target, load_weights=False)
        assert "trust_custom_code=True" in str(e.value) and marker.module in str(e.value)
        assert not marker.imported()
    model = hybridnas.build_model(folder, load_weights=False, trust_custom_code=True)
    assert marker.file.exists() and type(model.blocks[1].layer).__name__ == "MarkerFFN"


def test_cli_train_refuses_an_architecture_naming_code(marker, tmp_path, capsys):
    path = tmp_path / "arch.yaml"
    path.write_text(marker.arch_text())
    assert main(["train", str(path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert refused(err, marker), err
    assert err.startswith(f"error: {path}:2: symbols.Z:")
    assert main(["validate", "--arch", str(path)]) == 2
    assert refused(capsys.readouterr().err, marker)

    assert main(["train", str(path), "--quiet", "--trust-custom-code", "--out", str(tmp_path / "out")]) == 0
    assert marker.file.exists()
    assert main(["validate", "--arch", "--trust-custom-code", str(tmp_path / "out" / "architecture.yaml")]) == 0


def _study_with_recorded_arch(marker, tmp_path) -> str:
    """A study (as a shared storage would hold it) with one trial whose recorded architecture names code."""
    import yaml

    url = f"sqlite:///{tmp_path}/shared.db"
    study = optuna.create_study(study_name="trusty", storage=url, direction="maximize")
    t = study.ask()
    t.set_user_attr("arch", yaml.safe_load(marker.arch_text()))
    t.set_user_attr("pattern", "AZ")
    study.tell(t, 0.5)
    return url


def test_cli_export_of_a_study_refuses_recorded_code(marker, tmp_path, capsys):
    url = _study_with_recorded_arch(marker, tmp_path)
    assert main(["export", "trusty", "--storage", url, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert refused(err, marker), err
    assert "study trusty trial 0" in err
    assert not (tmp_path / "out" / "model.safetensors").exists()

    assert main(["export", "trusty", "--storage", url, "--out", str(tmp_path / "out"), "--trust-custom-code"]) == 0
    assert marker.file.exists() and (tmp_path / "out" / "model.safetensors").exists()


def test_cli_show_and_export_by_space_file_import_nothing(marker, tmp_path, capsys):
    """``show SPACE.yaml`` needs only the study's name and storage from the space: it imports none of its layers."""
    url = _study_with_recorded_arch(marker, tmp_path)
    space = tmp_path / "space.yaml"
    space.write_text(marker.arch_text().replace("name: trusty", f"name: trusty\nsearch: {{storage: '{url}'}}")
                     .replace('pattern: "AZ"', 'pattern: ["AZ", "ZA"]'))
    assert main(["show", str(space)]) == 0
    assert "trusty" in capsys.readouterr().out
    assert not marker.imported()
    assert main(["export", str(space), "--out", str(tmp_path / "out")]) == 2
    assert refused(capsys.readouterr().err, marker)


# ---------------------------------------------------------------------------------------------- file modes


@pytest.fixture
def umask():
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


def _modes(folder) -> dict[str, int]:
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir() if p.is_file()}


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_saved_files_honour_the_umask(tmp_path, umask, mask, mode):
    from hybridnas.config import ArchConfig, ModelConfig, TaskSpec, TrainConfig
    from hybridnas.model import HybridLM

    arch = ArchConfig(ModelConfig(vocab_size=32, d_model=16, pattern="A-", layers={"A": {"n_heads": 2}}),
                      TaskSpec("mqar", {"vocab_size": 32, "seq_len": 16, "num_kv_pairs": 2}), TrainConfig(steps=2),
                      {}, "modes")
    umask(mask)
    out = save_checkpoint(tmp_path / "ckpt", arch, HybridLM(arch.model))
    modes = _modes(out)
    assert set(modes) == {"architecture.yaml", "config.json", "model.safetensors"}
    assert modes == dict.fromkeys(modes, mode), {k: oct(v) for k, v in modes.items()}
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp file left behind


def test_export_folder_honours_the_umask(tmp_path, umask, monkeypatch):
    monkeypatch.chdir(tmp_path)
    space = tmp_path / "tiny.yaml"
    space.write_text(textwrap.dedent("""\
        name: modes
        task: {name: mqar, vocab_size: 32, seq_len: 16, num_kv_pairs: 2, num_train: 64, num_test: 16}
        model: {d_model: 16, pattern: ["A-"], layers: {A: {n_heads: 2}}}
        train: {steps: 2, batch_size: 8, eval_every: 2, warmup_steps: 1}
        search: {n_trials: 1, confirm_top: 0}
        """))
    umask(0o022)
    assert main(["search", str(space), "--quiet", "--export", "best"]) == 0
    modes = _modes(tmp_path / "best")
    assert {"architecture.yaml", "config.json", "model.safetensors", "README.md", "trial.json"} <= set(modes)
    assert modes == dict.fromkeys(modes, 0o644), {k: oct(v) for k, v in modes.items()}


def test_search_confirms_and_exports_its_own_space_layers_without_opt_in(marker, tmp_path):
    """The space the user runs is their own program: its layers are imported, and the confirmation and export at
    the end rebuild its trials (same import paths) without --trust-custom-code."""
    space = tmp_path / "own.yaml"
    space.write_text(marker.arch_text().replace("name: trusty", "name: own\nsearch: {n_trials: 1, confirm_top: 1}")
                     .replace('pattern: "AZ"', 'pattern: ["AZ"]'))
    assert main(["search", str(space), "--quiet", "--export", "best"]) == 0
    assert marker.file.exists()
    assert "confirm/0/0" in optuna.load_study(study_name="own", storage="sqlite:///runs/own.db").user_attrs
    assert hybridnas.build_model(tmp_path / "best", trust_custom_code=True).num_params() > 0
