"""Search fidelity: the sweep's table, the learning-rate ladder, replay, and pruning that waits for the jump."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import pytest

from hybridnas import search
from hybridnas.cli import main
from hybridnas.config import load_space
from hybridnas.ladder import ladder_from, run_ladder, rung_step
from hybridnas.replay import ground_truth, load_table, replay
from hybridnas.schema import Range, TrainConfig
from hybridnas.sweep import COLUMNS, SweepError, enumerate_space, lr_ladder

SPACE = """\
name: fid
task: {name: mqar, vocab_size: 32, seq_len: 16, num_kv_pairs: 2, num_train: 64, num_test: 16}
model:
  d_model: 16
  pattern: ["AA", "A-"]
  layers:
    A: {n_heads: [1, 2]}
train: {steps: 6, batch_size: 8, eval_every: 2, warmup_steps: 1, lr: {low: 1.0e-3, high: 1.0e-2, log: true},
        threads: 1}
search: {n_trials: 3, seed: 0, n_startup_trials: 1}
"""


@pytest.fixture
def runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


# ---------------------------------------------------------------------------------------------- sweep


def test_enumerate_space_is_every_architecture_once(runs):
    space = load_space(write(runs / "fid.yaml", SPACE.replace('["AA", "A-"]', '["AA", "A-", "*A"]')))
    cands = enumerate_space(space)
    # "*A" is "AA" written with an alias: the same architecture, swept once
    assert sorted((c.params["pattern"], c.params["A.n_heads"]) for c in cands) == \
        [("A-", 1), ("A-", 2), ("AA", 1), ("AA", 2)]
    assert lr_ladder(space) == [0.001, 0.00316228, 0.01]


@pytest.mark.parametrize("edit,message", [
    (("d_model: 16", "d_model: 16\n  init_std: {low: 0.01, high: 0.02}"), "continuous range"),
    (('["AA", "A-"]', "{genome: {length: 2, symbols: A}}"), "genome or ratio"),
    (("batch_size: 8", "batch_size: [8, 16]"), "train.batch_size is searched"),
])
def test_sweep_refuses_a_space_it_cannot_enumerate(runs, edit, message):
    space = load_space(write(runs / "fid.yaml", SPACE.replace(*edit)))
    with pytest.raises(SweepError, match=message):
        enumerate_space(space)


def test_sweep_writes_the_table_and_resumes(runs, capsys):
    path = write(runs / "fid.yaml", SPACE)
    args = ["sweep", path, "--n-lrs", "2", "--seeds", "2", "--budgets", "1,2", "--out", "t.csv", "--quiet"]
    assert main(args) == 0
    with open("t.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == COLUMNS
    first = [r for r in rows if float(r["budget"]) == 1]
    long = [r for r in rows if float(r["budget"]) == 2]
    assert len(first) == 4 * 2 * 2 and len(long) == 4 * 2  # 4 architectures x 2 lrs x 2 seeds; then best lr only
    for r in long:
        # the long budget runs at the architecture's best mean lr over the first budget's seeds
        mine = [x for x in first if x["arch_key"] == r["arch_key"]]
        means = {lr: sum(float(x["score"]) for x in mine if x["lr"] == lr) / 2 for lr in {x["lr"] for x in mine}}
        assert means[r["lr"]] == max(means.values())
        assert int(r["steps"]) == 12
    curve = json.loads(rows[0]["curve"])
    assert [c[0] for c in curve] == [2, 4, 6] and all(len(c) == 4 for c in curve)
    assert curve[-1][3] >= curve[0][3] > 0  # wall seconds since the run began, at each evaluation
    assert float(rows[0]["wall_seconds"]) >= curve[-1][3]
    # resuming trains nothing new, and --table-only rewrites the same table
    capsys.readouterr()
    assert main(args[:-1]) == 0
    assert "run " not in capsys.readouterr().out
    assert main(["sweep", path, "--table-only", "--out", "u.csv", "--n-lrs", "2", "--seeds", "2",
                 "--budgets", "1,2"]) == 0
    assert Path("u.csv").read_text() == Path("t.csv").read_text()


def test_an_interrupted_run_is_claimed_again(runs):
    from hybridnas.sweep import SweepPlan, open_sweep_study, run_sweep

    space = load_space(write(runs / "fid.yaml", SPACE))
    plan = SweepPlan(space, enumerate_space(space), [1e-3], [0], [1.0])
    study = open_sweep_study(space)
    # a worker killed mid-run leaves a FAIL trial with the run key and no fail_reason: the run is not done
    trial = study.ask()
    first = next(plan.pending({}, set()))
    trial.set_user_attr("run_key", first.key)
    study.tell(trial, state=__import__("optuna").trial.TrialState.FAIL)
    run_sweep(plan, log=lambda *a: None)
    done = [t for t in study.get_trials() if t.user_attrs.get("run_key") == first.key and t.state.name == "COMPLETE"]
    assert len(done) == 1


# ---------------------------------------------------------------------------------------------- ladder


class FakeRun:
    def __init__(self, lr: float, curve: list[tuple[int, float, float]]):
        self.lr, self.curve, self.i, self.closed, self.stop_reason = lr, curve, 0, False, "steps"

    def advance(self):
        if self.closed or self.i >= len(self.curve):
            return None
        step, loss, acc = self.curve[self.i]
        self.i += 1
        return {"step": step, "loss": loss, "accuracy": acc}

    def close(self):
        self.closed = True

    def finish(self):
        return {"lr": self.lr, "steps_run": self.i}


CURVES = {  # lr -> (step, loss, accuracy); lr 2 has the lowest loss at the rung (step 4) but flat accuracy
    1: [(2, 3.0, 0.30), (4, 2.9, 0.30), (6, 2.8, 0.30), (8, 2.7, 0.31)],
    2: [(2, 3.0, 0.20), (4, 2.0, 0.20), (6, 1.0, 0.90), (8, 0.5, 0.99)],
    3: [(2, 3.5, 0.10), (4, 3.4, 0.10), (6, 3.3, 0.10), (8, 3.2, 0.10)],
}


def test_halving_keeps_the_lowest_loss_at_the_rung_and_reports_the_envelope():
    made, seen = {}, []

    def make(lr):
        made[lr] = FakeRun(lr, CURVES[lr])
        return made[lr]

    out = run_ladder(make, [1, 2, 3], mode="halving", rung=4, target=0.99, on_eval=lambda s, ev: seen.append(
        (s, ev["accuracy"])), score=lambda r: 0.0)
    assert out.lr == 2 and out.result == {"lr": 2, "steps_run": 4}
    assert made[1].closed and made[3].closed and made[1].i == 2  # losers stop at the rung
    # until the rung the pruner sees the best rate at each step (accuracy), then the winner alone
    assert seen == [(2, 0.30), (4, 0.30), (6, 0.90), (8, 0.99)]
    assert set(out.rungs) == {1, 2, 3} and out.rungs[2]["step"] == 4


def test_full_ladder_keeps_the_best_score_and_closes_every_run_when_pruned():
    scores = {1: 0.31, 2: 0.99, 3: 0.10}
    out = run_ladder(lambda lr: FakeRun(lr, CURVES[lr]), [1, 2, 3], mode="ladder", rung=4, target=None,
                     on_eval=None, score=lambda r: scores[r["lr"]])
    assert out.lr == 2
    made = {}

    def make(lr):
        made[lr] = FakeRun(lr, CURVES[lr])
        return made[lr]

    def prune(step, ev):
        if step >= 4:
            raise RuntimeError("pruned")

    with pytest.raises(RuntimeError):
        run_ladder(make, [1, 2, 3], mode="halving", rung=6, target=None, on_eval=prune, score=lambda r: 0.0)
    assert all(r.closed for r in made.values())


def test_a_rate_that_fails_to_build_closes_the_rates_built_before_it():
    made = {}

    def make(lr):
        if lr == 3:
            raise RuntimeError("cannot build")
        made[lr] = FakeRun(lr, CURVES[lr])
        return made[lr]

    with pytest.raises(RuntimeError, match="cannot build"):
        run_ladder(make, [1, 2, 3], mode="halving", rung=4, target=None, on_eval=None, score=lambda r: 0.0)
    assert set(made) == {1, 2} and all(r.closed for r in made.values())


def test_ladder_rates_and_rung():
    assert ladder_from(Range(1e-3, 1e-1, log=True), 3) == [0.001, 0.01, 0.1]
    assert ladder_from([3e-3, 1e-3], 5) == [1e-3, 3e-3]
    assert ladder_from(2e-3, 3) == [2e-3]
    assert rung_step(TrainConfig(steps=600, eval_every=25), 0.25) == 150
    assert rung_step(TrainConfig(steps=100, eval_every=30), 0.25) == 30


def test_search_with_halving_records_and_exports_the_winning_rate(runs):
    text = SPACE.replace("n_startup_trials: 1}", "n_startup_trials: 1, lr_mode: halving, lr_rung: 0.5}")
    space = load_space(write(runs / "fid.yaml", text))
    study = search.run_search(space, quiet=True)
    trained = [t for t in study.trials if "lr" in t.user_attrs]
    assert trained and all("lr" not in t.params for t in study.trials)  # the rate is not a searched parameter
    for t in trained:
        assert t.user_attrs["lr"] in (0.001, 0.00316228, 0.01)
        assert t.user_attrs["arch"]["train"]["lr"] == t.user_attrs["lr"]
        assert set(t.user_attrs["lr_rungs"]) == {"0.001", "0.00316228", "0.01"}


# ---------------------------------------------------------------------------------------------- replay


def synthetic_table(space, path: str, curves: dict[str, list[float]], seeds=(0, 1), lrs=(1e-3, 1e-2)) -> None:
    """A table for ``space`` where pattern p's accuracy at each evaluation is ``curves[p]`` (the same at every lr
    and seed, plus a seed offset of 0.001), 1 second per evaluation."""
    steps = TrainConfig(**{k: v for k, v in space.train.items() if k != "lr"}).eval_every
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for cand in enumerate_space(space):
            acc = curves[cand.params["pattern"]]
            for lr in lrs:
                for seed in seeds:
                    a = [min(1.0, v + 0.001 * seed) for v in acc]
                    curve = [[steps * (i + 1), 3.0 - v, v, float(i + 1)] for i, v in enumerate(a)]
                    w.writerow({"run_key": f"{cand.key}|{lr}|{seed}", "arch_key": cand.key,
                                "pattern": cand.params["pattern"], "arch_params": json.dumps(cand.params),
                                "lr": lr, "seed": seed, "budget": 1.0, "steps": steps * len(a), "score": max(a),
                                "wall_seconds": float(len(a)), "stop_reason": "steps", "state": "COMPLETE",
                                "curve": json.dumps(curve)})


JUMP_SPACE = """\
name: jump
task: {name: mqar, vocab_size: 32, seq_len: 16, num_kv_pairs: 2}
model:
  d_model: [16, 32]
  pattern: ["AA", "A-", "-A", "--", "A", "-"]
