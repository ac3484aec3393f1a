"""Budgets as constraints or objectives, the Pareto export, confirmation, plots, importances, dashboard."""

import json
import math
import socket
import subprocess
import sys
import time
import urllib.request

import optuna
import pytest

import hybridnas
from hybridnas import search
from hybridnas.cli import main
from hybridnas.config import load_space
from hybridnas.confirm import confirmed, run_confirmation, spearman
from hybridnas.export import export_best, export_pareto
from hybridnas.plots import plot_study, symbol_depth_counts

BASE = """\
name: {name}
task: {{name: mqar, vocab_size: 32, seq_len: 16, num_kv_pairs: 2, num_train: 128, num_test: 32}}
model:
  d_model: [16, 32]
  pattern: ["AA", "A-", "AE", "-A", "A-A-"]
  layers: {{A: {{n_heads: [1, 2]}}, E: {{n_experts: 2, top_k: 1}}}}
train: {{steps: 8, batch_size: 16, eval_every: 4, warmup_steps: 2, lr: {{low: 1.0e-3, high: 1.0e-2, log: true}}}}
search:
  n_trials: {n}
  seed: 0
  sampler: random
{extra}"""


def make(name, n=6, extra=""):
    return load_space(text=BASE.format(name=name, n=n, extra=extra), file=f"{name}.yaml")


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def test_param_budget_is_a_constraint_checked_before_training():
    space = make("budget", extra="  constraints: {params: 12000}\n")
    study = search.run_search(space, quiet=True)
    infeasible = [t for t in study.trials if "infeasible" in t.user_attrs]
    feasible = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert infeasible and feasible
    for t in infeasible:
        assert t.state == optuna.trial.TrialState.PRUNED and t.user_attrs["params"] > 12000
        assert "metrics" not in t.user_attrs  # never trained
        assert t.constraints["params"] > 0
    for t in feasible:
        assert t.user_attrs["params"] <= 12000 and t.constraints["params"] <= 0


def test_state_and_latency_budgets_are_measured():
    space = make("lat", n=3, extra="  constraints: {state_bytes: 1.0e9, tokens_per_s: 1}\n  state_seq_len: 4096\n")
    study = search.run_search(space, quiet=True)
    t = study.trials[0]
    assert t.user_attrs["state_seq_len"] == 4096 and t.user_attrs["tokens_per_s"] > 1
    assert set(t.constraints) == {"state_bytes", "tokens_per_s"} and all(c <= 0 for c in t.constraints.values())


def test_several_objectives_give_a_pareto_front_exported_whole(tmp_path):
    space = make("pareto", n=6, extra="  objectives: [accuracy, params]\n")
    assert isinstance(search.make_pruner(space), optuna.pruners.NopPruner)
    study = search.run_search(space, quiet=True)
    assert len(study.directions) == 2 and study.metric_names == ["accuracy", "params"]
    front = study.best_trials
    assert front
    out = export_pareto(study, tmp_path / "front")
    summary = json.loads((out / "pareto.json").read_text())
    assert [r["trial"] for r in summary["front"]] == sorted(t.number for t in front)
    for r in summary["front"]:
        model = hybridnas.build_model(out / r["folder"])
        assert model.num_params() == r["params"]
    assert main(["export", "pareto", "--pareto", "--out", str(tmp_path / "cli_front")]) == 0
    assert (tmp_path / "cli_front" / "README.md").exists()
    assert main(["show", "pareto"]) == 0


def test_confirmation_ranks_by_confirmed_mean(tmp_path, capsys):
    space = make("confirm", n=5)
    study = search.run_search(space, quiet=True)
    summary = run_confirmation(study, top_k=3, seeds=2, budget=1.5, log=lambda *a: None)
    rows = summary["rows"]
    assert len(rows) == 3 and all(len(c.values) == 2 for c in rows)
    means = [c.mean for c in rows]
    assert means == sorted(means, reverse=True)
    attrs = search.load_study("confirm").user_attrs
    assert attrs["confirm/summary"]["seeds"] == 2
    first = attrs[f"confirm/{rows[0].trial.number}/0"]
    assert first["steps"] == 12 and first["seed"] != rows[0].trial.user_attrs["arch"]["train"]["seed"]
    # resuming does not retrain finished confirmation runs
    again = run_confirmation(search.load_study("confirm"), top_k=3, seeds=2, budget=1.5,
                             log=lambda *a: pytest.fail("retrained"))
    assert [c.values for c in again["rows"]] == [c.values for c in rows]
    out = export_best(search.load_study("confirm"), tmp_path / "best")
    card = (out / "README.md").read_text()
    assert "confirmed_mean" in card and f"trial {rows[0].trial.number}" in card
    assert main(["show", "confirm"]) == 0
    assert "Spearman" in capsys.readouterr().out
    assert confirmed(search.load_study("confirm"))[0].trial.number == rows[0].trial.number


def test_confirm_flags_on_the_command_line(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(BASE.format(name="cflags", n=3, extra=""))
    assert main(["search", str(path), "--quiet", "--confirm-top", "2", "--confirm-seeds", "1",
                 "--confirm-budget", "1"]) == 0
    assert "Spearman" in capsys.readouterr().out


def test_spearman():
    assert spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1.0], [2.0]) is None


def test_plots_and_importances(tmp_path, capsys):
    study = search.run_search(make("plots", n=6), quiet=True)
    written = plot_study(study, tmp_path / "plots")
    names = {p.name for p in written}
    assert {"optimization_history.png", "symbol_depth.png"} <= names
    for p in written:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["plot", "plots", "--out", str(tmp_path / "p2")]) == 0
    assert main(["show", "plots"]) == 0
    assert "parameter importances" in capsys.readouterr().out
    multi = search.run_search(make("plots2", n=4, extra="  objectives: [accuracy, params]\n"), quiet=True)
    assert "pareto_front.png" in {p.name for p in plot_study(multi, tmp_path / "plots2")}


def test_symbol_depth_counts():
    class T:
        def __init__(self, p):
            self.user_attrs = {"canonical": p}

    symbols, grid = symbol_depth_counts([T("MA"), T("MM"), T("MAF")])
    assert symbols == ["A", "F", "M"]
    assert grid[2][0] == 1.0 and grid[0][1] == pytest.approx(2 / 3) and grid[1][2] == 1.0
    assert math.isnan(grid[0][3]) if len(grid[0]) > 3 else True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dashboard_serves_the_study_list(tmp_path):
    pytest.importorskip("optuna_dashboard")
    search.run_search(make("dash", n=1), quiet=True)
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "hybridnas.cli", "dashboard", "dash", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        body = None
        for _ in range(100):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=2) as r:
                    body = json.loads(r.read())
                break
            except OSError:
                time.sleep(0.3)
        assert body is not None, proc.stdout.read1().decode() if proc.poll() is not None else "no answer"
        assert [s["study_name"] for s in body["study_summaries"]] == ["dash"]
    finally:
        proc.terminate()
        proc.wait(timeout=10)
