"""Bad input to `hybridnas validate` and `hybridnas search`: each case ends as one line
`error: FILE:LINE: FIELD: message` and exit code 2, never a traceback, never a model built or trained.

Cases: a task name that is a mapping or a list; absurd numbers (NaN, infinity, 1e308, 2^63) in the training,
model and layer fields; empty names; a missing `model` or `model.pattern`; ranges whose interior values cannot
build although their ends can; patterns too long, too deep or too large to expand; pattern spaces longer than a
model may be. And the `params` budget: a candidate over it is recorded infeasible from the layers' formulas,
before any model is built.
"""

from __future__ import annotations

import time
import tracemalloc
from pathlib import Path

import optuna
import pytest

from hybridnas import patterns, search
from hybridnas.cli import main
from hybridnas.config import load_space
from hybridnas.yamlio import ConfigError

TASK = "task: {name: mqar, vocab_size: 64, seq_len: 32, num_kv_pairs: 4}\n"
BIG = 2 ** 63


def write(tmp_path: Path, text: str, name: str = "bad.yaml") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


@pytest.fixture
def no_training(monkeypatch):
    """`hybridnas search` must refuse the file before any study runs: fail loudly if it gets that far."""
    def refuse(*args, **kwargs):
        raise AssertionError("the search started on a space that should have been refused")

    monkeypatch.setattr(search, "run_search", refuse)


def assert_one_line_error(tmp_path, capsys, text, line, field, *contains):
    """validate and search both exit 2 with one line naming file, line and field (and no traceback)."""
    path = write(tmp_path, text)
    for argv in (["validate", path], ["search", path, "--quiet"]):
        assert main(argv) == 2, argv
        out, err = capsys.readouterr()
        assert "Traceback" not in err
        assert err.count("\n") == 1, err[:2000]
        assert err.startswith(f"error: {path}:{line}: {field}: "), err[:2000]
        for part in contains:
            assert part in err, err
    return err


# ---------------------------------------------------------------------------------------------- 6: task name


@pytest.mark.parametrize("name", ["{a: 1}", "[mqar]"])
def test_task_name_that_is_not_a_string(tmp_path, capsys, no_training, name):
    text = f"task:\n  name: {name}\nmodel: {{d_model: 32, pattern: AA}}\n"
    assert_one_line_error(tmp_path, capsys, text, 2, "task.name", "known: ")


# ---------------------------------------------------------------------------------------------- 7: absurd numbers


MODEL = "model: {d_model: 32, pattern: AA}\n"


@pytest.mark.parametrize(("text", "line", "field"), [
    pytest.param(TASK + MODEL + "train:\n  lr: .nan\n", 4, "train.lr", id="lr-nan"),
    pytest.param(TASK + MODEL + "train:\n  lr: .inf\n", 4, "train.lr", id="lr-inf"),
    pytest.param(TASK + MODEL + "train:\n  lr: 1.0e+308\n", 4, "train.lr", id="lr-1e308"),
    pytest.param(TASK + MODEL + "train:\n  lr: [1.0e-3, .nan]\n", 4, "train.lr", id="lr-choice-nan"),
    pytest.param(TASK + MODEL + "train:\n  max_time: .nan\n", 4, "train.max_time", id="max_time-nan"),
    pytest.param(TASK + MODEL + "train:\n  batch_size: 9223372036854775808\n", 4, "train.batch_size",
                 id="batch-2^63"),
    pytest.param(TASK + MODEL + "train:\n  seed: -1\n", 4, "train.seed", id="train-seed-negative"),
    pytest.param(TASK + "model:\n  pattern: AA\n  d_model: 9223372036854775808\n", 4, "model.d_model",
                 id="d_model-2^63"),
    pytest.param(TASK + "model:\n  pattern: AA\n  d_model: 1000000000000000000000000000000\n", 4, "model.d_model",
                 id="d_model-1e30"),
    pytest.param(TASK + "model:\n  pattern: AA\n  d_model: {low: 32, high: 9223372036854775808}\n", 4,
                 "model.d_model", id="d_model-range-2^63"),
    pytest.param(TASK + "model:\n  pattern: AA\n  vocab_size: 9223372036854775808\n", 4, "model.vocab_size",
                 id="model-vocab-2^63"),
    pytest.param("task: {name: mqar, vocab_size: 9223372036854775808, seq_len: 32, num_kv_pairs: 4}\n" + MODEL, 1,
                 "task.vocab_size", id="task-vocab-2^63"),
    pytest.param(TASK + "model:\n  pattern: AA\n  norm_eps: .nan\n", 4, "model.norm_eps", id="norm_eps-nan"),
    pytest.param(TASK + "model:\n  pattern: EE\n  layers:\n    E: {n_experts: 9223372036854775808}\n", 5,
                 "model.layers.E.n_experts", id="n_experts-2^63"),
    pytest.param(TASK + "model:\n  pattern: MM\n  layers:\n    M: {d_state: 1000000000000000000000000000000}\n", 5,
                 "model.layers.M.d_state", id="d_state-1e30"),
    pytest.param(TASK + "model:\n  pattern: MM\n  layers:\n    M: {expand: .inf}\n", 5,
                 "model.layers.M.expand", id="expand-inf"),
    pytest.param(TASK + "model:\n  pattern: AA\n  layers:\n    A: {rope_theta: .nan}\n", 5,
                 "model.layers.A.rope_theta", id="rope_theta-nan"),
    pytest.param(TASK + MODEL + "search:\n  latency_batch: 9223372036854775808\n", 4, "search.latency_batch",
                 id="latency-batch-2^63"),
    pytest.param(TASK + MODEL + "search:\n  confirm_budget: .inf\n", 4, "search.confirm_budget",
                 id="confirm-budget-inf"),
    pytest.param(TASK + MODEL + "search:\n  seed: 9223372036854775808\n", 4, "search.seed", id="search-seed-2^63"),
    pytest.param(TASK + MODEL + "export:\n  dir: ''\n", 4, "export.dir", id="export-dir-empty"),
    pytest.param("name: ''\n" + TASK + MODEL, 1, "name", id="name-empty"),
])
def test_absurd_values_are_refused(tmp_path, capsys, no_training, text, line, field):
    assert_one_line_error(tmp_path, capsys, text, line, field)


