"""``train.compile``: validated like the other train fields; true compiles the training steps, false and auto on
CPU stay eager; a compile that fails at run time falls back to eager with one warning and is recorded (metrics,
and the trial's ``compile_fallback`` user attr) instead of failing the run or the trial.

The real compile path runs with the cheap ``aot_eager`` backend (inductor's C++ build would take a minute here);
``tests/layers/test_compile_layers.py`` compiles the layers with inductor.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from hybridnas import search
from hybridnas.cli import main
from hybridnas.config import ArchConfig, ModelConfig, TaskSpec, TrainConfig, load_space
from hybridnas.tasks import build_task
from hybridnas.train import train, wants_compile

TASK = TaskSpec("mqar", {"vocab_size": 32, "seq_len": 16, "num_kv_pairs": 2, "num_train": 64, "num_test": 16,
                         "seed": 0})


def arch(**kw) -> ArchConfig:
    model = ModelConfig(vocab_size=32, d_model=32, pattern="AE",
                        layers={"A": {"n_heads": 2}, "E": {"n_experts": 2, "top_k": 1}})
    cfg = {"steps": 3, "batch_size": 8, "lr": 3e-3, "eval_every": 3, "warmup_steps": 1, "seed": 0,
           "target_accuracy": None}
    cfg.update(kw)
    return ArchConfig(model, TASK, TrainConfig(**cfg))


@pytest.fixture(scope="module")
def data():
    return build_task(TASK.name, TASK.build_config())


@pytest.fixture
def compile_calls(monkeypatch):
    """torch.compile with the aot_eager backend, counting calls and compiled forwards."""
    calls = {"compile": 0, "forward": 0}
    real = torch.compile

    def fake(model, **kw):
        calls["compile"] += 1
        compiled = real(model, backend="aot_eager")

        def forward(*a, **k):
            calls["forward"] += 1
            return compiled(*a, **k)

        return forward

    monkeypatch.setattr(torch, "compile", fake)
    return calls


def test_auto_is_eager_on_cpu_and_compiles_on_cuda():
    assert wants_compile("auto", torch.device("cuda")) is True
    assert wants_compile("auto", torch.device("cpu")) is False
    assert wants_compile(True, torch.device("cpu")) is True
    assert wants_compile(False, torch.device("cuda")) is False


def test_compile_true_trains_compiled_and_matches_eager(data, compile_calls):
    torch._dynamo.reset()
    eager = train(arch(compile=False), data)
    assert compile_calls["compile"] == 0 and eager.metrics["compiled"] is False
    compiled = train(arch(compile=True), data)
    assert compile_calls == {"compile": 1, "forward": 3}
    assert compiled.metrics["compiled"] is True and "compile_error" not in compiled.metrics
    assert compiled.metrics["final_train_loss"] == pytest.approx(eager.metrics["final_train_loss"], rel=1e-4)
    auto = train(arch(), data)  # auto on CPU: eager
    assert compile_calls["compile"] == 1 and auto.metrics["compiled"] is False


def broken_compile(monkeypatch):
    def fake(model, **kw):
        def forward(*a, **k):
            raise RuntimeError("InductorError: CppCompileError: C++ compile error (simulated)")

        return forward

    monkeypatch.setattr(torch, "compile", fake)


def test_compile_failure_falls_back_to_eager_with_one_warning(data, monkeypatch):
    eager = train(arch(compile=False), data)
    broken_compile(monkeypatch)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        res = train(arch(compile=True), data)
    msgs = [str(w.message) for w in seen if "torch.compile failed" in str(w.message)]
    assert len(msgs) == 1, msgs
    assert res.metrics["compiled"] is False and res.metrics["steps"] == 3
    assert "CppCompileError" in res.metrics["compile_error"]
    assert res.metrics["final_train_loss"] == pytest.approx(eager.metrics["final_train_loss"], rel=1e-5)


def test_search_records_compile_fallback_on_the_trial(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    broken_compile(monkeypatch)
    (tmp_path / "s.yaml").write_text("""\
name: comp
task: {name: mqar, vocab_size: 32, seq_len: 16, num_kv_pairs: 2, num_train: 64, num_test: 16}
model: {d_model: 16, pattern: ["AA", "A-"], layers: {A: {n_heads: 2}}}
train: {steps: 3, batch_size: 8, eval_every: 3, warmup_steps: 1, lr: 3.0e-3, compile: true}
search: {n_trials: 2, seed: 0, lr_mode: sample, pruner: none, save_weights: false}
""")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        study = search.run_search(load_space(str(tmp_path / "s.yaml")), quiet=True)
    assert len(study.trials) == 2
    for t in study.trials:
        assert t.state.name == "COMPLETE", t.user_attrs.get("error")
        assert "CppCompileError" in t.user_attrs["compile_fallback"]


@pytest.mark.parametrize("value", ["maybe", "1", "2.5", "[auto, maybe]"])
def test_bad_compile_value_is_a_one_line_error(tmp_path, capsys, value):
    path = tmp_path / "bad.yaml"
    path.write_text("task: {name: mqar, vocab_size: 64, seq_len: 32, num_kv_pairs: 4}\nmodel: {pattern: AA}\n"
                    f"train:\n  steps: 10\n  compile: {value}\n")
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}:5: train.compile"), err
    assert "expected one of 'auto' or bool" in err, err
    assert err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("value, expected", [("true", True), ("false", False), ("auto", "auto")])
def test_good_compile_values_load(tmp_path, value, expected):
    path = tmp_path / "ok.yaml"
    path.write_text("task: {name: mqar, vocab_size: 64, seq_len: 32, num_kv_pairs: 4}\nmodel: {pattern: AA}\n"
                    f"train:\n  steps: 10\n  compile: {value}\n")
    assert load_space(str(path)).train["compile"] == expected
