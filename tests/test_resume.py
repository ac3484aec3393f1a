"""Resuming a study: new proposals, trials of dead local processes, fail-fast on bugs, TensorBoard writers closed on
every exit path, and a space changed between runs."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading

import optuna
import pytest

from hybridnas import registry, search
from hybridnas.cli import main
from hybridnas.config import load_space
from hybridnas.yamlio import ConfigError

# the tests leave trials RUNNING through study.ask(), as a killed worker leaves them, outside Study.optimize
pytestmark = pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")

SPACE = """\
name: {name}
task: {{name: mqar, vocab_size: 32, seq_len: 16, num_kv_pairs: 2, num_train: 64, num_test: 16}}
model:
  d_model: [16, 24, 32]
  pattern: ["A", "AA", "A-", "-A", "AF"]
  layers:
    A: {{n_heads: [1, 2]}}
train:
  steps: {steps}
  batch_size: 8
  eval_every: 1
  warmup_steps: 1
  lr: {{low: 1.0e-4, high: 1.0e-2, log: true}}
search: {{n_trials: 3, sampler: {sampler}, seed: 0, lr_mode: sample, pruner: none, confirm_top: 0,
         save_weights: false}}
"""


def space_text(name: str = "resume", sampler: str = "random", steps: int = 2) -> str:
    return SPACE.format(name=name, sampler=sampler, steps=steps)


@pytest.fixture
def runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write(path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


# ------------------------------------------------------------------------------------------------ 1: new proposals


@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_resumed_search_proposes_new_configurations(runs, sampler):
    space = load_space(write(runs / "s.yaml", space_text(sampler=sampler)))
    study = search.run_search(space, quiet=True)
    first = [t for t in study.trials]
    assert len(first) == 3
    study = search.run_search(space, n_trials=6, quiet=True)
    assert search.finished_count(study) == 6
    # lr is a continuous parameter: an equal value is a replay of the first run's sampler, not a coincidence
    old_lrs = {t.params["lr"] for t in first}
    new = [t for t in study.trials if t.number >= 3]
    assert new and all(t.params["lr"] not in old_lrs for t in new), \
        [(t.number, t.params) for t in study.trials]
    assert not any("duplicate_of" in t.user_attrs for t in new)


# ------------------------------------------------------------------------------------------------ 2: dead processes


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def running_trial(study: optuna.Study, space, host: str, pid: int) -> optuna.trial.FrozenTrial:
    """A trial left RUNNING by process ``host:pid`` (as a ``kill -9`` leaves it), with sampled parameters."""
    trial = study.ask()
    search.sample_arch(space, trial)
    trial.set_user_attr("pattern", trial.params["pattern"])
    study._storage.set_trial_system_attr(trial._trial_id, "hybridnas:host", host)
    study._storage.set_trial_system_attr(trial._trial_id, "hybridnas:pid", pid)
    return study._storage.get_trial(trial._trial_id)


def test_running_trial_of_a_dead_local_process_is_failed_and_retried_at_once(runs):
    space = load_space(write(runs / "s.yaml", space_text()))
    study = search.open_study(space)
    stale = running_trial(study, space, socket.gethostname(), dead_pid())
    # the grace period is long (120 s): only the dead pid tells the search that this trial will never finish
    study = search.run_search(space, quiet=True)
    assert search.finished_count(study) == 3
    failed = study.trials[stale.number]
    assert failed.state == optuna.trial.TrialState.FAIL
    assert "died" in failed.user_attrs.get("stale", "")
    retried = [t for t in study.trials if t.system_attrs.get("failed_trial") == stale.number]
    assert len(retried) == 1 and retried[0].params == stale.params
    assert search.counts_toward_budget(retried[0])


def test_live_or_remote_running_trials_are_left_alone(runs):
    space = load_space(write(runs / "s.yaml", space_text()))
    study = search.open_study(space)
    mine = running_trial(study, space, socket.gethostname(), os.getpid())  # alive: this very process
    remote = running_trial(study, space, "some-other-host", dead_pid())  # not ours to judge: heartbeat's
    assert search.fail_dead_local_trials(study) == []
    for t in (mine, remote):
        assert study._storage.get_trial(t._trial_id).state == optuna.trial.TrialState.RUNNING


def test_a_search_that_ends_short_says_so_and_exits_non_zero(runs, capsys):
    path = write(runs / "s.yaml", space_text())
    space = load_space(path)
    study = search.open_study(space)
    running_trial(study, space, "some-other-host", 4242)  # holds a slot until its heartbeat grace runs out
    rc = main(["search", path, "--n-trials", "2", "--quiet"])
    out, err = capsys.readouterr()
    assert rc == 1, out + err
    assert "ended short" in out + err and "1 of 2" in out + err
    assert "#0" in out + err and "some-other-host" in out + err  # which trial holds the slot, and where


# ------------------------------------------------------------------------------------------------ 4: fail fast

USER_LAYERS = '''
from dataclasses import dataclass

from torch import nn

from layers.base import TokenwiseLayer


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


class BadType(Good):
    def forward(self, x, ctx=None):
        raise TypeError("BadType.forward() got an unexpected keyword argument 'mask'")


class BadValue(Good):
    def forward(self, x, ctx=None):
        raise ValueError("BadValue: shapes do not line up")
'''


@pytest.fixture
def user_layers(tmp_path, monkeypatch):
    module = "hybridnas_test_resume_layers"
    (tmp_path / f"{module}.py").write_text(USER_LAYERS, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    before = set(registry.symbols())
    yield module
    registry.new_scope()
    for sym in set(registry.symbols()) - before:
        registry.unregister(sym)
    sys.modules.pop(module, None)


def buggy_space(module: str, cls: str, on_error: str | None = None) -> str:
    extra = f", on_error: {on_error}" if on_error else ""
    return f"""\
