"""Multi-query associative recall (MQAR) with Zoology semantics (``zoology/data/multiquery_ar.py``).

One example, before the next-token shift, is a sequence of ``seq_len + 1`` tokens:

    k1 v1 k2 v2 ... k_kv v_kv | . . k2 . . . . k1 . . ...
    \\______ context _______/   \\___ queries at context + 2*gap ___/

- keys are drawn from ``[1, V//2)`` and values from ``[V//2, V)``, without replacement within a sequence;
- each key is presented once more as a query at ``context + 2*gap``, ``context = 2*kv``; the gaps are drawn
  without replacement from ``{0, ..., space-1}``, ``space = (seq_len - context) // 2``, with probability
  ``p ∝ a * i**(a-1)`` for the i-th slot (``i = gap + 1``), so small ``a`` favours short distances;
- ``inputs = seq[:-1]`` and ``labels = seq[1:]`` masked to ``IGNORE_INDEX`` except right after each query key,
  i.e. the label at a query key's position is the value paired with that key;
- ``random_non_queries`` replaces every remaining 0 of the inputs with a uniform token from ``[0, V)``;
- ``train_kv_pairs`` (Zoology's mixture of training configurations): the train split is an equal mix of
  sequences with each listed number of pairs, shuffled; the test split keeps ``num_kv_pairs``. Easy sequences
  give the recall mechanism a gradient long before the hard ones do, so accuracy on the test's ``num_kv_pairs``
  rises with the model's capacity instead of waiting on a plateau.

Generation is vectorized over examples (NumPy), seeded with ``numpy.random.default_rng(seed)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from hybridnas.tasks.base import IGNORE_INDEX, TaskConfig, TaskConfigError, TaskData

# Offset between the train and the test seed, so that the two splits never share a random stream.
TEST_SEED_OFFSET = 1_000_003


@dataclass
class MQARConfig(TaskConfig):
    """MQAR data: ``num_train``/``num_test`` examples of ``seq_len`` tokens with ``num_kv_pairs`` pairs each."""

    vocab_size: int = 8192
    seq_len: int = 64
    num_kv_pairs: int = 8
    num_train: int = 10000
    num_test: int = 1000
    power_a: float = 0.01
    random_non_queries: bool = True
    seed: int = 0
    train_kv_pairs: list[int] | None = None

    def check(self) -> MQARConfig:
        """Raise :class:`TaskConfigError` naming the field of the first violated precondition."""
        for name in ("vocab_size", "seq_len", "num_kv_pairs", "num_train", "num_test", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer):
                raise TaskConfigError(name, f"must be an integer, got {value!r}")
        for name in ("vocab_size", "seq_len", "num_kv_pairs", "num_train", "num_test"):
            if getattr(self, name) < 1:
                raise TaskConfigError(name, f"must be at least 1, got {getattr(self, name)}")
        if self.seed < 0:
            raise TaskConfigError("seed", f"must be non-negative, got {self.seed}")
        if not isinstance(self.random_non_queries, bool | np.bool_):
            raise TaskConfigError("random_non_queries", f"must be true or false, got {self.random_non_queries!r}")
        if isinstance(self.power_a, bool) or not isinstance(self.power_a, int | float | np.number):
            raise TaskConfigError("power_a", f"must be a number, got {self.power_a!r}")
        if not (math.isfinite(self.power_a) and self.power_a > 0):
            raise TaskConfigError("power_a", f"must be a finite number > 0, got {self.power_a}")
        if self.seq_len % 2 != 0:
            raise TaskConfigError("seq_len", f"must be even, got {self.seq_len}")
        if self.vocab_size <= self.seq_len:
            raise TaskConfigError("vocab_size", f"must be greater than seq_len ({self.seq_len}), "
                                                f"got {self.vocab_size}")
        if 4 * self.num_kv_pairs > self.seq_len:
            raise TaskConfigError("num_kv_pairs", f"4 * num_kv_pairs must be <= seq_len ({self.seq_len}): "
                                                  f"at most {self.seq_len // 4}, got {self.num_kv_pairs}")
        num_keys = self.vocab_size // 2 - 1
        if self.num_kv_pairs > num_keys:
            raise TaskConfigError("num_kv_pairs", f"only {num_keys} distinct keys exist in [1, vocab_size/2) "
                                                  f"for vocab_size {self.vocab_size}, got {self.num_kv_pairs}")
        if self.train_kv_pairs is not None:
            mix = self.train_kv_pairs
            if not isinstance(mix, list | tuple) or not mix:
                raise TaskConfigError("train_kv_pairs", f"must be a non-empty list of integers, got {mix!r}")
            for kv in mix:
                if isinstance(kv, bool) or not isinstance(kv, int | np.integer) or kv < 1:
                    raise TaskConfigError("train_kv_pairs", f"entries must be integers >= 1, got {kv!r}")
                if 4 * kv > self.seq_len or kv > num_keys:
                    raise TaskConfigError("train_kv_pairs", f"{kv} pairs do not fit: at most "
                                                            f"{min(self.seq_len // 4, num_keys)} for seq_len "
                                                            f"{self.seq_len} and vocab_size {self.vocab_size}")
            if len(mix) > self.num_train:
                raise TaskConfigError("train_kv_pairs", f"{len(mix)} settings need num_train >= {len(mix)}, "
                                                        f"got {self.num_train}")
        return self

    def decode_seq_len(self) -> int:
        return int(self.seq_len)


def check_config(cfg: MQARConfig) -> MQARConfig:
    """Module-level form of :meth:`MQARConfig.check`."""
    return cfg.check()


def _distinct_per_row(rng: np.random.Generator, rows: int, low: int, high: int, k: int) -> np.ndarray:
    """``(rows, k)`` int64: in each row ``k`` distinct integers from ``[low, high)``, in uniformly random order."""
    population = high - low
    if population <= 4 * k:
        # Dense case: a random permutation of the whole (small) population, truncated.
        out = np.argsort(rng.random((rows, population)), axis=1)[:, :k]
    else:
        # Floyd's algorithm, one column at a time for all rows of a chunk, with a per-row "taken" bitmap:
        # O(rows * k) draws; the chunk keeps the bitmap under ~32 MB.
        out = np.empty((rows, k), dtype=np.int64)
        chunk = max(1, (32 << 20) // population)
        for start in range(0, rows, chunk):
            m = min(chunk, rows - start)
            taken = np.zeros((m, population), dtype=bool)
            idx = np.arange(m)
            for i, j in enumerate(range(population - k, population)):
                t = rng.integers(0, j + 1, size=m)
                t = np.where(taken[idx, t], j, t)
                taken[idx, t] = True
                out[start:start + m, i] = t
        # Floyd gives a uniform subset but not a uniform order; shuffle each row.
        out = np.take_along_axis(out, np.argsort(rng.random((rows, k)), axis=1), axis=1)
    return out.astype(np.int64) + low


def _power_law_gaps(rng: np.random.Generator, rows: int, space: int, k: int, power_a: float) -> np.ndarray:
    """``(rows, k)`` gaps in ``[0, space)`` drawn without replacement, ``p(gap) ∝ a * (gap+1)**(a-1)``.

    Sequential weighted sampling without replacement (``np.random.choice(..., replace=False, p=p)``) is
    equivalent to sorting ``w_i / E_i`` (``E_i ~ Exp(1)``) in descending order (Efraimidis–Spirakis), which
    vectorizes over rows; the k largest, in order, are the k successive draws.
    """
    log_w = (power_a - 1.0) * np.log(np.arange(1, space + 1, dtype=np.float64))
    with np.errstate(divide="ignore"):
        scores = log_w[None, :] - np.log(rng.standard_exponential((rows, space)))
    return np.argsort(-scores, axis=1, kind="stable")[:, :k].astype(np.int64)


def generate_mqar(cfg: MQARConfig, num_examples: int, seed: int,
                  num_kv_pairs: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, labels)``: int64 tensors of shape ``(num_examples, seq_len)``; see the module docstring.

    ``num_kv_pairs`` overrides ``cfg.num_kv_pairs`` (the train mixture uses it)."""
    cfg.check()
    if isinstance(num_examples, bool) or not isinstance(num_examples, int | np.integer) or num_examples < 0:
        raise TaskConfigError("num_examples", f"must be a non-negative integer, got {num_examples!r}")
    rng = np.random.default_rng(seed)
    kv = cfg.num_kv_pairs if num_kv_pairs is None else int(num_kv_pairs)
    n, v, seq_len = int(num_examples), cfg.vocab_size, cfg.seq_len
    context = 2 * kv
    half = v // 2

    keys = _distinct_per_row(rng, n, 1, half, kv)
    values = _distinct_per_row(rng, n, half, v, kv)

    space = (seq_len - context) // 2
    gaps = _power_law_gaps(rng, n, space, kv, float(cfg.power_a))
    query_pos = context + 2 * gaps  # position of each query key in the unshifted sequence

    # Zoology builds seq_len + 1 tokens and shifts: inputs = seq[:-1], labels = target[1:] with the value at
    # query_pos + 1 of the target. Writing the shifted arrays directly is the same thing (the last token of
    # seq is never a query: query_pos <= seq_len - 2) without two large copies.
    inputs = np.zeros((n, seq_len), dtype=np.int64)
    inputs[:, 0:context:2] = keys
    inputs[:, 1:context:2] = values
    np.put_along_axis(inputs, query_pos, keys, axis=1)

    labels = np.full((n, seq_len), IGNORE_INDEX, dtype=np.int64)
    np.put_along_axis(labels, query_pos, values, axis=1)

    if cfg.random_non_queries:
        empty = inputs == 0
        inputs[empty] = rng.integers(0, v, size=int(empty.sum()), dtype=np.int64)
    return torch.from_numpy(inputs), torch.from_numpy(labels)


