"""A trial -> a folder a user can rebuild and load: a :mod:`hybridnas.checkpoint` folder plus its story.

Folder layout (Hugging Face style)::

    architecture.yaml        complete config: task, model (every layer parameter resolved), train
    config.json              model_type "hybridnas", the pattern, sizes and per-symbol layer configs
    model.safetensors        weights (tied head stored once)
    tokenizer.json           the task's tokenizer (byte-level for text, decimal ids otherwise) and
    tokenizer_config.json    its settings: AutoTokenizer.from_pretrained(folder) reads them
    README.md                model card: metrics, search summary, plots
    optimization_history.png
    trial.json               study, trial number, objective values, sampled parameters, metrics

The first three are the checkpoint (saved and loaded by :mod:`hybridnas.checkpoint`; ``build_model`` is
re-exported here). Loading never unpickles: ``yaml.safe_load`` and safetensors only. Every file is written
through a temp file and a rename, so an interrupted export never leaves a half-written file.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

from hybridnas import patterns
from hybridnas.checkpoint import (  # noqa: F401 (the checkpoint names export used to define are re-exported)
    ARCH_FILE,
    CONFIG_FILE,
    WEIGHTS_FILE,
    build_model,
    complete_arch,
    hf_config,
    load_weights_into,
    save_checkpoint,
    save_weights,
)
from hybridnas.config import Trust, load_arch
from hybridnas.model import HybridLM
from hybridnas.schema import ArchConfig, resolved_layers
from hybridnas.yamlio import atomic_write_bytes, atomic_write_text, write_json

# ---------------------------------------------------------------------------------------------- study export


def _history_png(study) -> bytes | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna

    if not [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]:
        return None
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        multi = len(study.directions) > 1
        ax = optuna.visualization.matplotlib.plot_optimization_history(
            study, target=(lambda t: t.values[0]) if multi else None,
            target_name=(study.metric_names or ["Objective Value"])[0])
    fig = ax.figure
    fig.set_size_inches(7, 4)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else "nan"
    return str(v)


def model_card(arch: ArchConfig, trial, study, metrics: dict[str, Any], n_params: int) -> str:
    import optuna

    states = [t.state for t in study.trials]
    n = {s.name: states.count(s) for s in optuna.trial.TrialState}
    objective = study.user_attrs.get("objective", "accuracy")
    lines = [
        f"# {arch.name}: trial {trial.number} of study `{study.study_name}`",
        "",
        "Exported by hybridnas. Rebuild and load with:",
        "",
        "```python",
        "import hybridnas",
        "model = hybridnas.build_model('<this folder>')",
        "```",
        "",
        "## Architecture",
        "",
        f"- pattern: `{arch.model.pattern}` ({len(patterns.to_primary(arch.model.pattern))} blocks, "
        f"canonical `{patterns.to_primary(arch.model.pattern)}`)",
        f"- d_model: {arch.model.d_model}, vocab: {arch.model.vocab_size}, parameters: {n_params:,}",
        f"- task: `{arch.task.name}` " + ", ".join(f"{k}={v}" for k, v in arch.task.params.items()),
        "",
        "| symbol | parameters |",
        "|---|---|",
    ]
    for sym, params in resolved_layers(arch.model).items():
        lines.append(f"| `{sym}` | " + ", ".join(f"{k}={v}" for k, v in params.items()) + " |")
    lines += ["", "## Metrics (validation, best evaluation of the short run)", "", "| metric | value |", "|---|---|"]
    names = study.metric_names or [objective]
    for name, v in zip(names, trial.values or [], strict=False):
        lines.append(f"| objective: {name} | {_fmt(v)} |")
    for k, v in metrics.items():
        lines.append(f"| {k} | {_fmt(v)} |")
    if "state_bytes" in trial.user_attrs:
        lines.append(f"| decode state bytes (batch 1, seq {arch.task.params.get('seq_len', '?')}) | "
                     f"{trial.user_attrs['state_bytes']:,} |")
    lines += ["", "## Search", "",
              f"- trials: {len(study.trials)} ({', '.join(f'{k.lower()} {v}' for k, v in n.items() if v)})",
              "- directions: " + ", ".join(f"{d.name.lower()} {n}" for d, n in zip(study.directions, names,
                                                                                       strict=False)),
              "- sampled parameters of this trial: " + ", ".join(f"`{k}`={_fmt(v)}" for k, v in trial.params.items()),
              "", "![optimization history](optimization_history.png)", ""]
    return "\n".join(lines)


def export_trial(study, trial, out_dir: str | Path, *, retrain_if_missing: bool = True, log=print,
                 weights_dir: str | None = None, confirmed: dict[str, Any] | None = None,
                 trust_custom_code: Trust = False) -> Path:
    """Write the export folder for ``trial``: weights from its checkpoint, or retrained when absent.

    The trial's recorded architecture may name custom layer code (a study in a shared storage is anyone's): it is
    imported only as ``trust_custom_code`` allows (True, or the import paths the caller already trusts), else
    :class:`~hybridnas.config.UntrustedCodeError` before anything is imported or written."""
    out = Path(out_dir)
    arch_dict = trial.user_attrs.get("arch")
    if arch_dict is None:
        raise ValueError(f"trial {trial.number} has no recorded architecture (was it made by hybridnas search?)")
    arch = load_arch(data=arch_dict, file=f"study {study.study_name} trial {trial.number}",
                     trust_custom_code=trust_custom_code)
    weights_dir = weights_dir or trial.user_attrs.get("weights")
    metrics = dict(trial.user_attrs.get("metrics", {}))
    if confirmed:
        metrics.update({f"confirmed_{k}": v for k, v in confirmed.items()})
    model = None
    if weights_dir and (Path(weights_dir) / WEIGHTS_FILE).exists():
        # the trial's own recorded architecture (parsed above) rebuilds the model: the weights folder's
        # architecture.yaml is not read, so no module it might name is imported
        model = load_weights_into(HybridLM(arch.model), weights_dir).eval()
    elif retrain_if_missing:
        from hybridnas.tasks import build_task
        from hybridnas.trainers import trainer_for

        train = trainer_for(arch.task.name)

        log(f"weights of trial {trial.number} not found locally; retraining it with its recorded seed")
        data = build_task(arch.task.name, arch.task.build_config())
        result = train(arch, data)
        model = result.model.to("cpu")
        metrics = {k: v for k, v in result.metrics.items()}
    else:
        raise FileNotFoundError(f"weights of trial {trial.number} not found")
    save_checkpoint(out, arch, model, tokenizer=True)
    atomic_write_text(out / "README.md", model_card(arch, trial, study, metrics, model.num_params()))
    png = _history_png(study)
    if png is not None:
        atomic_write_bytes(out / "optimization_history.png", png)
    write_json(out / "trial.json", {"study": study.study_name, "trial": trial.number, "values": trial.values,
                                    "params": trial.params, "metrics": metrics})
    return out


def _finite(t) -> bool:
    return bool(t.values) and all(math.isfinite(v) for v in t.values)


def export_best(study, out_dir: str | Path, **kw) -> Path:
    """Export the winner: by confirmed mean when a confirmation ran, else by the (primary) objective."""
    import optuna

    from hybridnas.confirm import confirmed

    rows = [c for c in confirmed(study) if c.values]
    if rows:
        top = rows[0]
        return export_trial(study, top.trial, out_dir, weights_dir=top.weights,
                            confirmed={"mean": top.mean, "std": top.std, "runs": len(top.values)}, **kw)
    done = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)) if _finite(t)]
    if not done:
        raise ValueError(f"study {study.study_name!r} has no completed trial to export")
    if len(study.directions) > 1:
        maximize = study.directions[0] == optuna.study.StudyDirection.MAXIMIZE
        front = [t for t in study.best_trials if _finite(t)]
        best = sorted(front, key=lambda t: -t.values[0] if maximize else t.values[0])[0]
    else:
        best = study.best_trial
    return export_trial(study, best, out_dir, **kw)


def export_pareto(study, out_dir: str | Path, **kw) -> Path:
    """Every Pareto-optimal trial to ``out_dir/trial-NNNNN/`` plus ``pareto.json`` and a README table; each
    architecture once (a duplicate proposal shares its original's values, so it is on the front too: it is left
    out, see :func:`hybridnas.plots.pareto_front`)."""
    from hybridnas.plots import pareto_front

    out = Path(out_dir)
    front = pareto_front(study)
    if not front:
        raise ValueError(f"study {study.study_name!r} has no completed trial to export")
    names = study.metric_names or [f"objective_{i}" for i in range(len(study.directions))]
    rows = []
    for t in front:
        export_trial(study, t, out / f"trial-{t.number:05d}", **kw)
        rows.append({"trial": t.number, "pattern": t.user_attrs.get("pattern"), "folder": f"trial-{t.number:05d}",
                     **dict(zip(names, t.values, strict=False))})
    write_json(out / "pareto.json", {"study": study.study_name, "objectives": names,
                                     "directions": [d.name.lower() for d in study.directions], "front": rows})
    lines = [f"# Pareto front of study `{study.study_name}`", "",
             "| trial | pattern | " + " | ".join(names) + " | folder |", "|---" * (len(names) + 3) + "|"]
    for r in rows:
        lines.append(f"| {r['trial']} | `{r['pattern']}` | " + " | ".join(_fmt(r[n]) for n in names)
                     + f" | [{r['folder']}]({r['folder']}/) |")
    atomic_write_text(out / "README.md", "\n".join(lines) + "\n")
    return out
