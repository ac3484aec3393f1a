"""What a study remembers of the space that began it, so that resuming never mixes what does not compare.

Two fingerprints are stored as study user attributes when a study is created (:func:`record_space`):

- ``scoring``: what a trial's score depends on besides its architecture (:func:`scoring_settings`: the task, the
  training settings, the objectives, the learning-rate ladder). Scores under different values do not compare.
- ``dimensions``: every parameter the space can ask Optuna for, with its distribution (:func:`space_dimensions`).
  Optuna cannot change a categorical parameter's choices within a study (it fails the trial that asks).

:func:`check_resume` compares a space with them before any trial is asked for, and refuses with a
``file:line: field: message`` error naming what changed; ``scoring_fingerprint`` and ``dimensions_fingerprint``
are short hashes of the two for a glance.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, fields
from typing import Any

import optuna

from hybridnas.pattern_space import sample_pattern
from hybridnas.schema import ModelConfig, Range, SearchSpace, TrainConfig, value_options
from hybridnas.yamlio import PathT

#: the search's ``suggest(trial, name, value)``: fixed value -> itself, list -> categorical, Range -> int or float
Suggest = Callable[[Any, str, Any], Any]

#: train fields that say where and how fast a trial runs, not what it scores (as :func:`config_key`)
_NOT_SCORING = ("device", "threads")


def _plain(value: Any) -> Any:
    return asdict(value) if isinstance(value, Range) else value


def scoring_settings(space: SearchSpace) -> dict[str, Any]:
    """What a trial's score depends on besides its architecture, as ``field.path -> value``: the task, the training
    settings (a train field sampled per trial is a dimension instead), the objectives and the learning-rate ladder.
    Trials scored under different values do not compare, so a study keeps the values it began with."""
    out: dict[str, Any] = {"task.name": space.task.name}
    out.update({f"task.{k}": _plain(v) for k, v in space.task.params.items()})
    ladder = space.search.lr_mode != "sample"
    for f in fields(TrainConfig):
        value = space.train.get(f.name, getattr(TrainConfig, f.name))
        if f.name in _NOT_SCORING or (isinstance(value, (list, Range)) and not (ladder and f.name == "lr")):
            continue
        out[f"train.{f.name}"] = _plain(value)
    out["search.objectives"] = space.objective_names()
    out["search.lr_mode"] = space.search.lr_mode
    if ladder:
        out["search.lr_ladder"] = space.search.lr_ladder
        out["search.lr_rung"] = space.search.lr_rung
    return json.loads(json.dumps(out, default=str))


class _Recorder:
    """Stands in for an Optuna trial: records the distribution each ``suggest_*`` asks for and answers the lowest
    value (or the one ``force`` gives)."""

    def __init__(self, force: dict[str, Any] | None = None):
        self.dists: dict[str, optuna.distributions.BaseDistribution] = {}
        self.force = force or {}

    def suggest_categorical(self, name: str, choices: list[Any]) -> Any:
        self.dists[name] = optuna.distributions.CategoricalDistribution(choices)
        return self.force.get(name, choices[0])

    def suggest_int(self, name: str, low: int, high: int, *, step: int = 1, log: bool = False) -> int:
        self.dists[name] = optuna.distributions.IntDistribution(low, high, log=log, step=step)
        return self.force.get(name, low)

    def suggest_float(self, name: str, low: float, high: float, *, step: float | None = None,
                      log: bool = False) -> float:
        self.dists[name] = optuna.distributions.FloatDistribution(low, high, log=log, step=step)
        return self.force.get(name, low)

    def set_user_attr(self, key: str, value: Any) -> None:
        pass


def space_dimensions(space: SearchSpace, suggest: Suggest) -> dict[str, optuna.distributions.BaseDistribution]:
    """Every parameter the space can ask Optuna for, with its distribution: the names and distributions
    :func:`hybridnas.search.sample_arch` asks ``suggest(trial, name, value)`` for (the search's own function, so the
    two cannot drift apart), per-symbol parameters of every symbol, genome genes of the shortest and longest length
    (the longest has every position; a gene's name carries its choices)."""

    m = space.model
    dims: dict[str, optuna.distributions.BaseDistribution] = {}
    pspace = m.get("pattern", ModelConfig.pattern)
    if hasattr(pspace, "used_symbols"):
        lengths = value_options(pspace.length)
        for length in (min(lengths), max(lengths)):
            rec = _Recorder({"pattern.length": length})
            with contextlib.suppress(ValueError):  # a repair that fails: the genes were asked for already
                sample_pattern(pspace, rec, suggest)
            dims.update(rec.dists)
    rec = _Recorder()
    if not hasattr(pspace, "used_symbols"):
        suggest(rec, "pattern", pspace)
    for key, value in m.items():
        if key == "layers":
            for sym, params in value.items():
                for k, v in params.items():
                    suggest(rec, f"{sym}.{k}", v)
        elif key != "pattern":
            suggest(rec, key, value)
    for key, value in space.train.items():
        if not (key == "lr" and space.search.lr_mode != "sample"):
            suggest(rec, key, value)
    dims.update(rec.dists)
    return dims


def _param_path(space: SearchSpace, name: str) -> PathT:
    """Where parameter ``name`` is written in the space's YAML."""
    pspace = space.model.get("pattern")
    if name.startswith("pattern."):
        kind = "ratio" if hasattr(pspace, "shares") else "genome"
        if name.startswith("pattern.share."):
            return ("model", "pattern", kind, "shares", name[len("pattern.share."):])
        return ("model", "pattern", kind, "length" if name == "pattern.length" else "symbols")
    sym, _, param = name.partition(".")
    if param and sym in space.model.get("layers", {}):
        return ("model", "layers", sym, param)
    return ("model", name) if name in space.model else ("train", name)


def _shown(d: optuna.distributions.BaseDistribution) -> str:
    if isinstance(d, optuna.distributions.CategoricalDistribution):
        return json.dumps(list(d.choices), default=str)
    kind = "int" if isinstance(d, optuna.distributions.IntDistribution) else "float"
    return f"{kind} {d.low:g}..{d.high:g}" + (" log" if d.log else "")


def _fingerprint(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _dims_json(dims: dict[str, optuna.distributions.BaseDistribution]) -> dict[str, str]:
    return {k: optuna.distributions.distribution_to_json(d) for k, d in sorted(dims.items())}


def record_space(study: optuna.Study, space: SearchSpace, suggest: Suggest) -> None:
    """Store what :func:`check_resume` compares with: the scoring settings and the search dimensions, each with a
    fingerprint (study user attributes ``scoring``, ``scoring_fingerprint``, ``dimensions``,
    ``dimensions_fingerprint``)."""
    scoring, dims = scoring_settings(space), _dims_json(space_dimensions(space, suggest))
    study.set_user_attr("scoring", scoring)
    study.set_user_attr("scoring_fingerprint", _fingerprint(scoring))
    study.set_user_attr("dimensions", dims)
    study.set_user_attr("dimensions_fingerprint", _fingerprint(dims))


def check_resume(space: SearchSpace, study: optuna.Study, suggest: Suggest,
                 log: Callable[[str], None] | None = None) -> None:
    """Refuse to resume ``study`` with a space that would mix incomparable results or that Optuna cannot sample:

    - a scoring setting changed (:func:`scoring_settings`: task, train settings, objectives, lr ladder): a
      :class:`ConfigError` naming every changed field;
    - a parameter's choices changed, or its kind (Optuna cannot change a distribution within a study): a
      :class:`ConfigError` naming the parameter, before any trial is asked for, so no FAIL row is written.

    A range that moved, or a parameter added or dropped, is something Optuna samples from here on: ``log`` gets one
    note and the stored dimensions follow. A study from before these fingerprints gets them now."""
    a = study.user_attrs
    src, name = space.source, study.study_name
    how = "start a new study with --study NEW_NAME (or put the old values back)"
    if "scoring" not in a:
        if a.get("space_yaml") not in (None, space.text) and log is not None:
            log(f"note: {src.file} changed since study {name!r} began; earlier trials keep the values they were "
                "sampled with")
        record_space(study, space, suggest)
        return
    old, now = a["scoring"], scoring_settings(space)
    changed = sorted((k for k in now if k in old and old[k] != now[k]),
                     key=lambda k: src.line(tuple(k.split("."))) or 0)
    if changed:
        what = ", ".join(f"{k} {json.dumps(old[k])} -> {json.dumps(now[k])}" for k in changed)
        raise src.error(tuple(changed[0].split(".")),
                        f"changed since study {name!r} began ({what}); its trials were scored under the old settings "
                        f"and would not compare with new ones: {how}")
    dims = space_dimensions(space, suggest)
    before = {k: optuna.distributions.json_to_distribution(v) for k, v in a.get("dimensions", {}).items()}
    for t in study.get_trials(deepcopy=False):
        before.update(t.distributions)
    conflicts = []
    for k, new in dims.items():
        if k in before:
            try:
                optuna.distributions.check_distribution_compatibility(before[k], new)
            except ValueError:
                conflicts.append(k)
    if conflicts:
        conflicts.sort(key=lambda k: src.line(_param_path(space, k)) or 0)
        what = ", ".join(f"{k} {_shown(before[k])} -> {_shown(dims[k])}" for k in conflicts)
        raise src.error(_param_path(space, conflicts[0]),
                        f"changed since study {name!r} began ({what}); Optuna cannot change a parameter's choices "
                        f"(or make a list a range) within a study: {how}")
    stored = a.get("dimensions", {})
    if _dims_json(dims) != stored:
        moved = sorted(set(stored) ^ set(dims) | {k for k in set(stored) & set(dims)
                                                   if stored[k] != _dims_json({k: dims[k]})[k]})
        if log is not None:
            log(f"note: search dimensions changed since study {name!r} began ({', '.join(moved)}); Optuna samples "
                "them as they are now")
        record_space(study, space, suggest)
