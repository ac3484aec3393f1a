"""The trained-trial budget: infeasible, duplicate and repaired proposals do not use it up, they are capped apart,
and a repaired genome teaches the sampler the genes that were trained."""

import re
import subprocess
import uuid

import optuna
import pytest
from _postgres import postgres_param, url_or_fail

from hybridnas import search
from hybridnas.cli import main
from hybridnas.config import load_space
from hybridnas.pattern_space import sample_pattern
from hybridnas.storage import load_study
from hybridnas.workers import worker_command

# length-4 genomes over A (2048 decode-state bytes each at d_model 16, seq 16) and F (none): a 3000-byte budget
# admits at most one A, so 11 of 16 genomes are infeasible
GENOME = """\
name: {name}
task: {{name: mqar, vocab_size: 32, seq_len: 16, num_kv_pairs: 2, num_train: 64, num_test: 16}}
model:
  d_model: 16
  pattern:
    genome: {{length: 4, symbols: AF{counts}}}
  layers: {{A: {{n_heads: 2}}}}
train: {{steps: 4, batch_size: 16, eval_every: 2, warmup_steps: 1, lr: {{low: 1.0e-3, high: 1.0e-2, log: true}}}}
search:
  n_trials: {n}
  seed: 0
  sampler: random
  pruner: none
{extra}"""


def genome_space(name, n=3, extra="", counts=""):
    return load_space(text=GENOME.format(name=name, n=n, extra=extra, counts=counts), file=f"{name}.yaml")


def trained(study):
    return [t for t in study.trials if search.counts_toward_budget(t)]


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def test_mostly_infeasible_space_still_trains_n_trials_and_resumes():
    space = genome_space("infeasible", n=2, extra="  constraints: {state_bytes: 3000}\n")
    study = search.run_search(space, quiet=True)
    infeasible = [t for t in study.trials if "infeasible" in t.user_attrs]
    assert infeasible, "the space should propose infeasible genomes"
    assert all(t.state == optuna.trial.TrialState.PRUNED and not search.counts_toward_budget(t) for t in infeasible)
    assert len(trained(study)) == search.finished_count(study) == 2
    assert all("metrics" in t.user_attrs or "pruned_at_step" in t.user_attrs for t in trained(study))
    before = {t.number: (t.state, t.params) for t in study.trials}
    # resume with a larger target: two more models train, the earlier trials stay as they were
    again = search.run_search(space, n_trials=4, quiet=True)
    assert len(trained(again)) == search.finished_count(again) == 4
    assert {t.number: (t.state, t.params) for t in again.trials if t.number in before} == before


def test_duplicates_do_not_count():
    text = GENOME.format(name="dups", n=2, extra="", counts="").replace(
        "    genome: {length: 4, symbols: AF}", '    ["AA", "A-"]').replace(
        "{low: 1.0e-3, high: 1.0e-2, log: true}", "3.0e-3")
    space = load_space(text=text, file="dups.yaml")
    study = search.open_study(space)
    study.enqueue_trial({"pattern": "AA"})
    study.enqueue_trial({"pattern": "AA"})
    study = search.run_search(space, quiet=True)
    assert study.trials[1].user_attrs["duplicate_of"] == 0
    assert not search.counts_toward_budget(study.trials[1])
    assert search.finished_count(study) == 2
    assert sorted(t.user_attrs["pattern"] for t in trained(study)) == ["A-", "AA"]


