"""The six MAD synthetic tasks (Poli et al. 2024, ``mad-lab``), with MAD's semantics, written from its description.

Each task is a config dataclass with ``check()`` and a seeded, vectorized (or per-row, where motifs vary in
length) NumPy generator. ``build(cfg) -> TaskData`` serves MAD's test set as ``valid_*`` (MAD has no separate
validation split). What is trained and what is scored:

============================  ==========================================  ======================================
task                          training labels                             test labels (scored positions)
============================  ==========================================  ======================================
in-context recall (CR)        next token at every position                value after a key seen earlier, and
noisy in-context recall (NR)  next token at every position                the final probe's value
fuzzy in-context recall (FR)  next token at every non-pad position        every value token of a repeated key
                                                                          motif, and of the final probe
selective copying (SC)        the copied tokens, last ``n_copy`` slots     same as training
compression (C)               every input token (an AutoEncoder decodes   same as training
                              them from the pooled last position)
memorization (M)              the value at each insert position           same; the key->value map is fixed
                                                                          (``map_seed``) and shared by both
============================  ==========================================  ======================================

Token layout (as in MAD): with ``multi_query`` the recall tasks have no copy-prefix token; without it, the last
token id is a copy prefix placed before the final probe, and only the probe is scored. Keys come from the first
half of the usable vocabulary, values from the second half; noisy recall's ``noise_vocab_size`` tokens sit
above them. Recall sequences have ``seq_len`` tokens before the next-token shift, so the model sees
``seq_len - 1`` (``seq_len`` without ``multi_query``); selective copying, compression and memorization inputs
are ``seq_len`` tokens.

Two deliberate departures from ``mad-lab``: selective copying places its blanks with the seeded generator
(MAD used the global ``np.random``), and the "at least one real pair" index of noisy recall is drawn among
the context pairs only (MAD's draw could land on the probe and leave no key to probe).
Accuracy for MAD tasks is reported per scored token (micro, the primary ``accuracy``) and per class
(macro, ``accuracy_macro``: the mean over target classes present of per-class recall).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, fields

import numpy as np
import torch

from hybridnas.tasks.base import IGNORE_INDEX, TaskConfig, TaskConfigError, TaskData

TEST_SEED_OFFSET = 1_000_003


@dataclass
class MadTaskData(TaskData):
    """TaskData of one MAD task. ``accuracy_metric`` picks what the trainer reports as ``accuracy``;
    ``autoencoder`` says the task is scored through the compression AutoEncoder, not a language model."""

    accuracy_metric: str = "micro"
    autoencoder: bool = False


# ---------------------------------------------------------------------------------------------- configs


def _int(cfg, name: str, low: int) -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TaskConfigError(name, f"must be an integer, got {value!r}")
    if value < low:
        raise TaskConfigError(name, f"must be at least {low}, got {value}")


def _bool(cfg, name: str) -> None:
    if not isinstance(getattr(cfg, name), bool | np.bool_):
        raise TaskConfigError(name, f"must be true or false, got {getattr(cfg, name)!r}")


@dataclass
class _MadConfig(TaskConfig):
    vocab_size: int = 16
    seq_len: int = 128
    num_train: int = 12800
    num_test: int = 1280
    seed: int = 12345

    def _check_common(self, min_vocab: int, min_seq: int) -> None:
        _int(self, "vocab_size", min_vocab)
        _int(self, "seq_len", min_seq)
        _int(self, "num_train", 1)
        _int(self, "num_test", 1)
        _int(self, "seed", 0)

    def decode_seq_len(self) -> int:
        return int(self.seq_len)


@dataclass
class InContextRecallConfig(_MadConfig):
    """CR (and, with noise, NR): ``seq_len/2`` (key, value) pairs, a fresh key->value map per sequence."""

    multi_query: bool = True
    noise_vocab_size: int = 0
    frac_noise: float = 0.0

    def check(self):
        self._check_common(4, 4)
        _bool(self, "multi_query")
        _int(self, "noise_vocab_size", 0)
        if isinstance(self.frac_noise, bool) or not isinstance(self.frac_noise, int | float | np.number) \
                or not 0 <= self.frac_noise < 1:
            raise TaskConfigError("frac_noise", f"must be a number in [0, 1), got {self.frac_noise!r}")
        if self.seq_len % 2:
            raise TaskConfigError("seq_len", f"must be even (key, value pairs), got {self.seq_len}")
        if self.frac_noise > 0 and self.noise_vocab_size < 1:
            raise TaskConfigError("noise_vocab_size", "must be at least 1 when frac_noise > 0")
        usable = self.vocab_size - self.noise_vocab_size - (0 if self.multi_query else 1)
        if usable < 2:
            raise TaskConfigError("vocab_size", f"leaves {usable} key/value tokens after {self.noise_vocab_size} "
                                                "noise tokens and the copy prefix; need at least 2")
        return self


@dataclass
class NoisyInContextRecallConfig(InContextRecallConfig):
    """NR: as CR, but each context pair is replaced by 2 noise tokens with probability ``frac_noise``."""

    vocab_size: int = 32
    noise_vocab_size: int = 16
    frac_noise: float = 0.2


@dataclass
class FuzzyInContextRecallConfig(_MadConfig):
    """FR: keys and values are motifs of 1..k (1..v) distinct tokens; test keys always have k tokens."""

    k_motif_size: int = 3
    v_motif_size: int = 3
    multi_query: bool = True

    def check(self):
        self._check_common(6, 8)
        _int(self, "k_motif_size", 1)
        _int(self, "v_motif_size", 1)
        _bool(self, "multi_query")
        usable = self.vocab_size - (1 if self.multi_query else 2)
        if usable // 2 < self.k_motif_size:
            raise TaskConfigError("k_motif_size", f"needs {self.k_motif_size} distinct key tokens, vocab_size "
                                                  f"{self.vocab_size} gives {usable // 2}")
        if usable - usable // 2 < self.v_motif_size:
            raise TaskConfigError("v_motif_size", f"needs {self.v_motif_size} distinct value tokens, vocab_size "
                                                  f"{self.vocab_size} gives {usable - usable // 2}")
        need = 2 * (self.k_motif_size + self.v_motif_size) + (0 if self.multi_query else 1)
        if self.seq_len < need:
            raise TaskConfigError("seq_len", f"must hold two key/value motif pairs of maximal size: >= {need}, "
                                             f"got {self.seq_len}")
        return self


@dataclass
class SelectiveCopyingConfig(_MadConfig):
    """SC: ``num_tokens_to_copy`` tokens among blanks, a copy token, then blanks where the copies are scored."""

    seq_len: int = 256
    num_tokens_to_copy: int = 16

    def check(self):
        self._check_common(3, 4)
        _int(self, "num_tokens_to_copy", 1)
        if self.seq_len <= 2 * self.num_tokens_to_copy + 1:
            raise TaskConfigError("num_tokens_to_copy", f"2 * num_tokens_to_copy + 1 must be < seq_len "
                                                        f"({self.seq_len}), got {self.num_tokens_to_copy}")
        return self


@dataclass
class CompressionConfig(_MadConfig):
    """C: ``seq_len - 1`` random tokens and a compression token; an AutoEncoder reconstructs all of them."""

    seq_len: int = 32

    def check(self):
        self._check_common(2, 2)
        return self


@dataclass
class MemorizationConfig(_MadConfig):
    """M: ``key, insert`` pairs; the value of each key comes from one map fixed by ``map_seed``."""

    vocab_size: int = 256
    seq_len: int = 32
    num_train: int = 256
    map_seed: int = 12345

    def check(self):
        self._check_common(5, 2)
        _int(self, "map_seed", 0)
        if self.seq_len % 2:
            raise TaskConfigError("seq_len", f"must be even (key, insert pairs), got {self.seq_len}")
        keys = (self.vocab_size - 1) // 2
        if self.seq_len // 2 > keys:
            raise TaskConfigError("seq_len", f"seq_len/2 distinct keys per sequence, but vocab_size "
                                             f"{self.vocab_size} has only {keys} keys")
        return self


# ---------------------------------------------------------------------------------------------- generators


def _shift(seq: np.ndarray, test_targets: np.ndarray, is_training: bool, valid: np.ndarray | None = None):
    """MAD's shift: inputs ``seq[:, :-1]``; targets ``seq[:, 1:]`` (training) or the masked targets (test)."""
    inputs = seq[:, :-1]
    if is_training:
        labels = seq[:, 1:].copy()
        if valid is not None:
            labels[~valid[:, 1:]] = IGNORE_INDEX
    else:
        labels = test_targets[:, 1:]
    return inputs, labels


