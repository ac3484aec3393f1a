"""Task registry: a task name -> (its config dataclass, a builder ``config -> TaskData``).

Tasks make data and say how it is scored; they import neither the model nor the trainer. Which function trains
an architecture on a task is the training side's table: :func:`hybridnas.trainers.trainer_for`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from hybridnas.tasks import mad, mad_suite
from hybridnas.tasks.base import IGNORE_INDEX, TaskConfig, TaskConfigError, TaskData
from hybridnas.tasks.lm import LMConfig
from hybridnas.tasks.lm import build as build_lm
from hybridnas.tasks.mqar import MQARConfig
from hybridnas.tasks.mqar import build as build_mqar

TASKS: dict[str, tuple[type[TaskConfig], Callable[[Any], TaskData]]] = {
    "mqar": (MQARConfig, build_mqar),
    # the six MAD tasks, one run each, and "mad": a mean over chosen tasks and difficulty settings
    **{f"mad_{name}": (cls, mad.build) for name, cls in mad.MAD_TASKS.items()},
    "mad": (mad_suite.MadSuiteConfig, mad_suite.build_suite),
    "lm": (LMConfig, build_lm),
}


class UnknownTaskError(KeyError):
    """An unknown task name; the message lists the known ones."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


def _lookup(name: str) -> tuple[type[TaskConfig], Callable[[Any], TaskData]]:
    try:
        return TASKS[name]
    except (KeyError, TypeError):
        raise UnknownTaskError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}") from None


def task_config_class(name: str) -> type[TaskConfig]:
    """The config dataclass of task ``name``."""
    return _lookup(name)[0]


def build_task(name: str, config: Any = None) -> TaskData:
    """Build task ``name`` from ``config``: an instance of its config class, a mapping of fields, or None."""
    cls, builder = _lookup(name)
    if config is None:
        config = cls()
    elif isinstance(config, Mapping):
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(config) - fields)
        if unknown:
            raise TaskConfigError(unknown[0], f"task {name!r} has no field(s) {unknown}; known: {sorted(fields)}")
        config = cls(**config)
    elif not isinstance(config, cls):
        raise TypeError(f"task {name!r} expects a {cls.__name__} or a mapping, got {type(config).__name__}")
    return builder(config)


__all__ = ["IGNORE_INDEX", "TASKS", "LMConfig", "MQARConfig", "TaskConfig", "TaskConfigError", "TaskData",
           "UnknownTaskError", "build_task", "task_config_class"]
