"""Every registered task survives the whole path a user takes: a tiny `hybridnas search` (one trial, a few steps,
confirmation of the best) -> its export -> `hybridnas.build_model(folder)` -> the exported architecture.yaml read
back -> `hybridnas export` again from the study. The architecture a trial records must name its task: the `lm`
task used to write `task.name: null` (its config's own `name` field overwrote it), so nothing trained on text
could be confirmed, exported or rebuilt."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import pytest
import yaml

import hybridnas
from hybridnas.cli import main
from hybridnas.config import load_arch
from hybridnas.tasks import TASKS

SMALL = {"num_train": 32, "num_test": 8}


def _lm_params(tmp: Path) -> dict:
    rng = random.Random(0)
    words = ["state", "space", "model", "attention", "recall", "token", "layer", "search", "mixer", "the", "a"]
    text = "\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(60)) + "\n"
    (tmp / "corpus.txt").write_text(text, encoding="utf-8")
    return {"path": str(tmp / "corpus.txt"), "seq_len": 16, "split_block": 64, "cache_dir": str(tmp / "lmcache")}


#: a tiny configuration of every registered task (a new task needs one here: the test below checks)
TASK_PARAMS = {
    "mqar": lambda tmp: {"vocab_size": 32, "seq_len": 16, "num_kv_pairs": 2, **SMALL},
    "mad_in_context_recall": lambda tmp: {"vocab_size": 16, "seq_len": 16, **SMALL},
    "mad_noisy_in_context_recall": lambda tmp: {"seq_len": 16, **SMALL},
    "mad_fuzzy_in_context_recall": lambda tmp: {"vocab_size": 16, "seq_len": 16, **SMALL},
    "mad_selective_copying": lambda tmp: {"seq_len": 16, "num_tokens_to_copy": 4, **SMALL},
    "mad_compression": lambda tmp: {"seq_len": 8, **SMALL},
    "mad_memorization": lambda tmp: {"vocab_size": 64, "seq_len": 8, **SMALL},
    "mad": lambda tmp: {"tasks": ["in_context_recall", "compression"], "common": SMALL,
                        "params": {"in_context_recall": {"seq_len": 16}, "compression": {"seq_len": 8}}},
    "lm": _lm_params,
}


def test_every_registered_task_has_a_roundtrip_case():
    assert sorted(TASK_PARAMS) == sorted(TASKS)


def test_no_task_config_has_a_field_called_name():
    """`name` in a space's `task:` mapping is the task's name: a config field of that name can never be set from
    YAML and overwrites the task's name when the architecture is written out."""
    for task, (cls, _) in TASKS.items():
        assert "name" not in {f.name for f in dataclasses.fields(cls)}, task


@pytest.mark.parametrize("task", sorted(TASK_PARAMS))
def test_search_export_rebuild_confirm(task, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    study = f"rt_{task}"
    space = {
        "name": study,
        "task": {"name": task, **TASK_PARAMS[task](tmp_path)},
        "model": {"d_model": 16, "pattern": "AF", "layers": {"A": {"n_heads": 2}}},
        "train": {"steps": 3, "batch_size": 8, "eval_every": 3, "warmup_steps": 1, "lr": 3.0e-3,
                  "target_accuracy": None},
        "search": {"n_trials": 1, "sampler": "random", "pruner": "none", "lr_mode": "sample", "seed": 0,
                   "confirm_top": 1, "confirm_seeds": 1},
        "export": {"dir": "exported"},
    }
    path = tmp_path / f"{study}.yaml"
    path.write_text(yaml.safe_dump(space, sort_keys=False), encoding="utf-8")

    assert main(["search", str(path), "--quiet"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "confirmation" in out and "exported the best trial" in out, out

    folder = tmp_path / "exported"
    arch = load_arch(str(folder / "architecture.yaml"))
    assert arch.task.name == task
    model = hybridnas.build_model(folder)
    assert model.num_params() > 0 and model.cfg.pattern == "AF"

    again = tmp_path / "again"
    assert main(["export", str(path), "--out", str(again)]) == 0, capsys.readouterr().err
    assert hybridnas.build_model(again).num_params() == model.num_params()