def in_context_recall(cfg: InContextRecallConfig, n: int, rng: np.random.Generator, is_training: bool):
    """``(inputs, labels)`` int64 arrays; see the module docstring. Also serves noisy recall."""
    v, mq = cfg.vocab_size, cfg.multi_query
    usable = v - cfg.noise_vocab_size - (0 if mq else 1)
    nk = usable // 2  # keys [0, nk), values [nk, usable), noise [usable, usable + noise)
    pairs = cfg.seq_len // 2 - 1  # context pairs; one more pair is the probe
    keys = rng.integers(0, nk, size=(n, pairs))
    kv_map = rng.integers(nk, usable, size=(n, nk))
    rows = np.arange(n)[:, None]
    values = kv_map[rows, keys]
    noise = np.zeros((n, pairs), dtype=bool)
    if cfg.frac_noise > 0:
        noise = rng.random((n, pairs)) < cfg.frac_noise
        noise[np.arange(n), rng.integers(0, pairs, size=n)] = False  # at least one real pair
        noise_tok = rng.integers(usable, usable + cfg.noise_vocab_size, size=(n, pairs, 2))
    # a key is "seen" at pair j if it appeared as a real pair before j
    first = np.full((n, nk), pairs, dtype=np.int64)
    r, j = np.nonzero(~noise)
    np.minimum.at(first, (r, keys[r, j]), j)
    seen = (first[rows, keys] < np.arange(pairs)[None, :]) & ~noise
    presented = first < pairs
    probe = np.argmax(np.where(presented, rng.random((n, nk)), -1.0), axis=1)
    seq = np.empty((n, 2 * pairs), dtype=np.int64)
    seq[:, 0::2] = keys
    seq[:, 1::2] = values
    if cfg.frac_noise > 0:
        seq[:, 0::2] = np.where(noise, noise_tok[..., 0], seq[:, 0::2])
        seq[:, 1::2] = np.where(noise, noise_tok[..., 1], seq[:, 1::2])
    tgt = np.full_like(seq, IGNORE_INDEX)
    if mq:
        tgt[:, 1::2] = np.where(seen, values, IGNORE_INDEX)
    tail = [probe, kv_map[np.arange(n), probe]]
    tail_tgt = [np.full(n, IGNORE_INDEX), tail[1]]
    if not mq:
        tail = [np.full(n, v - 1)] + tail
        tail_tgt = [np.full(n, IGNORE_INDEX)] + tail_tgt
    seq = np.concatenate([seq, np.stack(tail, 1)], axis=1)
    tgt = np.concatenate([tgt, np.stack(tail_tgt, 1)], axis=1)
    return _shift(seq, tgt, is_training)


