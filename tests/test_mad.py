"""MAD tasks: semantics of each generator, every config field changes the data, preconditions name their field,
the compression AutoEncoder, micro/macro accuracy, and the ``mad`` suite as a trainer and as a search task."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import optuna
import pytest
import torch
from torch import nn

from hybridnas.config import ArchConfig, ModelConfig, TaskSpec, TrainConfig, load_space
from hybridnas.model import HybridLM
from hybridnas.suite import CompressionAutoEncoder, train_task
from hybridnas.tasks import TASKS, build_task
from hybridnas.tasks.base import IGNORE_INDEX, TaskConfigError
from hybridnas.tasks.mad import (
    MAD_TASKS,
    CompressionConfig,
    FuzzyInContextRecallConfig,
    InContextRecallConfig,
    MemorizationConfig,
    NoisyInContextRecallConfig,
    SelectiveCopyingConfig,
    build,
    memorization_map,
)
from hybridnas.tasks.mad_suite import TRAIN_FIELDS, MadSuiteConfig
from hybridnas.train import evaluate
from hybridnas.trainers import TRAINERS, trainer_for
from hybridnas.yamlio import ConfigError

TINY = dict(num_train=40, num_test=20)
SMALL = {
    "in_context_recall": dict(seq_len=32, **TINY),
    "fuzzy_in_context_recall": dict(seq_len=32, **TINY),
    "noisy_in_context_recall": dict(seq_len=32, **TINY),
    "selective_copying": dict(seq_len=32, num_tokens_to_copy=4, **TINY),
    "compression": dict(seq_len=16, **TINY),
    "memorization": dict(vocab_size=64, seq_len=16, **TINY),
}


def small(task: str, **overrides):
    return MAD_TASKS[task](**{**SMALL[task], **overrides})


def test_all_six_tasks_are_registered():
    for name, cls in MAD_TASKS.items():
        assert TASKS[f"mad_{name}"][0] is cls
    assert set(MAD_TASKS) == {"in_context_recall", "fuzzy_in_context_recall", "noisy_in_context_recall",
                              "selective_copying", "compression", "memorization"}
    assert "mad" in TASKS and "mad" in TRAINERS and "mad_compression" in TRAINERS


# ---------------------------------------------------------------- determinism and every field


@pytest.mark.parametrize("task", sorted(MAD_TASKS))
def test_deterministic_and_seeded(task):
    a, b = build(small(task)), build(small(task))
    for f in ("train_inputs", "train_labels", "valid_inputs", "valid_labels"):
        assert torch.equal(getattr(a, f), getattr(b, f))
    c = build(small(task, seed=1))
    assert not torch.equal(a.train_inputs, c.train_inputs)
    assert not torch.equal(a.train_inputs[: a.valid_inputs.size(0)], a.valid_inputs)


CHANGED = {
    "in_context_recall": {"vocab_size": 32, "seq_len": 40, "num_train": 41, "num_test": 21, "seed": 1,
                          "multi_query": False, "noise_vocab_size": 4, "frac_noise": 0.3},
    "noisy_in_context_recall": {"vocab_size": 48, "seq_len": 40, "num_train": 41, "num_test": 21, "seed": 1,
                                "multi_query": False, "noise_vocab_size": 8, "frac_noise": 0.5},
    "fuzzy_in_context_recall": {"vocab_size": 24, "seq_len": 40, "num_train": 41, "num_test": 21, "seed": 1,
                                "k_motif_size": 2, "v_motif_size": 2, "multi_query": False},
    "selective_copying": {"vocab_size": 24, "seq_len": 40, "num_train": 41, "num_test": 21, "seed": 1,
                          "num_tokens_to_copy": 6},
    "compression": {"vocab_size": 24, "seq_len": 20, "num_train": 41, "num_test": 21, "seed": 1},
    "memorization": {"vocab_size": 96, "seq_len": 20, "num_train": 41, "num_test": 21, "seed": 1, "map_seed": 7},
}


def test_changed_values_cover_every_field():
    for task, cls in MAD_TASKS.items():
        assert set(CHANGED[task]) == {f.name for f in dataclasses.fields(cls)}, task


def _differs(a, b) -> bool:
    for f in ("train_inputs", "train_labels", "valid_inputs", "valid_labels"):
        x, y = getattr(a, f), getattr(b, f)
        if x.shape != y.shape or not torch.equal(x, y):
            return True
    return a.vocab_size != b.vocab_size


@pytest.mark.parametrize("task,field", [(t, f) for t in sorted(CHANGED) for f in sorted(CHANGED[t])])
def test_every_config_field_changes_the_data(task, field):
    base = small(task)
    if task == "in_context_recall" and field == "frac_noise":
        base = small(task, noise_vocab_size=4)  # noise needs noise tokens
    changed = dataclasses.replace(base, **{field: CHANGED[task][field]})
    assert getattr(base, field) != getattr(changed, field)
    assert _differs(build(base), build(changed)), f"{task}.{field} does not change the data"


# ---------------------------------------------------------------- semantics


def _recall_layout(cfg):
    usable = cfg.vocab_size - cfg.noise_vocab_size - (0 if cfg.multi_query else 1)
    return usable // 2, usable


def test_in_context_recall_train_is_next_token_and_test_scores_seen_keys():
    cfg = small("in_context_recall", num_test=64)
    data = build(cfg)
    x, y = data.train_inputs, data.train_labels
    assert x.shape == (40, cfg.seq_len - 1)
    assert torch.equal(y[:, :-1], x[:, 1:])  # plain next-token targets everywhere
    nk, usable = _recall_layout(cfg)
    vx, vy = data.valid_inputs.numpy(), data.valid_labels.numpy()
    for row in range(vx.shape[0]):
        scored = np.nonzero(vy[row] != IGNORE_INDEX)[0]
        assert scored[-1] == vx.shape[1] - 1  # the final probe is always scored
        for p in scored:
            key, value = vx[row, p], vy[row, p]
            assert 0 <= key < nk and nk <= value < usable
            earlier = [q for q in range(0, p, 2) if vx[row, q] == key]
            assert earlier, "only keys already seen are scored"
            assert all(vx[row, q + 1] == value for q in earlier)  # one map per sequence
        # a repeated key that is not scored does not exist
        keys_at = list(range(0, vx.shape[1] - 2, 2))
        for q in keys_at:
            if any(vx[row, r] == vx[row, q] for r in range(0, q, 2)):
                assert vy[row, q] != IGNORE_INDEX


def test_noisy_recall_noise_is_never_scored():
    cfg = small("noisy_in_context_recall", frac_noise=0.6, num_test=64)
    data = build(cfg)
    nk, usable = _recall_layout(cfg)
    vx, vy = data.valid_inputs, data.valid_labels
    assert int(((vx >= usable) & (vx < cfg.vocab_size)).sum()) > 0  # noise present
    assert int(vx.max()) < cfg.vocab_size
    scored_inputs = vx[vy != IGNORE_INDEX]
    assert bool((scored_inputs < nk).all())  # only keys precede scored values


def test_single_query_scores_only_the_probe_after_the_copy_prefix():
    cfg = small("in_context_recall", multi_query=False)
    data = build(cfg)
    vx, vy = data.valid_inputs, data.valid_labels
    assert vx.shape[1] == cfg.seq_len
    assert bool(((vy != IGNORE_INDEX).sum(1) == 1).all())
    assert bool((vx[:, -2] == cfg.vocab_size - 1).all())  # copy prefix before the probe key


def test_fuzzy_recall_test_keys_have_full_motif_size_and_pads_are_not_trained():
    cfg = small("fuzzy_in_context_recall", num_test=30)
    data = build(cfg)
    pad = cfg.vocab_size - 1
    nk = (cfg.vocab_size - 1) // 2
    tx, ty = data.train_inputs, data.train_labels
    assert bool((ty[:, :-1][tx[:, 1:] == pad] == IGNORE_INDEX).all())
    vx, vy = data.valid_inputs, data.valid_labels
    for row in range(vx.size(0)):
        # the final probe: its key motif (the run of key tokens before the value) has k_motif_size tokens
        scored = torch.nonzero(vy[row] != IGNORE_INDEX)[:, 0].tolist()
        last_val_start = scored[-1]
        while last_val_start - 1 in scored and vx[row, last_val_start].item() >= nk:
            last_val_start -= 1
        run = 0
        p = last_val_start
        while p >= 0 and vx[row, p].item() < nk:
            run += 1
            p -= 1
        assert run == cfg.k_motif_size
        assert bool((vy[row][vy[row] != IGNORE_INDEX] >= nk).all())  # values only


def test_selective_copying_targets_are_the_tokens_in_order():
    cfg = small("selective_copying", num_test=30)
    data = build(cfg)
    blank, copy, c = cfg.vocab_size - 2, cfg.vocab_size - 1, cfg.num_tokens_to_copy
    for x, y in ((data.train_inputs, data.train_labels), (data.valid_inputs, data.valid_labels)):
        assert x.shape[1] == cfg.seq_len
        assert bool((x[:, cfg.seq_len - c - 1] == copy).all())
        assert bool((x[:, cfg.seq_len - c:] == blank).all())
        assert bool((y[:, : cfg.seq_len - c] == IGNORE_INDEX).all())
        for row in range(x.size(0)):
            head = x[row, : cfg.seq_len - c - 1]
            assert torch.equal(head[head != blank], y[row, cfg.seq_len - c:])
    # blanks are placed by the seeded generator, not the global one
    np.random.seed(0)
    a = build(cfg).train_inputs
    np.random.seed(1)
    assert torch.equal(a, build(cfg).train_inputs)


def test_compression_targets_are_the_inputs_and_use_the_autoencoder():
    cfg = small("compression")
    data = build(cfg)
    assert torch.equal(data.train_inputs, data.train_labels)
    assert bool((data.valid_inputs[:, -1] == cfg.vocab_size - 1).all())
    assert bool((data.valid_inputs[:, :-1] < cfg.vocab_size - 1).all())
    assert data.autoencoder


def test_memorization_map_is_fixed_and_shared_by_train_and_test():
    cfg = small("memorization")
    data = build(cfg)
    kv = memorization_map(cfg)
    for x, y in ((data.train_inputs, data.train_labels), (data.valid_inputs, data.valid_labels)):
        keys, vals = x[:, 0::2], y[:, 1::2]
        assert bool((x[:, 1::2] == cfg.vocab_size - 1).all())
        assert torch.equal(vals, torch.from_numpy(kv)[keys])
        assert bool((y[:, 0::2] == IGNORE_INDEX).all())
        assert all(len(set(r.tolist())) == r.numel() for r in keys)  # distinct keys in a sequence
    assert not np.array_equal(kv, memorization_map(dataclasses.replace(cfg, map_seed=1)))
    assert np.array_equal(kv, memorization_map(dataclasses.replace(cfg, seed=99)))


@pytest.mark.parametrize("cfg,field", [
    (InContextRecallConfig(seq_len=33), "seq_len"),
    (InContextRecallConfig(frac_noise=1.0, noise_vocab_size=4), "frac_noise"),
    (InContextRecallConfig(frac_noise=0.2), "noise_vocab_size"),
    (NoisyInContextRecallConfig(vocab_size=17), "vocab_size"),
    (FuzzyInContextRecallConfig(k_motif_size=9), "k_motif_size"),
    (FuzzyInContextRecallConfig(seq_len=10), "seq_len"),
    (SelectiveCopyingConfig(seq_len=32, num_tokens_to_copy=16), "num_tokens_to_copy"),
    (CompressionConfig(num_train=0), "num_train"),
    (MemorizationConfig(vocab_size=16, seq_len=32), "seq_len"),
    (MemorizationConfig(map_seed=-1), "map_seed"),
    (InContextRecallConfig(multi_query=1), "multi_query"),
])
def test_preconditions_name_their_field(cfg, field):
    with pytest.raises(TaskConfigError) as e:
        cfg.check()
    assert e.value.field == field


def test_mad_defaults_match_the_paper_baselines():
    assert (InContextRecallConfig().vocab_size, InContextRecallConfig().seq_len) == (16, 128)
    assert (NoisyInContextRecallConfig().vocab_size, NoisyInContextRecallConfig().noise_vocab_size) == (32, 16)
    assert NoisyInContextRecallConfig().frac_noise == 0.2
    assert (SelectiveCopyingConfig().seq_len, SelectiveCopyingConfig().num_tokens_to_copy) == (256, 16)
    assert (CompressionConfig().vocab_size, CompressionConfig().seq_len) == (16, 32)
    m = MemorizationConfig()
    assert (m.vocab_size, m.seq_len, m.num_train, m.map_seed) == (256, 32, 256, 12345)
    assert (InContextRecallConfig().num_train, InContextRecallConfig().num_test) == (12800, 1280)


# ---------------------------------------------------------------- accuracy definitions


class Fixed(nn.Module):
    """Predicts class 1 everywhere."""

    def forward(self, x):
        out = torch.zeros(*x.shape, 4)
        out[..., 1] = 1.0
        return out


def test_micro_and_macro_accuracy():
    x = torch.zeros(2, 4, dtype=torch.long)
    y = torch.tensor([[1, 1, 1, IGNORE_INDEX], [2, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]])
    ev = evaluate(Fixed(), x, y, 8, torch.device("cpu"), False, metric="macro")
    assert ev["accuracy_micro"] == pytest.approx(3 / 4)
    assert ev["accuracy_macro"] == pytest.approx(0.5)  # class 1: 3/3, class 2: 0/1
    assert ev["accuracy_example"] == pytest.approx(0.5)
    assert ev["accuracy"] == ev["accuracy_macro"]
    assert evaluate(Fixed(), x, y, 8, torch.device("cpu"), False)["accuracy"] == ev["accuracy_example"]


# ---------------------------------------------------------------- compression AutoEncoder

ARCH_MODEL = dict(d_model=32, pattern="AF", layers={"A": {"n_heads": 2}})


def tiny_train(**kw) -> TrainConfig:
    return TrainConfig(**{"steps": 6, "batch_size": 8, "eval_every": 3, "warmup_steps": 1, "lr": 3e-3,
                          "device": "cpu", "seed": 0, **kw})


def test_autoencoder_pools_the_last_position():
    enc = HybridLM(ModelConfig(vocab_size=16, **ARCH_MODEL))
    ae = CompressionAutoEncoder(enc)
    x = torch.randint(0, 15, (3, 10))
    logits = ae(x)
    assert logits.shape == (3, 10, 16)
    # the decoder sees one vector per sequence: positions differ only by the fixed sin-cos code
    x2 = x.clone()
    x2[:, 0] = (x2[:, 0] + 1) % 15
    assert not torch.allclose(ae(x2), logits)  # the last position summarizes the whole (causal) sequence
    logits.sum().backward()
    assert enc.embed.weight.grad is not None and enc.embed.weight.grad.abs().sum() > 0
    assert ae.num_params() == enc.num_params() + 32 * 64 + 64 + 64 * 16 + 16


def test_compression_trainer_returns_the_encoder():
    cfg = small("compression")
    data = build(cfg)
    arch = ArchConfig(ModelConfig(vocab_size=16, **ARCH_MODEL), TaskSpec("mad_compression", {}), tiny_train())
    res = trainer_for("mad_compression")(arch, data)
    assert isinstance(res.model, HybridLM) and res.model.cfg.vocab_size == 16
    assert 0 <= res.metrics["accuracy"] <= 1 and "accuracy_macro" in res.metrics
    assert train_task is TRAINERS["mad_compression"]


# ---------------------------------------------------------------- the suite

SUITE = {"tasks": ["in_context_recall", "compression", "memorization"], "common": {"num_train": 32, "num_test": 16},
         "params": {"in_context_recall": {"seq_len": 16}, "compression": {"seq_len": 8},
                    "memorization": {"vocab_size": 40, "seq_len": 8}},
         "extra": {"in_context_recall": {"vocab_size": [24]}}, "train": {"memorization": {"steps": 9}}}


def test_full_mad_grid_has_66_settings():
    runs = MadSuiteConfig(settings="mad").runs()
    per = {}
    for task, _, _, _ in runs:
        per[task] = per.get(task, 0) + 1
    assert per == {"in_context_recall": 11, "fuzzy_in_context_recall": 11, "noisy_in_context_recall": 14,
                   "selective_copying": 13, "compression": 11, "memorization": 6}
    assert len(MadSuiteConfig().runs()) == 6


def test_suite_config_fields():
    cfg = MadSuiteConfig(**SUITE).check()
    runs = cfg.runs()
    assert [(t, label) for t, label, _, _ in runs] == [
        ("in_context_recall", "baseline"), ("in_context_recall", "vocab_size=24"), ("compression", "baseline"),
        ("memorization", "baseline")]
    assert runs[0][2].num_train == 32 and runs[0][2].seq_len == 16 and runs[1][2].vocab_size == 24
    assert runs[3][3] == {"steps": 9}
    assert cfg.vocab_size == 40  # the largest run vocabulary
    # every field changes the runs or the data
    changes = {"tasks": ["compression"], "settings": "mad", "extra": {}, "common": {"num_train": 33},
               "params": {"compression": {"seq_len": 9}}, "train": {}, "vocab_size": 64}
    assert set(changes) == {f.name for f in dataclasses.fields(MadSuiteConfig)}
    for field, value in changes.items():
        other = MadSuiteConfig(**{**SUITE, field: value})
        assert (repr(other.runs()) != repr(cfg.runs())) or other.vocab_size != cfg.vocab_size, field


def test_suite_knows_every_training_field():
    # tasks may not import the config schema, so the suite spells out TrainConfig's fields: keep them equal
    assert TRAIN_FIELDS == {f.name for f in dataclasses.fields(TrainConfig)}, \
        "update hybridnas.tasks.mad_suite.TRAIN_FIELDS to TrainConfig's fields"


@pytest.mark.parametrize("kw,field", [
    ({"tasks": ["recall"]}, "tasks"),
    ({"tasks": []}, "tasks"),
    ({"settings": "full"}, "settings"),
    ({"common": {"nope": 1}}, "common"),
    ({"params": {"compression": {"k_motif_size": 2}}}, "params"),
    ({"params": {"compression": {"seq_len": 1}}}, "params"),
    ({"extra": {"compression": {"seq_len": 4}}}, "extra"),
    ({"train": {"compression": {"stepz": 4}}}, "train"),
    ({"vocab_size": 8}, "vocab_size"),
])
def test_suite_errors_name_their_field(kw, field):
    with pytest.raises(TaskConfigError) as e:
        MadSuiteConfig(**{**SUITE, **kw}).check()
    assert e.value.field == field


def suite_arch(**train_kw) -> tuple[ArchConfig, object]:
    task = TaskSpec("mad", SUITE)
    data = build_task("mad", task.build_config())
    model = ModelConfig(vocab_size=data.vocab_size, **ARCH_MODEL)
    return ArchConfig(model, task, tiny_train(**train_kw)), data


def test_suite_trainer_reports_a_running_mean_and_per_task_attrs():
    arch, data = suite_arch()
    seen = []
    res = trainer_for("mad")(arch, data, on_eval=lambda s, ev: seen.append((s, ev)))
    steps = [s for s, _ in seen]
    assert steps == sorted(set(steps)) and steps[-1] == 6 + 6 + 6 + 9  # planned steps of every run
    assert all({"accuracy", "loss", "train_loss"} <= set(ev) for _, ev in seen)
    tasks = {"in_context_recall", "compression", "memorization"}
    assert {k for k in res.attrs if k.count("/") == 1} == {f"mad/{t}" for t in tasks}
    assert "mad/in_context_recall/vocab_size=24" in res.attrs
    icr = (res.attrs["mad/in_context_recall/baseline"] + res.attrs["mad/in_context_recall/vocab_size=24"]) / 2
    assert res.attrs["mad/in_context_recall"] == pytest.approx(icr)
    mean = sum(res.attrs[f"mad/{t}"] for t in tasks) / 3
    assert res.metrics["accuracy"] == pytest.approx(mean)
    assert seen[-1][1]["accuracy"] == pytest.approx(res.metrics["micro_accuracy_runs"])
    assert math.isfinite(res.metrics["loss"]) and res.metrics["runs"] == 4
    assert res.model.cfg.vocab_size == arch.model.vocab_size  # the saved model rebuilds from arch
    rebuilt = HybridLM(arch.model)
    rebuilt.load_state_dict(res.model.state_dict())


def test_mad_search_space_loads():
    space = load_space("search_spaces/mad.yaml")
    assert space.task.name == "mad"
    assert space.model["vocab_size"] == space.task.params["vocab_size"]


def test_mad_space_errors_point_at_the_task_field():
    text = open("search_spaces/mad.yaml").read().replace("settings: baseline", "settings: everything")
    with pytest.raises(ConfigError) as e:
        load_space(text=text, file="mad.yaml")
    assert "task.settings" in str(e.value) and "mad.yaml:" in str(e.value)


def test_mad_search_records_per_task_attrs(tmp_path, monkeypatch):
    from hybridnas import search

    monkeypatch.chdir(tmp_path)
    text = """
name: tiny_mad
task: {name: mad, tasks: [in_context_recall, memorization], common: {num_train: 32, num_test: 16},
       params: {in_context_recall: {seq_len: 16}, memorization: {vocab_size: 40, seq_len: 8}}}
model: {d_model: 32, pattern: ["AF", "FA"], layers: {A: {n_heads: 2}}}
train: {steps: 4, batch_size: 8, eval_every: 2, warmup_steps: 1, device: cpu}
search: {n_trials: 2, pruner: none, sampler: random, save_weights: true}
"""
    space = load_space(text=text, file="tiny.yaml")
    study = search.run_search(space, quiet=True)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert done
    for t in done:
        assert "mad/in_context_recall" in t.user_attrs and "mad/memorization" in t.user_attrs
        assert 0 <= t.value <= 1