def test_parameter_count_bound_before_building(tmp_path, capsys, no_training):
    """Every value is within its own bound, but the largest candidate would have ~1e12 parameters."""
    text = TASK + "model:\n  pattern: (AE)x8\n  d_model: 65536\n  layers:\n    E: {n_experts: 64}\n"
    assert_one_line_error(tmp_path, capsys, text, 4, "model.d_model", "parameters")


# ---------------------------------------------------------------------------------------------- 7: required


def test_missing_model_is_an_error(tmp_path, capsys, no_training):
    assert_one_line_error(tmp_path, capsys, TASK + "train: {steps: 3}\n", 1, "model", "missing")


def test_missing_pattern_is_an_error(tmp_path, capsys, no_training):
    assert_one_line_error(tmp_path, capsys, TASK + "model:\n  d_model: 32\n", 2, "model.pattern", "missing")


def test_missing_pattern_in_an_architecture_file(tmp_path, capsys):
    path = write(tmp_path, TASK + "model: {d_model: 32}\n")
    assert main(["validate", "--arch", path]) == 2
    _, err = capsys.readouterr()
    assert err.startswith(f"error: {path}:2: model.pattern: ") and "missing" in err and err.count("\n") == 1


def test_every_ready_space_still_validates(capsys):
    spaces = sorted(str(p) for p in (Path(__file__).resolve().parents[1] / "search_spaces").glob("*.yaml")
                    if not p.name.startswith("distill_"))  # distill-search files: tests/test_distill.py
    assert spaces
    assert main(["validate", *spaces]) == 0, capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- 7: ranges


@pytest.mark.parametrize(("layers", "d_model", "field", "contains"), [
    pytest.param("A: {n_heads: {low: 2, high: 128}}", 256, "model.layers.A.n_heads",
                 ("n_heads=3", "from the range {low: 2, high: 128}", "d_model=256"), id="n_heads-int-range"),
    pytest.param("M: {headdim: 16, expand: {low: 1.0, high: 2.0}}", 32, "model.layers.M.expand",
                 ("from the range {low: 1.0, high: 2.0}", "list"), id="expand-float-range"),
    pytest.param("A: {n_heads: 2, n_kv_heads: {low: 1, high: 2, step: 1}}", 32, None, (), id="good-int-range"),
    pytest.param("F: {expand: {low: 1.5, high: 4.0}}", 32, None, (), id="good-float-range"),
])
def test_ranges_are_checked_at_every_value(tmp_path, capsys, no_training, layers, d_model, field, contains):
    text = TASK + f"model:\n  d_model: {d_model}\n  pattern: AMF\n  layers:\n    {layers}\n"
    if field is None:
        path = write(tmp_path, text)
        assert main(["validate", path]) == 0, capsys.readouterr().err
        return
    assert_one_line_error(tmp_path, capsys, text, 6, field, *contains)


def test_d_model_range_is_checked_at_every_value(tmp_path, capsys, no_training):
    text = TASK + "model:\n  d_model: {low: 32, high: 40}\n  pattern: AA\n  layers:\n    A: {n_heads: 2}\n"
    assert_one_line_error(tmp_path, capsys, text, 3, "model.d_model", "d_model=33 from the range {low: 32, high: 40}",
                          "not divisible by n_heads=2")