def _motifs(vocab: np.ndarray, size: int) -> list[tuple[int, ...]]:
    return list(itertools.permutations(vocab.tolist(), size))


def fuzzy_in_context_recall(cfg: FuzzyInContextRecallConfig, n: int, rng: np.random.Generator, is_training: bool):
    """Per sequence: a pool of ``nk`` distinct key motifs (sizes 1..k in training, k at test), each mapped to a
    value motif of size 1..v; (key, value) motif pairs drawn from the pool until the sequence is full, a final
    probe of a presented key, left padding. Labels: next token (training; pads ignored) or value tokens of
    repeated keys and the probe (test)."""
    v, mq, L = cfg.vocab_size, cfg.multi_query, cfg.seq_len
    pad, prefix = v - 1, v - 2
    usable = v - (1 if mq else 2)
    nk = usable // 2
    key_vocab, val_vocab = np.arange(nk), np.arange(nk, usable)
    key_sizes = range(1, cfg.k_motif_size + 1) if is_training else [cfg.k_motif_size]
    key_motifs = [m for s in key_sizes for m in _motifs(key_vocab, s)]
    val_motifs = [m for s in range(1, cfg.v_motif_size + 1) for m in _motifs(val_vocab, s)]
    budget = L - (0 if mq else 1)  # room for the pairs and the final probe (prefix excluded)
    seqs = np.full((n, L), pad, dtype=np.int64)
    tgts = np.full((n, L), IGNORE_INDEX, dtype=np.int64)
    for i in range(n):
        pool_idx = rng.choice(len(key_motifs), size=min(nk, len(key_motifs)), replace=False)
        pool = [key_motifs[k] for k in pool_idx]
        vals = [val_motifs[k] for k in rng.integers(0, len(val_motifs), size=len(pool))]
        seq: list[int] = []
        tgt: list[int] = []
        shown: set[int] = set()
        while True:
            p = int(rng.integers(0, len(pool)))
            k, val = pool[p], vals[p]
            # keep room for a maximal probe; check() guarantees the first pair fits
            if len(seq) + len(k) + len(val) + cfg.k_motif_size + cfg.v_motif_size > budget:
                break
            seq += [*k, *val]
            tgt += [IGNORE_INDEX] * len(k) + (list(val) if (p in shown and mq) else [IGNORE_INDEX] * len(val))
            shown.add(p)
        p = int(rng.choice(sorted(shown)))
        head = [] if mq else [prefix]
        seq += head + [*pool[p], *vals[p]]
        tgt += [IGNORE_INDEX] * (len(head) + len(pool[p])) + list(vals[p])
        seqs[i, L - len(seq):] = seq
        tgts[i, L - len(tgt):] = tgt
    return _shift(seqs, tgts, is_training, valid=seqs != pad)


