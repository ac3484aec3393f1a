"""Local Hugging Face folders as distillation teachers (hybridnas.hf_teacher): Llama-family weights converted exactly
into a HybridLM (AF)xL, other architectures through transformers, remote code only on opt-in, bad folders refused
in one line. Every model is tiny, random, built here and saved into tmp_path: nothing downloads."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hybridnas import patterns  # noqa: E402
from hybridnas.hf_teacher import TeacherError, load_hf_teacher  # noqa: E402

V = 97


def _ids(batch=2, t=13, seed=0):
    return torch.randint(0, V, (batch, t), generator=torch.Generator().manual_seed(seed))


def _save(model, path):
    model.save_pretrained(path)
    return path


def _llama(**kw):
    base = dict(vocab_size=V, hidden_size=32, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=64,
                rope_parameters={"rope_type": "default", "rope_theta": 500.0}, tie_word_embeddings=False)
    base.update(kw)
    return transformers.LlamaConfig(**base)


def _mistral(**kw):
    base = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=1, rms_norm_eps=1e-6, max_position_embeddings=64, sliding_window=5,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    base.update(kw)
    return transformers.MistralConfig(**base)


def _qwen2(**kw):
    base = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=64, tie_word_embeddings=True,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    base.update(kw)
    return transformers.Qwen2Config(**base)


def _reference(cfg):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # v5's init leaves norms at one: move them so a mis-mapped norm shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("make,kind", [
    (lambda: _llama(), "llama"),
    (lambda: _llama(tie_word_embeddings=True, head_dim=16, mlp_bias=True), "llama"),
    (lambda: _mistral(), "mistral"),  # sliding window 5 < 13 tokens: the window must map
    (lambda: _qwen2(), "qwen2"),      # q/k/v biases, tied head
])
def test_llama_family_converts_exactly(tmp_path, make, kind):
    ref = _reference(make())
    _save(ref, tmp_path)
    teacher = load_hf_teacher(tmp_path)
    assert teacher.kind == kind and teacher.hybrid is not None and teacher.not_mapped is None
    n = ref.config.num_hidden_layers
    assert patterns.layer_symbols(teacher.hybrid.cfg.pattern) == list("AF" * n)
    assert teacher.vocab_size == V and teacher.tokenizer_path is None
    ids = _ids()
    with torch.no_grad():
        want = ref(input_ids=ids).logits
        got = teacher.model(ids)
        assert torch.allclose(teacher.hybrid(ids), want, atol=1e-4, rtol=0)
    assert not teacher.model.training
    assert torch.allclose(got, want, atol=1e-4, rtol=0)
    assert teacher.hybrid.num_params() == ref.num_parameters()


def test_unmappable_llama_falls_back_to_transformers_and_says_why(tmp_path):
    ref = _reference(_llama(attention_bias=True))  # o_proj has a bias: the A layer has no place for it
    _save(ref, tmp_path)
    teacher = load_hf_teacher(tmp_path)
    assert teacher.hybrid is None and teacher.kind == "llama"
    assert "o_proj" in teacher.not_mapped and "bias" in teacher.not_mapped
    ids = _ids()
    with torch.no_grad():
        assert torch.allclose(teacher.model(ids), ref(input_ids=ids).logits, atol=1e-5)


def test_scaled_rope_is_not_mapped(tmp_path):
    rope = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    _save(_reference(_llama(rope_parameters=rope)), tmp_path)
    teacher = load_hf_teacher(tmp_path)
    assert teacher.hybrid is None and "rope_type 'linear'" in teacher.not_mapped


def test_layers_with_different_windows_are_not_mapped(tmp_path):
    # Qwen2 slides only from layer max_window_layers on: one A symbol cannot hold two windows
    _save(_reference(_qwen2(use_sliding_window=True, sliding_window=4, max_window_layers=1)), tmp_path)
    teacher = load_hf_teacher(tmp_path)
    assert teacher.hybrid is None and "window" in teacher.not_mapped


def test_v4_style_rope_theta_in_config_json(tmp_path):
    # a folder written by transformers 4.x keeps rope_theta at the top level (no rope_parameters)
    ref = _reference(_llama(rope_parameters={"rope_type": "default", "rope_theta": 50.0}))
    _save(ref, tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw.pop("rope_parameters")
    raw["rope_theta"], raw["rope_scaling"] = 50.0, None
    (tmp_path / "config.json").write_text(json.dumps(raw))
    teacher = load_hf_teacher(tmp_path)
    assert teacher.hybrid is not None and teacher.hybrid.cfg.layers["A"]["rope_theta"] == 50.0
    ids = _ids()
    with torch.no_grad():
        assert torch.allclose(teacher.model(ids), ref(input_ids=ids).logits, atol=1e-4, rtol=0)


def test_other_architecture_is_the_transformers_model(tmp_path):
    cfg = transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=32)
    ref = _reference(cfg)
    _save(ref, tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    teacher = load_hf_teacher(tmp_path)
    assert teacher.hybrid is None and teacher.kind == "gpt2" and teacher.vocab_size == V
    assert teacher.tokenizer_path == tmp_path / "tokenizer.json"
    assert not teacher.model.training
    ids = _ids()
    with torch.no_grad():
        assert torch.allclose(teacher.model(ids), ref(input_ids=ids).logits, atol=1e-5)


def _remote_code_folder(tmp_path):
    sentinel = tmp_path / "EXECUTED"
    folder = tmp_path / "custom"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "sneaky", "vocab_size": V,
        "auto_map": {"AutoConfig": "configuration_sneaky.SneakyConfig",
                     "AutoModelForCausalLM": "modeling_sneaky.SneakyForCausalLM"}}))
    code = f"import pathlib\npathlib.Path({str(sentinel)!r}).write_text('ran')\n"
    (folder / "configuration_sneaky.py").write_text(code)
    (folder / "modeling_sneaky.py").write_text(code)
    return folder, sentinel


def test_remote_code_refused_without_opt_in_and_nothing_runs(tmp_path):
    folder, sentinel = _remote_code_folder(tmp_path)
    with pytest.raises(TeacherError) as e:
        load_hf_teacher(folder)
    msg = str(e.value)
    assert str(folder) in msg and "trust_remote_code" in msg and "\n" not in msg
    assert not sentinel.exists()


def test_remote_code_opt_in_is_passed_to_transformers(tmp_path, monkeypatch):
    folder, sentinel = _remote_code_folder(tmp_path)
    seen = {}

    class Stop(BaseException):  # not an Exception: the loader's one-line error wrapping must not swallow it
        pass

    def fake(path, **kwargs):
        seen.update(kwargs, path=path)
        raise Stop

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake)
    with pytest.raises(Stop):
        load_hf_teacher(folder, trust_remote_code=True)
    assert seen["trust_remote_code"] is True and seen["local_files_only"] is True
    assert not sentinel.exists()  # the fake loader ran nothing


def test_unknown_model_type_without_code_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "nosuchthing", "vocab_size": 3}))
    with pytest.raises(TeacherError, match="nosuchthing"):
        load_hf_teacher(tmp_path)


@pytest.mark.parametrize("setup,match", [
    (lambda p: None, "no config.json"),
    (lambda p: (p / "config.json").write_text('{"model_type": "llama",\n  "vocab_size": }'), r"config.json:2:"),
    (lambda p: (p / "config.json").write_text('[1, 2]'), "JSON object"),
    (lambda p: (p / "config.json").write_text('{"vocab_size": 3}'), "model_type"),
])
def test_not_a_model_folder(tmp_path, setup, match):
    setup(tmp_path)
    with pytest.raises(TeacherError, match=match) as e:
        load_hf_teacher(tmp_path)
    assert str(tmp_path) in str(e.value) and "\n" not in str(e.value)


def test_broken_weights_file_is_one_line(tmp_path):
    _save(_reference(_llama()), tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(TeacherError, match="model.safetensors") as e:
        load_hf_teacher(tmp_path)
    assert "\n" not in str(e.value)


def test_invalid_llama_config_is_one_line(tmp_path):
    _save(_reference(_llama()), tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["num_attention_heads"] = 5  # 32 is not divisible by 5: transformers' own validation refuses it
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(TeacherError) as e:
        load_hf_teacher(tmp_path)
    assert str(tmp_path) in str(e.value) and "\n" not in str(e.value)


def test_missing_folder(tmp_path):
    with pytest.raises(TeacherError, match="no such folder"):
        load_hf_teacher(tmp_path / "absent")


def test_hybridnas_export_is_its_own_hybrid(tmp_path):
    from hybridnas.checkpoint import save_checkpoint
    from hybridnas.model import HybridLM
    from hybridnas.schema import ArchConfig, ModelConfig, TaskSpec, TrainConfig

    arch = ArchConfig(model=ModelConfig(vocab_size=257, d_model=32, pattern="AFMF"), task=TaskSpec("lm", {}),
                      train=TrainConfig())
    torch.manual_seed(0)
    model = HybridLM(arch.model).eval()
    save_checkpoint(tmp_path, arch, model)
    teacher = load_hf_teacher(tmp_path)
    assert teacher.kind == "hybridnas" and teacher.hybrid is teacher.model
    ids = _ids()
    assert teacher.vocab_size == 257
    with torch.no_grad():
        assert torch.equal(teacher.model(ids), model(ids))
