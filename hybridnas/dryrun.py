"""``hybridnas search SPACE --dry-run``: the candidates a space holds, with their sizes, before anything trains.

A finite space (explicit patterns, lists, integer ranges: what ``hybridnas sweep`` can enumerate) is listed whole,
one row per distinct architecture; any other space (a genome or ratio pattern space, a continuous range, or more
than :data:`MAX_LISTED` architectures) is sampled ``n`` times through Optuna's random sampler in memory. Each row
has the parameter count (from the layers' formulas) and the decoding-state bytes at the search's
``state_seq_len`` (default: the task's sequence length), measured on a model built on the ``meta`` device (no
weights allocated). Nothing is trained, and no study, storage or file is created.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import optuna
import torch

from hybridnas.model import HybridLM
from hybridnas.schema import ArchConfig, ModelConfig, Range, SearchSpace, value_options

#: a finite space with more architectures than this is sampled instead of listed
MAX_LISTED = 10000


@dataclass
class Row:
    settings: dict[str, Any]
    pattern: str = "?"
    params: int | None = None
    state_bytes: int | None = None
    notes: list[str] = field(default_factory=list)


def _count(space: SearchSpace) -> int | None:
    """How many architectures a finite space enumerates (before de-duplication), None when it is not finite."""
    m = space.model
    pspace = m.get("pattern", ModelConfig.pattern)
    if hasattr(pspace, "used_symbols"):
        return None

    def n(v: Any) -> int | None:
        if isinstance(v, Range):
            if not (isinstance(v.low, int) and isinstance(v.high, int)):
                return None
            return (v.high - v.low) // (1 if v.log else (v.step or 1)) + 1
        return len(v) if isinstance(v, list) else 1

    from hybridnas import patterns

    pats = pspace if isinstance(pspace, list) else [pspace]
    base = 1
    for k, v in m.items():
        if k not in ("pattern", "layers"):
            c = n(v)
            if c is None:
                return None
            base *= c
    total = 0
    for p in pats:
        c = base
        used = set(patterns.used_symbols(p))
        for sym, params in m.get("layers", {}).items():
            if sym in used:
                for v in params.values():
                    k = n(v)
                    if k is None:
                        return None
                    c *= k
        total += c
    return total


def _measure(arch: ArchConfig, space: SearchSpace, row: Row) -> Row:
    from hybridnas.search import task_seq_len

    row.pattern = arch.model.pattern
    try:
        row.params = HybridLM.param_count(arch.model)
        seq = space.search.state_seq_len or task_seq_len(arch)
        with torch.device("meta"):
            model = HybridLM(arch.model)
        row.state_bytes = model.state_size(1, seq)
    except (ValueError, TypeError, RuntimeError, NotImplementedError) as e:
        row.notes.append(f"cannot build: {e}")
        return row
    limits = space.search.constraints
    for key in ("params", "state_bytes"):
        value = getattr(row, key)
        if key in limits and value is not None and value > limits[key]:
            row.notes.append(f"over the {key} budget ({value:,} > {limits[key]:,.0f}): not trained")
    return row


def _searched_train(space: SearchSpace) -> dict[str, Any]:
    return {k: v for k, v in space.train.items() if isinstance(v, (list, Range))}


def candidates(space: SearchSpace, n: int = 20) -> tuple[list[Row], bool]:
    """``(rows, finite)``: every architecture of a finite space (``finite`` True), else ``n`` sampled ones."""
    from hybridnas.sweep import SweepError, enumerate_space

    count = _count(space)
    if count is not None and count <= MAX_LISTED:
        # the train settings a search samples are not architectures: fix them to their first value to list
        fixed = {k: (value_options(v)[0] if k != "lr" else v) for k, v in space.train.items()}
        try:
            cands = enumerate_space(replace(space, train=fixed))
        except SweepError:
            cands = None
        if cands is not None:
            return [_measure(c.arch, space, Row(dict(c.params))) for c in cands], True
    from hybridnas.search import InvalidTrialConfig, sample_arch

    sampler = optuna.samplers.RandomSampler(seed=space.search.seed)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=sampler)  # in memory: nothing is written
    rows = []
    for _ in range(n):
        trial = study.ask()
        try:
            arch = sample_arch(space, trial)
        except InvalidTrialConfig as e:
            rows.append(Row(dict(trial.params), notes=[f"invalid: {e}"]))
            continue
        row = Row(dict(trial.params))
        if "pattern_repaired" in trial.user_attrs:
            row.notes.append(f"repaired from {trial.user_attrs['pattern_repaired']}")
        rows.append(_measure(arch, space, row))
        study.tell(trial, 0.0)
    return rows, False


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    return str(v)


def render(space: SearchSpace, rows: list[Row], finite: bool) -> str:
    """The table ``--dry-run`` prints."""
    kind = "every candidate of the finite space" if finite else f"{len(rows)} sampled candidates (the space is " \
        "not finite or too large to list)"
    lines = [f"dry run of {space.name!r}: {kind}; nothing trained, nothing written"]
    header = ["#", "pattern", "params", "state_bytes", "settings", "note"]
    table = [[str(i), r.pattern, f"{r.params:,}" if r.params is not None else "-",
              f"{r.state_bytes:,}" if r.state_bytes is not None else "-",
              ", ".join(f"{k}={_fmt(v)}" for k, v in r.settings.items()) or "-", "; ".join(r.notes)]
             for i, r in enumerate(rows)]
    widths = [max(len(t[i]) for t in [header, *table]) for i in range(len(header))]
    for t in [header, *table]:
        lines.append("  ".join(c.ljust(w) for c, w in zip(t, widths)).rstrip())
    searched = [f"train.{k}" for k in _searched_train(space) if k != "lr" or space.search.lr_mode == "sample"]
    if finite and searched:
        lines.append("also sampled in each trial: " + ", ".join(searched))
    if space.search.lr_mode != "sample":
        lines.append(f"learning rate: {space.search.lr_mode} over {space.search.lr_ladder} rates inside each trial")
    return "\n".join(lines)
