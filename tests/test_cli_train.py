"""`hybridnas train ARCH.yaml`: trains, prints metrics, saves a loadable folder; bad files exit 2."""

import json

import torch

import hybridnas
from hybridnas.cli import main

ARCH = """\
name: tiny_arch
task: {name: mqar, vocab_size: 32, seq_len: 16, num_kv_pairs: 2, num_train: 64, num_test: 16}
model:
  d_model: 16
  pattern: "A-"
  layers: {A: {n_heads: 2}}
train: {steps: 4, batch_size: 8, eval_every: 2, warmup_steps: 1}
"""


def test_train_prints_metrics_and_saves(tmp_path, capsys):
    path = tmp_path / "arch.yaml"
    path.write_text(ARCH)
    assert main(["train", str(path), "--out", str(tmp_path / "out"), "--log-dir", str(tmp_path / "tb")]) == 0
    out = capsys.readouterr().out
    metrics = json.loads(out[out.index("{"):out.rindex("}") + 1])
    assert metrics["steps"] == 4 and "tokens_per_s" in metrics
    model = hybridnas.build_model(tmp_path / "out")
    assert model(torch.zeros(1, 16, dtype=torch.long)).shape == (1, 16, 32)
    # the saved architecture.yaml is itself a valid architecture file
    assert main(["validate", "--arch", str(tmp_path / "out" / "architecture.yaml")]) == 0
    assert any((tmp_path / "tb").iterdir())


def test_train_bad_file_is_a_clear_error(tmp_path, capsys):
    path = tmp_path / "arch.yaml"
    path.write_text(ARCH.replace("d_model: 16", "d_model: [16, 32]"))
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}:4: model.d_model:" in err and "Traceback" not in err
