"""Ground truth for a finite search space: every architecture x a learning-rate ladder x seeds x budgets.

``hybridnas sweep SPACE.yaml --out TABLE.csv`` enumerates every architecture the space can propose (every
combination of its model choices; per-symbol parameters only for symbols the pattern uses, as the search samples
them), trains each at every learning rate of a ladder and every seed at the space's step budget (1x), and then at
longer budgets (e.g. 10x) at the architecture's best learning rate only (``--long-lrs best``; the best by mean
score over seeds at the first budget). Each run is one trial of an Optuna study in the usual storage (SQLite under
``runs/`` by default, or any URL), so a sweep resumes where it stopped and any number of processes or machines
can share it: a worker claims the first run of the plan that no trial holds, runs it with Optuna's heartbeat, and
a killed worker's run is failed by the heartbeat and claimed again.

The table (CSV, one row per run) is written from the study: architecture key, the architecture's parameters (as
the search names them: ``pattern``, ``d_model``, ``M.d_state``), lr, seed, budget, steps, final and best score,
loss, wall time, the load average when the run ended, and the full learning curve (``step``, ``loss``,
``accuracy``, ``wall_seconds`` at every evaluation, JSON). ``hybridnas.fidelity`` reads it back: an
architecture's ground truth is its best learning rate's mean over seeds; its noise band comes from the seeds.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import os
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import optuna
from optuna.exceptions import ExperimentalWarning

from hybridnas import patterns
from hybridnas.ladder import ladder_from
from hybridnas.schema import ArchConfig, ModelConfig, Range, SearchSpace, TrainConfig, arch_key, value_options
from hybridnas.storage import RUNS_DIR, make_storage
from hybridnas.yamlio import atomic_write_text

#: columns of the table, in order
COLUMNS = ["run_key", "arch_key", "pattern", "arch_params", "n_params", "lr", "seed", "budget", "steps", "score",
           "final_score", "loss", "final_loss", "stop_reason", "wall_seconds", "load_avg", "state", "fail_reason",
           "trial", "curve"]


class SweepError(ValueError):
    """A space that cannot be swept (not finite) or sweep settings that make no sense."""


@dataclass(frozen=True)
class Candidate:
    """One architecture of a finite space: its search parameters (as trial params) and the concrete config."""

    params: dict[str, Any]
    arch: ArchConfig
    key: str


@dataclass(frozen=True)
class Run:
    arch: Candidate
    lr: float
    seed: int
    budget: float

    @property
    def key(self) -> str:
        return f"{self.arch.key}|lr={self.lr:.6g}|seed={self.seed}|budget={self.budget:g}"


def _finite(value: Any, where: str) -> list[Any]:
    if isinstance(value, Range) and not (isinstance(value.low, int) and isinstance(value.high, int)):
        raise SweepError(f"{where} is a continuous range {{low: {value.low}, high: {value.high}}}; a sweep needs "
                         "a finite space: list the values")
    return list(value_options(value, limit=10**6))


def enumerate_space(space: SearchSpace) -> list[Candidate]:
    """Every distinct architecture of ``space`` (distinct by architecture key), in a stable order."""
    m = space.model
    pspace = m.get("pattern", ModelConfig.pattern)
    if hasattr(pspace, "used_symbols"):
        raise SweepError("model.pattern is a genome or ratio space; a sweep needs an explicit list of patterns")
    pats = _finite(pspace, "model.pattern")
    fixed_train = {}
    for k, v in space.train.items():
        if k == "lr":
            continue
        if isinstance(v, (list, Range)):
            raise SweepError(f"train.{k} is searched; a sweep varies only the architecture and lr: fix train.{k}")
        fixed_train[k] = v
    model_keys = [k for k in m if k not in ("pattern", "layers")]
    model_opts = [_finite(m[k], f"model.{k}") for k in model_keys]
    out: dict[str, Candidate] = {}
    for pattern in pats:
        used = set(patterns.used_symbols(pattern))
        sym_keys = [(sym, k) for sym, params in m.get("layers", {}).items() if sym in used for k in params]
        sym_opts = [_finite(m["layers"][sym][k], f"model.layers.{sym}.{k}") for sym, k in sym_keys]
        for combo in itertools.product(*model_opts, *sym_opts):
            model_vals = dict(zip(model_keys, combo[:len(model_keys)]))
            layers: dict[str, dict[str, Any]] = {}
            for (sym, k), v in zip(sym_keys, combo[len(model_keys):]):
                layers.setdefault(sym, {})[k] = v
            searched = {k: v for k, v in model_vals.items() if isinstance(m[k], (list, Range))}
            params = {"pattern": pattern, **searched,
                      **{f"{sym}.{k}": v for (sym, k), v in zip(sym_keys, combo[len(model_keys):])
                         if isinstance(m["layers"][sym][k], (list, Range))}}
            model = ModelConfig(pattern=pattern, layers=layers, **model_vals)
            arch = ArchConfig(model=model, task=space.task, train=TrainConfig(**fixed_train),
                              symbols=dict(space.symbols), name=space.name)
            key = arch_key(model)
            out.setdefault(key, Candidate(params, arch, key))
    return list(out.values())


def lr_ladder(space: SearchSpace, n: int = 3, explicit: list[float] | None = None) -> list[float]:
    """The learning rates every architecture is trained at: ``explicit``, else the ladder a search trial would
    train (:func:`hybridnas.ladder.ladder_from`: the space's list of lrs, or ``n`` points over its range)."""
    if explicit:
        return sorted(float(v) for v in explicit)
    return ladder_from(space.train.get("lr", TrainConfig.lr), n)


@dataclass
class SweepPlan:
    """What a sweep trains: first every (architecture, lr, seed) at ``budgets[0]``; then each longer budget at the
    architecture's best lr (``long_lrs="best"``, decided once all its first-budget runs are in) or at every lr."""

    space: SearchSpace
    candidates: list[Candidate]
    lrs: list[float]
    seeds: list[int]
    budgets: list[float]
    long_lrs: str = "best"

    def __post_init__(self) -> None:
        if not self.candidates:
            raise SweepError("the space has no architecture")
        if not self.lrs or not self.seeds or not self.budgets:
            raise SweepError("a sweep needs at least one lr, one seed and one budget")
        if any(b <= 0 for b in self.budgets):
            raise SweepError(f"budgets must be positive, got {self.budgets}")
        if self.long_lrs not in ("best", "all"):
            raise SweepError(f"long_lrs must be best or all, got {self.long_lrs!r}")
        self.maximize = self.space.directions()[0] == "maximize"

    def first_runs(self) -> Iterator[Run]:
        for seed in self.seeds:
            for cand in self.candidates:
                for lr in self.lrs:
                    yield Run(cand, lr, seed, self.budgets[0])

    def best_lr(self, cand: Candidate, scores: dict[str, float]) -> float | None:
        """The lr with the best mean score over seeds at the first budget, once every such run is in."""
        means = []
        for lr in self.lrs:
            vals = [scores.get(Run(cand, lr, s, self.budgets[0]).key) for s in self.seeds]
            if any(v is None for v in vals):
                return None
            finite = [v for v in vals if math.isfinite(v)]
            worst = -math.inf if self.maximize else math.inf
            mean = sum(finite) / len(finite) if len(finite) == len(vals) else worst  # a diverged seed loses
            means.append((mean if self.maximize else -mean, -self.lrs.index(lr), lr))
        return max(means)[2]

    def pending(self, done: dict[str, float], held: set[str]) -> Iterator[Run]:
        """Runs not finished (``done``: run key -> score) and not held by a live trial, in plan order."""
        for run in self.first_runs():
            if run.key not in done and run.key not in held:
                yield run
        for budget in self.budgets[1:]:
            for seed in self.seeds:
                for cand in self.candidates:
                    lrs = self.lrs if self.long_lrs == "all" else [self.best_lr(cand, done)]
                    for lr in lrs:
                        if lr is None:
                            continue
                        run = Run(cand, lr, seed, budget)
                        if run.key not in done and run.key not in held:
                            yield run

    def total(self) -> int:
        n_long = len(self.lrs) if self.long_lrs == "all" else 1
        return len(self.candidates) * len(self.seeds) * (len(self.lrs) + n_long * (len(self.budgets) - 1))


def run_arch(run: Run) -> ArchConfig:
    """The concrete architecture file of one sweep run: the candidate at this lr, seed and budget."""
    base = run.arch.arch
    steps = max(1, int(round(base.train.steps * run.budget)))
    train = replace(base.train, lr=run.lr, seed=run.seed, steps=steps)
    return replace(base, train=train)


# ---------------------------------------------------------------------------------------------- the study


def sweep_study_name(space: SearchSpace) -> str:
    return f"{space.search.study_name or space.name}-sweep"


def open_sweep_study(space: SearchSpace, storage: str | None = None, study_name: str | None = None) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    name = study_name or sweep_study_name(space)
    url = storage or f"sqlite:///{RUNS_DIR}/{name}.db"
    st = make_storage(url, space.search.heartbeat_interval, space.search.grace_period)
    study = optuna.create_study(study_name=name, storage=st, direction=space.directions()[0], load_if_exists=True)
    if "space_yaml" not in study.user_attrs:
        study.set_user_attr("space_yaml", space.text)
        study.set_user_attr("kind", "sweep")
        study.set_user_attr("storage", url)
    return study


def _state(study: optuna.Study) -> tuple[dict[str, float], set[str]]:
    """(finished run key -> score, run keys held by a running trial). A run that failed as data (diverged)
    counts as finished with a nan score; one interrupted (no ``fail_reason``) is run again."""
    done: dict[str, float] = {}
    held: set[str] = set()
    for t in study.get_trials(deepcopy=False):
        key = t.user_attrs.get("run_key")
        if key is None:
            continue
        if t.state == optuna.trial.TrialState.COMPLETE:
            done[key] = float(t.value)
        elif t.state == optuna.trial.TrialState.FAIL and "fail_reason" in t.user_attrs:
            done.setdefault(key, math.nan)
        elif t.state == optuna.trial.TrialState.RUNNING:
            held.add(key)
    return done, held


class _Nothing(Exception):
    pass


class SweepObjective:
    """The objective each claimed trial runs: pick the first pending run, train it, record its curve."""

    def __init__(self, plan: SweepPlan, log=print):
        from hybridnas.tasks import build_task

        self.plan = plan
        self.log = log
        self.data = build_task(plan.space.task.name, plan.space.task.build_config())
        self.objective = plan.space.objective_names()[0]

    def __call__(self, trial: optuna.Trial) -> float:
        from hybridnas.trainers import trainer_for

        done, held = _state(trial.study)
        held.discard(trial.user_attrs.get("run_key", ""))
        run = next(self.plan.pending(done, held), None)
        if run is None:
            trial.set_user_attr("idle", True)
            raise _Nothing()
        trial.set_user_attr("run_key", run.key)
        # two workers may have claimed the same run at once: the lower trial number keeps it
        rivals = [t for t in trial.study.get_trials(deepcopy=False) if t.user_attrs.get("run_key") == run.key
                  and t.number < trial.number and t.state in (optuna.trial.TrialState.RUNNING,
                                                              optuna.trial.TrialState.COMPLETE)]
        if rivals:
            trial.set_user_attr("run_key_lost", run.key)
            trial.set_user_attr("run_key", None)
            raise optuna.TrialPruned("run claimed by another worker")
        arch = run_arch(run)
        for k, v in (("arch_key", run.arch.key), ("arch_params", run.arch.params), ("lr", run.lr),
                     ("seed", run.seed), ("budget", run.budget), ("steps", arch.train.steps),
                     ("pattern", arch.model.pattern), ("arch", arch.to_dict())):
            trial.set_user_attr(k, v)
        from hybridnas.model import HybridLM

        trial.set_user_attr("n_params", HybridLM.param_count(arch.model))
        t0 = time.perf_counter()
        try:
            result = trainer_for(arch.task.name)(arch, self.data)
        except (ValueError, RuntimeError) as e:
            reason = "out_of_memory" if "out of memory" in str(e).lower() else "error"
            trial.set_user_attr("fail_reason", reason)
            trial.set_user_attr("error", f"{type(e).__name__}: {e}"[:500])
            return math.nan
        wall = time.perf_counter() - t0
        curve = [[int(h["step"]), float(h["loss"]), float(h["accuracy"]), float(h.get("wall_seconds", math.nan))]
                 for h in result.history]
        metrics = result.metrics
        trial.set_user_attr("curve", curve)
        trial.set_user_attr("wall_seconds", wall)
        trial.set_user_attr("load_avg", os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan)
        trial.set_user_attr("stop_reason", metrics["stop_reason"])
        trial.set_user_attr("loss", metrics.get("loss"))
        trial.set_user_attr("final_score", curve[-1][2] if curve else math.nan)
        trial.set_user_attr("final_loss", curve[-1][1] if curve else math.nan)
        if metrics["stop_reason"] == "nan":
            trial.set_user_attr("fail_reason", "diverged")
            return math.nan
        value = float(metrics[self.objective])
        self.log(f"run {run.key}: {self.objective} {value:.4f} in {wall:.1f}s ({len(curve)} evals, "
                 f"{metrics['stop_reason']})")
        return value


def run_sweep(plan: SweepPlan, *, storage: str | None = None, study_name: str | None = None,
              max_runs: int | None = None, log=print) -> optuna.Study:
    """Claim and train pending runs until none is left (or ``max_runs`` have run here). Resumable."""
    from hybridnas.runtime import apply_torch_threads

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    threads = plan.space.train.get("threads")  # the search's thread rule: train.threads, else the cores' share
    apply_torch_threads(threads if isinstance(threads, int) and not isinstance(threads, bool) else None)
    study = open_sweep_study(plan.space, storage, study_name)
    objective = SweepObjective(plan, log=log)
    ran = 0
    while max_runs is None or ran < max_runs:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        done, held = _state(study)
        if next(plan.pending(done, held), None) is None:
            if held:  # another worker is finishing a run whose result may unlock longer-budget runs
                time.sleep(5)
                continue
            break
        try:
            study.optimize(objective, n_trials=1, catch=(_Nothing,), gc_after_trial=True)
        except _Nothing:
            break
        ran += 1
    done, held = _state(study)
    log(f"sweep {study.study_name!r}: {len(done)} of {plan.total()} runs finished"
        + (f", {len(held)} running elsewhere" if held else ""))
    return study


# ---------------------------------------------------------------------------------------------- the table


def table_rows(study: optuna.Study) -> list[dict[str, Any]]:
    """One row per finished run (the latest trial of each run key), in trial order."""
    rows: dict[str, dict[str, Any]] = {}
    for t in study.get_trials(deepcopy=False):
        a = t.user_attrs
        key = a.get("run_key")
        finished = t.state == optuna.trial.TrialState.COMPLETE or (
            t.state == optuna.trial.TrialState.FAIL and "fail_reason" in a)
        if key is None or not finished:
            continue
        if key in rows and rows[key]["state"] == "COMPLETE":
            continue
        rows[key] = {
            "run_key": key, "arch_key": a["arch_key"], "pattern": a["pattern"],
            "arch_params": json.dumps(a["arch_params"], sort_keys=True), "n_params": a.get("n_params"),
            "lr": a["lr"], "seed": a["seed"], "budget": a["budget"], "steps": a["steps"],
            "score": t.value if t.state == optuna.trial.TrialState.COMPLETE else math.nan,
            "final_score": a.get("final_score"), "loss": a.get("loss"), "final_loss": a.get("final_loss"),
            "stop_reason": a.get("stop_reason"), "wall_seconds": a.get("wall_seconds"),
            "load_avg": a.get("load_avg"), "state": t.state.name, "fail_reason": a.get("fail_reason", ""),
            "trial": t.number, "curve": json.dumps(a.get("curve", [])),
        }
    return list(rows.values())


def write_table(study: optuna.Study, path: str) -> int:
    """Write the sweep's table as CSV (atomically); returns the number of rows."""
    rows = table_rows(study)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if v is None else v) for k, v in r.items()})
    atomic_write_text(path, buf.getvalue())
    return len(rows)


def run_sweep_workers(argv: list[str], n: int, storage: str, log_dir: str) -> int:
    """``n`` processes of ``hybridnas sweep`` (``argv`` without ``--workers``) on one study (created by the caller):
    each gets a log file and the environment a search worker gets (:func:`hybridnas.workers.worker_env`: its share
    of the cores as torch threads, its GPU); returns how many exited with an error."""
    import subprocess
    import sys
    from pathlib import Path

    import torch

    from hybridnas.workers import worker_env

    Path(log_dir).mkdir(parents=True, exist_ok=True)
    gpus = torch.cuda.device_count()
    procs, logs = [], []
    for i in range(n):
        log = open(Path(log_dir) / f"sweep-worker-{i}.log", "ab")
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, "-m", "hybridnas.cli", "sweep", *argv, "--storage", storage],
                                      stdout=log, stderr=subprocess.STDOUT, env=worker_env(i, n, gpus)))
    try:
        for p in procs:
            p.wait()
    finally:
        for log in logs:
            log.close()
    return sum(p.returncode != 0 for p in procs)
