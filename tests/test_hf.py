"""Hugging Face path: an export folder loads with AutoModelForCausalLM / AutoTokenizer after ``import hybridnas``,
generate() decodes exactly like HybridLM, and custom layer code needs trust_remote_code."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

import hybridnas  # noqa: E402,F401  (registers the Auto classes)
from hybridnas import registry  # noqa: E402
from hybridnas.checkpoint import CONFIG_FILE, UntrustedCodeError, save_checkpoint  # noqa: E402
from hybridnas.config import ArchConfig, ModelConfig, TaskSpec, TrainConfig  # noqa: E402
from hybridnas.model import HybridLM  # noqa: E402

MQAR = TaskSpec("mqar", {"vocab_size": 64, "seq_len": 16, "num_kv_pairs": 2})
BYTES = TaskSpec("lm", {"path": "data/prose.txt", "tokenizer": "bytes", "seq_len": 32})
SYMBOL, MODULE = "Q", "hybridnas_test_hf_layer"


def exported(tmp_path, pattern: str, task: TaskSpec = MQAR, vocab: int = 64, symbols=None, name="export",
             tie: bool = True):
    arch = ArchConfig(ModelConfig(vocab_size=vocab, d_model=32, pattern=pattern, layers={"A": {"n_heads": 2}},
                                  tie_embeddings=tie),
                      task, TrainConfig(steps=3), dict(symbols or {}), "hf")
    torch.manual_seed(0)
    model = HybridLM(arch.model)
    with torch.no_grad():  # not a fresh init, so loading is what restores the weights
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return save_checkpoint(tmp_path / name, arch, model.eval(), tokenizer=True), model.eval()


@pytest.mark.parametrize("pattern", ["MA", "AM-", "HA"])
def test_auto_model_generates_exactly_like_hybridlm(tmp_path, pattern):
    from transformers import AutoModelForCausalLM

    from hybridnas.hf import HybridNASCache, HybridNASForCausalLM

    folder, model = exported(tmp_path, pattern)
    hf = AutoModelForCausalLM.from_pretrained(folder)
    assert isinstance(hf, HybridNASForCausalLM) and not hf.training
    x = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(1))
    assert torch.equal(hf(x).logits, model(x))
    ours = model.generate(x, max_new_tokens=10)
    out = hf.generate(x, max_new_tokens=10, do_sample=False, return_dict_in_generate=True)
    assert torch.equal(out.sequences, ours)
    # the cache generate carried: one state per block, KV for attention, a fixed-size state for Mamba/Hyena
    cache = out.cache
    assert isinstance(cache, HybridNASCache) and cache.get_seq_length() == 6 + 10 - 1
    assert len(cache.states) == len(pattern)
    for sym, state in zip(pattern, cache.states, strict=True):
        if sym == "A":
            assert state["k"].shape[2] == cache.get_seq_length()
        elif sym == "-":
            assert state is None
        else:
            assert state is not None
    assert cache.nbytes() > 0


def test_config_json_is_what_from_pretrained_needs(tmp_path):
    from transformers import AutoConfig

    from hybridnas.hf import HybridNASConfig

    folder, _ = exported(tmp_path, "AM-")
    data = json.loads((folder / CONFIG_FILE).read_text())
    assert data["model_type"] == "hybridnas" and data["architectures"] == ["HybridNASForCausalLM"]
    assert data["hybrid_override_pattern"] == "AM-"
    assert data["layer_types"] == ["full_attention", "linear_attention", "mlp"]
    config = AutoConfig.from_pretrained(folder)
    assert isinstance(config, HybridNASConfig) and config.layer_types == data["layer_types"]
    config.validate()  # what save_pretrained runs
    with pytest.raises(Exception, match="layer_types"):
        HybridNASConfig(hybrid_override_pattern="A", layer_types=["rwkv7"])


def test_save_pretrained_round_trip_and_sampling(tmp_path):
    from transformers import AutoModelForCausalLM

    folder, model = exported(tmp_path, "MA")
    hf = AutoModelForCausalLM.from_pretrained(folder)
    hf.save_pretrained(tmp_path / "again")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again")
    x = torch.randint(0, 64, (1, 5))
    assert torch.equal(again(x).logits, model(x))
    torch.manual_seed(0)
    a = again.generate(x, max_new_tokens=6, do_sample=True, temperature=0.8, top_k=10, top_p=0.9)
    torch.manual_seed(0)
    b = again.generate(x, max_new_tokens=6, do_sample=True, temperature=0.8, top_k=10, top_p=0.9)
    assert a.shape == (1, 11) and torch.equal(a, b)
    # the training path: a loss with gradients, no cache
    again.train()
    out = again(x, labels=x)
    out.loss.backward()
    assert again.embed.weight.grad is not None


def test_every_weight_loads_by_name_tied_or_not(tmp_path):
    from transformers import AutoModelForCausalLM

    for tie in (True, False):
        folder, model = exported(tmp_path, "AM-", tie=tie, name=f"tie{tie}")
        hf, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
        assert set(hf.state_dict()) == set(model.state_dict())
        x = torch.randint(0, 64, (1, 5))
        assert torch.equal(hf(x).logits, model(x))
        assert torch.equal(hf.generate(x, max_new_tokens=6, do_sample=False), model.generate(x, 6))


def test_padding_and_foreign_caches_are_refused(tmp_path):
    from transformers import AutoModelForCausalLM, DynamicCache

    folder, _ = exported(tmp_path, "MA")
    hf = AutoModelForCausalLM.from_pretrained(folder)
    x = torch.randint(0, 64, (2, 5))
    with pytest.raises(ValueError, match="padding"):
        hf(x, attention_mask=torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]]))
    with pytest.raises(TypeError, match="HybridNASCache"):
        hf(x, cache=DynamicCache())


def test_byte_tokenizer_loads_with_auto_tokenizer(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, model = exported(tmp_path, "AM", task=BYTES, vocab=257)
    tok = AutoTokenizer.from_pretrained(folder)
    text = "héllo wörld\n€"
    ids = tok(text)["input_ids"]
    assert ids == list(text.encode("utf-8")) and tok.decode(ids) == text
    assert tok.eos_token_id == 256 and json.loads((folder / CONFIG_FILE).read_text())["eos_token_id"] == 256
    hf = AutoModelForCausalLM.from_pretrained(folder)
    enc = tok("hi", return_tensors="pt")
    out = hf.generate(**enc, max_new_tokens=5, do_sample=False)
    assert torch.equal(out[:, :2], enc["input_ids"])


def test_id_tokenizer_for_mqar(tmp_path):
    from transformers import AutoTokenizer

    folder, _ = exported(tmp_path, "MA")
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok("3 17 42")["input_ids"] == [3, 17, 42] and tok.decode([3, 17, 42]) == "3 17 42"


LAYER_SOURCE = '''
from layers.ffn import SwiGLU


class CustomFFN(SwiGLU):
    """A user layer outside hybridnas."""
'''


def test_custom_layers_need_trust_remote_code(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    (tmp_path / f"{MODULE}.py").write_text(LAYER_SOURCE, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = f"{MODULE}:CustomFFN"
    registry.register_path(SYMBOL, path)
    try:
        folder, model = exported(tmp_path, f"A{SYMBOL}", symbols={SYMBOL: path})
        registry.unregister(SYMBOL)
        sys.modules.pop(MODULE, None)
        with pytest.raises(UntrustedCodeError, match="trust_remote_code=True"):
            AutoModelForCausalLM.from_pretrained(folder)
        assert MODULE not in sys.modules
        hf = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
        assert MODULE in sys.modules
        x = torch.randint(0, 64, (1, 5))
        assert torch.equal(hf(x).logits, model(x))
        registry.unregister(SYMBOL)
        sys.modules.pop(MODULE, None)
        hf = AutoModelForCausalLM.from_pretrained(folder, trust_custom_code=True)  # hybridnas's own spelling
        assert torch.equal(hf(x).logits, model(x))
    finally:
        if SYMBOL in registry.symbol_map():
            registry.unregister(SYMBOL)
        sys.modules.pop(MODULE, None)


def test_import_hybridnas_loads_no_transformers():
    code = ("import sys, time; t = time.perf_counter(); import hybridnas; dt = time.perf_counter() - t; "
            "assert 'transformers' not in sys.modules and 'torch' not in sys.modules; print(dt)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert float(out.stdout) < 0.5
    # and the registration happens when transformers' Auto classes are imported after hybridnas
    code = ("import hybridnas; from transformers import AutoConfig, AutoModelForCausalLM; "
            "from transformers.models.auto.configuration_auto import CONFIG_MAPPING; "
            "assert 'hybridnas' in CONFIG_MAPPING; import sys; assert 'hybridnas.hf' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_registration_in_either_import_order():
    # transformers' Auto modules first, hybridnas after: registered at once
    code = ("from transformers import AutoModelForCausalLM; import hybridnas; "
            "from transformers.models.auto.configuration_auto import CONFIG_MAPPING; "
            "from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING; "
            "from hybridnas.hf import HybridNASConfig, HybridNASForCausalLM; "
            "assert 'hybridnas' in CONFIG_MAPPING; "
            "assert MODEL_FOR_CAUSAL_LM_MAPPING[HybridNASConfig] is HybridNASForCausalLM")
    subprocess.run([sys.executable, "-c", code], check=True)
    # AutoConfig alone does not load the model classes
    code = ("import hybridnas, sys; from transformers import AutoConfig; AutoConfig.for_model('hybridnas'); "
            "assert 'hybridnas.hf' not in sys.modules and 'transformers.modeling_utils' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_generate_continues_from_a_returned_cache_and_beams(tmp_path):
    from transformers import AutoModelForCausalLM

    folder, model = exported(tmp_path, "AM-")
    hf = AutoModelForCausalLM.from_pretrained(folder)
    x = torch.randint(0, 64, (1, 5), generator=torch.Generator().manual_seed(2))
    out = hf.generate(x, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    more = torch.cat([out.sequences, torch.tensor([[7, 8]])], 1)
    seen = out.cache.get_seq_length()
    cont = hf.generate(more, cache=out.cache, max_new_tokens=4, do_sample=False)
    assert torch.equal(cont, model.generate(more, 4))
    assert out.cache.get_seq_length() == seen + 3 + 3  # the new tokens, then 3 steps: not the prompt again
    assert hf.generate(x, max_new_tokens=3, num_beams=2, do_sample=False).shape == (1, 8)


def test_a_text_task_tokenizer_file_is_exported_with_its_eos(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["the cat sat on the mat"] * 20,
                            trainers.BpeTrainer(vocab_size=60, special_tokens=["[UNK]", "</s>"]))
    path = tmp_path / "tok.json"
    tok.save(str(path))
    task = TaskSpec("lm", {"path": "data/prose.txt", "tokenizer": str(path), "seq_len": 32})
    folder, _ = exported(tmp_path, "AM", task=task, vocab=tok.get_vocab_size())
    eos = tok.token_to_id("</s>")
    assert json.loads((folder / CONFIG_FILE).read_text())["eos_token_id"] == eos
    auto = AutoTokenizer.from_pretrained(folder)
    assert auto.eos_token_id == eos and auto("the cat")["input_ids"] == tok.encode("the cat").ids
