"""The short training run: schedule, early stop, divergence, metrics, TensorBoard, best weights kept."""

import math

import pytest
import torch

from hybridnas.config import ArchConfig, ModelConfig, TaskSpec, TrainConfig
from hybridnas.model import HybridLM
from hybridnas.tasks import build_task
from hybridnas.train import evaluate, lr_at, train

TASK = TaskSpec("mqar", {"vocab_size": 32, "seq_len": 16, "num_kv_pairs": 2, "num_train": 256, "num_test": 64,
                         "seed": 0})


def arch(**train_kw) -> ArchConfig:
    model = ModelConfig(vocab_size=32, d_model=32, pattern="AA", layers={"A": {"n_heads": 2}})
    kw = {"steps": 30, "batch_size": 16, "lr": 3e-3, "eval_every": 10, "warmup_steps": 5, "seed": 0}
    kw.update(train_kw)
    return ArchConfig(model, TASK, TrainConfig(**kw))


@pytest.fixture(scope="module")
def data():
    return build_task(TASK.name, TASK.build_config())


def test_lr_schedule_warmup_then_cosine():
    cfg = TrainConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(55, cfg) == pytest.approx(0.55)
    assert lr_at(99, cfg) == pytest.approx(0.1, abs=1e-3)
    values = [lr_at(s, cfg) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_metrics_and_history(data):
    res = train(arch(target_accuracy=None), data)
    m = res.metrics
    for key in ("accuracy", "loss", "tokens_per_s", "peak_memory_mb", "steps", "stop_reason", "params"):
        assert key in m
    assert m["steps"] == 30 and m["stop_reason"] == "steps"
    assert [h["step"] for h in res.history] == [10, 20, 30]
    assert m["tokens_per_s"] > 0 and m["peak_memory_mb"] > 0
    assert 0 <= m["accuracy"] <= 1
    assert m["accuracy"] == max(h["accuracy"] for h in res.history)


def test_training_is_deterministic(data):
    a = train(arch(target_accuracy=None), data).metrics
    b = train(arch(target_accuracy=None), data).metrics
    assert a["loss"] == b["loss"] and a["final_train_loss"] == b["final_train_loss"]


def test_best_weights_are_restored(data):
    a = arch(target_accuracy=None)
    res = train(a, data)
    ev = evaluate(res.model, data.valid_inputs, data.valid_labels, 64, torch.device("cpu"), False)
    assert ev["accuracy"] == pytest.approx(res.metrics["accuracy"])
    assert ev["loss"] == pytest.approx(res.metrics["loss"], rel=1e-5)


def test_early_stop_at_target(data):
    res = train(arch(target_accuracy=1e-9), data)
    assert res.metrics["stop_reason"] == "target"
    assert res.metrics["steps"] == 10


def test_nan_loss_ends_the_run_with_a_reason(data):
    a = arch()
    model = HybridLM(a.model)
    with torch.no_grad():
        model.embed.weight.fill_(float("nan"))
    res = train(a, data, model=model)
    assert res.metrics["stop_reason"] == "nan"
    assert res.metrics["steps"] == 1
    assert math.isnan(res.metrics["accuracy"])


def test_on_eval_callback_sees_each_evaluation(data):
    seen = []
    train(arch(target_accuracy=None), data, on_eval=lambda step, ev: seen.append((step, ev["accuracy"])))
    assert [s for s, _ in seen] == [10, 20, 30]


def test_tensorboard_scalars_and_hparams(data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(arch(target_accuracy=None), data, log_dir=str(tmp_path), hparams={"pattern": "AA", "lr": 3e-3})
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    for tag in ("train/loss", "train/lr", "valid/loss", "valid/accuracy", "perf/tokens_per_s", "hparam/accuracy"):
        assert tag in tags
    # the hparams plugin's records: the experiment declares the hparams and the metrics, the session holds the values
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = acc.PluginTagToContent("hparams")
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= set(content)
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert {h.name for h in experiment.hparam_infos} == {"pattern", "lr"}
    assert "hparam/accuracy" in {m.name.tag for m in experiment.metric_infos}
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["pattern"].string_value == "AA" and start.hparams["lr"].number_value == 3e-3


def test_moe_aux_loss_is_trained(data):
    a = arch(target_accuracy=None, steps=10)
    a.model.pattern = "AE"
    a.model.layers = {"A": {"n_heads": 2}, "E": {"n_experts": 4, "top_k": 1, "aux_loss_coef": 0.01}}
    res = train(a, data)
    assert res.metrics["stop_reason"] == "steps"
    assert res.model.aux_loss() is not None
