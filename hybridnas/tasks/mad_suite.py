"""The ``mad`` task's data: which MAD runs make up one trial (:class:`MadSuiteConfig`) and their data.

``mad`` scores one architecture on chosen MAD tasks and difficulty settings: one trial trains a fresh model per
(task, setting) in turn. This module only says which runs those are (MAD's difficulty grid, extra settings,
per-task changes) and builds their data; :mod:`hybridnas.suite` trains and scores them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from hybridnas.tasks.base import TaskConfig, TaskConfigError, TaskData
from hybridnas.tasks.mad import MAD_GRID, MAD_TASKS, MadTaskData, build

ALL_TASKS = list(MAD_TASKS)

#: The training settings a run may change through ``train`` (the fields of ``hybridnas.config.TrainConfig``).
#: Spelled out here because tasks sit below the config schema and must not import it; a test keeps the two
#: equal.
TRAIN_FIELDS = frozenset({
    "steps", "batch_size", "lr", "weight_decay", "beta1", "beta2", "warmup_steps", "min_lr_ratio", "grad_clip",
    "eval_every", "eval_examples", "target_accuracy", "seed", "device", "bf16", "precision", "max_time",
    "threads", "compile",
})


@dataclass
class MadSuiteConfig(TaskConfig):
    """Which MAD runs make up one trial.

    - ``tasks``: MAD task names (default all six);
    - ``settings``: ``baseline`` (each task's baseline) or ``mad`` (baseline plus MAD's difficulty grid,
      each axis varied alone: 66 runs for all six tasks);
    - ``extra``: more settings, ``{task: {field: [values]}}``, each value varied alone from the baseline;
    - ``common``: fields set on every run whose task has them (e.g. ``num_train``, ``num_test``, ``seed``);
    - ``params``: ``{task: {field: value}}``, changes to a task's baseline (after ``common``);
    - ``train``: ``{task: {train field: value}}``, per-task changes to the trial's training settings;
    - ``vocab_size``: what the architecture's embedding declares; null = the largest vocabulary of the runs.
    """

    tasks: list[str] = field(default_factory=lambda: list(ALL_TASKS))
    settings: str = "baseline"
    extra: dict[str, Any] = field(default_factory=dict)
    common: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    vocab_size: int | None = None

    def __post_init__(self) -> None:
        if self.vocab_size is None:
            try:  # filled in here so the validated config (and the model's default vocab) carries it
                self.vocab_size = max(cfg.vocab_size for _, _, cfg, _ in self.runs())
            except (TaskConfigError, TypeError, ValueError, KeyError, AttributeError):
                pass  # check() names the problem

    def _task_fields(self, section: str, task: Any) -> set[str]:
        if task not in MAD_TASKS:
            raise TaskConfigError(section, f"unknown MAD task {task!r}; known: {', '.join(ALL_TASKS)}")
        return {f.name for f in dataclasses.fields(MAD_TASKS[task])}

    def resource_runs(self) -> int:
        """Runs per trial: the pruner's resource (reported steps) spans this many times the train steps."""
        return len(self.runs())

    def decode_seq_len(self) -> int:
        """The longest sequence of any run: where a trial's decode-state bytes are measured."""
        return max(cfg.decode_seq_len() for _, _, cfg, _ in self.runs())

    def runs(self) -> list[tuple[str, str, Any, dict[str, Any]]]:
        """``(task, setting label, task config, train overrides)`` for every run, in order."""
        out = []
        for task in self.tasks:
            names = self._task_fields("tasks", task)
            base = {k: v for k, v in self.common.items() if k in names}
            tparams = self.params.get(task) or {}
            unknown = sorted(set(tparams) - names)
            if unknown:
                raise TaskConfigError("params", f"{task} has no field(s) {unknown}; known: {sorted(names)}")
            base.update(tparams)
            axes: dict[str, list] = {}
            if self.settings == "mad":
                axes.update({k: list(v) for k, v in MAD_GRID[task].items()})
            for k, values in (self.extra.get(task) or {}).items():
                if k not in names:
                    raise TaskConfigError("extra", f"{task} has no field {k!r}; known: {sorted(names)}")
                if not isinstance(values, list):
                    raise TaskConfigError("extra", f"{task}.{k}: expected a list of values, got {values!r}")
                axes[k] = axes.get(k, []) + [v for v in values if v not in axes.get(k, [])]
            train = dict(self.train.get(task) or {})
            out.append((task, "baseline", MAD_TASKS[task](**base), train))
            for k, values in axes.items():
                for value in values:
                    if base.get(k, getattr(MAD_TASKS[task], k)) == value:
                        continue  # the baseline itself
                    out.append((task, f"{k}={value}", MAD_TASKS[task](**{**base, k: value}), train))
        return out

    def check(self) -> MadSuiteConfig:
        if not isinstance(self.tasks, list) or not self.tasks:
            raise TaskConfigError("tasks", f"must be a non-empty list of MAD tasks ({', '.join(ALL_TASKS)})")
        if len(set(self.tasks)) != len(self.tasks):
            raise TaskConfigError("tasks", f"duplicate tasks in {self.tasks}")
        for task in self.tasks:
            self._task_fields("tasks", task)
        if self.settings not in ("baseline", "mad"):
            raise TaskConfigError("settings", f"must be 'baseline' or 'mad', got {self.settings!r}")
        for section in ("extra", "params", "train"):
            for task, sub in getattr(self, section).items():
                self._task_fields(section, task)
                if not isinstance(sub, dict):
                    raise TaskConfigError(section, f"{task}: expected a mapping, got {sub!r}")
        every = set().union(*(self._task_fields("tasks", t) for t in self.tasks))
        stray = sorted(set(self.common) - every)
        if stray:
            raise TaskConfigError("common", f"no chosen task has field(s) {stray}")
        for task, sub in self.train.items():
            bad = sorted(set(sub) - TRAIN_FIELDS)
            if bad:
                raise TaskConfigError("train", f"{task}: unknown training field(s) {bad}")
        runs = self.runs()
        for task, label, cfg, _ in runs:
            try:
                cfg.check()
            except TaskConfigError as e:
                section = "extra" if label != "baseline" else ("params" if self.params.get(task) else "common")
                raise TaskConfigError(section, f"{task} ({label}): {e}") from None
        need = max(cfg.vocab_size for _, _, cfg, _ in runs)
        if self.vocab_size is None:
            self.vocab_size = need
        if isinstance(self.vocab_size, bool) or not isinstance(self.vocab_size, int) or self.vocab_size < need:
            raise TaskConfigError("vocab_size", f"must be an integer >= {need} (the largest task vocabulary), "
                                                f"got {self.vocab_size!r}")
        return self


@dataclass
class MadRun:
    """One run of a suite: its task, setting label, task config, data and changes to the training settings."""

    task: str
    label: str
    config: Any
    data: MadTaskData
    train: dict[str, Any]


@dataclass
class MadSuiteData(TaskData):
    """The data of every run of a suite; the top-level tensors are empty (a plain trainer cannot use them)."""

    runs: list[MadRun] = field(default_factory=list)
    accuracy_metric: str = "micro"


def build_suite(cfg: MadSuiteConfig) -> MadSuiteData:
    """The data of every run of ``cfg`` (checked first); :func:`hybridnas.suite.train_suite` trains on it."""
    cfg.check()
    runs = [MadRun(task, label, tcfg, build(tcfg), train) for task, label, tcfg, train in cfg.runs()]
    empty = torch.zeros(0, 1, dtype=torch.long)
    return MadSuiteData(empty, empty, empty, empty, int(cfg.vocab_size), runs=runs)
