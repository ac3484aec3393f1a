"""``hybridnas plot STUDY --out DIR``: PNG plots of a study, written atomically.

- ``optimization_history.png``  primary objective per trial and the best so far
- ``pareto_front.png``          multi-objective studies only
- ``param_importances.png``     Optuna's default evaluator (PED-ANOVA in Optuna 5) when it can be computed
- ``symbol_depth.png``          which symbol sits at which depth among the best trials
"""

from __future__ import annotations

import io
import math
import warnings
from pathlib import Path

import optuna

from hybridnas.yamlio import atomic_write_bytes


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _completed(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
            if t.values and all(math.isfinite(v) for v in t.values)]


def best_fraction(study: optuna.Study, fraction: float = 0.25, minimum: int = 3) -> list[optuna.trial.FrozenTrial]:
    done = _completed(study)
    maximize = study.directions[0] == optuna.study.StudyDirection.MAXIMIZE
    done.sort(key=lambda t: -t.values[0] if maximize else t.values[0])
    return done[:max(minimum, math.ceil(fraction * len(done)))]


def symbol_depth_counts(trials: list[optuna.trial.FrozenTrial]) -> tuple[list[str], list[list[float]]]:
    """Rows: symbols; columns: depth; value: share of the trials (long enough) with that symbol there."""
    pats = [t.user_attrs.get("canonical") or t.user_attrs.get("pattern", "") for t in trials]
    pats = [p for p in pats if p]
    if not pats:
        return [], []
    depth = max(len(p) for p in pats)
    symbols = sorted({c for p in pats for c in p})
    grid = []
    for s in symbols:
        row = []
        for i in range(depth):
            have = [p for p in pats if len(p) > i]
            row.append(sum(p[i] == s for p in have) / len(have) if have else math.nan)
        grid.append(row)
    return symbols, grid


def plot_study(study: optuna.Study, out_dir: str | Path, top_fraction: float = 0.25) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    names = study.metric_names or [f"objective {i}" for i in range(len(study.directions))]
    done = _completed(study)
    if not done:
        raise ValueError(f"study {study.study_name!r} has no completed trial to plot")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        multi = len(study.directions) > 1
        ax = ovm.plot_optimization_history(study, target=(lambda t: t.values[0]) if multi else None,
                                           target_name=names[0])
        atomic_write_bytes(out / "optimization_history.png", _png(ax.figure))
        written.append(out / "optimization_history.png")
        if multi:
            ax = ovm.plot_pareto_front(study, target_names=names[:3] if len(names) <= 3 else None,
                                       targets=None if len(names) <= 3 else (lambda t: t.values[:2]))
            atomic_write_bytes(out / "pareto_front.png", _png(ax.figure))
            written.append(out / "pareto_front.png")
        try:
            ax = ovm.plot_param_importances(study, target=(lambda t: t.values[0]) if multi else None,
                                            target_name=names[0])
            atomic_write_bytes(out / "param_importances.png", _png(ax.figure))
            written.append(out / "param_importances.png")
        except (ValueError, RuntimeError, ZeroDivisionError):
            pass  # fewer than two distinct completed trials: no importances
    symbols, grid = symbol_depth_counts(best_fraction(study, top_fraction))
    if symbols:
        fig, ax = plt.subplots(figsize=(max(4, 0.5 * len(grid[0]) + 2), 0.6 * len(symbols) + 1.6))
        im = ax.imshow(grid, cmap="viridis", vmin=0, vmax=1, aspect="auto")
        ax.set_yticks(range(len(symbols)), symbols)
        ax.set_xticks(range(len(grid[0])))
        ax.set_xlabel("depth (layer index)")
        ax.set_title(f"symbol at each depth, best {len(best_fraction(study, top_fraction))} trials")
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                if not math.isnan(v):
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if v < 0.6 else "black")
        fig.colorbar(im, ax=ax, fraction=0.04)
        atomic_write_bytes(out / "symbol_depth.png", _png(fig))
        written.append(out / "symbol_depth.png")
    return written


def importances(study: optuna.Study) -> dict[str, float]:
    """Parameter importances of the primary objective; {} when they cannot be computed yet."""
    multi = len(study.directions) > 1
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return optuna.importance.get_param_importances(study, target=(lambda t: t.values[0]) if multi else None)
    except (ValueError, RuntimeError, ZeroDivisionError):
        return {}
