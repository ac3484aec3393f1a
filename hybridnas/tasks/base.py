"""What every task hands the trainer."""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100


@dataclass
class TaskData:
    """Token tensors for one task. Labels are ``IGNORE_INDEX`` where nothing is scored.

    ``train_*`` and ``valid_*`` are ``(num_examples, seq_len)`` int64 tensors; loss and accuracy are computed
    only where ``labels != IGNORE_INDEX``. ``vocab_size`` is what the model's embedding must cover.
    """

    train_inputs: torch.Tensor
    train_labels: torch.Tensor
    valid_inputs: torch.Tensor
    valid_labels: torch.Tensor
    vocab_size: int


class TaskConfigError(ValueError):
    """A task config that violates a precondition of its generator; ``field`` names the offending field."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")
