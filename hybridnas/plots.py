"""``hybridnas plot STUDY --out DIR``: PNG plots of a study, written atomically.

- ``optimization_history.png``  primary objective per trial and the best so far
- ``pareto_front.png``          multi-objective studies only: the first two objectives, each point labelled with
                                its pattern and trial number (Pareto-optimal points always; the dominated ones too
                                while the study has at most 30 distinct trials)
- ``param_importances.png``     Optuna's default evaluator (PED-ANOVA in Optuna 5) when it can be computed
- ``symbol_depth.png``          which symbol sits at which depth among the best trials

Each architecture counts once (:func:`distinct_trials`): a duplicate proposal, recorded COMPLETE with its original's
value and ``duplicate_of``, is not a second point of the Pareto front nor a second vote in the symbol-at-depth
heatmap. ``hybridnas export --pareto`` takes its front from :func:`pareto_front` too.
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


def distinct_trials(trials: list[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
    """Each trained configuration once, in trial order: a trial marked ``duplicate_of`` (a proposal that reused an
    earlier trial's value) is dropped, and of trials with the same ``config_key`` (workers that raced to train one
    configuration) only the first is kept."""
    seen: set[str] = set()
    out = []
    for t in sorted(trials, key=lambda t: t.number):
        if "duplicate_of" in t.user_attrs:
            continue
        key = t.user_attrs.get("config_key")
        if isinstance(key, str):
            if key in seen:
                continue
            seen.add(key)
        out.append(t)
    return out


def pareto_front(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The Pareto-optimal trials with finite values (Optuna's ``best_trials``, which respects the constraints),
    each architecture once (:func:`distinct_trials`), in trial order."""
    return distinct_trials([t for t in study.best_trials if t.values and all(math.isfinite(v) for v in t.values)])


def best_fraction(study: optuna.Study, fraction: float = 0.25, minimum: int = 3) -> list[optuna.trial.FrozenTrial]:
    done = distinct_trials(_completed(study))
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


LABEL_ALL_UP_TO = 30  # distinct trials: up to this many, dominated points are labelled too
LOG_SCALE = ("params", "state_bytes", "tokens_per_s")  # objectives spanning orders of magnitude


def pareto_axes(study: optuna.Study, names: list[str]):
    """Scatter of the first two objectives over the distinct completed trials, the Pareto front highlighted; each
    front point is annotated with its pattern and trial number (every point while there are at most
    :data:`LABEL_ALL_UP_TO`). Returns the Axes; the caller saves and closes its figure."""
    import matplotlib.pyplot as plt

    done = distinct_trials(_completed(study))
    front = pareto_front(study)
    on_front = {t.number for t in front}
    dominated = [t for t in done if t.number not in on_front]
    fig, ax = plt.subplots(figsize=(7, 5))

    def label(t: optuna.trial.FrozenTrial) -> str:
        return f"{t.user_attrs.get('pattern', '?')} #{t.number}"

    if dominated:
        ax.scatter([t.values[0] for t in dominated], [t.values[1] for t in dominated], c="lightgray",
                   edgecolors="gray", label="dominated", zorder=2)
        if len(done) <= LABEL_ALL_UP_TO:
            for t in dominated:
                ax.annotate(label(t), (t.values[0], t.values[1]), textcoords="offset points", xytext=(4, 4),
                            fontsize=6, color="dimgray")
    ax.scatter([t.values[0] for t in front], [t.values[1] for t in front], c="tab:red", label="Pareto front",
               zorder=3)
    for t in front:
        ax.annotate(label(t), (t.values[0], t.values[1]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    for axis, name, i in ((ax.set_xscale, names[0], 0), (ax.set_yscale, names[1], 1)):
        if name in LOG_SCALE and all(t.values[i] > 0 for t in done):
            axis("log")
    ax.set_xlabel(f"{names[0]} ({study.directions[0].name.lower()})")
    ax.set_ylabel(f"{names[1]} ({study.directions[1].name.lower()})")
    more = f"; the front is over all {len(names)} objectives" if len(names) > 2 else ""
    ax.set_title(f"Pareto front: {len(front)} of {len(done)} distinct trials{more}", fontsize=9)
    ax.legend(fontsize=7)
    return ax


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
            ax = pareto_axes(study, names)
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
