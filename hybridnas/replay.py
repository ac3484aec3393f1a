"""Replay: the real search loop with every trial answered from a sweep's table, many search seeds in seconds.

``hybridnas replay SPACE.yaml --table TABLE.csv --seeds N`` runs :func:`hybridnas.search.run_search` (the same
sampler, pruner, trial cap, duplicate and budget code) on an in-memory study, with training replaced by the
table: a trial's run is the table's run of that architecture, learning rate (the ladder's rates, or the sampled
rate's nearest rung) and a seed drawn per trial (the table's seeds are the evaluation noise). The run's learning
curve is reported evaluation by evaluation, so the pruner acts as it would live, and its recorded wall time is
the trial's cost, cut where the pruner stopped it.

Ground truth (:class:`GroundTruth`): an architecture's score is its best learning rate's mean over seeds, and its
noise band is two standard errors of that mean (``2 * std / sqrt(seeds)``, the seeds' std at that rate). A
replayed search *hits* when the architecture it exports scores within the best architecture's band of the best
score. The seed std pooled over all architectures is reported beside it.
Compute is the replayed cost over the wall time of the whole first-budget sweep.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import hashlib
import io
import json
import math
import statistics
from dataclasses import dataclass, field, replace
from typing import Any

from hybridnas.schema import ArchConfig, SearchSpace, arch_key
from hybridnas.train import TrainResult

# ---------------------------------------------------------------------------------------------- the table


@dataclass
class TableRow:
    arch_key: str
    pattern: str
    params: dict[str, Any]
    lr: float
    seed: int
    budget: float
    score: float
    wall_seconds: float
    stop_reason: str
    curve: list[tuple[int, float, float, float]]  # (step, loss, accuracy, wall seconds since the run began)
    n_params: int | None = None
    steps: int = 0  # the run's step budget (an early-stopped curve ends before it)


def _num(text: str) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


def load_table(path: str) -> list[TableRow]:
    """Rows of a sweep table (``hybridnas sweep --out``)."""
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        for r in csv.DictReader(f):
            curve = [(int(s), float(lo), float(a), float(w)) for s, lo, a, w in json.loads(r["curve"] or "[]")]
            rows.append(TableRow(r["arch_key"], r["pattern"], json.loads(r["arch_params"]), float(r["lr"]),
                                 int(float(r["seed"])), float(r["budget"]), _num(r["score"]),
                                 _num(r["wall_seconds"]), r["stop_reason"], curve,
                                 int(float(r["n_params"])) if r.get("n_params") else None,
                                 int(float(r["steps"])) if r.get("steps") else 0))
    if not rows:
        raise ValueError(f"{path}: the table has no runs")
    return rows


@dataclass
class ArchTruth:
    arch_key: str
    pattern: str
    params: dict[str, Any]
    score: float  # the best lr's mean over seeds
    lr: float  # that lr
    std: float  # seed standard deviation at that lr
    n_seeds: int
    by_lr: dict[float, float] = field(default_factory=dict)  # mean over seeds per lr

    @property
    def band(self) -> float:
        """Its noise band: two standard errors of its mean over seeds."""
        return 2 * self.std / math.sqrt(self.n_seeds)


@dataclass
class GroundTruth:
    archs: dict[str, ArchTruth]
    sigma: float  # seed standard deviation pooled over every architecture at its best lr
    pooled_band: float  # two standard errors of a mean over seeds at the pooled sigma
    maximize: bool = True

    @property
    def best(self) -> ArchTruth:
        pick = max if self.maximize else min
        return pick(self.archs.values(), key=lambda a: a.score)

    @property
    def band(self) -> float:
        """The best architecture's noise band: a hit scores within it."""
        return self.best.band

    def regret(self, key: str) -> float:
        a = self.archs[key].score
        return (self.best.score - a) if self.maximize else (a - self.best.score)

    def hit(self, key: str) -> bool:
        return self.regret(key) <= self.band

    def median_score(self) -> float:
        return statistics.median(a.score for a in self.archs.values())


