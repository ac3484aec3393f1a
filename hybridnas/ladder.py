"""A trial's learning rate: a ladder of rates inside the trial, so its score measures the architecture.

Three modes (``search.lr_mode``):

- ``sample``: the learning rate is one more searched parameter (a trial trains once, at the sampled lr);
- ``ladder``: every trial trains the architecture at each rate of the ladder to the full budget and keeps the best
  (Zoology's and MAD's "best over the lr grid", inside one trial);
- ``halving``: every rate trains to the rung (``lr_rung`` of the steps); the one with the lowest validation loss
  there (a rate that already reached the target accuracy first) continues alone to the end. Loss, not accuracy,
  decides: on a recall task's plateau accuracy is flat while the loss already moves.

The runs advance in lock-step, evaluation by evaluation. The trial's reported curve is the envelope: at each
evaluation the best accuracy among the rates still training, so the pruner judges the trial by its best rate.
The same code drives real training runs (:class:`hybridnas.train.TrainRun`) and table runs replayed from a sweep
(:mod:`hybridnas.replay`), so a replay costs and scores a trial exactly as the search would.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from hybridnas import train as train_mod
from hybridnas.schema import ArchConfig, Range, SearchSpace, TrainConfig

MODES = ("sample", "ladder", "halving")


class Run(Protocol):
    """What the ladder drives: a training run advanced evaluation by evaluation."""

    stop_reason: str

    def advance(self) -> dict[str, float] | None: ...

    def close(self) -> None: ...

    def finish(self) -> Any: ...


def ladder_from(lr: Any, n: int) -> list[float]:
    """The rates a ladder trains: a list as written; a range as ``n`` points evenly spaced (in log for a log range)
    with both ends included; a fixed value alone."""
    if isinstance(lr, list):
        return sorted(float(v) for v in lr)
    if isinstance(lr, Range):
        lo, hi = float(lr.low), float(lr.high)
        if n == 1:
            return [float(f"{math.sqrt(lo * hi) if lr.log else (lo + hi) / 2:.6g}")]
        if lr.log:
            return [float(f"{lo * (hi / lo) ** (i / (n - 1)):.6g}") for i in range(n)]
        return [float(f"{lo + (hi - lo) * i / (n - 1):.6g}") for i in range(n)]
    return [float(lr)]


def rung_step(train: TrainConfig, fraction: float) -> int:
    """The first evaluation step at or after ``fraction`` of the steps: where halving chooses its rate."""
    target = max(1, math.ceil(fraction * train.steps))
    every = train.eval_every
    return min(train.steps, math.ceil(target / every) * every)


@dataclass
class LadderOutcome:
    lr: float  # the rate that continued to the end (halving) or scored best (ladder)
    result: Any  # the winning run's finish()
    rungs: dict[float, dict[str, float]] = field(default_factory=dict)  # lr -> its last evaluation before the choice


def _better(a: dict[str, float], b: dict[str, float], target: float | None) -> bool:
    """Is evaluation ``a`` a better reason to keep its rate than ``b``? Solved first, then lower loss."""
    solved_a = target is not None and a["accuracy"] >= target
    solved_b = target is not None and b["accuracy"] >= target
    if solved_a != solved_b:
        return solved_a
    la, lb = a["loss"], b["loss"]
    if not math.isfinite(lb):
        return math.isfinite(la)
    return math.isfinite(la) and la < lb


def run_ladder(make_run: Callable[[float], Run], lrs: list[float], *, mode: str, rung: int,
               target: float | None, on_eval: Callable[[int, dict[str, float]], None] | None,
               score: Callable[[Any], float], by_loss: bool = False) -> LadderOutcome:
    """Train ``lrs`` in lock-step and pick one. ``score(result)`` ranks finished runs in ``ladder`` mode (higher
    is better). ``on_eval(step, ev)`` gets the envelope (the best accuracy at each step, or the lowest loss with
    ``by_loss``, for a loss objective); it may raise (pruning): every run is closed on the way out.
    """
    if mode not in ("ladder", "halving"):
        raise ValueError(f"lr mode must be ladder or halving here, got {mode!r}")
    runs: dict[float, Run] = {}
    last: dict[float, dict[str, float]] = {}
    try:
        for lr in lrs:  # inside the try: a rate that fails to build closes the ones built before it
            runs[lr] = make_run(lr)
        live = dict(runs)
        while live:
            evs = {}
            for lr, run in list(live.items()):
                ev = run.advance()
                if ev is None:
                    del live[lr]
                else:
                    evs[lr] = last[lr] = ev
            if not evs:
                break
            step = max(int(ev["step"]) for ev in evs.values())
            best = (min(evs.values(), key=lambda e: e["loss"]) if by_loss else
                    max(evs.values(), key=lambda e: (e["accuracy"], -e["loss"])))
            if on_eval is not None:
                on_eval(step, best)
            if mode == "halving" and step >= rung:
                break
        usable = {lr: ev for lr, ev in last.items() if runs[lr].stop_reason != "nan"} or last
        if mode == "halving":
            winner = None
            for lr in lrs:
                if lr in usable and (winner is None or _better(usable[lr], usable[winner], target)):
                    winner = lr
            winner = lrs[0] if winner is None else winner
            for lr, run in runs.items():
                if lr != winner:
                    run.close()
            rungs = dict(last)
            run = runs[winner]
            while (ev := run.advance()) is not None:
                if on_eval is not None:
                    on_eval(int(ev["step"]), ev)
            return LadderOutcome(winner, run.finish(), rungs)
        results = {lr: run.finish() for lr, run in runs.items()}
        ranked = sorted(lrs, key=lambda lr: (runs[lr].stop_reason == "nan", -_finite(score(results[lr]))))
        return LadderOutcome(ranked[0], results[ranked[0]], dict(last))
    finally:
        for run in runs.values():
            run.close()


def _finite(v: float) -> float:
    return v if isinstance(v, (int, float)) and math.isfinite(v) else -math.inf


def ladder_trainer(space: SearchSpace, base: Callable[..., Any], make_run: Callable[..., Any] | None = None):
    """A trainer with ``base``'s signature that applies ``search.lr_mode`` (ladder or halving) inside the trial.

    ``make_run(arch, data, log_dir)`` makes one run advanced evaluation by evaluation (default: a real
    :class:`hybridnas.train.TrainRun`); a task whose trainer is not the plain one (a suite) trains each rate to the
    end one after the other, with no intermediate reports, and keeps the best. The result carries the winning rate
    in ``attrs`` (``lr``, ``lr_rungs``)."""
    s = space.search
    lrs = ladder_from(space.train.get("lr", TrainConfig.lr), s.lr_ladder)
    objective = space.objective_names()[0]
    sign = 1.0 if space.directions()[0] == "maximize" else -1.0

    def score(result: Any) -> float:
        return sign * float(result.metrics.get(objective, math.nan))

    def trainer(arch: ArchConfig, data: Any, *, on_eval=None, log_dir=None, hparams=None, model=None):
        def with_lr(lr: float) -> ArchConfig:
            return replace(arch, train=replace(arch.train, lr=lr))

        plain = make_run is not None or base is train_mod.train
        if not plain or len(lrs) == 1:
            results = {lr: base(with_lr(lr), data, on_eval=on_eval if len(lrs) == 1 else None,
                                log_dir=None if log_dir is None else f"{log_dir}/lr-{lr:g}", hparams=hparams)
                       for lr in lrs}
            lr = max(lrs, key=lambda v: (results[v].metrics["stop_reason"] != "nan", _finite(score(results[v]))))
            out = results[lr]
            out.attrs.update({"lr": lr, "lr_scores": {f"{v:g}": results[v].metrics.get(objective) for v in lrs}})
            return out

        def run_for(lr: float):
            logs = None if log_dir is None else f"{log_dir}/lr-{lr:g}"
            if make_run is not None:
                return make_run(with_lr(lr), data, logs)
            return train_mod.TrainRun(with_lr(lr), data, log_dir=logs, hparams=hparams)

        outcome = run_ladder(run_for, lrs, mode=s.lr_mode, rung=rung_step(arch.train, s.lr_rung),
                             target=arch.train.target_accuracy, on_eval=on_eval, score=score,
                             by_loss=objective == "loss")
        result = outcome.result
        result.attrs.update({"lr": outcome.lr, "lr_rungs": {f"{lr:g}": {k: ev[k] for k in ("step", "loss", "accuracy")}
                                                            for lr, ev in outcome.rungs.items()}})
        return result

    return trainer
