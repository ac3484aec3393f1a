"""Results as a user reads them: duplicates counted once, labelled Pareto plots, byte decoding, in-trial progress."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution

from hybridnas import export, plots

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _study(directions: list[str], rows: list[tuple[str, list[float], dict]]) -> optuna.Study:
    """A study built by hand: one trial per row (pattern, values, extra user attrs), as hybridnas search records
    them (a duplicate proposal is COMPLETE with its original's values and ``duplicate_of``)."""
    study = optuna.create_study(directions=directions)
    dist = {"pattern": CategoricalDistribution(["AA", "AM", "MM"])}
    for pattern, values, attrs in rows:
        study.add_trial(optuna.trial.create_trial(
            params={"pattern": pattern}, distributions=dist, values=values,
            user_attrs={"pattern": pattern, "canonical": pattern, "config_key": f"key-{pattern}", **attrs}))
    return study


def test_symbol_depth_heatmap_counts_a_duplicate_once():
    study = _study(["maximize"], [("AA", [0.9], {}), ("AA", [0.9], {"duplicate_of": 0}), ("MM", [0.5], {}),
                                  ("AM", [0.4], {})])
    best = plots.best_fraction(study, 1.0)
    assert sorted(t.number for t in best) == [0, 2, 3]
    symbols, grid = plots.symbol_depth_counts(best)
    assert symbols == ["A", "M"]
    assert grid[0][0] == pytest.approx(2 / 3)  # AA, AM of AA, MM, AM: not 3/4 with the duplicate counted again


def test_a_second_worker_training_the_same_configuration_counts_once():
    # two workers raced and both trained one configuration: same config_key, no duplicate mark
    study = _study(["maximize"], [("AA", [0.9], {}), ("AA", [0.8], {}), ("MM", [0.5], {})])
    assert [t.number for t in plots.best_fraction(study, 1.0)] == [0, 2]


PARETO_ROWS = [("AA", [0.9, 100.0], {}), ("AA", [0.9, 100.0], {"duplicate_of": 0}), ("MM", [0.5, 50.0], {}),
               ("AM", [0.4, 200.0], {})]


def test_pareto_front_lists_each_architecture_once():
    study = _study(["maximize", "minimize"], PARETO_ROWS)
    assert len(study.best_trials) == 3  # Optuna's own front holds the duplicate too
    assert [t.number for t in plots.pareto_front(study)] == [0, 2]


def test_export_pareto_exports_a_duplicate_once(tmp_path, monkeypatch):
    study = _study(["maximize", "minimize"], PARETO_ROWS)
    exported = []
    monkeypatch.setattr(export, "export_trial", lambda study, t, out, **kw: exported.append(t.number))
    out = export.export_pareto(study, tmp_path / "front")
    assert exported == [0, 2]
    front = json.loads((out / "pareto.json").read_text())["front"]
    assert [r["trial"] for r in front] == [0, 2]
    assert (out / "README.md").read_text().count("`AA`") == 1


def test_pareto_plot_labels_each_point_with_its_pattern(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    study = _study(["maximize", "minimize"], PARETO_ROWS)
    ax = plots.pareto_axes(study, ["accuracy", "params"])
    texts = [t.get_text() for t in ax.texts]
    plt.close(ax.figure)
    assert sum("AA" in s for s in texts) == 1  # the duplicate is not a second point
    assert any("MM" in s for s in texts) and any("AM" in s for s in texts)
    assert "pareto_front.png" in {p.name for p in plots.plot_study(study, tmp_path / "plots")}


def test_byte_tokenizer_decodes_what_it_encodes():
    from hybridnas.tasks.lm import BYTE_EOS, ByteTokenizer

    tok = ByteTokenizer()
    text = "héllo wörld, 価格 € 😀\n"
    (ids, lens), = tok.encode([text])
    assert tok.decode(ids) == text  # a numpy array of ids
    assert tok.decode([*ids.tolist(), BYTE_EOS, *tok.encode(["ok"])[0][0].tolist()]) == text + "ok"  # end skipped
    assert tok.decode(ids.tolist()[:2]) == "h\ufffd"  # a cut multi-byte character: replaced, no error


def test_tokenizer_file_decodes_skipping_the_end_of_text(tmp_path):
    pytest.importorskip("tokenizers")
    from hybridnas.hf_tokenizer import byte_tokenizer
    from hybridnas.tasks.lm import load_tokenizer

    path = tmp_path / "tok.json"
    path.write_text(byte_tokenizer().to_str())
    tok = load_tokenizer(str(path))
    text = "naïve café ✓"
    (ids, _), = tok.encode([text])
    assert tok.decode([*ids.tolist(), tok.eos_id]) == text


TINY = """\
name: NAME
task: {name: mqar, vocab_size: 32, seq_len: 16, num_kv_pairs: 2, num_train: 64, num_test: 16}
model: {d_model: 16, pattern: "AA", layers: {A: {n_heads: 2}}}
train: {steps: 4, batch_size: 16, eval_every: 2, warmup_steps: 1, lr: 3.0e-3}
search: {n_trials: 1, seed: 0, lr_mode: sample, max_proposals: 2, confirm_top: 0EXTRA}
"""


def _tiny(tmp_path, monkeypatch, name: str, extra: str = "") -> str:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / f"{name}.yaml"
    path.write_text(TINY.replace("NAME", name).replace("EXTRA", extra))
    return str(path)


@pytest.mark.parametrize("lr_mode", ["sample", "halving"])
def test_search_prints_progress_within_a_trial_past_the_threshold(tmp_path, monkeypatch, capsys, lr_mode):
    import re

    from hybridnas.cli import main

    space = _tiny(tmp_path, monkeypatch, "prog")
    Path(space).write_text(Path(space).read_text().replace("lr_mode: sample", f"lr_mode: {lr_mode}"))
    assert main(["search", space, "--progress-after", "0"]) == 0
    out = capsys.readouterr().out
    lines = re.findall(r"trial\s+0 step (\d)/4 .*loss [\d.]+.*accuracy [\d.]+.* [\d.]+s", out)
    assert lines == ["2", "4"], out
    # the default threshold (10 s) keeps a short trial quiet
    assert main(["search", space, "--study", "prog2"]) == 0
    assert not re.search(r"step \d/4", capsys.readouterr().out)


def test_search_end_summary_counts_the_pareto_front_once(tmp_path, monkeypatch, capsys):
    from hybridnas import search
    from hybridnas.cli import main
    from hybridnas.config import load_space

    path = _tiny(tmp_path, monkeypatch, "front", ", objectives: [accuracy, params]")
    search.run_search(load_space(path), n_trials=2, quiet=True)  # one configuration: trains once, then duplicates
    assert main(["search", path, "--n-trials", "1"]) == 0
    out = capsys.readouterr().out
    assert "Pareto front: 1 trial(s): #0 AA" in out, out


@pytest.mark.parametrize("value", ["-1", "nan"])
def test_a_bad_progress_threshold_is_one_line(tmp_path, monkeypatch, capsys, value):
    from hybridnas.cli import main

    space = _tiny(tmp_path, monkeypatch, "bad")
    assert main(["search", space, "--progress-after", value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --progress-after"), err
    assert not (tmp_path / "runs").exists()


def _readme_gaps(readme: str) -> list[str]:
    """Train keys and extras the README does not document: each train key as `key` in the training settings
    paragraph, each extra of pyproject.toml as a row of the extras table."""
    import dataclasses
    import tomllib

    from hybridnas.schema import TrainConfig

    root = Path(__file__).resolve().parents[1]
    extras = tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    start = readme.find("Training settings (`train:`")
    section = readme[start:readme.find("\n\n", readme.find("- `max_time`", start))] if start >= 0 else ""
    gaps = [f"train.{f.name}" for f in dataclasses.fields(TrainConfig) if f"`{f.name}`" not in section]
    return gaps + [f"extra {name}" for name in extras if f"\n| `{name}` |" not in readme]


def test_readme_documents_every_train_key_and_extra():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert _readme_gaps(readme) == []
