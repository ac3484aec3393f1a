"""End-to-end search on a tiny MQAR: trials, attributes, resume, duplicates, failures, show and export."""

import math
from pathlib import Path

import optuna
import pytest
import torch

import hybridnas
from hybridnas import search
from hybridnas.cli import main
from hybridnas.config import load_space
from hybridnas.export import build_model, export_best
from hybridnas.tasks import build_task
from hybridnas.train import evaluate

SPACE = """\
name: tiny
task: {name: mqar, vocab_size: 32, seq_len: 16, num_kv_pairs: 2, num_train: 128, num_test: 32}
model:
  d_model: [16, 32]
  pattern: ["AA", "A-", "(AE)x1"]
  layers:
    A: {n_heads: [1, 2]}
    E: {n_experts: 2, top_k: 1}
train:
  steps: 8
  batch_size: 16
  eval_every: 4
  warmup_steps: 2
  lr: {low: 1.0e-3, high: 1.0e-2, log: true}
search:
  n_trials: 4
  seed: 0
  n_startup_trials: 2
  lr_mode: sample  # these tests exercise the loop's bookkeeping with the lr as one more searched parameter
  pruner: hyperband
  prune_after: 0
"""


@pytest.fixture
def runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write_space(path: Path, text: str = SPACE) -> Path:
    path.write_text(text)
    return path


def test_search_records_trials_and_resumes(runs):
    space = load_space(str(write_space(runs / "tiny.yaml")))
    study = search.run_search(space, quiet=True)
    assert (runs / "runs" / "tiny.db").exists()
    assert search.finished_count(study) == 4
    for t in study.trials:
        assert t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
        for key in ("pattern", "canonical", "arch_key", "config_key", "params", "arch"):
            assert key in t.user_attrs, key
        if "duplicate_of" not in t.user_attrs:
            assert "state_bytes" in t.user_attrs
    # TensorBoard run per trial
    assert any((runs / "runs" / "tiny" / "tb").iterdir())
    # re-running the same search with a larger target resumes: the old trials stay, new ones are added
    again = search.run_search(space, n_trials=6, quiet=True)
    assert search.finished_count(again) == 6
    assert [t.number for t in again.trials][:4] == [0, 1, 2, 3]
    # reaching the target already: nothing runs
    third = search.run_search(space, n_trials=6, quiet=True)
    assert len(third.trials) == 6


def test_duplicate_configuration_is_not_retrained(runs):
    text = SPACE.replace('["AA", "A-", "(AE)x1"]', '"AA"').replace("[16, 32]", "16").replace("[1, 2]", "2") \
        .replace("{low: 1.0e-3, high: 1.0e-2, log: true}", "3.0e-3") \
        .replace("n_trials: 4", "n_trials: 2\n  max_proposals: 3")
    space = load_space(str(write_space(runs / "dup.yaml", text.replace("name: tiny", "name: dup"))))
    study = search.run_search(space, quiet=True)
    # a one-configuration space trains once; its duplicates do not count, and the run stops at max_proposals
    first, *dups = study.trials
    assert len(dups) == 3 and search.finished_count(study) == 1
    for second in dups:
        assert second.user_attrs["duplicate_of"] == first.number
        assert second.value == first.value