def generate_mixture(cfg: MQARConfig, num_examples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The train split of ``cfg.train_kv_pairs``: ``num_examples`` split as evenly as possible over the listed
    numbers of pairs (the first ones get the remainder), each part from its own stream of ``seed``, rows shuffled."""
    mix = [int(k) for k in cfg.train_kv_pairs]
    sizes = [num_examples // len(mix) + (i < num_examples % len(mix)) for i in range(len(mix))]
    parts = [generate_mqar(cfg, size, seed + 7919 * i, num_kv_pairs=kv)
             for i, (kv, size) in enumerate(zip(mix, sizes, strict=True))]
    inputs = torch.cat([p[0] for p in parts])
    labels = torch.cat([p[1] for p in parts])
    order = torch.from_numpy(np.random.default_rng(seed).permutation(num_examples))
    return inputs[order], labels[order]


def build(cfg: MQARConfig) -> TaskData:
    """Train split from ``cfg.seed``, test split (served as ``valid_*``) from ``cfg.seed + TEST_SEED_OFFSET``."""
    cfg.check()
    if cfg.train_kv_pairs is None:
        train_inputs, train_labels = generate_mqar(cfg, cfg.num_train, cfg.seed)
    else:
        train_inputs, train_labels = generate_mixture(cfg, cfg.num_train, cfg.seed)
    valid_inputs, valid_labels = generate_mqar(cfg, cfg.num_test, cfg.seed + TEST_SEED_OFFSET)
    return TaskData(train_inputs=train_inputs, train_labels=train_labels, valid_inputs=valid_inputs,
                    valid_labels=valid_labels, vocab_size=cfg.vocab_size)
