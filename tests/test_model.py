"""HybridLM: parameter formula, init ownership, aux losses, decoding through prefill + step."""

from dataclasses import dataclass

import pytest
import torch

from hybridnas import registry
from hybridnas.config import ModelConfig
from hybridnas.model import HybridLM
from layers.base import TokenwiseLayer


def cfg(pattern: str, **kw) -> ModelConfig:
    layers = kw.pop("layers", {"A": {"n_heads": 2}, "E": {"n_experts": 4, "top_k": 2}})
    return ModelConfig(vocab_size=48, d_model=32, pattern=pattern, layers=layers, **kw)


@pytest.mark.parametrize("pattern", ["AA", "A-A-", "(AE)x2", "AFE*"])
@pytest.mark.parametrize("tie", [True, False])
def test_param_count_formula_is_exact(pattern, tie):
    c = cfg(pattern, tie_embeddings=tie)
    model = HybridLM(c)
    assert HybridLM.param_count(c) == model.num_params()


def test_aliases_build_the_same_model_as_primaries():
    torch.manual_seed(0)
    a = HybridLM(cfg("A-A-"))
    torch.manual_seed(0)
    b = HybridLM(cfg("AFAF"))
    x = torch.randint(0, 48, (2, 10))
    torch.testing.assert_close(a(x), b(x))


@dataclass
class _MarkedConfig:
    value: float = 7.0


class _Marked(TokenwiseLayer):
    """A layer whose own init is unmistakable: every weight equals config.value."""

    Config = _MarkedConfig

    def __init__(self, d_model, config=None, *, layer_idx=0, n_layers=1):
        super().__init__(d_model, config, layer_idx=layer_idx, n_layers=n_layers)
        self.proj = torch.nn.Linear(d_model, d_model, bias=True)
        self.reset_parameters()

    @classmethod
    def param_count(cls, d_model, config):
        return d_model * d_model + d_model

    def reset_parameters(self):
        torch.nn.init.constant_(self.proj.weight, self.config.value / 100)
        torch.nn.init.constant_(self.proj.bias, self.config.value)

    def forward(self, x, ctx=None):
        return self.proj(x)


@pytest.fixture
def marked_symbol():
    registry.register("Q", _Marked)
    yield "Q"
    registry.unregister("Q")


def test_layer_init_survives_model_init(marked_symbol):
    model = HybridLM(ModelConfig(vocab_size=16, d_model=8, pattern="AQ", layers={"Q": {"value": 3.0}}))
    layer = model.blocks[1].layer
    assert torch.all(layer.proj.bias == 3.0)
    assert torch.all(layer.proj.weight == 0.03)
    model.init_weights()  # an explicit re-init must still defer to the layer
    assert torch.all(layer.proj.bias == 3.0)


def test_attention_out_projection_keeps_its_depth_scaled_init():
    torch.manual_seed(0)
    model = HybridLM(ModelConfig(vocab_size=64, d_model=256, pattern="A" * 8, layers={"A": {"n_heads": 4}}))
    out_std = model.blocks[0].layer.out.weight.std().item()
    assert out_std == pytest.approx(0.02 / 4, rel=0.1)  # 0.02 / sqrt(2 * 8)
    assert model.embed.weight.std().item() == pytest.approx(0.02, rel=0.1)


def test_aux_loss_collected_from_moe_layers():
    model = HybridLM(cfg("AEAE"))
    x = torch.randint(0, 48, (2, 12))
    model(x)
    aux = model.aux_loss()
    per_layer = [b.layer.aux_loss() for b in model.blocks if b.layer.aux_loss() is not None]
    assert len(per_layer) == 2
    torch.testing.assert_close(aux, per_layer[0] + per_layer[1])
    assert HybridLM(cfg("AA")).aux_loss() is None


@pytest.mark.parametrize("pattern", ["AA", "A-E*", "(AF)x2"])
def test_prefill_then_step_matches_forward(pattern):
    torch.manual_seed(1)
    model = HybridLM(cfg(pattern)).eval()
    x = torch.randint(0, 48, (2, 15))
    full = model(x)
    logits, state = model.prefill(x[:, :9])
    torch.testing.assert_close(logits, full[:, :9], atol=1e-5, rtol=0)
    for t in range(9, 15):
        step_logits, state = model.step(x[:, t], state)
        torch.testing.assert_close(step_logits, full[:, t], atol=1e-5, rtol=0)


def test_generate_greedy_equals_repeated_full_forward():
    torch.manual_seed(2)
    model = HybridLM(cfg("A-A-")).eval()
    prompt = torch.randint(0, 48, (2, 6))
    out = model.generate(prompt, max_new_tokens=5)
    seq = prompt
    for _ in range(5):
        nxt = model(seq)[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    assert torch.equal(out, seq)


def test_generate_sampling_is_seeded():
    model = HybridLM(cfg("AA")).eval()
    prompt = torch.randint(0, 48, (1, 4))
    a = model.generate(prompt, 6, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(3))
    b = model.generate(prompt, 6, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_state_size_grows_for_attention_only():
    model = HybridLM(cfg("AF"))
    assert model.state_size(1, 200) == 2 * model.state_size(1, 100)
    assert HybridLM(cfg("FE")).state_size(1, 1000) == 0


def test_untied_head_is_separate():
    model = HybridLM(cfg("AA", tie_embeddings=False))
    assert model.lm_head is not None and model.lm_head.weight.data_ptr() != model.embed.weight.data_ptr()
