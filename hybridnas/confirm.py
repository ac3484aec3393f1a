"""Confirmation: re-train the top K with several seeds and a longer budget before declaring a winner.

Short runs rank noisily. ``hybridnas search ... --confirm-top K --confirm-seeds S --confirm-budget X`` trains
each of the K best distinct configurations S more times (new seeds, X times the steps). Results are stored as
study user attributes (``confirm/<trial>/<seed>``; finished trials cannot take new attributes), one per run
as it finishes, so an interrupted confirmation resumes where it stopped. ``show`` and ``export`` then rank by
the confirmed mean, and the Spearman correlation between the short-run and confirmed rankings says how
faithful the short-run proxy was.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from hybridnas.storage import RUNS_DIR


@dataclass
class Confirmed:
    trial: optuna.trial.FrozenTrial
    values: list[float]
    weights: str | None  # folder of the best seed's checkpoint

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values) if self.values else math.nan

    @property
    def std(self) -> float:
        return statistics.stdev(self.values) if len(self.values) > 1 else 0.0


def _maximize(study: optuna.Study) -> bool:
    return study.directions[0] == optuna.study.StudyDirection.MAXIMIZE


def top_trials(study: optuna.Study, k: int) -> list[optuna.trial.FrozenTrial]:
    """The K best completed trials by the primary objective, one per distinct configuration."""
    done = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
            if t.values and math.isfinite(t.values[0]) and "arch" in t.user_attrs]
    done.sort(key=lambda t: (-t.values[0] if _maximize(study) else t.values[0], t.number))
    seen, out = set(), []
    for t in done:
        key = t.user_attrs.get("config_key", t.number)
        if key not in seen:
            seen.add(key)
            out.append(t)
    return out[:k]


def run_confirmation(study: optuna.Study, top_k: int, seeds: int, budget: float, *, log=print,
                     trust_custom_code: bool | Collection[str] = False) -> dict[str, Any]:
    """Re-train the top ``top_k`` distinct trials on ``seeds`` new seeds at ``budget`` times their steps (runs already
    recorded are kept). A trial's recorded architecture is rebuilt with ``trust_custom_code`` (see
    :func:`hybridnas.config.load_arch`): the search passes the import paths its own space named."""
    from hybridnas.checkpoint import save_checkpoint
    from hybridnas.config import load_arch
    from hybridnas.tasks import build_task
    from hybridnas.trainers import trainer_for

    objective = (study.user_attrs.get("objectives") or [study.user_attrs.get("objective", "accuracy")])[0]
    trials = top_trials(study, top_k)
    data_cache: dict[str, Any] = {}
    for t in trials:
        arch = load_arch(data=t.user_attrs["arch"], file=f"study {study.study_name} trial {t.number}",
                         trust_custom_code=trust_custom_code)
        base_seed, base_steps = arch.train.seed, arch.train.steps
        for s in range(seeds):
            key = f"confirm/{t.number}/{s}"
            if key in study.user_attrs:
                continue
            arch.train.seed = base_seed + 1000 * (s + 1)
            arch.train.steps = max(1, math.ceil(base_steps * budget))
            task_key = repr(arch.task)
            if task_key not in data_cache:
                data_cache[task_key] = build_task(arch.task.name, arch.task.build_config())
            log(f"confirm: trial {t.number} ({t.user_attrs.get('pattern')}) seed {s + 1}/{seeds}, "
                f"{arch.train.steps} steps")
            result = trainer_for(arch.task.name)(arch, data_cache[task_key])
            value = result.metrics.get(objective, math.nan)
            out = Path(RUNS_DIR) / study.study_name / "confirm" / f"{t.number:05d}" / f"seed-{s}"
            if isinstance(value, float) and math.isfinite(value):
                save_checkpoint(out, arch, result.model.to("cpu"))
            study.set_user_attr(key, {"value": value if math.isfinite(value) else None, "seed": arch.train.seed,
                                      "steps": arch.train.steps, "weights": str(out),
                                      "stop_reason": result.metrics.get("stop_reason")})
    summary = summarize(study)
    study.set_user_attr("confirm/summary", {"spearman": summary["spearman"], "top_k": top_k, "seeds": seeds,
                                            "budget": budget})
    return summary


def confirmed(study: optuna.Study) -> list[Confirmed]:
    """Confirmed trials ranked by their confirmed mean (best first); [] when no confirmation ran."""
    by_trial: dict[int, list[dict]] = {}
    for key, value in study.user_attrs.items():
        if key.startswith("confirm/") and key.count("/") == 2:
            by_trial.setdefault(int(key.split("/")[1]), []).append(value)
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    out = []
    for number, runs in by_trial.items():
        vals = [r["value"] for r in runs if r.get("value") is not None]
        best = None
        if vals:
            pick = max if _maximize(study) else min
            best = pick((r for r in runs if r.get("value") is not None), key=lambda r: r["value"])["weights"]
        out.append(Confirmed(trials[number], vals, best))
    sign = -1 if _maximize(study) else 1
    out.sort(key=lambda c: (math.isnan(c.mean), sign * (c.mean if not math.isnan(c.mean) else 0), c.trial.number))
    return out


def spearman(a: list[float], b: list[float]) -> float | None:
    if len(a) < 2 or len(set(a)) < 2 or len(set(b)) < 2:
        return None
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def summarize(study: optuna.Study) -> dict[str, Any]:
    rows = confirmed(study)
    usable = [c for c in rows if c.values]
    rho = spearman([c.trial.values[0] for c in usable], [c.mean for c in usable])
    return {"rows": rows, "spearman": rho}
