"""hybridnas generate: streams tokens as they come, greedy equals HybridLM.generate, bad arguments exit 2 in one
line."""

from __future__ import annotations

import io
import sys

import pytest
import torch

pytest.importorskip("tokenizers")

from hybridnas.checkpoint import save_checkpoint  # noqa: E402
from hybridnas.cli import main  # noqa: E402
from hybridnas.config import ArchConfig, ModelConfig, TaskSpec, TrainConfig  # noqa: E402
from hybridnas.model import HybridLM  # noqa: E402

BYTES = TaskSpec("lm", {"path": "data/prose.txt", "tokenizer": "bytes", "seq_len": 32})
MQAR = TaskSpec("mqar", {"vocab_size": 64, "seq_len": 16, "num_kv_pairs": 2})


def export(tmp_path, task=BYTES, vocab=257, pattern="AM"):
    arch = ArchConfig(ModelConfig(vocab_size=vocab, d_model=32, pattern=pattern, layers={"A": {"n_heads": 2}}), task,
                      TrainConfig(steps=3), {}, "gen")
    torch.manual_seed(0)
    model = HybridLM(arch.model).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return str(save_checkpoint(tmp_path / "exp", arch, model, tokenizer=True)), model


class Recorder(io.StringIO):
    """stdout that counts flushes."""

    def __init__(self):
        super().__init__()
        self.flushes = 0

    def flush(self):
        self.flushes += 1
        super().flush()


def run(monkeypatch, *argv) -> tuple[int, Recorder]:
    out = Recorder()
    monkeypatch.setattr(sys, "stdout", out)
    return main(["generate", *argv]), out


def test_greedy_ids_equal_hybridlm_and_stream(tmp_path, monkeypatch):
    folder, model = export(tmp_path, MQAR, 64)
    rc, out = run(monkeypatch, folder, "--prompt", "1 2 3 4", "--ids", "--temperature", "0", "--max-new-tokens", "9")
    assert rc == 0
    want = model.generate(torch.tensor([[1, 2, 3, 4]]), max_new_tokens=9)[0, 4:].tolist()
    assert [int(t) for t in out.getvalue().split()] == want
    assert out.flushes >= 9  # one flush per token: the tokens stream


def test_text_prompt_with_the_byte_tokenizer(tmp_path, monkeypatch):
    folder, model = export(tmp_path)
    rc, out = run(monkeypatch, folder, "--prompt", "héllo", "--temperature", "0", "--max-new-tokens", "12")
    assert rc == 0
    prompt = list("héllo".encode())
    ids = model.generate(torch.tensor([prompt]), max_new_tokens=12)[0, len(prompt):].tolist()
    stop = ids.index(256) if 256 in ids else len(ids)  # generation ends at <|endoftext|>, not printed
    text = bytes(ids[:stop]).decode("utf-8", errors="replace")
    got = out.getvalue()
    assert got.endswith("\n") and got[:-1] == text


def test_sampling_is_reproducible_with_a_seed(tmp_path, monkeypatch):
    folder, _ = export(tmp_path, MQAR, 64)
    args = (folder, "--prompt", "5 6 7", "--ids", "--max-new-tokens", "12", "--temperature", "1.5", "--top-k", "20",
            "--top-p", "0.9", "--seed", "3")
    a = run(monkeypatch, *args)[1].getvalue()
    b = run(monkeypatch, *args)[1].getvalue()
    c = run(monkeypatch, *args[:-1], "4")[1].getvalue()
    assert a == b and len(a.split()) == 12 and a != c


@pytest.mark.parametrize("argv, message", [
    (["--prompt", "hi", "--max-new-tokens", "x"], "--max-new-tokens must be an integer"),
    (["--prompt", "hi", "--max-new-tokens", "-1"], "--max-new-tokens must be >= 0"),
    (["--prompt", "hi", "--temperature", "-1"], "--temperature must be"),
    (["--prompt", "hi", "--temperature", "hot"], "--temperature must be a number"),
    (["--prompt", "hi", "--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--prompt", "hi", "--top-k", "0"], "--top-k must be"),
    (["--prompt", "hi", "--seed", "1.5"], "--seed must be an integer"),
    (["--prompt", "1 x", "--ids"], "--ids"),
    (["--prompt", "300", "--ids"], "outside the vocabulary"),
    (["--prompt", ""], "empty"),
    (["--prompt", "hi", "--device", "tpu"], "--device must be"),
])
def test_bad_arguments_are_one_line_exit_2(tmp_path, monkeypatch, capsys, argv, message):
    folder, _ = export(tmp_path)
    assert main(["generate", folder, *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_missing_folder_and_text_without_tokenizer(tmp_path, capsys):
    assert main(["generate", str(tmp_path / "nope"), "--prompt", "hi"]) == 2
    assert "not an export folder" in capsys.readouterr().err
    folder, _ = export(tmp_path, MQAR, 64)
    (tmp_path / "exp" / "tokenizer.json").unlink()
    assert main(["generate", folder, "--prompt", "hi"]) == 2
    assert "--ids" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["generate"], ["generate", "dir"], ["generate", "dir", "--prompt", "x", "--bogus"],
                                  ["serve"], ["serve", "dir", "--nope"]])
def test_usage_errors_are_one_line_exit_2(capsys, argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: hybridnas")


def test_custom_layer_code_needs_trust_custom_code(tmp_path, monkeypatch, capsys):
    from hybridnas import registry

    module = "hybridnas_test_generate_layer"
    (tmp_path / f"{module}.py").write_text("from layers.ffn import SwiGLU\n\n\nclass CustomFFN(SwiGLU):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = f"{module}:CustomFFN"
    registry.register_path("Q", path)
    try:
        arch = ArchConfig(ModelConfig(vocab_size=64, d_model=32, pattern="AQ", layers={"A": {"n_heads": 2}}), MQAR,
                          TrainConfig(steps=3), {"Q": path}, "gen")
        folder = str(save_checkpoint(tmp_path / "exp", arch, HybridLM(arch.model).eval(), tokenizer=True))
        registry.unregister("Q")
        sys.modules.pop(module, None)
        argv = ["generate", folder, "--prompt", "1 2", "--ids", "--max-new-tokens", "2", "--temperature", "0"]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "--trust-custom-code" in err and err.count("\n") == 1 and module not in sys.modules
        assert main([*argv, "--trust-custom-code"]) == 0 and module in sys.modules
    finally:
        if "Q" in registry.symbol_map():
            registry.unregister("Q")
        sys.modules.pop(module, None)