def test_repaired_genome_trains_genes_that_need_no_repair(capsys):
    space = genome_space("repair", n=3, counts=", counts: {A: {max: 1}}")
    study = search.run_search(space, quiet=True)
    pspace = space.model["pattern"]
    assert len(trained(study)) == 3
    for t in trained(study):
        pattern, notes = sample_pattern(pspace, optuna.trial.FixedTrial(t.params), search.suggest)
        assert notes == {} and pattern == t.user_attrs["pattern"], t.number
    parents = [t for t in study.trials if "repaired_into" in t.user_attrs]
    assert parents, "the space should propose genomes that break the count bound"
    for p in parents:
        assert p.state == optuna.trial.TrialState.PRUNED and not search.counts_toward_budget(p)
        child = study.trials[p.user_attrs["repaired_into"]]
        assert child.user_attrs["repaired_from"] == p.number
        assert child.user_attrs["pattern_repaired"] == p.user_attrs["pattern_repaired"]
        assert child.user_attrs["pattern"].count("A") <= 1
    # the command line says which trial repaired what, how long each took, and the rate
    path = "repair_cli.yaml"
    with open(path, "w") as f:
        f.write(GENOME.format(name="repair_cli", n=2, extra="", counts=", counts: {A: {max: 1}}"))
    assert main(["search", path]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("trial ")]
    assert any("(repaired: " in line and " -> " in line for line in lines), out
    assert all(re.search(r" \d+\.\ds ", line) for line in lines), out
    assert "trials/hour" in out
    assert main(["show", "repair_cli"]) == 0
    assert "repaired" in capsys.readouterr().out


def test_bookkeeping_cap_stops_an_all_infeasible_space(capsys):
    space = genome_space("hopeless", n=2, extra="  constraints: {params: 1.0}\n  max_proposals: 4\n")
    study = search.run_search(space, quiet=True)
    assert len(study.trials) == 4 and search.finished_count(study) == 0
    out = capsys.readouterr().out
    stop = [line for line in out.splitlines() if line.startswith("stopped")]
    assert len(stop) == 1 and "4" in stop[0] and "max_proposals" in stop[0], out
    assert "trained 0 of 2" in out
    # the default cap
    assert search.proposal_cap(genome_space("d", n=3), 3) == 50
    assert search.proposal_cap(genome_space("d", n=30), 30) == 300


def test_over_cap_ignores_bookkeeping_but_counts_undecided_live_trials():
    study = optuna.create_study(direction="maximize")
    t0 = study.ask()
    study.tell(t0, 1.0)  # trained
    t1 = study.ask()
    t1.set_user_attr("infeasible", "params=9 vs max 1")
    study.tell(t1, state=optuna.trial.TrialState.PRUNED)
    t2 = study.ask()
    t2.set_user_attr("duplicate_of", 0)
    study.tell(t2, 1.0)
    t3 = study.ask()  # running, not yet known to be bookkeeping: it may train, so it holds a slot
    t4 = study.ask()
    t4.set_user_attr("repaired_into", 9)  # running but decided: it will not train
    t5 = study.ask()
    assert search.finished_count(study) == 1
    assert not search.over_cap(study, 5, 3)  # t0, t3
    assert search.over_cap(study, 6, 3)  # t0, t3, t5
    t3.set_user_attr("infeasible", "state_bytes=9 vs max 1")
    assert not search.over_cap(study, 6, 3)  # t0, t5
    assert t5.number == 5


def _storages():
    yield pytest.param("journal", id="journal-file")
    yield postgres_param()  # skipped off CI without a server; fails under CI without one (tests/_postgres.py)


@pytest.mark.slow
@pytest.mark.parametrize("storage", list(_storages()))
def test_racing_workers_train_exactly_n_trials_among_bookkeeping_proposals(storage, tmp_path):
    storage = url_or_fail(storage)
    name = f"race_{uuid.uuid4().hex[:8]}"
    path = tmp_path / "race.yaml"
    path.write_text(GENOME.format(name=name, n=5, counts=", counts: {A: {max: 2}}",
                                  extra="  constraints: {state_bytes: 3000}\n").replace("steps: 4,", "steps: 60,"))
    url = str(tmp_path / "runs" / f"{name}.journal") if storage == "journal" else storage
    search.open_study(load_space(str(path)), url, name)
    procs = [subprocess.Popen(worker_command(str(path), url, name, 5, i), cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT) for i in range(3)]
    outs = [p.communicate(timeout=300)[0].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    study = load_study(name, url)
    ran_training = [t for t in study.trials if "threads" in t.user_attrs]  # set just before training starts
    assert len(ran_training) == search.finished_count(study) == 5, outs
    assert any(search.bookkeeping(t) for t in study.trials)
