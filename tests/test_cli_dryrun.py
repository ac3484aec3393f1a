"""`hybridnas search SPACE --dry-run`: lists the candidates with params and state bytes, trains and writes
nothing."""

import re

from hybridnas.cli import main
from hybridnas.model import HybridLM
from hybridnas.schema import ModelConfig

FINITE = """\
name: dry_finite
task: {name: mqar, vocab_size: 32, seq_len: 16, num_kv_pairs: 2, num_train: 64, num_test: 16}
model:
  d_model: [16, 32]
  pattern: ["A-", "MA"]
  layers: {A: {n_heads: 2}, M: {d_state: [4, 8], headdim: 8}}
train: {steps: 4, batch_size: 8, lr: {low: 1.0e-3, high: 1.0e-2, log: true}}
search: {n_trials: 2}
"""

GENOME = """\
name: dry_genome
task: {name: mqar, vocab_size: 32, seq_len: 16, num_kv_pairs: 2, num_train: 64, num_test: 16}
model:
  d_model: 16
  pattern:
    genome: {length: {low: 2, high: 4}, symbols: AF, positions: {0: A}}
  layers: {A: {n_heads: 2}}
train: {steps: 4, batch_size: 8, dropout_free: 1}
search: {n_trials: 2}
""".replace("dropout_free: 1", "warmup_steps: [1, 2]")


def rows(out: str) -> list[list[str]]:
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("#"))
    return [re.split(r"\s{2,}", line) for line in lines[start + 1:] if re.match(r"^\d+\s", line)]


def test_dry_run_lists_a_finite_space_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "s.yaml").write_text(FINITE)
    assert main(["search", "s.yaml", "--dry-run"]) == 0
    out = capsys.readouterr().out
    table = rows(out)
    # A- at two widths, MA at two widths x two d_state
    assert len(table) == 6, out
    assert "finite" in out and "nothing written" in out
    for r in table:
        pattern, params, state = r[1], int(r[2].replace(",", "")), int(r[3].replace(",", ""))
        settings = dict(kv.split("=") for kv in r[4].split(", "))
        d = int(settings["d_model"])
        layers = {"A": {"n_heads": 2}}
        if "M.d_state" in settings:
            layers["M"] = {"d_state": int(settings["M.d_state"]), "headdim": 8}
        cfg = ModelConfig(vocab_size=32, d_model=d, pattern=pattern, layers=layers)
        model = HybridLM(cfg)
        assert params == model.num_params()
        assert state == model.state_size(1, 16)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.yaml"]  # no runs/, no database


def test_dry_run_samples_an_infinite_space(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "g.yaml").write_text(GENOME)
    assert main(["search", "g.yaml", "--dry-run", "--dry-run-n", "5"]) == 0
    out = capsys.readouterr().out
    table = rows(out)
    assert len(table) == 5 and "sampled" in out
    assert all(r[1].startswith("A") and "warmup_steps=" in r[4] for r in table)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.yaml"]
    assert main(["search", "g.yaml", "--dry-run", "--dry-run-n", "0"]) == 2