name: buggy
symbols: {{Z: {module}:{cls}}}
task: {{name: mqar, vocab_size: 32, seq_len: 16, num_kv_pairs: 2, num_train: 64, num_test: 16}}
model: {{d_model: [16, 32], pattern: [AZ, ZA]}}
train: {{steps: 2, batch_size: 8, eval_every: 1, warmup_steps: 1}}
search: {{n_trials: 3, sampler: random, pruner: none, confirm_top: 0, save_weights: false{extra}}}
"""


@pytest.mark.parametrize("cls, error", [("BadType", "TypeError"), ("BadValue", "ValueError")])
def test_a_bug_in_layer_code_stops_the_search_with_the_trial_params(runs, capsys, user_layers, cls, error):
    path = write(runs / "buggy.yaml", buggy_space(user_layers, cls))
    rc = main(["search", path, "--quiet"])
    out, err = capsys.readouterr()
    assert rc == 1
    assert err.count("Traceback") == 1, err  # once, not once from Optuna's log and once more
    assert "failed with" not in err  # nor Optuna's two warning lines about it
    assert f"{error}:" in err and "forward" in err
    study = search.load_study("buggy")
    assert len(study.trials) == 1  # stopped at the first bug: no search failing forever
    t = study.trials[0]
    assert t.state == optuna.trial.TrialState.FAIL
    line = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(line) == 1 and f"trial {t.number}" in line[0]
    for k, v in t.params.items():
        assert f"{k}={v}" in line[0]
    assert not search.counts_toward_budget(t)  # a fixed bug re-runs it on resume


def test_on_error_record_keeps_failures_as_data(runs, user_layers):
    space = load_space(write(runs / "buggy.yaml", buggy_space(user_layers, "BadType", on_error="record")))
    study = search.run_search(space, quiet=True)
    assert search.finished_count(study) == 3
    assert all(t.user_attrs.get("fail_reason") == "error" and "TypeError" in t.user_attrs["error"]
               for t in study.trials)


def test_on_error_is_validated(runs, user_layers):
    with pytest.raises(ConfigError, match=r"buggy.yaml:6: search.on_error: .*'stop', 'record'"):
        load_space(write(runs / "buggy.yaml", buggy_space(user_layers, "Good", on_error="ignore")))


def test_out_of_memory_and_invalid_configs_stay_data(runs, monkeypatch):
    import torch

    from hybridnas.train import TrainRun

    space = load_space(write(runs / "s.yaml", space_text()))
    real = TrainRun.advance
    calls = {"n": 0}

    def advance(self):
        calls["n"] += 1
        if calls["n"] == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        if calls["n"] == 4:
            raise MemoryError()
        return real(self)

    monkeypatch.setattr(TrainRun, "advance", advance)
    study = search.run_search(space, n_trials=3, quiet=True)
    reasons = [t.user_attrs.get("fail_reason") for t in study.trials]
    assert reasons.count("out_of_memory") == 2 and search.finished_count(study) == 3


# ------------------------------------------------------------------------------------------------ 5: writer threads


def new_threads(before: set[threading.Thread]) -> list[str]:
    """Threads started since ``before`` and still alive, but for tqdm's monitor (one per process, by design)."""
    return [t.name for t in threading.enumerate() if t not in before and type(t).__name__ != "TMonitor"]