def ground_truth(rows: list[TableRow], budget: float = 1.0, maximize: bool = True) -> GroundTruth:
    """Each architecture at its best learning rate (mean over seeds) at ``budget``; the pooled noise band."""
    groups: dict[str, dict[float, list[TableRow]]] = {}
    for r in rows:
        if r.budget == budget:
            groups.setdefault(r.arch_key, {}).setdefault(r.lr, []).append(r)
    if not groups:
        raise ValueError(f"the table has no runs at budget {budget:g}")
    worst = -math.inf if maximize else math.inf
    archs = {}
    for key, by_lr in groups.items():
        means = {}
        for lr, rs in by_lr.items():
            vals = [r.score for r in rs]
            means[lr] = statistics.fmean(vals) if all(math.isfinite(v) for v in vals) else worst
        pick = max if maximize else min
        lr = pick(sorted(means), key=lambda v: means[v])
        vals = [r.score for r in by_lr[lr]]
        any_row = by_lr[lr][0]
        archs[key] = ArchTruth(key, any_row.pattern, any_row.params, means[lr], lr,
                               statistics.stdev(vals) if len(vals) > 1 else 0.0, len(vals), means)
    multi = [a for a in archs.values() if a.n_seeds > 1 and math.isfinite(a.score)]
    sigma = math.sqrt(statistics.fmean(a.std ** 2 for a in multi)) if multi else 0.0
    n = statistics.median(a.n_seeds for a in archs.values())
    return GroundTruth(archs, sigma, 2 * sigma / math.sqrt(n), maximize)


def spearman(xs: list[float], ys: list[float]) -> float:
    """:func:`hybridnas.confirm.spearman`, with nan where it has no answer (fewer than two distinct values)."""
    from hybridnas.confirm import spearman as rank_correlation

    rho = rank_correlation(xs, ys)
    return math.nan if rho is None else rho


# ---------------------------------------------------------------------------------------------- answering trials


class TableRun:
    """A table row's learning curve, advanced evaluation by evaluation; ``cost`` collects the wall time used."""

    def __init__(self, row: TableRow, cost: list[float]):
        self.row = row
        self.cost = cost
        self.i = 0
        self.spent = 0.0
        self.stop_reason = row.stop_reason
        self.best: dict[str, float] = {"accuracy": -1.0, "loss": math.inf}

    def advance(self) -> dict[str, float] | None:
        if self.i >= len(self.row.curve):
            return None
        step, loss, acc, wall = self.row.curve[self.i]
        self.i += 1
        self.cost[0] += max(wall - self.spent, 0.0)
        self.spent = max(wall, self.spent)
        if acc > self.best["accuracy"] or (acc == self.best["accuracy"] and loss < self.best["loss"]):
            self.best = {"accuracy": acc, "loss": loss}
        return {"step": step, "loss": loss, "accuracy": acc, "wall_seconds": wall}

    def close(self) -> None:
        pass

    def finish(self) -> TrainResult:
        while self.advance() is not None:
            pass
        metrics = {"accuracy": self.row.score, "loss": self.best["loss"], "stop_reason": self.stop_reason,
                   "wall_seconds": self.row.wall_seconds, "steps": self.row.curve[-1][0] if self.row.curve else 0}
        return TrainResult(metrics, None, [])  # type: ignore[arg-type]


class TableAnswers:
    """Trial answers from the table at one budget: ``make_run`` for the ladder, ``trainer`` for a sampled lr.

    Which of the table's seeds answers an architecture is drawn once per replay (a hash of the replay seed and the
    architecture key): a live search trains an architecture at its fixed ``train.seed``, so asking twice gives the
    same run, and every rate of a ladder shares the seed; across replays the draw models the seed noise."""

    def __init__(self, rows: list[TableRow], budget: float, replay_seed: int):
        self.index: dict[tuple[str, float, int], TableRow] = {}
        self.lrs: dict[str, list[float]] = {}
        for r in rows:
            if r.budget == budget:
                self.index[(r.arch_key, r.lr, r.seed)] = r
                self.lrs.setdefault(r.arch_key, [])
                if r.lr not in self.lrs[r.arch_key]:
                    self.lrs[r.arch_key].append(r.lr)
        self.seeds = sorted({r.seed for r in rows if r.budget == budget})
        self.replay_seed = replay_seed
        self.cost = [0.0]

    def seed_for(self, key: str) -> int:
        """The table seed that answers architecture ``key`` in this replay."""
        draw = int(hashlib.sha256(f"{self.replay_seed}|{key}".encode()).hexdigest()[:8], 16)
        return self.seeds[draw % len(self.seeds)]

    def nearest_lr(self, key: str, lr: float) -> float:
        return min(self.lrs[key], key=lambda v: abs(math.log(v) - math.log(lr)))

    def row(self, arch: ArchConfig) -> TableRow:
        key = arch_key(arch.model)
        if key not in self.lrs:
            raise KeyError(f"architecture {arch.model.pattern!r} (key {key}) is not in the table: was the table swept "
                           "from this space?")
        lr = self.nearest_lr(key, arch.train.lr)
        seed = self.seed_for(key)
        row = self.index.get((key, lr, seed))
        if row is None:
            raise KeyError(f"no run of {arch.model.pattern!r} at lr {lr:g}, seed {seed} in the table")
        return row

    def make_run(self, arch: ArchConfig, data: Any, log_dir: str | None) -> TableRun:
        return TableRun(self.row(arch), self.cost)

    def trainer(self, arch: ArchConfig, data: Any, *, on_eval=None, log_dir=None, hparams=None, model=None):
        run = TableRun(self.row(arch), self.cost)
        while (ev := run.advance()) is not None:
            if on_eval is not None:
                on_eval(int(ev["step"]), ev)
        return run.finish()