def test_float_step_range_is_enumerated(tmp_path, capsys, no_training):
    # 1.0, 1.5, 2.0 at d_model 32 give d_inner 32, 48, 64: all multiples of headdim 16
    ok = TASK + "model:\n  d_model: 32\n  pattern: M\n  layers:\n    M: {headdim: 16, expand: {low: 1.0, high: 2.0, " \
                "step: 0.5}}\n"
    assert main(["validate", write(tmp_path, ok, "ok.yaml")]) == 0, capsys.readouterr().err
    capsys.readouterr()
    bad = ok.replace("step: 0.5", "step: 0.25")  # 1.25 gives 40
    assert_one_line_error(tmp_path, capsys, bad, 6, "model.layers.M.expand", "expand=1.25")


# ---------------------------------------------------------------------------------------------- 8: patterns


def test_deeply_nested_pattern(tmp_path, capsys, no_training):
    pattern = "(" * 3000 + "A" + ")x1" * 3000
    assert_one_line_error(tmp_path, capsys, TASK + f"model:\n  pattern: '{pattern}'\n", 3, "model.pattern",
                          "nest")


def test_five_megabyte_pattern(tmp_path, capsys, no_training):
    t0 = time.perf_counter()
    assert_one_line_error(tmp_path, capsys, TASK + "model:\n  pattern: " + "A" * 5_000_000 + "\n", 3,
                          "model.pattern", "characters")
    assert time.perf_counter() - t0 < 60


def test_long_pattern_is_refused_by_length_before_parsing():
    text = "A" * 1_000_000
    tracemalloc.start()
    try:
        with pytest.raises(patterns.PatternError) as info:
            patterns.parse(text)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2 ** 20, f"{peak / 2 ** 20:.0f} MiB to refuse a 1 MB pattern"
    assert "1000000 characters" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("pattern", [
    pytest.param("(((A)x100)x100)x100", id="nested-expansion"),
    pytest.param("(A)x" + "9" * 5000, id="5000-digit-count"),
    pytest.param("(A)x99999999999999999999", id="huge-count"),
])
def test_pattern_expanding_too_far(tmp_path, capsys, no_training, pattern):
    assert_one_line_error(tmp_path, capsys, TASK + f"model:\n  pattern: '{pattern}'\n", 3, "model.pattern",
                          "layers")


@pytest.mark.parametrize(("space", "field"), [
    pytest.param("genome: {length: 5000, symbols: AF}", "model.pattern.genome.length", id="genome-length"),
    pytest.param("genome: {length: {low: 1, high: 5000}, symbols: AF}", "model.pattern.genome.length",
                 id="genome-length-range"),
    pytest.param("ratio: {length: 5000, base: M, shares: {A: 0.5}}", "model.pattern.ratio.length",
                 id="ratio-length"),
])
def test_pattern_space_longer_than_a_model_may_be(tmp_path, capsys, no_training, space, field):
    assert_one_line_error(tmp_path, capsys, TASK + f"model:\n  pattern:\n    {space}\n", 4, field, "4096")


# ---------------------------------------------------------------------------------------------- 3: params budget


def test_params_budget_is_checked_before_building(tmp_path, monkeypatch):
    """A candidate far over the params budget is recorded infeasible from the layers' formulas; no model is built
    (the builder raises if called) and nothing is allocated."""
    monkeypatch.chdir(tmp_path)
    text = TASK + """\
name: over_budget
model:
  d_model: 4096
  pattern: AA
train: {steps: 2, batch_size: 4, eval_every: 1, warmup_steps: 0, lr: 1.0e-3}
search:
  n_trials: 1
  max_proposals: 2
  constraints: {params: 1.0e+5}
  pruner: none
  confirm_top: 0
"""

    def no_build(*args, **kwargs):
        raise AssertionError("a model was built for a candidate over the params budget")

    monkeypatch.setattr(search.HybridLM, "__init__", no_build)
    space = load_space(text=text, file="over_budget.yaml")
    study = search.run_search(space, quiet=True)
    trials = study.trials
    assert trials
    for t in trials:
        assert t.state == optuna.trial.TrialState.PRUNED, (t.state, t.user_attrs)
        assert "params=" in t.user_attrs["infeasible"], t.user_attrs
        assert t.user_attrs["params"] > 1e5
        assert t.constraints["params"] > 0
        assert not search.counts_toward_budget(t)


def test_load_space_raises_config_error_only():
    with pytest.raises(ConfigError):
        load_space(text="task:\n  name: {a: 1}\n", file="x.yaml")