@pytest.mark.parametrize("lr_mode", ["sample", "halving"])
def test_pruned_trials_close_their_tensorboard_writers(runs, monkeypatch, lr_mode):
    text = space_text(steps=4).replace("lr_mode: sample", f"lr_mode: {lr_mode}")
    space = load_space(write(runs / "s.yaml", text))
    # every trial is pruned at its first report: accuracy never reaches 2
    monkeypatch.setattr(search, "make_pruner", lambda space: optuna.pruners.ThresholdPruner(lower=2.0))
    before = set(threading.enumerate())
    study = search.run_search(space, n_trials=4, quiet=True)
    pruned = [t for t in study.trials
              if t.state == optuna.trial.TrialState.PRUNED and "duplicate_of" not in t.user_attrs]
    assert len(pruned) >= 4
    assert new_threads(before) == []
    assert any((runs / "runs" / "resume" / "tb").iterdir())  # the writers did write


@pytest.mark.parametrize("how", ["failed", "failed_building_a_rate", "interrupted", "completed"])
def test_failed_interrupted_and_completed_trials_close_their_writers(runs, monkeypatch, how):
    from hybridnas.train import TrainRun

    space = load_space(write(runs / "s.yaml", space_text(steps=3).replace("lr_mode: sample", "lr_mode: halving")))
    real_advance, real_init = TrainRun.advance, TrainRun.__init__
    calls = {"advance": 0, "init": 0}

    def advance(self):
        calls["advance"] += 1
        if calls["advance"] == 2 and how == "failed":
            raise RuntimeError("CUDA out of memory. Tried to allocate 2 GiB")
        if calls["advance"] == 2 and how == "interrupted":
            raise KeyboardInterrupt
        return real_advance(self)

    def init(self, *args, **kw):
        calls["init"] += 1
        if calls["init"] == 2 and how == "failed_building_a_rate":  # the ladder's second rate: its first is open
            raise RuntimeError("CUDA out of memory. Tried to allocate 2 GiB")
        real_init(self, *args, **kw)

    monkeypatch.setattr(TrainRun, "advance", advance)
    monkeypatch.setattr(TrainRun, "__init__", init)
    before = set(threading.enumerate())
    try:
        search.run_search(space, n_trials=2, quiet=True)
    except KeyboardInterrupt:
        assert how == "interrupted"
    assert new_threads(before) == []


# ------------------------------------------------------------------------------------------------ 6b: changed space


def test_changed_scoring_settings_stop_with_the_fields_that_changed(runs, capsys):
    path = write(runs / "s.yaml", space_text())
    assert main(["search", path, "--n-trials", "1", "--quiet"]) == 0
    text = space_text(steps=3).replace("vocab_size: 32", "vocab_size: 48")
    write(runs / "s.yaml", text)
    capsys.readouterr()
    rc = main(["search", path, "--n-trials", "2", "--quiet"])
    out, err = capsys.readouterr()
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "train.steps" in lines[0] and "task.vocab_size" in lines[0] and "--study" in lines[0]
    assert len(search.load_study("resume").trials) == 1


def test_changed_categorical_choices_stop_before_any_trial(runs, capsys):
    path = write(runs / "s.yaml", space_text())
    assert main(["search", path, "--n-trials", "1", "--quiet"]) == 0
    write(runs / "s.yaml", space_text().replace('"AF"]', '"AF", "FA"]'))
    capsys.readouterr()
    rc = main(["search", path, "--n-trials", "3", "--quiet"])
    out, err = capsys.readouterr()
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"error: {path}:5: model.pattern:") and "--study" in lines[0]
    study = search.load_study("resume")
    assert len(study.trials) == 1 and study.trials[0].state == optuna.trial.TrialState.COMPLETE  # no FAIL rows


def test_unchanged_space_resumes_silently(runs, capsys):
    path = write(runs / "s.yaml", space_text())
    assert main(["search", path, "--n-trials", "1", "--quiet"]) == 0
    # only what does not change a score or a dimension: the trial count, a comment
    write(runs / "s.yaml", "# resumed\n" + space_text().replace("n_trials: 3", "n_trials: 2"))
    capsys.readouterr()
    assert main(["search", path]) == 0
    out, err = capsys.readouterr()
    assert "changed" not in out + err and "note" not in out + err and "error" not in out + err, out + err
    assert search.finished_count(search.load_study("resume")) == 2
