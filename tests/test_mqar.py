"""MQAR generator: Zoology semantics, determinism, every config field matters, preconditions."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from hybridnas.tasks import TASKS, build_task, task_config_class
from hybridnas.tasks.base import IGNORE_INDEX, TaskConfigError, TaskData
from hybridnas.tasks.mqar import MQARConfig, build, check_config, generate_mqar

SMALL = dict(vocab_size=128, seq_len=32, num_kv_pairs=4, num_train=200, num_test=50)


def small(**overrides) -> MQARConfig:
    return MQARConfig(**{**SMALL, **overrides})


def query_gaps(inputs: torch.Tensor, labels: torch.Tensor, kv: int) -> np.ndarray:
    """Gap index of every labelled position: position = 2*kv + 2*gap."""
    rows, cols = torch.nonzero(labels != IGNORE_INDEX, as_tuple=True)
    return ((cols - 2 * kv) // 2).numpy()


# ---------------------------------------------------------------- determinism


def test_same_seed_same_data():
    cfg = small()
    a = generate_mqar(cfg, 100, seed=7)
    b = generate_mqar(cfg, 100, seed=7)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    d1, d2 = build(cfg), build(cfg)
    for f in ("train_inputs", "train_labels", "valid_inputs", "valid_labels"):
        assert torch.equal(getattr(d1, f), getattr(d2, f))


def test_different_seed_different_data():
    cfg = small()
    a = generate_mqar(cfg, 100, seed=7)
    b = generate_mqar(cfg, 100, seed=8)
    assert not torch.equal(a[0], b[0])
    assert not torch.equal(a[1], b[1])


def test_train_and_test_splits_differ():
    data = build(small(num_test=200))
    assert not torch.equal(data.train_inputs, data.valid_inputs)


# ---------------------------------------------------------------- every field changes the data

CHANGED = {
    "vocab_size": 256,
    "seq_len": 64,
    "num_kv_pairs": 6,
    "num_train": 201,
    "num_test": 51,
    "power_a": 1.0,
    "random_non_queries": False,
    "seed": 1,
    "train_kv_pairs": [1, 2],
}


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a, b)


def test_changed_values_cover_every_field():
    assert set(CHANGED) == {f.name for f in dataclasses.fields(MQARConfig)}


@pytest.mark.parametrize("field", sorted(CHANGED))
def test_every_config_field_changes_the_data(field):
    base = small()
    assert getattr(base, field) != CHANGED[field]
    changed = dataclasses.replace(base, **{field: CHANGED[field]})
    d0, d1 = build(base), build(changed)
    same = all(_same(getattr(d0, f), getattr(d1, f))
               for f in ("train_inputs", "train_labels", "valid_inputs", "valid_labels"))
    assert not same, f"changing {field} did not change the generated data"


def test_power_a_changes_the_gap_distribution():
    kv = 8
    cfg = MQARConfig(vocab_size=512, seq_len=128, num_kv_pairs=kv)
    skewed = query_gaps(*generate_mqar(cfg, 2000, seed=0), kv)
    uniform = query_gaps(*generate_mqar(dataclasses.replace(cfg, power_a=1.0), 2000, seed=0), kv)
    space = (cfg.seq_len - 2 * kv) // 2
    uniform_mean = (space - 1) / 2
    assert abs(uniform.mean() - uniform_mean) < 0.05 * uniform_mean
    assert skewed.mean() < 0.8 * uniform_mean
    # the shortest gap is far more common under a = 0.01
    assert (skewed == 0).mean() > 2 * (uniform == 0).mean()


def test_default_power_a_skews_to_short_gaps():
    kv = 16
    cfg = MQARConfig(seq_len=256, num_kv_pairs=kv)
    assert cfg.power_a == 0.01
    gaps = query_gaps(*generate_mqar(cfg, 2000, seed=3), kv)
    space = (cfg.seq_len - 2 * kv) // 2
    assert gaps.min() >= 0 and gaps.max() < space
    assert gaps.mean() < 0.8 * (space - 1) / 2


def test_first_gap_follows_the_power_law():
    """The first key's gap is Zoology's first sequential draw, so its law is exactly p ∝ a·i^(a−1)."""
    kv, a = 2, 0.01
    cfg = MQARConfig(vocab_size=64, seq_len=16, num_kv_pairs=kv, power_a=a, random_non_queries=False)
    inputs, labels = generate_mqar(cfg, 40000, seed=11)
    space = (cfg.seq_len - 2 * kv) // 2
    first_key = inputs[:, 0:1]
    # the query of the first key: the position after the prefix holding that key
    pos = (inputs[:, 2 * kv:] == first_key).int().argmax(dim=1)
    gap = (pos // 2).numpy()
    p = a * np.arange(1, space + 1) ** (a - 1)
    p /= p.sum()
    freq = np.bincount(gap, minlength=space) / len(gap)
    np.testing.assert_allclose(freq, p, atol=0.01)


# ---------------------------------------------------------------- structure


@pytest.mark.parametrize("random_non_queries", [True, False])
@pytest.mark.parametrize("vocab_size,seq_len,kv", [(128, 32, 4), (8192, 64, 8), (8192, 256, 64), (66, 64, 16)])
def test_structure(vocab_size, seq_len, kv, random_non_queries):
    cfg = MQARConfig(vocab_size=vocab_size, seq_len=seq_len, num_kv_pairs=kv, random_non_queries=random_non_queries)
    n = 300
    inputs, labels = generate_mqar(cfg, n, seed=5)
    assert inputs.shape == labels.shape == (n, seq_len)
    assert inputs.dtype == labels.dtype == torch.int64
    half = vocab_size // 2
    ctx = 2 * kv

    keys, values = inputs[:, 0:ctx:2], inputs[:, 1:ctx:2]
    assert ((keys >= 1) & (keys < half)).all()
    assert ((values >= half) & (values < vocab_size)).all()
    assert ((inputs >= 0) & (inputs < vocab_size)).all()
    for row in range(n):
        assert len(set(keys[row].tolist())) == kv, "duplicate keys in a sequence"
        assert len(set(values[row].tolist())) == kv, "duplicate values in a sequence"

    scored = labels != IGNORE_INDEX
    assert (scored.sum(dim=1) == kv).all()
    assert not scored[:, :ctx].any(), "nothing in the kv prefix is scored"
    assert ((labels == IGNORE_INDEX) | (labels >= half)).all()

    for row in range(n):
        pairs = dict(zip(keys[row].tolist(), values[row].tolist()))
        positions = torch.nonzero(scored[row]).flatten().tolist()
        assert all((p - ctx) % 2 == 0 for p in positions)
        queried = [inputs[row, p].item() for p in positions]
        assert sorted(queried) == sorted(pairs), "each key is queried exactly once"
        for p, q in zip(positions, queried):
            assert labels[row, p].item() == pairs[q]

    filler = ~scored.clone()
    filler[:, :ctx] = False
    if random_non_queries:
        assert (inputs[filler] != 0).float().mean() > 0.9
    else:
        assert (inputs[filler] == 0).all()


def test_zoology_docstring_example_layout():
    # Zoology's example: V=12, kv=2, seq 16 (we need V > seq_len, so V=20 here); no random filling.
    cfg = MQARConfig(vocab_size=20, seq_len=16, num_kv_pairs=2, random_non_queries=False)
    inputs, labels = generate_mqar(cfg, 50, seed=0)
    for row in range(50):
        x, y = inputs[row].tolist(), labels[row].tolist()
        assert all(t == IGNORE_INDEX for t in y[:4])
        for p in range(4, 16):
            if y[p] != IGNORE_INDEX:
                k = x[p]
                assert k in (x[0], x[2])
                assert y[p] == (x[1] if k == x[0] else x[3])
            else:
                assert x[p] == 0


def test_build_returns_taskdata():
    cfg = small()
    data = build(cfg)
    assert isinstance(data, TaskData)
    assert data.vocab_size == cfg.vocab_size
    assert data.train_inputs.shape == data.train_labels.shape == (cfg.num_train, cfg.seq_len)
    assert data.valid_inputs.shape == data.valid_labels.shape == (cfg.num_test, cfg.seq_len)


def test_large_generation_shapes():
    # 10k examples of length 256 (speed is measured elsewhere, never asserted here)
    inputs, labels = generate_mqar(MQARConfig(seq_len=256, num_kv_pairs=16), 10000, seed=0)
    assert inputs.shape == (10000, 256)
    assert ((labels != IGNORE_INDEX).sum(dim=1) == 16).all()


# ---------------------------------------------------------------- preconditions


@pytest.mark.parametrize("overrides,field", [
    (dict(vocab_size=32, seq_len=32), "vocab_size"),
    (dict(vocab_size=20, seq_len=32), "vocab_size"),
    (dict(seq_len=31), "seq_len"),
    (dict(seq_len=32, num_kv_pairs=9), "num_kv_pairs"),
    (dict(num_kv_pairs=0), "num_kv_pairs"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(seq_len=0), "seq_len"),
    (dict(num_train=0), "num_train"),
    (dict(num_test=0), "num_test"),
    (dict(power_a=0.0), "power_a"),
    (dict(power_a=-1.0), "power_a"),
    (dict(power_a=math.nan), "power_a"),
    (dict(power_a=math.inf), "power_a"),
    (dict(power_a="0.1"), "power_a"),
    (dict(seq_len=32.0), "seq_len"),
    (dict(num_kv_pairs=True), "num_kv_pairs"),
    (dict(random_non_queries="yes"), "random_non_queries"),
    (dict(seed=-1), "seed"),
])
def test_precondition_errors_name_the_field(overrides, field):
    cfg = small(**overrides)
    with pytest.raises(TaskConfigError) as info:
        cfg.check()
    assert info.value.field == field
    assert field in str(info.value)
    assert isinstance(info.value, ValueError)
    with pytest.raises(TaskConfigError):
        check_config(cfg)
    with pytest.raises(TaskConfigError):
        build(cfg)


def test_valid_configs_pass_check():
    MQARConfig().check()
    small().check()
    # the tightest legal settings
    MQARConfig(vocab_size=33, seq_len=32, num_kv_pairs=8).check()
    generate_mqar(MQARConfig(vocab_size=33, seq_len=32, num_kv_pairs=8), 10, seed=0)


def test_generate_rejects_negative_count():
    with pytest.raises(TaskConfigError) as info:
        generate_mqar(small(), -1, seed=0)
    assert info.value.field == "num_examples"


# ---------------------------------------------------------------- task registry


def test_task_registry():
    assert "mqar" in TASKS
    assert task_config_class("mqar") is MQARConfig
    data = build_task("mqar", small())
    assert torch.equal(data.train_inputs, build(small()).train_inputs)
    from_dict = build_task("mqar", SMALL)
    assert torch.equal(from_dict.train_labels, data.train_labels)


def test_unknown_task_lists_known_names():
    with pytest.raises(KeyError) as info:
        build_task("nope", {})
    assert "nope" in str(info.value) and "mqar" in str(info.value)
    with pytest.raises(KeyError):
        task_config_class("nope")


def test_unknown_config_key_is_an_error():
    with pytest.raises(TaskConfigError) as info:
        build_task("mqar", {**SMALL, "num_kv": 3})
    assert info.value.field == "num_kv"


# ---------------------------------------------------------------- the train mixture (train_kv_pairs)

def test_train_mixture_counts_and_test_split():
    cfg = MQARConfig(vocab_size=128, seq_len=32, num_kv_pairs=8, num_train=1001, num_test=64,
                     train_kv_pairs=[2, 4, 8])
    d = build(cfg)
    per_row = (d.train_labels != IGNORE_INDEX).sum(1)
    counts = {k: int((per_row == k).sum()) for k in (2, 4, 8)}
    assert counts == {2: 334, 4: 334, 8: 333}
    assert int((per_row == 2).sum() + (per_row == 4).sum() + (per_row == 8).sum()) == 1001
    # shuffled, not blocks: the first hundred rows hold more than one setting
    assert len(set(per_row[:100].tolist())) == 3
    # the test split keeps num_kv_pairs and is the plain generator's
    plain = build(MQARConfig(vocab_size=128, seq_len=32, num_kv_pairs=8, num_train=1001, num_test=64))
    assert torch.equal(d.valid_inputs, plain.valid_inputs) and torch.equal(d.valid_labels, plain.valid_labels)
    assert bool(((d.valid_labels != IGNORE_INDEX).sum(1) == 8).all())
    # each part is a well-formed MQAR sequence: the label after a query key is the value that key was paired with
    for row in range(50):
        x, y = d.train_inputs[row], d.train_labels[row]
        kv = int((y != IGNORE_INDEX).sum())
        pairs = {int(x[2 * i]): int(x[2 * i + 1]) for i in range(kv)}
        for pos in torch.nonzero(y != IGNORE_INDEX).flatten().tolist():
            assert pairs[int(x[pos])] == int(y[pos])


def test_train_mixture_is_seeded():
    cfg = MQARConfig(vocab_size=64, seq_len=32, num_kv_pairs=4, num_train=300, num_test=8, train_kv_pairs=[1, 4])
    a, b = build(cfg), build(cfg)
    assert torch.equal(a.train_inputs, b.train_inputs) and torch.equal(a.train_labels, b.train_labels)
    c = build(dataclasses.replace(cfg, seed=5))
    assert not torch.equal(a.train_inputs, c.train_inputs)


@pytest.mark.parametrize("mix", [[], [0], [9], [True], "4", [2, 2.5]])
def test_train_mixture_errors_name_the_field(mix):
    cfg = MQARConfig(vocab_size=64, seq_len=32, num_kv_pairs=4, num_train=100, num_test=8, train_kv_pairs=mix)
    with pytest.raises(TaskConfigError) as e:
        cfg.check()
    assert e.value.field == "train_kv_pairs"