def test_failures_are_recorded_and_the_search_goes_on(runs, monkeypatch):
    space = load_space(str(write_space(runs / "tiny.yaml")))
    import hybridnas.train as train_mod

    real = train_mod.train
    calls = {"n": 0}

    def flaky(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2 GiB")
        if calls["n"] == 2:
            model = kw["model"]
            with torch.no_grad():
                model.embed.weight.fill_(float("nan"))
        return real(*args, **kw)

    monkeypatch.setattr(train_mod, "train", flaky)
    study = search.run_search(space, quiet=True)
    reasons = [t.user_attrs.get("fail_reason") for t in study.trials]
    assert reasons[0] == "out_of_memory" and reasons[1] == "diverged"
    assert study.trials[0].state == optuna.trial.TrialState.FAIL
    assert search.finished_count(study) == 4
    assert any(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)


def test_interrupted_trial_is_marked_failed_and_search_resumes(runs, monkeypatch):
    space = load_space(str(write_space(runs / "tiny.yaml")))
    import hybridnas.train as train_mod

    real = train_mod.train
    calls = {"n": 0}

    def interrupt_second(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(train_mod, "train", interrupt_second)
    with pytest.raises(KeyboardInterrupt):
        search.run_search(space, quiet=True)
    study = search.load_study("tiny")
    states = [t.state for t in study.trials]
    assert states[0] == optuna.trial.TrialState.COMPLETE
    assert states[1] == optuna.trial.TrialState.FAIL  # not left RUNNING
    assert search.finished_count(study) == 1  # the interrupted trial does not use up the budget
    monkeypatch.setattr(train_mod, "train", real)
    study = search.run_search(space, quiet=True)
    assert search.finished_count(study) == 4
    # 4 trained + the interrupted one + any duplicate proposals, which do not count
    assert len(study.trials) == 5 + sum(search.bookkeeping(t) is not None for t in study.trials)


def test_export_rebuilds_the_same_model(runs):
    space = load_space(str(write_space(runs / "tiny.yaml")))
    study = search.run_search(space, quiet=True)
    out = export_best(study, runs / "export")
    for name in ("architecture.yaml", "config.json", "model.safetensors", "README.md", "optimization_history.png",
                 "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).exists(), name
    model = hybridnas.build_model(out)
    # the reported score is reproduced by the loaded weights
    data = build_task(space.task.name, space.task.build_config())
    ev = evaluate(model, data.valid_inputs, data.valid_labels, 64, torch.device("cpu"), False)
    assert ev["accuracy"] == pytest.approx(study.best_trial.value)
    # and the checkpoint saved during the search gives identical outputs
    ckpt = build_model(study.best_trial.user_attrs["weights"])
    x = torch.randint(0, 32, (3, 16))
    assert torch.equal(model(x), ckpt(x))
    card = (out / "README.md").read_text()
    assert study.best_trial.user_attrs["pattern"] in card


def test_export_retrains_when_weights_are_missing(runs):
    text = SPACE.replace("search:\n", "search:\n  save_weights: false\n")
    space = load_space(str(write_space(runs / "tiny.yaml", text)))
    study = search.run_search(space, quiet=True)
    out = export_best(study, runs / "export", log=lambda *_: None)
    model = hybridnas.build_model(out)
    assert model.num_params() == study.best_trial.user_attrs["params"]


def test_no_pickle_on_the_load_path(runs, monkeypatch):
    space = load_space(str(write_space(runs / "tiny.yaml")))
    study = search.run_search(space, n_trials=1, quiet=True)
    out = export_best(study, runs / "export")
    import pickle

    def forbidden(*a, **k):
        raise AssertionError("unpickling on the load path")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    hybridnas.build_model(out)


def test_cli_search_show_export(runs, capsys):
    path = write_space(runs / "tiny.yaml")
    assert main(["search", str(path), "--quiet", "--export", "best"]) == 0
    assert (runs / "best" / "model.safetensors").exists()
    capsys.readouterr()
    assert main(["show", "tiny"]) == 0
    out = capsys.readouterr().out
    for col in ("pattern", "params", "state_bytes", "score", "state", "duration"):
        assert col in out
    assert main(["show", str(path), "--sort", "score", "--top", "2"]) == 0
    assert main(["export", "tiny", "--out", "again", "--trial", "0"]) in (0,)
    assert main(["show", "nosuchstudy"]) == 2
    assert "no study storage" in capsys.readouterr().err


def test_samplers_and_pruners_are_selectable(runs):
    for sampler, pruner in (("random", "median"), ("tpe", "none"), ("qmc", "sha")):
        text = SPACE.replace("name: tiny", f"name: s_{sampler}").replace("  pruner: hyperband\n", "").replace(
            "search:\n", f"search:\n  sampler: {sampler}\n  pruner: {pruner}\n").replace("n_trials: 4", "n_trials: 2")
        space = load_space(text=text, file="s.yaml")
        study = search.run_search(space, quiet=True)
        assert search.finished_count(study) == 2
        assert type(study.sampler).__name__.lower().startswith(sampler)


def test_seeded_search_is_reproducible(runs):
    a = search.run_search(load_space(text=SPACE.replace("name: tiny", "name: r1"), file="a.yaml"), quiet=True)
    b = search.run_search(load_space(text=SPACE.replace("name: tiny", "name: r2"), file="b.yaml"), quiet=True)
    assert [t.params for t in a.trials] == [t.params for t in b.trials]
    va = [t.value for t in a.trials]
    vb = [t.value for t in b.trials]
    assert all((x == y) or (x is None and y is None) or (math.isnan(x) and math.isnan(y)) for x, y in zip(va, vb))


def test_aliases_are_canonicalized_so_equal_architectures_are_not_retrained(runs):
    text = SPACE.replace('["AA", "A-", "(AE)x1"]', '["A-", "AF", "(AF)x1"]').replace("[16, 32]", "16") \
        .replace("[1, 2]", "2").replace("{low: 1.0e-3, high: 1.0e-2, log: true}", "3.0e-3") \
        .replace("n_trials: 4", "n_trials: 4\n  sampler: random\n  max_proposals: 3")
    study = search.run_search(load_space(text=text.replace("name: tiny", "name: canon"), file="c.yaml"), quiet=True)
    first = study.trials[0]
    assert len(study.trials) == 4  # one trained, three duplicates (the max_proposals of this run)
    assert {t.user_attrs["canonical"] for t in study.trials} == {"AF"}
    assert all(t.user_attrs.get("duplicate_of") == first.number for t in study.trials[1:])
