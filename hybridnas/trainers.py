"""Task name -> the function that trains and scores one architecture on it.

A task whose trial is not one plain :func:`hybridnas.train.train` run (e.g. a suite of several short runs)
registers a trainer in :data:`TRAINERS` with train's signature:
``(arch, data, *, on_eval, log_dir, hparams, model) -> TrainResult``. Kept on the training side so that the
tasks (data and scoring) import neither the model nor the trainer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hybridnas import suite
from hybridnas import train as train_mod
from hybridnas.tasks import task_config_class

TRAINERS: dict[str, Callable[..., Any]] = {
    "mad_compression": suite.train_task,  # through MAD's AutoEncoder
    "mad": suite.train_suite,  # one short run per (task, setting), scored by the mean
}


def trainer_for(name: str) -> Callable[..., Any]:
    """The function that trains and scores one architecture on task ``name``."""
    task_config_class(name)  # an unknown name raises UnknownTaskError, listing the known tasks
    # looked up when asked, not bound at import, so that a patched hybridnas.train.train is the one used
    return TRAINERS.get(name) or train_mod.train
