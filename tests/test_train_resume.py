"""Longer training: `hybridnas train` checkpoints every N steps (atomically, keeping the last K), resumes at the
same step and data position with the same loss curve, trains an export further, presets, precision."""

import json
import os
from pathlib import Path

import pytest
import torch

from hybridnas.checkpoint import TRAIN_LOG, checkpoint_steps, latest_train_checkpoint
from hybridnas.cli import main

TEXT = "".join(f"Line {i}: the quick brown fox {i % 7} jumps over the lazy dog {i * 13 % 11}.\n" for i in range(400))


def lm_arch(tmp_path: Path, *, in_memory: bool = True, extra_train: str = "") -> Path:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    in_mem = "" if in_memory else ", in_memory_tokens: 0"
    path = tmp_path / "arch.yaml"
    path.write_text(f"""\
name: tiny_lm
task: {{name: lm, path: {corpus}, seq_len: 16, split_block: 256, cache_dir: {tmp_path / 'cache'}{in_mem}}}
model:
  d_model: 16
  pattern: "A-"
  layers: {{A: {{n_heads: 2}}}}
train: {{steps: 20, batch_size: 4, eval_every: 5, warmup_steps: 2, target_accuracy: null, lr: 3.0e-3{extra_train}}}
""")
    return path


def losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / TRAIN_LOG).read_text().splitlines()]
    return {r["step"]: r["train_loss"] for r in rows if "train_loss" in r and "loss" not in r}


@pytest.mark.parametrize("in_memory", [True, False], ids=["in_memory", "stream"])
def test_resume_gives_the_same_loss_curve(tmp_path, in_memory, capsys):
    arch = lm_arch(tmp_path, in_memory=in_memory)
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(["train", str(arch), "--out", str(full), "--checkpoint-every", "5", "--quiet"]) == 0
    # stopped at step 10 as if killed there: its last checkpoint is step 10
    assert main(["train", str(arch), "--out", str(part), "--checkpoint-every", "5", "--stop-after", "10",
                 "--quiet"]) == 0
    assert latest_train_checkpoint(part).name.endswith("10")
    assert not (part / "model.safetensors").exists()  # an interrupted run writes no final model
    assert main(["train", str(arch), "--out", str(part), "--checkpoint-every", "5", "--resume", "--quiet"]) == 0
    a, b = losses(full), losses(part)
    assert sorted(a) == sorted(b) == list(range(1, 21))
    for step in range(11, 21):
        assert abs(a[step] - b[step]) <= 1e-6, (step, a[step], b[step])
    out = capsys.readouterr().out
    assert "resumed from" in out
    sa = torch.load(full / "checkpoints" / "step-00000020" / "optimizer.pt", weights_only=True)
    sb = torch.load(part / "checkpoints" / "step-00000020" / "optimizer.pt", weights_only=True)
    assert sa["data"]["batches"] == sb["data"]["batches"] == 20


def test_checkpoints_keep_the_last_k_and_hold_every_part(tmp_path):
    arch = lm_arch(tmp_path)
    out = tmp_path / "out"
    assert main(["train", str(arch), "--out", str(out), "--checkpoint-every", "4", "--keep", "2", "--quiet"]) == 0
    assert checkpoint_steps(out) == [16, 20]
    ckpt = latest_train_checkpoint(out)
    names = {p.name for p in ckpt.iterdir()}
    assert {"model.safetensors", "optimizer.pt", "trainer_state.json", "architecture.yaml", "config.json"} <= names
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == 20 and state["rng"]["python"] and state["rng"]["numpy"]
    opt = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert {"optimizer", "torch_rng", "data"} <= set(opt)
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]  # no temp folder left