def selective_copying(cfg: SelectiveCopyingConfig, n: int, rng: np.random.Generator, is_training: bool):
    """Tokens to copy (with replacement from ``[0, V-2)``) scattered among blanks (``V-2``) as MAD's
    insert-at-random-index does (the last token to copy stays last), then the copy token (``V-1``) and
    ``n_copy`` blanks at which the tokens are the targets, in order."""
    v, L, c = cfg.vocab_size, cfg.seq_len, cfg.num_tokens_to_copy
    blank, copy = v - 2, v - 1
    n_blank = L - 2 * c - 1
    to_copy = rng.integers(0, v - 2, size=(n, c))
    head = c - 1 + n_blank  # slots before the last token to copy
    # positions of the first c-1 tokens: a uniformly random subset of the head slots, in order
    pos = np.sort(np.argsort(rng.random((n, head)), axis=1)[:, :c - 1], axis=1)
    seq = np.full((n, L), blank, dtype=np.int64)
    np.put_along_axis(seq, pos, to_copy[:, :c - 1], axis=1)
    seq[:, head] = to_copy[:, -1]
    seq[:, head + 1] = copy
    labels = np.full((n, L), IGNORE_INDEX, dtype=np.int64)
    labels[:, L - c:] = to_copy
    return seq, labels


def compression(cfg: CompressionConfig, n: int, rng: np.random.Generator, is_training: bool):
    """``seq_len - 1`` random tokens from ``[0, V-1)`` and the compression token ``V-1``; targets = inputs."""
    seq = np.empty((n, cfg.seq_len), dtype=np.int64)
    seq[:, :-1] = rng.integers(0, cfg.vocab_size - 1, size=(n, cfg.seq_len - 1))
    seq[:, -1] = cfg.vocab_size - 1
    return seq, seq.copy()


