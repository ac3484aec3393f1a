"""What every task hands the trainer (:class:`TaskData`) and what every task config offers (:class:`TaskConfig`).

Both are the whole protocol between tasks and the training/search side: the trainer and the search read these
members by plain attribute access, so a task states its choices here rather than by leaving attributes out.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100

#: ``(batch_size, seed) -> iterator of (inputs, labels)`` batches, each ``(batch_size, seq_len)`` int64
TrainStream = Callable[[int, int], Iterator[tuple[torch.Tensor, torch.Tensor]]]


@dataclass
class TaskData:
    """Token tensors for one task, and how the trainer scores them. Labels are ``IGNORE_INDEX`` where nothing
    is scored.

    ``train_*`` and ``valid_*`` are ``(num_examples, seq_len)`` int64 tensors; loss and accuracy are computed
    only where ``labels != IGNORE_INDEX``. ``vocab_size`` is what the model's embedding must cover.

    Scoring choices (subclasses override the defaults):

    - ``accuracy_metric``: which accuracy the trainer reports as ``accuracy``: ``"example"`` (per example,
      then mean: Zoology's definition), ``"micro"`` (per labelled token) or ``"macro"`` (per target class).
      Default: ``"example"``.
    - ``select_by``: which evaluation's weights the trainer keeps: ``"accuracy"`` (highest accuracy, then
      lowest loss) or ``"loss"`` (lowest loss, as for language modelling). Default: ``"accuracy"``.
    - ``bytes_per_token``: mean UTF-8 bytes per validation token of a text task; when set the trainer also
      reports ``bits_per_byte``. Default: ``None`` (not text).
    - ``train_stream``: a :data:`TrainStream` the trainer draws its batches from instead of the in-memory
      ``train_*`` tensors (a corpus larger than memory; ``train_*`` may then be empty). Default: ``None``.
    """

    train_inputs: torch.Tensor
    train_labels: torch.Tensor
    valid_inputs: torch.Tensor
    valid_labels: torch.Tensor
    vocab_size: int
    accuracy_metric: str = "example"
    select_by: str = "accuracy"
    bytes_per_token: float | None = None
    train_stream: TrainStream | None = None


class TaskConfig:
    """Base of every task's config dataclass: the hooks the config loader and the search call, with defaults.

    - ``check()``: raise :class:`TaskConfigError` naming the field of the first violated precondition; return
      ``self``. Default: accept.
    - ``decode_seq_len()``: the sequence length at which a trial's decode-state bytes are measured (a KV cache
      grows with it). Default: ``0``; tasks with a ``seq_len`` return it, a suite its longest run's.
    - ``resource_runs()``: how many training runs one trial makes; the pruner's resource (reported steps)
      spans this many times the train steps. Default: ``1``.
    """

    def check(self):
        return self

    def decode_seq_len(self) -> int:
        return 0

    def resource_runs(self) -> int:
        return 1


class TaskConfigError(ValueError):
    """A task config that violates a precondition of its generator; ``field`` names the offending field."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")