def test_an_interrupted_checkpoint_write_leaves_the_previous_one(tmp_path, monkeypatch, capsys):
    arch = lm_arch(tmp_path)
    out = tmp_path / "out"
    assert main(["train", str(arch), "--out", str(out), "--checkpoint-every", "5", "--stop-after", "5",
                 "--quiet"]) == 0
    import hybridnas.checkpoint as ck

    real = ck.save_weights
    calls = []

    def failing(path, model, metadata=None):
        calls.append(path)
        real(path, model, metadata)
        raise KeyboardInterrupt  # killed halfway through writing the step-10 checkpoint

    monkeypatch.setattr(ck, "save_weights", failing)
    capsys.readouterr()
    assert main(["train", str(arch), "--out", str(out), "--checkpoint-every", "5", "--resume", "--quiet"]) == 130
    assert calls and checkpoint_steps(out) == [5]
    err = capsys.readouterr().err
    assert "interrupted at step 10" in err and "step-00000005" in err and "--resume" in err
    monkeypatch.setattr(ck, "save_weights", real)
    assert main(["train", str(arch), "--out", str(out), "--checkpoint-every", "5", "--resume", "--quiet"]) == 0
    assert checkpoint_steps(out)[-1] == 20


def test_resume_without_a_checkpoint_or_out_is_a_clear_error(tmp_path, capsys):
    arch = lm_arch(tmp_path)
    assert main(["train", str(arch), "--resume"]) == 2
    assert "--out" in capsys.readouterr().err
    assert main(["train", str(arch), "--out", str(tmp_path / "none"), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint" in err and "Traceback" not in err


def test_train_an_export_further(tmp_path, capsys):
    arch = lm_arch(tmp_path)
    first = tmp_path / "first"
    assert main(["train", str(arch), "--out", str(first), "--steps", "5", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["train", str(first), "--out", str(tmp_path / "second"), "--steps", "3", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert f"from the weights in {first}" in out
    metrics = json.loads(out[out.index("{"):out.rindex("}") + 1])
    assert metrics["steps"] == 3
    # starting from trained weights: the first step's loss is below a fresh model's
    fresh = tmp_path / "fresh"
    assert main(["train", str(arch), "--out", str(fresh), "--steps", "3", "--quiet"]) == 0
    assert losses(tmp_path / "second")[1] < losses(fresh)[1]


def test_steps_override_and_preset(tmp_path, capsys):
    from hybridnas.checkpoint import build_model
    from hybridnas.presets import PRESETS

    arch = lm_arch(tmp_path)
    out = tmp_path / "out"
    assert main(["train", str(arch), "--out", str(out), "--preset", "tiny", "--steps", "2", "--quiet"]) == 0
    model = build_model(out)
    assert model.cfg.d_model == PRESETS["tiny"]["d_model"]
    assert len(model.blocks) >= PRESETS["tiny"]["n_layers"]
    assert main(["train", str(arch), "--preset", "huge"]) == 2
    assert "--preset" in capsys.readouterr().err


def test_precision_fp32_on_cpu_and_validation(tmp_path, capsys):
    from hybridnas.config import load_arch
    from hybridnas.train import autocast_dtype

    arch = lm_arch(tmp_path, extra_train=", precision: fp32")
    a = load_arch(str(arch))
    assert a.train.precision == "fp32"
    assert autocast_dtype(a.train, torch.device("cpu")) is None
    assert autocast_dtype(a.train, torch.device("cuda")) is None
    a.train.precision = "auto"
    assert autocast_dtype(a.train, torch.device("cpu")) is None
    assert autocast_dtype(a.train, torch.device("cuda")) is torch.bfloat16
    a.train.precision = "bf16"
    assert autocast_dtype(a.train, torch.device("cuda")) is torch.bfloat16
    assert main(["train", str(arch), "--steps", "2", "--quiet"]) == 0
    bad = lm_arch(tmp_path, extra_train=", precision: fp16")
    assert main(["train", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:7: train.precision:" in err and "Traceback" not in err


def test_precision_bf16_autocasts_on_cpu_too(tmp_path, capsys):
    arch = lm_arch(tmp_path, extra_train=", precision: bf16, device: cpu")
    assert main(["train", str(arch), "--steps", "3", "--quiet"]) == 0
    out = capsys.readouterr().out
    metrics = json.loads(out[out.index("{"):out.rindex("}") + 1])
    assert metrics["steps"] == 3 and metrics["final_train_loss"] == metrics["final_train_loss"]  # finite, not NaN
    from hybridnas.config import load_arch
    from hybridnas.train import TrainRun

    a = load_arch(str(arch))
    from hybridnas.tasks import build_task

    run = TrainRun(a, build_task(a.task.name, a.task.build_config()))
    assert run.autocast
    seen = []
    linear = next(m for m in run.model.modules() if isinstance(m, torch.nn.Linear))
    handle = linear.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    run.advance()
    handle.remove()
    assert torch.bfloat16 in seen


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 autocast runs on CUDA")
def test_bf16_on_cuda(tmp_path):
    arch = lm_arch(tmp_path, extra_train=", precision: bf16, device: cuda")
    assert main(["train", str(arch), "--out", str(tmp_path / "o"), "--steps", "4", "--checkpoint-every", "2",
                 "--quiet"]) == 0
    assert checkpoint_steps(tmp_path / "o") == [2, 4]


def test_checkpoint_every_needs_out(tmp_path, capsys):
    arch = lm_arch(tmp_path)
    assert main(["train", str(arch), "--checkpoint-every", "5"]) == 2
    assert "--out" in capsys.readouterr().err
    assert os.listdir(tmp_path)  # nothing else checked: the error came before training


def test_resume_with_layer_parameters_written_as_ints_in_the_file(tmp_path):
    """M's default `expand` is the int 2; the checkpoint's architecture.yaml reads it back as 2.0: the same model."""
    arch = lm_arch(tmp_path)
    arch.write_text(arch.read_text().replace('pattern: "A-"', 'pattern: "MA"').replace(
        "layers: {A: {n_heads: 2}}", "layers: {A: {n_heads: 2}, M: {headdim: 8, d_state: 8}}"))
    out = tmp_path / "out"
    assert main(["train", str(arch), "--out", str(out), "--checkpoint-every", "2", "--stop-after", "2",
                 "--steps", "4", "--quiet"]) == 0
    assert main(["train", str(arch), "--out", str(out), "--checkpoint-every", "2", "--resume", "--steps", "4",
                 "--quiet"]) == 0
    assert checkpoint_steps(out)[-1] == 4


def test_resume_with_another_architecture_is_a_clear_error(tmp_path, capsys):
    arch = lm_arch(tmp_path)
    out = tmp_path / "out"
    assert main(["train", str(arch), "--out", str(out), "--checkpoint-every", "5", "--stop-after", "5",
                 "--quiet"]) == 0
    capsys.readouterr()
    assert main(["train", str(arch), "--out", str(out), "--resume", "--preset", "tiny"]) == 2
    err = capsys.readouterr().err
    assert "different model" in err and "Traceback" not in err


def test_a_folder_with_foreign_weights_is_a_clear_error(tmp_path, capsys):
    arch = lm_arch(tmp_path)
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["train", str(arch), "--out", str(a), "--steps", "1", "--quiet"]) == 0
    assert main(["train", str(arch), "--out", str(b), "--steps", "1", "--preset", "tiny", "--quiet"]) == 0
    (a / "model.safetensors").write_bytes((b / "model.safetensors").read_bytes())
    capsys.readouterr()
    assert main(["train", str(a), "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "do not fit the architecture" in err and "Traceback" not in err


def test_a_checkpoint_left_half_written_is_ignored_then_cleaned(tmp_path):
    arch = lm_arch(tmp_path)
    out = tmp_path / "out"
    assert main(["train", str(arch), "--out", str(out), "--checkpoint-every", "5", "--stop-after", "5",
                 "--quiet"]) == 0
    # what a run killed (SIGKILL) while saving step 10 leaves: a temp folder without its state file
    half = out / "checkpoints" / ".tmp-step-00000010-99999"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"partial")
    assert checkpoint_steps(out) == [5] and latest_train_checkpoint(out).name == "step-00000005"
    assert main(["train", str(arch), "--out", str(out), "--checkpoint-every", "5", "--resume", "--quiet"]) == 0
    assert not half.exists() and checkpoint_steps(out) == [15, 20]


def test_config_key_of_a_study_recorded_before_precision_is_unchanged():
    """A study resumed with this version still recognises its earlier trials as duplicates: the default
    precision is left out of the key; another precision is a different configuration."""
    import hashlib
    from dataclasses import asdict, replace

    from hybridnas.schema import ArchConfig, ModelConfig, TaskSpec, TrainConfig, arch_key
    from hybridnas.search import config_key

    arch = ArchConfig(ModelConfig(vocab_size=32, d_model=16, pattern="A-", layers={"A": {"n_heads": 2}}),
                      TaskSpec("mqar", {}), TrainConfig(steps=7))
    before = {k: v for k, v in asdict(arch.train).items() if k not in ("device", "threads", "precision")}
    old = hashlib.sha256((arch_key(arch.model) + json.dumps(before, sort_keys=True, default=str)).encode())
    assert config_key(arch) == old.hexdigest()[:16]
    assert config_key(replace(arch, train=replace(arch.train, precision="fp32"))) != config_key(arch)


def test_resume_after_a_kill_drops_the_lost_steps_from_logs(tmp_path):
    """Killed at step 8 with its last checkpoint at 5: the resumed run repeats 6-8, and neither train_log.jsonl
    nor TensorBoard keeps the killed run's copies of them."""
    import shutil

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    arch = lm_arch(tmp_path)
    out, tb = tmp_path / "out", tmp_path / "tb"
    assert main(["train", str(arch), "--out", str(out), "--log-dir", str(tb), "--checkpoint-every", "5",
                 "--keep", "5", "--stop-after", "8", "--quiet"]) == 0
    shutil.rmtree(out / "checkpoints" / "step-00000008")  # as if killed between the checkpoints
    assert main(["train", str(arch), "--out", str(out), "--log-dir", str(tb), "--checkpoint-every", "5",
                 "--resume", "--quiet"]) == 0
    steps = [json.loads(line)["step"] for line in (out / TRAIN_LOG).read_text().splitlines()
             if "loss" not in json.loads(line)]
    assert steps == list(range(1, 21))
    acc = EventAccumulator(str(tb))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 21))


def test_a_process_killed_mid_run_resumes_on_the_same_curve(tmp_path):
    """SIGKILL a real `hybridnas train` process once a checkpoint past step 10 exists, resume it: the losses after
    the checkpoint equal an uninterrupted run's (both stopped 10 steps later; the schedule spans 5000)."""
    import signal
    import subprocess
    import sys
    import time

    arch = lm_arch(tmp_path)
    arch.write_text(arch.read_text().replace("steps: 20,", "steps: 5000,").replace("eval_every: 5", "eval_every: 1000"))
    killed, full = tmp_path / "killed", tmp_path / "full"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "hybridnas.cli", "train", str(arch), "--out", str(killed),
                             "--checkpoint-every", "5", "--quiet"], env=env, stdout=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not [s for s in checkpoint_steps(killed) if s >= 10]:
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    at = checkpoint_steps(killed)[-1]
    assert at >= 10 and not (killed / "model.safetensors").exists()
    stop = str(at + 10)
    assert main(["train", str(arch), "--out", str(killed), "--checkpoint-every", "5", "--resume", "--stop-after",
                 stop, "--quiet"]) == 0
    assert main(["train", str(arch), "--out", str(full), "--checkpoint-every", "5", "--stop-after", stop,
                 "--quiet"]) == 0
    a, b = losses(full), losses(killed)
    assert sorted(b) == list(range(1, at + 11))
    for step in range(at + 1, at + 11):
        assert abs(a[step] - b[step]) <= 1e-6, (step, a[step], b[step])