def memorization_map(cfg: MemorizationConfig) -> np.ndarray:
    """The fixed key->value map: ``map[k]`` for keys ``[0, (V-1)//2)``, values from ``[(V-1)//2, V-1)``."""
    nk = (cfg.vocab_size - 1) // 2
    return np.random.default_rng(cfg.map_seed).integers(nk, cfg.vocab_size - 1, size=nk)


def memorization(cfg: MemorizationConfig, n: int, rng: np.random.Generator, is_training: bool):
    """``seq_len/2`` distinct keys per sequence, each followed by the insert token (``V-1``) whose target is
    the key's value under the fixed map."""
    kv_map = memorization_map(cfg)
    nk, half = len(kv_map), cfg.seq_len // 2
    keys = np.argsort(rng.random((n, nk)), axis=1)[:, :half]
    seq = np.full((n, cfg.seq_len), cfg.vocab_size - 1, dtype=np.int64)
    seq[:, 0::2] = keys
    labels = np.full_like(seq, IGNORE_INDEX)
    labels[:, 1::2] = kv_map[keys]
    return seq, labels


GENERATORS = {
    InContextRecallConfig: in_context_recall,
    NoisyInContextRecallConfig: in_context_recall,
    FuzzyInContextRecallConfig: fuzzy_in_context_recall,
    SelectiveCopyingConfig: selective_copying,
    CompressionConfig: compression,
    MemorizationConfig: memorization,
}

#: MAD task name -> config class
MAD_TASKS: dict[str, type] = {
    "in_context_recall": InContextRecallConfig,
    "fuzzy_in_context_recall": FuzzyInContextRecallConfig,
    "noisy_in_context_recall": NoisyInContextRecallConfig,
    "selective_copying": SelectiveCopyingConfig,
    "compression": CompressionConfig,
    "memorization": MemorizationConfig,
}

#: MAD's difficulty grid (``make_benchmark_mad_configs``): each axis varied alone from the baseline
MAD_GRID: dict[str, dict[str, list]] = {
    "in_context_recall": {"vocab_size": [32, 64, 128], "seq_len": [256, 512, 1024],
                          "num_train": [6400, 3200, 1600, 800]},
    "fuzzy_in_context_recall": {"vocab_size": [32, 64, 128], "seq_len": [256, 512, 1024],
                                "num_train": [6400, 3200, 1600, 800]},
    "noisy_in_context_recall": {"vocab_size": [48, 80, 144], "seq_len": [256, 512, 1024],
                                "num_train": [6400, 3200, 1600, 800], "frac_noise": [0.4, 0.6, 0.8]},
    "selective_copying": {"vocab_size": [32, 64, 128], "seq_len": [512, 1024],
                          "num_train": [6400, 3200, 1600, 800], "num_tokens_to_copy": [32, 64, 96]},
    "compression": {"vocab_size": [32, 64, 128], "seq_len": [64, 128, 256], "num_train": [6400, 3200, 1600, 800]},
    "memorization": {"vocab_size": [512, 1024, 2048, 4096, 8192]},
}


def generate(cfg, num_examples: int, seed: int, is_training: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, labels)`` int64 tensors for any MAD task config."""
    cfg.check()
    gen = GENERATORS[type(cfg)]
    inputs, labels = gen(cfg, int(num_examples), np.random.default_rng(seed), is_training)
    return torch.from_numpy(np.ascontiguousarray(inputs)), torch.from_numpy(np.ascontiguousarray(labels))


def build(cfg) -> MadTaskData:
    """Train split (training labels) from ``cfg.seed``, test split (scored labels) from ``seed + offset``."""
    cfg.check()
    tx, ty = generate(cfg, cfg.num_train, cfg.seed, True)
    vx, vy = generate(cfg, cfg.num_test, cfg.seed + TEST_SEED_OFFSET, False)
    return MadTaskData(tx, ty, vx, vy, cfg.vocab_size, accuracy_metric="micro",
                       autoencoder=isinstance(cfg, CompressionConfig))


def field_names(cls: type) -> list[str]:
    return [f.name for f in fields(cls)]
