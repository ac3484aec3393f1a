"""`hybridnas eval FOLDER`: scores a trained folder on its task (accuracy, loss, bits per byte for text), or on
another task with --task-override; bad input exits 2 in one line."""

import json

from hybridnas.cli import main

MQAR = """\
name: tiny_mqar
task: {name: mqar, vocab_size: 32, seq_len: 16, num_kv_pairs: 2, num_train: 64, num_test: 16}
model:
  d_model: 16
  pattern: "A-"
  layers: {A: {n_heads: 2}}
train: {steps: 4, batch_size: 8, eval_every: 2, warmup_steps: 1, target_accuracy: null}
"""


def _json(out: str) -> dict:
    return json.loads(out[out.rindex("\n{") + 1:out.rindex("}") + 1] if "\n{" in out else out[out.index("{"):])


def test_eval_text_export_reports_loss_accuracy_and_bits_per_byte(tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(f"line {i} says hello to the world {i % 5}\n" for i in range(300)))
    arch = tmp_path / "lm.yaml"
    arch.write_text(MQAR.replace(
        "task: {name: mqar, vocab_size: 32, seq_len: 16, num_kv_pairs: 2, num_train: 64, num_test: 16}",
        f"task: {{name: lm, path: {corpus}, seq_len: 16, split_block: 128, cache_dir: {tmp_path / 'cache'}}}"))
    out = tmp_path / "out"
    assert main(["train", str(arch), "--out", str(out), "--quiet"]) == 0
    trained = _json(capsys.readouterr().out.split("saved to")[0])
    assert main(["eval", str(out)]) == 0
    ev = _json(capsys.readouterr().out)
    assert ev["task"] == "lm" and {"accuracy", "loss", "bits_per_byte", "examples"} <= set(ev)
    # the folder holds the best-evaluated weights: eval reproduces the run's reported validation scores
    assert abs(ev["loss"] - trained["loss"]) < 1e-5
    assert abs(ev["bits_per_byte"] - trained["bits_per_byte"]) < 1e-5


def test_eval_with_task_override(tmp_path, capsys):
    arch = tmp_path / "a.yaml"
    arch.write_text(MQAR)
    out = tmp_path / "out"
    assert main(["train", str(arch), "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["eval", str(out)]) == 0
    own = _json(capsys.readouterr().out)
    assert own["task"] == "mqar" and own["examples"] == 16 and "bits_per_byte" not in own
    assert main(["eval", str(out), "--task-override", "{num_test: 8, seed: 7}"]) == 0
    other = _json(capsys.readouterr().out)
    assert other["examples"] == 8 and other["loss"] != own["loss"]


def test_eval_bad_input_is_one_line(tmp_path, capsys):
    arch = tmp_path / "a.yaml"
    arch.write_text(MQAR)
    out = tmp_path / "out"
    assert main(["train", str(arch), "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["eval", str(out), "--task-override", "{num_kv_pairs: -3}"]) == 2
    err = capsys.readouterr().err
    assert "--task-override:1: task.num_kv_pairs:" in err and "Traceback" not in err
    assert main(["eval", str(out), "--task-override", "{vocab_size: 64}"]) == 2
    assert "more than the model's 32" in capsys.readouterr().err
    assert main(["eval", str(tmp_path)]) == 2
    assert "not a model folder" in capsys.readouterr().err