# ---------------------------------------------------------------------------------------------- one replay


@dataclass
class ReplayResult:
    seed: int
    exported: str | None  # arch key of the exported (best) trial
    pattern: str | None
    cost: float  # seconds of table wall time spent
    trained: int  # trials that trained (not duplicates, not infeasible)
    regret: float
    hit: bool


def replay_once(space: SearchSpace, rows: list[TableRow], truth: GroundTruth, seed: int, *,
                budget: float = 1.0) -> ReplayResult:
    """One search (search seed ``seed``) answered from the table."""

    from hybridnas import search

    sp = copy.copy(space)
    sp.search = replace(space.search, seed=seed, save_weights=False, storage=None)
    answers = TableAnswers(rows, budget, seed)
    with contextlib.redirect_stdout(io.StringIO()):  # a replay's search speaks through its summary only
        study = search.run_search(sp, storage=":memory:", study_name=f"replay-{seed}", quiet=True,
                                  objective_kwargs={"trainer": answers.trainer, "make_run": answers.make_run,
                                                    "data": object()}, gc_after_trial=False)
    best = search.best_trial(study)
    key = best.user_attrs.get("arch_key") if best is not None else None
    if sp.search.confirm_top and best is not None:
        key = _confirm(study, sp, rows, answers) or key
    trained = sum(search.counts_toward_budget(t) for t in study.trials)
    if key is None or key not in truth.archs:
        worst = truth.best.score - min(a.score for a in truth.archs.values())
        return ReplayResult(seed, key, None, answers.cost[0], trained, worst, False)
    return ReplayResult(seed, key, truth.archs[key].pattern, answers.cost[0], trained, truth.regret(key),
                        truth.hit(key))


def _confirm(study: Any, space: SearchSpace, rows: list[TableRow], answers: TableAnswers) -> str | None:
    """What ``--confirm-top K`` would export, answered from the table: the K best distinct trials each re-run at
    their (winning) lr on ``confirm_seeds`` seeds other than the one that answered them, at ``confirm_budget``;
    the best mean of those new runs wins (as :func:`hybridnas.confirm.confirmed` ranks). Their wall time is
    charged. With a small table the other seeds are the ones the ground truth also averages: an optimistic
    reading of confirmation, as on any tabular benchmark with few seeds."""
    from hybridnas.confirm import top_trials

    s = space.search
    index = {(r.arch_key, r.lr, r.seed, r.budget): r for r in rows}
    sign = 1.0 if space.directions()[0] == "maximize" else -1.0
    scored = []
    for t in top_trials(study, s.confirm_top):
        key = t.user_attrs["arch_key"]
        lr = answers.nearest_lr(key, float(t.user_attrs["arch"]["train"]["lr"]))
        others = [x for x in answers.seeds if x != answers.seed_for(key)][:s.confirm_seeds]
        vals = []
        for seed in others:
            row = index.get((key, lr, seed, s.confirm_budget))
            if row is None:
                raise KeyError(f"confirmation needs a run of {t.user_attrs.get('pattern')} at lr {lr:g}, seed {seed}, "
                               f"budget {s.confirm_budget:g} and the table has none")
            answers.cost[0] += row.wall_seconds
            vals.append(row.score)
        if vals:
            scored.append((sign * statistics.fmean(vals), -t.number, key))
    return max(scored)[2] if scored else None


