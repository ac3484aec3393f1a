"""`hybridnas show --format table|csv|md`: the sampled settings and the steps trained are columns; csv parses."""

import csv
import io

import pytest

from hybridnas import search
from hybridnas.cli import main
from hybridnas.config import load_space

SPACE = """\
name: showfmt
task: {name: mqar, vocab_size: 32, seq_len: 16, num_kv_pairs: 2, num_train: 64, num_test: 16}
model:
  d_model: [16, 32]
  pattern: ["A-", "AA"]
  layers: {A: {n_heads: [1, 2]}}
train: {steps: 4, batch_size: 8, eval_every: 2, warmup_steps: 1, lr: {low: 1.0e-3, high: 1.0e-2, log: true}}
search: {n_trials: 3, seed: 0, lr_mode: sample, pruner: none, confirm_top: 0}
"""


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("show")
    (d / "s.yaml").write_text(SPACE)
    import os

    old = os.getcwd()
    os.chdir(d)
    try:
        search.run_search(load_space(str(d / "s.yaml")), quiet=True)
    finally:
        os.chdir(old)
    return d


def test_show_csv_parses_with_settings_and_steps(study_dir, monkeypatch, capsys):
    monkeypatch.chdir(study_dir)
    assert main(["show", "showfmt", "--format", "csv"]) == 0
    text = capsys.readouterr().out
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == 3
    for col in ("number", "state", "pattern", "params", "state_bytes", "score", "steps", "d_model", "A.n_heads",
                "lr", "duration_s"):
        assert col in rows[0], col
    study = search.load_study("showfmt", None)
    for row, t in zip(rows, study.trials, strict=True):
        assert int(row["number"]) == t.number
        assert int(row["steps"]) == t.user_attrs["metrics"]["steps"] == 4
        assert int(row["d_model"]) == t.params["d_model"]
        assert float(row["lr"]) == pytest.approx(t.params["lr"])
        assert float(row["score"]) == pytest.approx(t.value)
        assert int(row["params"]) == t.user_attrs["params"]


def test_show_md_and_table(study_dir, monkeypatch, capsys):
    monkeypatch.chdir(study_dir)
    assert main(["show", "showfmt", "--format", "md"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("| # | state | pattern |") and "| steps |" in lines[0] and "d_model" in lines[0]
    assert set(lines[1]) <= {"|", "-"}
    assert len(lines) == 2 + 3 and all(line.count("|") == lines[0].count("|") for line in lines)
    assert main(["show", "showfmt"]) == 0
    out = capsys.readouterr().out
    assert "steps" in out and "A.n_heads" in out and "best: trial" in out


def test_show_has_a_bits_per_byte_column_for_text_trials(tmp_path, monkeypatch, capsys):
    """A text-task study's trials carry bits per byte in their metrics: show prints it as a column (csv, md,
    table); a study without it gets no such column."""
    import optuna

    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tmp_path / 'bpb.db'}"
    study = optuna.create_study(study_name="bpb", storage=url, direction="minimize")
    for i, bpb in enumerate([1.75, 2.5]):
        t = study.ask({"d_model": optuna.distributions.CategoricalDistribution([16, 32])})
        t.set_user_attr("pattern", "MA")
        t.set_user_attr("params", 1000 + i)
        t.set_user_attr("metrics", {"steps": 4, "loss": bpb * 0.7, "bits_per_byte": bpb})
        study.tell(t, bpb * 0.7)
    assert main(["show", "bpb", "--storage", url, "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [float(r["bits_per_byte"]) for r in rows] == [1.75, 2.5]
    assert main(["show", "bpb", "--storage", url, "--format", "md"]) == 0
    md = capsys.readouterr().out.splitlines()
    assert "| bits_per_byte |" in md[0] and "| 1.750 |" in md[2]
    assert main(["show", "bpb", "--storage", url]) == 0
    assert "bits_per_byte" in capsys.readouterr().out


def test_show_has_no_bits_per_byte_column_without_text_trials(study_dir, monkeypatch, capsys):
    monkeypatch.chdir(study_dir)
    assert main(["show", "showfmt", "--format", "csv"]) == 0
    assert "bits_per_byte" not in capsys.readouterr().out.splitlines()[0]