train: {steps: 100, eval_every: 10, lr: {low: 1.0e-3, high: 1.0e-2, log: true}}
search: {n_trials: 8, seed: 0, sampler: random, pruner: hyperband, lr_mode: halving, prune_after: 0, confirm_top: 0}
"""
# "AA" sits below the others on the plateau, then jumps at 80% of the steps (a recall task's curve)
JUMP = {"AA": [0.20] * 7 + [0.5, 0.95, 0.99], "A-": [0.30] * 10, "-A": [0.29] * 10, "--": [0.25] * 10,
        "A": [0.28] * 10, "-": [0.24] * 10}


def test_replay_is_deterministic_and_its_last_line_is_the_summary(runs, capsys):
    space = load_space(write(runs / "jump.yaml", JUMP_SPACE))
    synthetic_table(space, "t.csv", JUMP)
    args = ["replay", "jump.yaml", "--table", "t.csv", "--seeds", "6"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first
    last = first.strip().splitlines()[-1]
    assert re.fullmatch(r"hit_rate=[0-9.e-]+ compute=[0-9.e-]+ regret=[0-9.e-]+", last), last


def test_pruning_that_waits_for_the_jump_finds_the_late_jumper(runs):
    space = load_space(write(runs / "jump.yaml", JUMP_SPACE))
    synthetic_table(space, "t.csv", JUMP)
    rows = load_table("t.csv")
    truth = ground_truth(rows)
    assert truth.best.pattern == "AA" and truth.band < 0.01 and truth.pooled_band < 0.01
    eager = replay(space, rows, 10)
    space.search.prune_after = 0.85
    patient = replay(space, rows, 10)
    # pruning from the first evaluation cuts "AA" on its plateau; waiting past the jump keeps it
    # (the patient misses are searches whose 8 trials never drew "AA" among 12 architectures)
    assert eager.hit_rate <= 0.5
    assert patient.hit_rate >= 0.9
    assert all(r.trained > 0 for r in patient.results)


def test_replay_charges_a_pruned_trial_only_up_to_its_prune_step(runs):
    space = load_space(write(runs / "jump.yaml", JUMP_SPACE))
    synthetic_table(space, "t.csv", JUMP)
    rows = load_table("t.csv")
    space.search.pruner = "none"
    full = replay(space, rows, 3)
    space.search.pruner = "hyperband"
    cut = replay(space, rows, 3)
    assert all(c.cost < f.cost for c, f in zip(cut.results, full.results))
    # halving: three rates to the rung (step 30: 3 evaluations of 1 s each), then one rate alone (7 more)
    assert all(math.isclose(r.cost, r.trained * (3 * 3 + 7)) for r in full.results)


def test_sweep_workers_share_one_study(runs):
    path = write(runs / "fid.yaml", SPACE.replace('["AA", "A-"]', '["AA"]'))
    assert main(["sweep", path, "--n-lrs", "2", "--seeds", "2", "--workers", "2", "--out", "w.csv", "--quiet"]) == 0
    with open("w.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 2 * 2 and len({r["run_key"] for r in rows}) == 8  # every run once, none repeated
    logs = sorted((runs / "runs" / "fid-sweep").glob("sweep-worker-*.log"))
    assert len(logs) == 2 and all("runs finished" in p.read_text() for p in logs)


def test_the_envelope_follows_a_loss_objective():
    seen = []
    run_ladder(lambda lr: FakeRun(lr, CURVES[lr]), [1, 2, 3], mode="ladder", rung=4, target=None,
               on_eval=lambda s, ev: seen.append(ev["loss"]), score=lambda r: 0.0, by_loss=True)
    assert seen == [3.0, 2.0, 1.0, 0.5]  # the lowest loss among the rates at each step