@dataclass
class Summary:
    label: str
    results: list[ReplayResult]
    sweep_seconds: float

    @property
    def hit_rate(self) -> float:
        return sum(r.hit for r in self.results) / len(self.results)

    @property
    def compute(self) -> float:
        return statistics.median(r.cost for r in self.results) / self.sweep_seconds

    @property
    def regret(self) -> float:
        return statistics.median(r.regret for r in self.results)

    def line(self) -> str:
        return f"hit_rate={self.hit_rate:.3g} compute={self.compute:.3g} regret={self.regret:.3g}"


def replay(space: SearchSpace, rows: list[TableRow], seeds: int, *, budget: float = 1.0, label: str = "",
           first_seed: int = 0) -> Summary:
    maximize = space.directions()[0] == "maximize"
    truth = ground_truth(rows, budget, maximize)
    sweep_seconds = sum(r.wall_seconds for r in rows if r.budget == budget and math.isfinite(r.wall_seconds))
    results = [replay_once(space, rows, truth, s, budget=budget) for s in range(first_seed, first_seed + seeds)]
    return Summary(label, results, sweep_seconds)


def _beats(o: Summary, s: Summary, metric: str, higher_is_better: bool) -> bool:
    """``o`` is at least as good as ``s`` on the metric at no more compute, and strictly better on one."""
    m, y = getattr(o, metric), getattr(s, metric)
    at_least = m >= y if higher_is_better else m <= y
    return o.compute <= s.compute and at_least and (o.compute < s.compute or m != y)


def write_comparison(summaries: list[Summary], out: str) -> None:
    """``out.json`` (every strategy's figures and per-seed results) and ``out.png``: hit rate and median regret
    against the median compute, one point per strategy."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hybridnas.yamlio import atomic_write_bytes, atomic_write_text

    data = [{"strategy": s.label, "hit_rate": s.hit_rate, "compute": s.compute, "regret": s.regret,
             "sweep_seconds": s.sweep_seconds,
             "runs": [{"seed": r.seed, "exported": r.pattern, "arch_key": r.exported, "cost_s": round(r.cost, 2),
                       "trained": r.trained, "regret": r.regret, "hit": r.hit} for r in s.results]}
            for s in summaries]
    atomic_write_text(f"{out}.json", json.dumps(data, indent=1) + "\n")
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    parsed = [dict(part.split("=", 1) for part in s.label.split(", ") if "=" in part) for s in summaries]
    first_key = next(iter(parsed[0]), None) if parsed and parsed[0] else None
    groups = sorted({p.get(first_key, "") for p in parsed}) if first_key else [""]
    colors = {g: f"C{i}" for i, g in enumerate(groups)}

    def short(p: dict[str, str]) -> str:
        return "/".join(p.values()) or "as the space says"

    for ax, metric, name, better in ((axes[0], "hit_rate", "hit rate", max), (axes[1], "regret", "median regret", min)):
        for g in groups:
            pts = [(s.compute, getattr(s, metric)) for s, p in zip(summaries, parsed) if p.get(first_key, "") == g]
            ax.scatter([x for x, _ in pts], [y for _, y in pts], color=colors[g], alpha=0.7,
                       label=f"{first_key}={g}" if first_key else None)
        # label the strategies no other beats on both axes (and the first one, the reference)
        for i, (s, p) in enumerate(zip(summaries, parsed)):
            y = getattr(s, metric)
            dominated = any(_beats(o, s, metric, better is max) for o in summaries if o is not s)
            if i == 0 or not dominated:
                ax.annotate(short(p), (s.compute, y), fontsize=6, xytext=(4, 2), textcoords="offset points")
        ax.set_xlabel("median compute (fraction of the sweep's first-budget wall time)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        if first_key:
            ax.legend(fontsize=7, loc="best")
    keys = "/".join(parsed[0]) if parsed and parsed[0] else ""
    axes[0].set_title(f"replayed searches, {len(summaries[0].results)} seeds each; labels: {keys}", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(f"{out}.png", buf.getvalue())
